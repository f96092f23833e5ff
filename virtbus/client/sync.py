"""A synchronous facade for scripts: the async client run on an event loop of its own.

::

    with connect_sync() as c:
        dom = c.host("a").define(xml)
        dom.start()
        for ev in c.events(host="a", since=0):
            print(ev.event)

Every method of :class:`~virtbus.client.Client` and its handles is there, with the same
arguments and results; coroutines are run to completion, async iterators become plain
iterators. Use it from one thread; in async code use the async client itself.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

from virtbus.client.core import Client, Domain, Host, Scheduler

T = TypeVar("T")
_HANDLES = (Host, Domain, Scheduler)


class _SyncIterator(Generic[T]):
    def __init__(self, runner: asyncio.Runner, source: AsyncIterator[T]) -> None:
        self._runner = runner
        self._source = source

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        try:
            return self._runner.run(self._source.__anext__())  # type: ignore[arg-type]
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        aclose = getattr(self._source, "aclose", None)
        if aclose is not None:
            self._runner.run(aclose())


class SyncProxy:
    """Runs the wrapped object's coroutine methods to completion."""

    def __init__(self, runner: asyncio.Runner, target: Any) -> None:
        self._runner = runner
        self._target = target

    def __repr__(self) -> str:
        return f"sync {self._target!r}"

    def _wrap(self, value: Any) -> Any:
        if isinstance(value, _HANDLES):
            return SyncProxy(self._runner, value)
        if inspect.isasyncgen(value) or (
            hasattr(value, "__anext__") and not inspect.iscoroutine(value)
        ):
            return _SyncIterator(self._runner, value)
        return value

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value):
            return self._wrap(value)

        def call(*args: Any, **kwargs: Any) -> Any:
            result = value(*args, **kwargs)
            if inspect.iscoroutine(result):
                result = self._runner.run(result)
            return self._wrap(result)

        call.__name__ = name
        call.__doc__ = getattr(value, "__doc__", None)
        return call


class SyncClient(SyncProxy):
    """:class:`Client`, synchronously; close it (or use ``with``) to end its loop."""

    def __init__(self, runner: asyncio.Runner, client: Client) -> None:
        super().__init__(runner, client)
        self.client = client

    def close(self) -> None:
        try:
            self._runner.run(self.client.close())
        finally:
            self._runner.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def connect_sync(url: str | None = None, **options: Any) -> SyncClient:
    """:meth:`Client.connect`, for scripts without an event loop."""
    runner = asyncio.Runner()
    try:
        client = runner.run(Client.connect(url, **options))
    except BaseException:
        runner.close()
        raise
    return SyncClient(runner, client)
