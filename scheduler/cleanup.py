"""Cleanups a migration could not finish because a host did not answer, retried until done.

A rollback or confirm step whose host stays silent beyond ``cleanup_timeout`` (agent
dead, host down) is not forgotten: it stays in the migration's journal record
(``record.cleanup``, in order) and a task per record retries it with capped, jittered
backoff, at once when the host's heartbeats return (:meth:`CleanupRunner.host_alive`), and
after a scheduler restart (the record is reloaded). So an orphaned incoming QEMU on a
destination that was down is killed (``finish(success=False)``) when it comes back, and a
source left paused because the destination might have run the guest is resumed only after
the destination answered that it does not (``confirm(success=False)`` queued behind it).

If the destination answers that it *does* run the guest (it finished before it went
silent), the remaining steps are replaced by ``confirm(success=True)`` on the source: the
guest stays where it runs, never on two hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from scheduler.inventory import ClusterView
from scheduler.journal import MigrationJournal, MigrationRecord
from scheduler.settings import SchedulerSettings
from virtbus.aio import TaskGroup, backoff_delays
from virtbus.errors import (
    MigrateFailed,
    NoConnect,
    NoDomainError,
    OperationInvalid,
    RetryableError,
    VirtbusError,
)
from virtbus.protocol import ops
from virtbus.protocol.base import Message
from virtbus.protocol.domain import DomainInfo
from virtbus.protocol.migration import MigrationEnd, MigrationOutcome, RecordState
from virtbus.protocol.registry import Op

log = logging.getLogger(__name__)

Req = TypeVar("Req", bound=Message)
Res = TypeVar("Res", bound=Message)


class AgentCall(Protocol):
    """One call to a host's agent; the answer is the op's typed result, checked where it
    enters (a malformed one is RPC_ERROR)."""

    def __call__(
        self, host: str, op: Op[Req, Res], request: Req, timeout: float
    ) -> Awaitable[Res]: ...


def cleanup_step(host: str, op: str, success: bool) -> dict[str, Any]:
    """One journaled cleanup step: ``op`` (finish/confirm) with ``success`` on ``host``."""
    return {"host": host, "op": str(op), "success": success}


def destination_owns(answer: MigrationOutcome | DomainInfo | None) -> bool:
    """A finish (or info) answer that says the destination runs the guest as its own."""
    return answer is not None and bool(answer.persistent) and answer.state == "running"


class CleanupRunner:
    """Runs the pending cleanups of finished migrations (see module docstring)."""

    def __init__(
        self,
        call: AgentCall,
        view: ClusterView,
        journal: MigrationJournal,
        settings: SchedulerSettings,
        tasks: TaskGroup,
    ) -> None:
        self._call = call
        self.view = view
        self.journal = journal
        self.settings = settings
        self._tasks = tasks
        self.pending: dict[str, MigrationRecord] = {}  # by record id
        self._alive: dict[str, asyncio.Event] = {}  # by host: a heartbeat arrived

    def busy(self, uuid: str) -> bool:
        """A domain with a cleanup pending must not migrate again until it is done."""
        return any(r.uuid == uuid for r in self.pending.values())

    def host_alive(self, host: str) -> None:
        """A heartbeat of ``host``: wake the cleanups waiting for it."""
        event = self._alive.get(host)
        if event is not None:
            event.set()

    async def start(self, record: MigrationRecord) -> None:
        """Journal the record with its cleanup steps and start retrying them."""
        if record.id in self.pending:
            return
        self.pending[record.id] = record
        await self.journal.save(record)
        self._tasks.spawn(self._run(record), name=f"migration:{record.id}:cleanup")

    async def _run(self, record: MigrationRecord) -> None:
        delays = backoff_delays(self.settings.cleanup_backoff)
        while record.cleanup:
            step = record.cleanup[0]
            host = step["host"]
            if not self.view.is_up(host):
                await self._wait_for(host, self.settings.cleanup_backoff.maximum)
                if not self.view.is_up(host):
                    continue
                delays = backoff_delays(self.settings.cleanup_backoff)  # it is back: retry now
            try:
                answer = await self._call(
                    host,
                    ops.lookup(step["op"]),
                    MigrationEnd(domain=record.uuid, success=step["success"]),
                    self.settings.step_timeout,
                )
            except (RetryableError, NoConnect) as exc:
                log.info("migration %s: cleanup %s on %s: %s", record.id, step["op"], host, exc)
                await self._wait_for(host, next(delays), wake_on_heartbeat=False)
                continue
            except (NoDomainError, OperationInvalid, MigrateFailed) as exc:
                log.info("migration %s: cleanup %s on %s: %s", record.id, step["op"], host, exc)
                answer = None  # nothing left to undo there
            except VirtbusError as exc:  # answered but could not do it: an operator may fix it
                log.error("migration %s: cleanup %s on %s failed: %s",
                          record.id, step["op"], host, exc)  # fmt: skip
                await self._wait_for(host, next(delays), wake_on_heartbeat=False)
                continue
            self._done(record, step, answer)
            if record.cleanup:
                await self.journal.save(record)
        self.pending.pop(record.id, None)
        await self.journal.remove(record)
        log.warning("migration %s of %s: cleanup done (%s on %s)",
                    record.id, record.domain, record.state, self._where(record))  # fmt: skip

    def _done(self, record: MigrationRecord, step: dict[str, Any], answer: Any) -> None:
        record.cleanup.pop(0)
        record.updated = time.time()
        if step["op"] == ops.MIGRATION_FINISH and not step["success"] and destination_owns(answer):
            log.warning("migration %s: the destination runs %s: confirming on the source",
                        record.id, record.domain)  # fmt: skip
            record.cleanup = [cleanup_step(record.source, ops.MIGRATION_CONFIRM, True)]
            record.state, record.error = RecordState.COMPLETED, None
            self.view.domain_moved(record.uuid, record.source, record.destination)

    @staticmethod
    def _where(record: MigrationRecord) -> str:
        return record.destination if record.state == "completed" else record.source

    async def _wait_for(self, host: str, delay: float, *, wake_on_heartbeat: bool = True) -> None:
        """Sleep ``delay``; with ``wake_on_heartbeat``, end early when ``host`` is heard."""
        event = self._alive.setdefault(host, asyncio.Event())
        event.clear()
        if not wake_on_heartbeat:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await event.wait()
