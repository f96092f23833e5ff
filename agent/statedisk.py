"""Whether the agent's state dir takes writes, as the writers that depend on it see it.

The event outbox and the reply log write to ``<state-dir>``; when a write fails (the disk
is full, a quota, an I/O error) the writer reports it here instead of dying. While any
writer is failing the agent refuses new work (every op but the read-only ones) with
OPERATION_FAILED naming the directory and the error: what it had accepted is finished and
published, nothing new is taken on that it could not record. A probe writes one page to
``<state-dir>/.write-probe`` every ``probe_interval`` seconds meanwhile; once that works
the failures are forgotten (a writer that still cannot write reports again) and the
writers are told, so the outbox writes what it owes at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from virtbus.aio import TaskGroup
from virtbus.errors import OperationFailed

log = logging.getLogger(__name__)
PROBE = b"\0" * 4096


class StateDisk:
    def __init__(self, path: Path, probe_interval: float = 1.0) -> None:
        self.path = path
        self._interval = probe_interval
        self._failing: dict[str, OSError] = {}  # writer -> its last error
        self._listeners: list[Callable[[], None]] = []
        self._tasks = TaskGroup("state-disk")
        self._probe: asyncio.Task[None] | None = None

    @property
    def error(self) -> OSError | None:
        return next(iter(self._failing.values()), None)

    def on_recover(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def failed(self, writer: str, exc: OSError) -> None:
        """Called from the event loop by a writer whose write failed."""
        if writer not in self._failing:
            log.error("%s cannot write to %s (%s): refusing new work until it can",
                      writer, self.path, exc.strerror or exc)  # fmt: skip
        self._failing[writer] = exc
        if self._probe is None or self._probe.done():
            self._probe = self._tasks.spawn(self._wait_for_room(), name="state-disk:probe")

    def ok(self, writer: str) -> None:
        if self._failing.pop(writer, None) is not None and not self._failing:
            log.warning("the state dir %s takes writes again: accepting work", self.path)

    def check(self) -> None:
        """OPERATION_FAILED while a writer cannot write (the gate for new work)."""
        exc = self.error
        if exc is not None:
            raise OperationFailed(
                f"the agent's state dir {self.path} cannot be written"
                f" ({exc.strerror or exc}): refusing new work until it can; read-only"
                " calls are still served"
            )

    async def _wait_for_room(self) -> None:
        while self._failing:
            await asyncio.sleep(self._interval)
            try:
                await asyncio.to_thread(self._write_probe)
            except OSError:
                continue
            self._failing.clear()
            log.warning("the state dir %s takes writes again: accepting work", self.path)
            for listener in self._listeners:
                listener()

    def _write_probe(self) -> None:
        probe = self.path / ".write-probe"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, PROBE)
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)

    async def close(self) -> None:
        await self._tasks.cancel_all()
