"""Live migration as a journaled state machine over the agents' v3 steps.

Forward: ``begin`` (source: check, XML) and ``prepare`` (destination: paused incoming
instance, URI) *together* (the scheduler already holds the XML from placing it) →
``perform`` (source: start streaming) → ``progress`` (``migration.status`` is a long
poll the source's agent answers as QEMU reports the end, so the end is seen without a
polling interval; the source's ``migration`` events carry the progress meanwhile) →
``finish`` (destination resumes and owns the definition) → ``confirm`` (source stops,
drops its definition) → ``done``.

Rollback, from any failure, timeout or cancel before ``finish`` succeeded: cancel on the
source, ``finish(success=False)`` on the destination (its instance is killed),
``confirm(success=False)`` on the source (resumed if the migration paused it): the guest
runs in exactly one place. Once the destination runs the guest (finish succeeded, or a
post-copy is under way) there is no way back: the coordinator only goes forward.

A copy-storage migration (``params.copy_storage``) runs ``begin`` *then* ``prepare``
(the destination makes its volumes from the disks the source lists, and answers the NBD
target the source mirrors into) and has one more phase, ``storage``, between ``perform``
and ``progress``: the source mirrors the disks, and sends memory once they are copied (its
``migration`` events say ``phase: memory``). Rollback is the same: ``cancel`` stops the
mirrors or the stream, ``finish(success=False)`` removes the volumes the destination made.

Every phase that recovery tells apart is written to the journal before its step
(``prepare``, ``perform``, ``storage``, ``finish``, ``confirm``, ``rollback``; a queued
migration that never started, and ``progress``, which recovers like ``perform``, are
not), so a
restarted scheduler resumes each migration after asking the agents what really happened
(:meth:`MigrationCoordinator.recover`). A step a silent host still owes after
``cleanup_timeout`` is kept in the record and retried (:mod:`scheduler.cleanup`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from enum import Enum
from typing import Any

from scheduler.cleanup import AgentCall, CleanupRunner, Req, Res, cleanup_step, destination_owns
from scheduler.inventory import ClusterView
from scheduler.journal import MigrationJournal, MigrationRecord
from scheduler.settings import SchedulerSettings
from virtbus import faults
from virtbus.aio import TaskGroup, forget
from virtbus.errors import (
    MigrateFailed,
    NoConnect,
    NoDomainError,
    OperationInvalid,
    ProtocolError,
    RetryableError,
    VirtbusError,
)
from virtbus.protocol import ops
from virtbus.protocol.base import to_wire
from virtbus.protocol.domain import DomainTarget
from virtbus.protocol.messages import DomainEvent
from virtbus.protocol.migration import (
    STATUS_WAIT_MAX,
    MigrationBegin,
    MigrationDomain,
    MigrationEnd,
    MigrationOutcome,
    MigrationPerform,
    MigrationPrepare,
    MigrationState,
    MigrationStatus,
    MigrationStatusQuery,
    NbdTarget,
    RecordState,
)
from virtbus.protocol.migration import MigrationPhase as Phase
from virtbus.protocol.registry import Op

log = logging.getLogger(__name__)

ACTIVE_STATUSES = frozenset(
    {
        MigrationState.SETUP,
        MigrationState.ACTIVE,
        MigrationState.DEVICE,
        MigrationState.PRE_SWITCHOVER,
        MigrationState.WAIT_UNPLUG,
    }
)
POSTCOPY_STATUSES = frozenset(
    {
        MigrationState.POSTCOPY_ACTIVE,
        MigrationState.POSTCOPY_PAUSED,
        MigrationState.POSTCOPY_RECOVER,
        MigrationState.POSTCOPY_RECOVER_SETUP,
    }
)


class _Unfinished(Enum):
    GAVE_UP = "gave up"  # a cleanup step the agent refused (it answered with an error)
    UNREACHABLE = "unreachable"  # its host never answered: left to CleanupRunner


_GAVE_UP, _UNREACHABLE = _Unfinished.GAVE_UP, _Unfinished.UNREACHABLE
_UNJOURNALED = frozenset({Phase.PROGRESS})  # recovered like the phase before: not written
# the source is streaming: disks first (copy-storage), then memory
_STREAMING = frozenset({Phase.PERFORM, Phase.STORAGE, Phase.PROGRESS})


async def _first(wake: asyncio.Event, answer: asyncio.Future[Any] | None, limit: float) -> None:
    """Until ``wake`` is set, ``answer`` is done or ``limit`` seconds passed."""
    waiting: asyncio.Future[Any] = asyncio.ensure_future(wake.wait())
    try:
        await asyncio.wait(
            {waiting} if answer is None else {waiting, answer},
            timeout=limit,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        waiting.cancel()


class _Rollback(Exception):
    """Internal control flow: undo the migration with this end state."""

    def __init__(self, state: RecordState, error: str | None) -> None:
        super().__init__(error)
        self.state, self.error = state, error


class MigrationCoordinator:
    """Runs migrations within the concurrency limits; see the module docstring."""

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
        self.active: dict[str, MigrationRecord] = {}  # by id
        self.history: collections.deque[MigrationRecord] = collections.deque(
            maxlen=settings.history
        )
        self._wake: dict[str, asyncio.Event] = {}  # by id: a migration event arrived
        self._changed: dict[str, asyncio.Event] = {}  # by id: set (and dropped) on a change
        self._xml: dict[str, str] = {}  # by id: the source's XML from placement (not journaled)
        self.cleanups = CleanupRunner(call, view, journal, settings, tasks)
        self._slots = asyncio.Condition()
        self._running_out: collections.Counter[str] = collections.Counter()
        self._running = 0

    # --- queries --------------------------------------------------------------------
    def for_domain(self, ref: str) -> MigrationRecord | None:
        """The migration in flight for ``ref`` (name or uuid), else the latest finished one."""
        for rec in self.active.values():
            if ref in (rec.domain, rec.uuid, rec.id):
                return rec
        for rec in reversed(self.history):
            if ref in (rec.domain, rec.uuid, rec.id):
                return rec
        return None

    def busy(self, uuid: str) -> bool:
        return any(r.uuid == uuid for r in self.active.values()) or self.cleanups.busy(uuid)

    async def wait_change(self, record: MigrationRecord, timeout: float) -> None:
        """Long poll: return when ``record`` changes (phase, state, progress) or at ``timeout``."""
        if record.terminal:
            return
        event = self._changed.setdefault(record.id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()

    def _notify(self, record: MigrationRecord) -> None:
        event = self._changed.pop(record.id, None)
        if event is not None:
            event.set()

    # --- submission -----------------------------------------------------------------
    async def submit(self, record: MigrationRecord, xml: str | None = None) -> MigrationRecord:
        """Start a new (already placed) migration; ``xml`` is the source's live definition.

        It is journaled when it starts (``prepare``): one that was still waiting for a slot
        when the scheduler stopped had done nothing, and is forgotten.
        """
        if self.busy(record.uuid):
            raise OperationInvalid(f"domain '{record.domain}' is already migrating")
        self.active[record.id] = record
        if xml is not None:
            self._xml[record.id] = xml
        self._spawn(record, counted=False)
        return record

    def _spawn(self, record: MigrationRecord, *, counted: bool) -> None:
        self._wake[record.id] = asyncio.Event()
        self._tasks.spawn(self._run(record, counted), name=f"migration:{record.id}")

    def cancel(self, ref: str) -> MigrationRecord:
        record = next((r for r in self.active.values() if ref in (r.domain, r.uuid, r.id)), None)
        if record is None:
            raise OperationInvalid(f"no migration in progress for '{ref}'")
        record.cancel_requested = True
        self._poke(record)
        return record

    def on_event(self, event: DomainEvent) -> None:
        """A ``migration`` event from an agent: note the progress, wake its follower."""
        for record in self.active.values():
            if record.source == event.host and record.uuid == event.uuid:
                if event.data:
                    record.progress = dict(event.data)
                    self._notify(record)
                self._poke(record)

    def _poke(self, record: MigrationRecord) -> None:
        wake = self._wake.get(record.id)
        if wake is not None:
            wake.set()

    # --- limits ---------------------------------------------------------------------
    async def _acquire(self, record: MigrationRecord) -> None:
        """Wait for a slot within the limits (a queued migration can still be cancelled)."""
        s = self.settings
        async with self._slots:
            while not (
                self._running < s.max_migrations
                and self._running_out[record.source] < s.max_outbound_per_host
            ):
                if record.cancel_requested:
                    raise _Rollback(RecordState.CANCELLED, "cancelled before it started")
                try:
                    async with asyncio.timeout(s.progress_poll):
                        await self._slots.wait()
                except TimeoutError:
                    pass
            self._take(record)

    def _take(self, record: MigrationRecord) -> None:
        self._running += 1
        self._running_out[record.source] += 1

    async def _release(self, record: MigrationRecord) -> None:
        async with self._slots:
            self._running -= 1
            self._running_out[record.source] -= 1
            self._slots.notify_all()

    # --- the state machine ----------------------------------------------------------
    async def _run(self, record: MigrationRecord, counted: bool) -> None:
        holding = counted
        try:
            if not counted:
                await self._acquire(record)
                holding = True
            await self._forward(record)
        except _Rollback as rb:
            if record.phase == Phase.QUEUED:
                record.state, record.error = rb.state, rb.error
            else:
                await self._guarded_rollback(record, rb.state, rb.error)
        except Exception as exc:  # a bug must not take the scheduler down
            log.exception("migration %s failed unexpectedly", record.id)
            record.state, record.error = RecordState.FAILED, f"internal error: {exc!r}"
        finally:
            if holding:
                await self._release(record)
            await self._finalize(record)

    async def _forward(self, record: MigrationRecord) -> None:
        """Run from the record's phase to ``done``; raise _Rollback to undo."""
        s = self.settings
        if record.phase == Phase.QUEUED:
            record.state, record.started = RecordState.RUNNING, time.time()
            record.progress = {"status": "setup"}
            await self._enter(record, Phase.PREPARE)
            xml = self._xml.pop(record.id, None)
            nbd = None
            if record.params.copy_storage:
                record.uri, nbd = await self._begin_then_prepare(record, xml)
            else:
                record.uri = await self._begin_and_prepare(record, xml)
            await self._enter(record, Phase.PERFORM)
            # the source checks the URI with the destination's prepare (by migration id)
            perform = MigrationPerform(
                domain=record.uuid, uri=record.uri, params=record.params,
                migration=record.id, destination=record.destination, nbd=nbd,
            )  # fmt: skip
            await self._step(record, record.source, ops.MIGRATION_PERFORM, perform)
            copying = record.params.copy_storage
            await self._enter(record, Phase.STORAGE if copying else Phase.PROGRESS)
        if record.phase in _STREAMING:
            await self._follow(record)
            await self._enter(record, Phase.FINISH)
        if record.phase == Phase.FINISH:
            finish = MigrationEnd(domain=record.uuid, success=True)
            await self._step(record, record.destination, ops.MIGRATION_FINISH, finish, forward=True)
            await self._enter(record, Phase.CONFIRM)
        if record.phase == Phase.CONFIRM:
            answer = await self._retry(
                record, record.source, ops.MIGRATION_CONFIRM, True, s.cleanup_timeout
            )
            if answer is _UNREACHABLE:  # the guest runs at the destination: stop the old copy later
                record.cleanup.append(cleanup_step(record.source, ops.MIGRATION_CONFIRM, True))
            self.view.domain_moved(record.uuid, record.source, record.destination)
            record.state = RecordState.COMPLETED
            await self._enter(record, Phase.DONE)

    async def _begin_then_prepare(
        self, record: MigrationRecord, xml: str | None
    ) -> tuple[str, NbdTarget]:
        """Copy-storage: ``begin`` first (the source lists the disks and their sizes), then
        ``prepare`` (the destination makes the volumes and serves them over NBD)."""
        begin = MigrationBegin(domain=record.uuid, params=record.params)
        source = await self._step(record, record.source, ops.MIGRATION_BEGIN, begin)
        prepare = MigrationPrepare(
            xml=xml or source.xml, params=record.params, migration=record.id,
            disks=source.disks,
        )  # fmt: skip
        target = await self._step(record, record.destination, ops.MIGRATION_PREPARE, prepare)
        if target.nbd is None:
            raise _Rollback(RecordState.FAILED, f"{record.destination} serves no disks to copy")
        return target.uri, target.nbd

    async def _begin_and_prepare(self, record: MigrationRecord, xml: str | None) -> str:
        """``begin`` on the source and ``prepare`` on the destination, at once when the XML
        is already known (a failed ``begin`` rolls back the prepared destination)."""
        begin = MigrationBegin(domain=record.uuid, params=record.params)
        if xml is None:
            source = await self._step(record, record.source, ops.MIGRATION_BEGIN, begin)
            prepare = MigrationPrepare(xml=source.xml, params=record.params, migration=record.id)
            target = await self._step(record, record.destination, ops.MIGRATION_PREPARE, prepare)
            return str(target.uri)
        prepare = MigrationPrepare(xml=xml, params=record.params, migration=record.id)
        results = await asyncio.gather(
            self._step(record, record.source, ops.MIGRATION_BEGIN, begin),
            self._step(record, record.destination, ops.MIGRATION_PREPARE, prepare),
            return_exceptions=True,
        )
        begun, prepared = results
        if isinstance(begun, BaseException):
            raise begun
        if isinstance(prepared, BaseException):
            raise prepared
        return prepared.uri

    async def _follow(self, record: MigrationRecord) -> None:
        """Wait for the source to report an end state; cancel on deadline or request.

        ``migration.status`` is a long poll (``wait``: ``progress_poll``): the source's
        agent answers as soon as QEMU reports the end, or after ``progress_poll`` (then it
        is asked again), so the end is heard without a polling interval; it is asked at
        the start too (recovery resumes here). The source's ``migration`` events
        (:meth:`on_event`) carry the progress, a cancel request or the deadline wake the
        wait meanwhile. An agent that answers at once (an older one) is asked again only
        after ``progress_poll``.
        """
        s, wake = self.settings, self._wake[record.id]
        asking: asyncio.Future[MigrationStatus] | None = None
        asked = next_ask = 0.0  # monotonic
        poll = min(s.progress_poll, STATUS_WAIT_MAX)
        query = MigrationStatusQuery(domain=record.uuid, wait=poll)
        try:
            while True:
                if asking is None and time.monotonic() >= next_ask:
                    asked = time.monotonic()
                    asking = asyncio.ensure_future(
                        self._call(record.source, ops.MIGRATION_STATUS, query,
                                   s.step_timeout + poll)
                    )  # fmt: skip
                answered = asking is not None and asking.done()
                if asking is not None and answered:
                    status: MigrationStatus | None
                    try:
                        status = asking.result()
                    except (RetryableError, ProtocolError) as exc:  # ask again later
                        log.warning(
                            "migration %s: status from %s: %s", record.id, record.source, exc
                        )
                        status = None
                    except VirtbusError as exc:
                        lost = f"source lost the migration: {exc}"
                        raise _Rollback(RecordState.FAILED, lost) from None
                    asking, next_ask = None, asked + poll
                    if status is not None:
                        record.progress = to_wire(status)
                        self._notify(record)
                if record.phase == Phase.STORAGE and record.progress.get("phase") == "memory":
                    await self._enter(record, Phase.PROGRESS)  # the disks are copied
                state = record.progress.get("status")
                if state == "completed":
                    return
                if state in ("failed", "cancelled") or (
                    answered and state == "none" and record.phase == Phase.PROGRESS
                ):
                    why = record.progress.get("error") or f"the source reports {state}"
                    raise _Rollback(
                        RecordState.CANCELLED if record.cancel_requested else RecordState.FAILED,
                        why,
                    )
                past_deadline = time.time() >= record.deadline
                postcopy = record.progress.get("status") in POSTCOPY_STATUSES
                if (record.cancel_requested or past_deadline) and not postcopy:
                    reason = (
                        RecordState.CANCELLED if record.cancel_requested else RecordState.FAILED
                    )
                    error = (
                        None if record.cancel_requested else f"timed out after {record.timeout:g} s"
                    )
                    raise _Rollback(reason, error)
                limit = record.deadline - time.time()
                if asking is None:
                    limit = min(limit, next_ask - time.monotonic())
                await _first(wake, asking, max(0.01, limit))
                wake.clear()
        finally:  # an answer still on its way is not needed any more
            forget(asking)

    async def _guarded_rollback(
        self, record: MigrationRecord, state: RecordState, error: str | None
    ) -> None:
        try:
            await self._rollback(record, state, error)
        except _Rollback as again:  # going forward from a rollback failed too
            record.state, record.error = RecordState.FAILED, again.error
            await self._enter(record, Phase.ROLLED_BACK)

    async def _rollback(
        self, record: MigrationRecord, state: RecordState, error: str | None
    ) -> None:
        """Undo on both sides so the guest runs only at the source (bounded retries).

        The source is resumed only once the destination has answered that it does not run
        the guest; if the destination may have finished (``finish`` was sent) and does not
        answer, the source is left paused: one paused copy, never two running ones.
        """
        log.warning("migration %s of %s rolling back: %s", record.id, record.domain, error)
        record.error = error
        was = record.phase
        finish_sent = any(p == Phase.FINISH for p, _ in record.history)
        await self._enter(record, Phase.ROLLBACK)
        t, step = self.settings.cleanup_timeout, self.settings.step_timeout
        if was in _STREAMING or was in (Phase.FINISH, Phase.ROLLBACK):
            try:
                cancel = MigrationDomain(domain=record.uuid)
                await self._call(record.source, ops.MIGRATION_CANCEL, cancel, step)
            except VirtbusError as exc:  # not running any more: fine
                log.info("migration %s: cancel on %s: %s", record.id, record.source, exc)
        if was != Phase.BEGIN:
            answer = await self._retry(record, record.destination, ops.MIGRATION_FINISH, False, t)
            if answer is _UNREACHABLE:  # retried when its heartbeats return (cleanup.py)
                record.cleanup.append(cleanup_step(record.destination, ops.MIGRATION_FINISH, False))
            if answer in (_GAVE_UP, _UNREACHABLE) and finish_sent:
                note = "the destination did not answer after finish: the source is left paused"
                if answer is _UNREACHABLE:
                    note += " until it does"
                    record.cleanup.append(cleanup_step(record.source, ops.MIGRATION_CONFIRM, False))
                record.error = f"{error}; {note}" if error else note
                record.state = RecordState.FAILED
                await self._enter(record, Phase.ROLLED_BACK)
                return
            if isinstance(answer, MigrationOutcome) and destination_owns(answer):
                log.warning(
                    "migration %s: the destination owns %s: going forward", record.id, record.domain
                )
                record.error = None
                await self._enter(record, Phase.CONFIRM)
                await self._forward(record)
                return
        answer = await self._retry(record, record.source, ops.MIGRATION_CONFIRM, False, t)
        if answer is _UNREACHABLE:
            record.cleanup.append(cleanup_step(record.source, ops.MIGRATION_CONFIRM, False))
        record.state = state
        await self._enter(record, Phase.ROLLED_BACK)

    # --- steps ----------------------------------------------------------------------
    async def _step(
        self,
        record: MigrationRecord,
        host: str,
        op: Op[Req, Res],
        request: Req,
        *,
        forward: bool = False,
    ) -> Res:
        """One forward step and its typed answer (a malformed answer is RPC_ERROR and rolls
        back like a failed step, never escapes as a bug)."""
        if record.cancel_requested and not forward:
            raise _Rollback(RecordState.CANCELLED, None)
        try:
            return await self._call(host, op, request, self.settings.step_timeout)
        except VirtbusError as exc:
            raise _Rollback(RecordState.FAILED, f"{op} on {host}: {exc}") from None

    async def _retry(
        self,
        record: MigrationRecord,
        host: str,
        op: Op[MigrationEnd, MigrationOutcome],
        success: bool,
        within: float,
    ) -> MigrationOutcome | _Unfinished | None:
        """A finish/confirm step that must happen: retried on transient errors for
        ``within`` s; None when there was nothing left to do on that host."""
        deadline = time.monotonic() + within
        request = MigrationEnd(domain=record.uuid, success=success)
        while True:
            try:
                return await self._call(host, op, request, self.settings.step_timeout)
            except (RetryableError, NoConnect) as exc:
                if time.monotonic() >= deadline:
                    note = f"{op} on {host} not done yet (retried when it answers): {exc}"
                    log.error("migration %s: %s", record.id, note)
                    record.error = f"{record.error}; {note}" if record.error else note
                    return _UNREACHABLE
                await asyncio.sleep(self.settings.cleanup_retry)
            except (NoDomainError, OperationInvalid, MigrateFailed) as exc:
                log.info("migration %s: %s on %s: %s", record.id, op, host, exc)
                return None
            except VirtbusError as exc:  # the agent answered, but could not do it
                note = f"{op} on {host} failed: {exc}"
                log.error("migration %s: %s", record.id, note)
                record.error = f"{record.error}; {note}" if record.error else note
                return _GAVE_UP

    async def _enter(self, record: MigrationRecord, phase: Phase) -> None:
        record.enter(phase)
        if phase == Phase.DONE:
            # Decided and done: the destination runs and owns the guest, the source has
            # confirmed (its copy is gone, or its confirm is in record.cleanup). Followers
            # hear it now; the journal entry after only ends the record (a scheduler that
            # stops before writing it resumes at the journaled confirm: idempotent).
            self._notify(record)
        if phase not in _UNJOURNALED:
            await self.journal.save(record)
        faults.scheduler_exit_at(phase)  # the crash tests' fault point (off unless set)
        self._notify(record)

    async def _finalize(self, record: MigrationRecord) -> None:
        if not record.terminal:
            return  # cancelled by a stopping scheduler: the journal keeps it for recovery
        record.ended = time.time()
        self.view.release(record.destination, record.uuid)
        self.active.pop(record.id, None)
        self._wake.pop(record.id, None)
        self._xml.pop(record.id, None)
        self.history.append(record)
        self._notify(record)
        if record.cleanup:
            await self.cleanups.start(record)  # keeps it journaled until done
        else:
            await self.journal.remove(record)
        log.info(
            "migration %s of %s %s -> %s: %s%s",
            record.id,
            record.domain,
            record.source,
            record.destination,
            record.state,
            f" ({record.error})" if record.error else "",
        )

    # --- recovery after a restart ---------------------------------------------------
    async def recover(self, records: list[MigrationRecord]) -> None:
        """Resume every journaled migration from what the agents say really happened."""
        for record in records:
            if record.terminal and record.cleanup:
                self.history.append(record)
                await self.cleanups.start(record)
                continue
            if record.terminal or record.id in self.active:
                if record.terminal:  # it ended just before the restart: still answerable
                    self.history.append(record)
                    await self.journal.remove(record)
                continue
            self.active[record.id] = record
            log.warning(
                "recovering migration %s of %s (phase %s)", record.id, record.domain, record.phase
            )
            self._wake[record.id] = asyncio.Event()
            async with self._slots:
                self._take(record)
            self._tasks.spawn(self._recover_one(record), name=f"migration:{record.id}:recover")

    async def _recover_one(self, record: MigrationRecord) -> None:
        try:
            await self._reconcile(record)
            await self._forward(record)
        except _Rollback as rb:
            await self._guarded_rollback(record, rb.state, rb.error)
        except Exception as exc:  # a bug must not take the scheduler down
            log.exception("recovery of migration %s failed unexpectedly", record.id)
            record.state, record.error = RecordState.FAILED, f"internal error: {exc!r}"
        finally:
            await self._release(record)
            await self._finalize(record)

    async def _reconcile(self, record: MigrationRecord) -> None:
        """Pick the phase to resume from, from the agents' answers."""
        s = self.settings
        failed = RecordState.FAILED
        if record.phase in (Phase.QUEUED, Phase.BEGIN):
            raise _Rollback(failed, "the scheduler restarted before the migration started")
        if record.phase == Phase.PREPARE:
            raise _Rollback(failed, "the scheduler restarted while preparing the destination")
        if record.phase == Phase.ROLLBACK:
            was = record.state if record.state != RecordState.RUNNING else failed
            raise _Rollback(was, record.error)
        if record.phase in _STREAMING:
            state: str | None
            try:
                status = await self._call(
                    record.source,
                    ops.MIGRATION_STATUS,
                    MigrationStatusQuery(domain=record.uuid),
                    s.step_timeout,
                )
                state = status.status
            except NoDomainError:
                state = "gone"
            except ProtocolError as exc:  # decided below from the destination's answer
                log.warning("migration %s: %s", record.id, exc)
                state = None
            if state in ACTIVE_STATUSES or state in POSTCOPY_STATUSES:
                if record.phase != Phase.STORAGE:
                    record.phase = Phase.PROGRESS  # still streaming: follow it again
            elif state == MigrationState.COMPLETED:
                record.phase = Phase.FINISH
            elif await self._destination_owns(record):
                record.phase = Phase.CONFIRM  # it finished before we went away
            else:
                raise _Rollback(failed, f"the scheduler restarted; the source reports {state}")

    async def _destination_owns(self, record: MigrationRecord) -> bool:
        try:
            info = await self._call(
                record.destination,
                ops.DOMAIN_INFO,
                DomainTarget(domain=record.uuid),
                self.settings.step_timeout,
            )
        except VirtbusError:
            return False
        return destination_owns(info)
