"""asyncio helpers: supervised named tasks, staged shutdown, jittered backoff."""

from __future__ import annotations

import asyncio
import logging
import random
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from virtbus.settings import Backoff

log = logging.getLogger(__name__)


def backoff_delays(policy: Backoff) -> Iterator[float]:
    """Exponential, capped, jittered delays: never a thundering herd of reconnects."""
    delay = policy.initial
    while True:
        low = delay * (1.0 - policy.jitter)
        yield random.uniform(low, delay)
        delay = min(policy.maximum, delay * policy.factor)


def log_task_failure(task: asyncio.Task[Any]) -> BaseException | None:
    """A done task's failure, logged with the task's name (the one place that does it);
    cancellation is not a failure. Also usable as a done callback."""
    if task.cancelled():
        return None
    exc = task.exception()
    if exc is not None:
        log.error("task %s failed: %r", task.get_name(), exc, exc_info=exc)
    return exc


def forget(answer: asyncio.Future[Any] | None) -> None:
    """An answer no longer wanted: cancelled, or, when it came meanwhile, its outcome
    retrieved (so that an error in it is never logged as lost)."""
    if answer is not None and not answer.cancel() and not answer.cancelled():
        answer.exception()


class TaskGroup:
    """Named background tasks that never fail into nowhere.

    A task that raises is logged with its name and, if ``on_crash`` is set, reported so
    the owner can stop or restart; ``stop`` cancels stragglers after a grace period.
    """

    def __init__(self, owner: str, on_crash: Callable[[str, BaseException], None] | None = None):
        self._owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_crash = on_crash

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"{self._owner}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        exc = log_task_failure(task)
        if exc is not None and self._on_crash is not None:
            self._on_crash(task.get_name(), exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def stop(self, grace: float) -> None:
        """Let tasks finish within ``grace`` seconds, then cancel what is left."""
        pending = set(self._tasks)
        if not pending:
            return
        _, still = await asyncio.wait(pending, timeout=grace)
        for task in still:
            task.cancel()
        if still:
            await asyncio.wait(still)

    async def cancel_all(self) -> None:
        await self.stop(0)


def configure_logging(level: str) -> None:
    """The daemons' log format, on stderr (systemd's journal timestamps it again)."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
