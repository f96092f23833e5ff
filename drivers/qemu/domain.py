"""One domain at runtime: its QEMU, its QMP connection and the task that follows its events.

Each running domain has one named task, ``qemu-domain-<name>``, that consumes the domain's
event queue in order. Every lifecycle event is emitted from that task, from what QEMU
reported (STOP, RESUME, SHUTDOWN, ...) mapped by :mod:`drivers.qemu.events`; the driver's
API methods send a command, mark what they asked for (``pending``) and wait for the task
to see its effect. So an event is emitted exactly once, in QEMU's order.

After each change of state the task rewrites the run's status file, so that a restarted
agent (:meth:`Domain.reattach`) knows what the guest looked like when it left and can
publish, marked ``reconciled``, what changed while it was away — the events libvirt
would have sent. A lost QMP connection of a live QEMU is re-established with capped,
jittered backoff; a QEMU that is gone is ``stopped`` with libvirt's detail.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drivers.base import DomainRef, DriverEvent, EventSink
from drivers.qemu import companions as comp
from drivers.qemu import events as ev
from drivers.qemu.migration import QMP_EVENTS as MIGRATION_EVENTS
from drivers.qemu.migration import Job
from drivers.qemu.monitor import EventQueue, Kick, Monitor, MonitorLost, QmpEvent
from drivers.qemu.process import QemuProcess
from drivers.qemu.settings import QemuSettings
from drivers.qemu.state import RunStatus, StateStore, remove_files
from virtbus.aio import backoff_delays, log_task_failure
from virtbus.domain import DomainDefinition, parse_domain_xml
from virtbus.errors import OperationFailed, OperationInvalid, OperationTimeout, VirtbusError
from virtbus.protocol.events import DomainState

if TYPE_CHECKING:
    from drivers.qemu.launch import LaunchStep

log = logging.getLogger(__name__)
S = DomainState


@dataclass(slots=True)
class Runtime:
    """What every domain of one driver shares."""

    settings: QemuSettings
    store: StateStore
    sink: EventSink = lambda _event: None
    steps: tuple[LaunchStep, ...] = ()  # what a launch acquires on the host (launch.py)

    async def release(self, uuid: str) -> None:
        """Give back what the launch steps hold for ``uuid`` (a failed launch, a run's end);
        a step that fails is logged and the others still release."""
        for step in self.steps:
            try:
                await step.release(uuid)
            except Exception:
                log.exception("domain %s: releasing %s failed", uuid, type(step).__name__)


@dataclass(eq=False, slots=True)
class Run:
    """A running QEMU of one domain."""

    id: int
    live: DomainDefinition  # the definition it runs with, runtime values written back
    process: QemuProcess
    qmp_socket: Path
    queue: EventQueue
    pidfile: Path | None = None
    logfile: Path | None = None
    sockets: tuple[Path, ...] = ()  # UNIX sockets QEMU created: removed after it exits
    monitor: Monitor | None = None
    job: dict[str, Any] | None = None  # the job in flight, persisted in the status file
    migration: Job | None = None  # a live migration in flight (drivers/qemu/migration.py)
    live_xml: str | None = None  # ``live`` serialised for status files (reset when it changes)
    pending: set[ev.Pending] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    helpers: set[asyncio.Task[None]] = field(default_factory=set)  # stop/reboot fallbacks
    waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    deleted_devices: set[str] = field(default_factory=set)  # DEVICE_DELETED ids (detach waits)
    job_states: dict[str, str] = field(default_factory=dict)  # QMP job id -> JOB_STATUS_CHANGE
    migration_state: str | None = None  # the last MIGRATION event's status (save/restore)
    saved: tuple[DomainState, str] | None = None  # state/reason in the status file
    writing: asyncio.Task[None] | None = None  # the status write in flight (never cut short)
    companions: comp.Companions | None = None  # helpers, overlays: released after QEMU ends


class Domain:
    """A defined domain, and its run while active (see module docstring)."""

    def __init__(self, defn: DomainDefinition, rt: Runtime) -> None:
        self.defn = defn  # persistent definition
        self.state: DomainState = S.SHUTOFF
        self.reason = "unknown"
        self.run: Run | None = None
        self._rt = rt

    @property
    def ref(self) -> DomainRef:
        return DomainRef(self.defn.name, self.defn.uuid)

    @property
    def _settings(self) -> QemuSettings:
        return self._rt.settings

    def emit(self, event: str, detail: str | None = None, data: dict[str, Any] | None = None,
             reconciled: bool = False) -> None:  # fmt: skip
        self._rt.sink(
            DriverEvent(self.defn.name, self.defn.uuid, event, detail, data or {}, reconciled)
        )

    def require(self, *states: DomainState, verb: str) -> Run:
        if self.run is None or self.state == S.SHUTOFF:
            raise OperationInvalid(f"domain '{self.defn.name}' is not running")
        if self.state not in states:
            raise OperationInvalid(
                f"cannot {verb} domain '{self.defn.name}': it is {self.state.label}"
            )
        return self.run

    async def execute(self, run: Run, cmd: str, args: dict[str, Any] | None = None) -> Any:
        if run.monitor is None:
            raise OperationFailed(f"{cmd}: the monitor of this domain is reconnecting")
        return await run.monitor.execute(cmd, args)

    # --- connection ---------------------------------------------------------------------
    async def connect(self, run: Run) -> None:
        monitor = Monitor(self.defn.name, run.qmp_socket, self._settings, run.queue)
        await monitor.connect(
            self._settings.connect_timeout, run.process.alive, self._settings.exit_poll
        )
        run.monitor = monitor

    def start_loop(self, run: Run, first: Coroutine[Any, Any, None] | None = None) -> None:
        run.task = asyncio.create_task(self._loop(run, first), name=f"qemu-domain-{self.defn.name}")
        run.task.add_done_callback(log_task_failure)

    async def attach(self, run: Run) -> None:
        """Connect QMP and start the domain's event task."""
        await self.connect(run)
        self.start_loop(run)

    async def save_status(self, run: Run) -> None:
        """Write the run's status file (after a state change, or a change of ``run.job``)."""
        if self.run is not run:
            return
        if run.writing is not None:  # one write at a time, in order
            await asyncio.wait([run.writing])
        status = self._status(run)  # taken after the previous write: never older than it
        run.writing = asyncio.create_task(self._write(run, status), name=f"qemu-status-{run.id}")
        await asyncio.shield(run.writing)  # a cancelled caller must not cut a write short

    def save_status_soon(self, run: Run) -> None:
        """Bring the status file up to date without holding up the event task: one
        background write at a time, coalescing every change made meanwhile."""
        if run.writing is None or run.writing.done():
            run.writing = asyncio.create_task(self._catch_up(run), name=f"qemu-status-{run.id}")

    async def _catch_up(self, run: Run) -> None:
        while self.run is run and run.saved != (self.state, self.reason):
            await self._write(run, self._status(run))

    def _status(self, run: Run) -> RunStatus:
        return RunStatus(
            uuid=self.defn.uuid, pid=run.process.pid, id=run.id, qmp_socket=run.qmp_socket,
            xml=self._live_xml(run), state=self.state, reason=self.reason, logfile=run.logfile,
            pidfile=run.pidfile, sockets=run.sockets, job=run.job,
            companions=run.companions.to_json() if run.companions is not None else None,
        )  # fmt: skip

    @staticmethod
    def _live_xml(run: Run) -> str:
        """Serialising the definition costs ~0.2 ms; it changes only while a run starts."""
        if run.live_xml is None:
            run.live_xml = run.live.to_xml()
        return run.live_xml

    async def _write(self, run: Run, status: RunStatus) -> None:
        try:
            await self._rt.store.write_status(status)
            run.saved = (status.state, status.reason)
        except OSError as exc:
            log.error("domain %s: cannot write status file: %s", self.defn.name, exc)

    async def close(self) -> None:
        """Forget the run without touching QEMU (agent stop: the guest keeps running)."""
        run = self.run
        if run is None:
            return
        tasks = [t for t in (run.task, *run.helpers) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if run.writing is not None:
            await asyncio.wait([run.writing])
        if run.saved != (self.state, self.reason):
            await self.save_status(run)  # the event task may not have written it yet
        self.run = None
        if run.monitor is not None:
            await run.monitor.close()

    # --- the per-domain event task ------------------------------------------------------
    async def _loop(self, run: Run, first: Coroutine[Any, Any, None] | None) -> None:
        if first is not None:
            await first
        while self.run is run:
            item = await run.queue.get()
            try:
                if isinstance(item, QmpEvent):
                    await self._on_qmp_event(run, item)
                elif isinstance(item, MonitorLost):
                    if item.monitor is run.monitor:
                        run.monitor = None
                        await self._on_monitor_lost(run)
                elif isinstance(item, Kick) and not run.process.alive():
                    await self.on_exit(run)
            except VirtbusError as exc:
                log.warning("domain %s: handling %r failed: %s", self.defn.name, item, exc)
            except Exception:  # a bug or an unexpected payload: skip the item, keep following
                log.exception("domain %s: handling %r failed", self.defn.name, item)
            if self.run is run and run.saved != (self.state, self.reason):
                self.save_status_soon(run)

    @staticmethod
    def _balloon_changed(run: Run, kib: int) -> None:
        """The guest gave or took memory: the live ``<currentMemory>`` says what it has, as
        libvirt's does (clamped to ``<memory>``; a balloon never reports more)."""
        kib = min(kib, run.live.memory_kib)
        if kib > 0 and kib != run.live.current_memory_kib:
            run.live.set_current_memory_kib(kib)
            run.live_xml = None

    async def _on_qmp_event(self, run: Run, item: QmpEvent) -> None:
        if item.name == "DEVICE_DELETED" and isinstance(item.data.get("device"), str):
            run.deleted_devices.add(item.data["device"])  # a detach waits for this (notify)
        if item.name == "BALLOON_CHANGE" and isinstance(item.data.get("actual"), int):
            self._balloon_changed(run, item.data["actual"] // 1024)
        if item.name == "MIGRATION":
            run.migration_state = str(item.data.get("status", ""))  # save/restore wait on it
        if item.name == "JOB_STATUS_CHANGE" and isinstance(item.data.get("id"), str):
            run.job_states[item.data["id"]] = str(item.data.get("status", ""))  # snapshots wait
        if item.name in MIGRATION_EVENTS and run.migration is not None:
            run.migration.feed(item.name, item.data)  # the migration job reports progress
        ctx = self.context(run)
        status_reason = None
        if ev.needs_status(item.name, ctx) and run.monitor is not None:
            try:
                status = await run.monitor.execute("query-status")
                status_reason = ev.pause_reason(str(status.get("status", "")))
            except VirtbusError:
                status_reason = "unknown"
            ctx = self.context(run)
        outcome = ev.map_event(item.name, item.data, ctx, status_reason=status_reason)
        self.apply(run, outcome)
        await self._act(run, outcome)

    async def _act(self, run: Run, outcome: ev.Outcome) -> None:
        for action in outcome.actions:
            if action == ev.Action.QUIT:
                self.helper(run, self.stop_process(run), f"qemu-stop-{self.defn.name}")
            elif run.monitor is not None:
                try:
                    await run.monitor.execute(action.value)
                except VirtbusError as exc:
                    log.warning("domain %s: %s failed: %s", self.defn.name, action.value, exc)

    def context(self, run: Run) -> ev.Context:
        live = run.live
        return ev.Context(
            self.state, self.reason,
            ev.Lifecycle(live.on_poweroff, live.on_reboot, live.on_crash),
            frozenset(run.pending),
        )  # fmt: skip

    def apply(self, run: Run, outcome: ev.Outcome, *, silent: bool = False,
              reconciled: bool = False) -> None:  # fmt: skip
        run.pending |= outcome.add
        run.pending -= outcome.clear
        if outcome.state is not None:
            self.state, self.reason = outcome.state
        if not silent:
            for event, detail, data in outcome.events:
                self.emit(event, detail, data, reconciled)
        self.notify(run)

    def notify(self, run: Run) -> None:
        keep = []
        for ready, fut in run.waiters:
            if fut.done():
                continue
            if ready() or run.ended.is_set():
                fut.set_result(None)
            else:
                keep.append((ready, fut))
        run.waiters = keep

    async def wait(self, run: Run, ready: Callable[[], bool], what: str,
                   timeout: float | None = None) -> None:  # fmt: skip
        """Wait until the event task made ``ready()`` true (or the run ended)."""
        if ready() or run.ended.is_set():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        run.waiters.append((ready, fut))
        limit = self._settings.qmp_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                await fut
        except TimeoutError:
            raise OperationTimeout(f"{what}: QEMU did not report the change in {limit}s") from None

    async def come_up(self, run: Run, paused: bool, detail: str, verb: str,
                      paused_reason: str | None = None) -> None:  # fmt: skip
        """A run whose state was just loaded (a restore, a snapshot revert) comes up paused
        (started + suspended with ``detail``; the state's reason ``paused_reason``, by default
        ``detail``) or running (``cont``, then the RESUME event makes it started)."""
        if paused:
            run.pending.discard(ev.Pending.START)
            self.state, self.reason = DomainState.PAUSED, paused_reason or detail
            self.emit("started", detail)
            self.emit("suspended", detail)
        else:
            await self.execute(run, "cont")
            await self.wait(run, lambda: ev.Pending.START not in run.pending, verb)
        if self.run is not run:
            raise OperationFailed(f"QEMU exited during the {verb}")

    # --- loss, exit, reconcile ----------------------------------------------------------
    async def _on_monitor_lost(self, run: Run) -> None:
        """QMP is gone: the QEMU exited (-> stopped) or reconnect with capped jittered backoff."""
        settings = self._settings
        if await run.process.wait_exit(settings.exit_wait, settings.exit_poll):
            await self.on_exit(run)
            return
        delays = backoff_delays(settings.reconnect)
        while run.process.alive() and self.run is run:
            try:
                await self.connect(run)
            except VirtbusError as exc:
                log.info("domain %s: QMP reconnect failed: %s", self.defn.name, exc)
            else:
                await self.resync(run)
                return
            item = await run.queue.get_within(next(delays))
            if isinstance(item, QmpEvent):
                await self._on_qmp_event(run, item)
        await self.on_exit(run)

    async def resync(self, run: Run, reconciled: bool = True) -> None:
        """After (re)connecting: take QEMU's run state as the truth and emit, marked
        ``reconciled``, what changed (mapped by :func:`drivers.qemu.events.map_status`)."""
        assert run.monitor is not None
        status = await run.monitor.execute("query-status")
        running, qstate = bool(status.get("running")), str(status.get("status", ""))
        outcome = ev.map_status(running, qstate, self.context(run))
        self.apply(run, outcome, reconciled=reconciled)
        await self._act(run, outcome)

    async def on_exit(self, run: Run, reconciled: bool = False) -> None:
        if self.run is not run:
            return
        starting = ev.Pending.START in run.pending
        # a QEMU that dies during start() is start's error, not an event
        self.apply(run, ev.map_exit(self.context(run)), silent=starting, reconciled=reconciled)
        await self.teardown(run)

    async def teardown(self, run: Run) -> None:
        """Forget the run: what its launch acquired, tasks, monitor, status file, sockets.
        Idempotent."""
        if self.run is run:
            self.run = None
        await self._rt.release(self.defn.uuid)  # before `ended`: a destroy returns after it
        if run.companions is not None:
            await comp.release(run.companions, self._settings.companions)
        # before `ended` too: a start right after a destroy binds the same socket paths
        # (the QMP socket before QEMU runs), which a removal after it would take away
        await self._rt.store.remove_own_sockets((run.qmp_socket, *run.sockets))
        run.ended.set()
        self.notify(run)
        current = asyncio.current_task()
        for task in (run.task, *run.helpers):
            if task is not None and task is not current:
                task.cancel()
        if run.monitor is not None:
            monitor, run.monitor = run.monitor, None
            await monitor.close()
        if run.writing is not None and run.writing is not asyncio.current_task():
            await asyncio.wait([run.writing])  # else it would re-create the file
        await self._rt.store.remove_status(self.defn.uuid)
        await remove_files(run.pidfile)

    def helper(self, run: Run, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        run.helpers.add(task)
        task.add_done_callback(run.helpers.discard)
        task.add_done_callback(log_task_failure)

    async def stop_process(self, run: Run) -> None:
        """Make QEMU exit: `quit`, then SIGTERM/SIGKILL (bounded). The exit is seen by EOF."""
        if run.monitor is not None:
            try:
                await run.monitor.execute("quit", timeout=self._settings.quit_wait)
            except VirtbusError as exc:
                log.debug("domain %s: quit: %s", self.defn.name, exc)
        if not await run.process.wait_exit(self._settings.quit_wait, self._settings.exit_poll):
            await run.process.kill(self._settings)
        run.queue.put_control(Kick())

    async def wait_ended(self, run: Run) -> None:
        """Wait (bounded) for the event task to see the exit; if it is stuck, finish here."""
        try:
            await asyncio.wait_for(run.ended.wait(), self._settings.exit_wait)
        except TimeoutError:
            await self.on_exit(run)

    async def abort_start(self, run: Run, previous_reason: str) -> None:
        run.pending.add(ev.Pending.DESTROY)
        if not await run.process.kill(self._settings):
            log.error("QEMU pid %d of %s survived SIGKILL", run.process.pid, self.defn.name)
        await self.teardown(run)
        self.state, self.reason = S.SHUTOFF, previous_reason

    # --- after an agent restart ---------------------------------------------------------
    async def reattach(self, status: RunStatus) -> None:
        """Find the QEMU of ``status`` again; publish what happened while we were away."""
        try:
            live = parse_domain_xml(status.xml)
        except VirtbusError as exc:
            log.warning("domain %s: live XML in status unusable (%s)", self.defn.name, exc)
            live = self.defn.copy()
        run = Run(status.id, live, QemuProcess(status.pid, self.defn.uuid), status.qmp_socket,
                  EventQueue(self._settings.event_queue), pidfile=status.pidfile,
                  logfile=status.logfile, sockets=status.sockets, job=status.job,
                  saved=(status.state, status.reason),
                  companions=comp.Companions.from_json(status.companions))  # fmt: skip
        self.run, self.state, self.reason = run, status.state, status.reason
        if not run.process.alive():  # gone (or the pid now belongs to someone else)
            log.warning("domain %s: QEMU pid %d is gone", self.defn.name, status.pid)
            await self.on_exit(run, reconciled=True)
            return
        try:
            await self.connect(run)
            await self.resync(run, reconciled=True)
        except VirtbusError as exc:
            log.error("domain %s: cannot reattach to QEMU pid %d: %s",
                      self.defn.name, status.pid, exc)  # fmt: skip
            if run.monitor is None:  # keep retrying from the event task
                self.start_loop(run, self._on_monitor_lost(run))
                return
        if self.run is run:
            self.start_loop(run)
            if run.companions is not None and run.companions.helpers.processes:
                self.helper(run, comp.watch(run.companions, self.defn.name),
                            f"qemu-helpers-{self.defn.name}")  # fmt: skip
            if run.saved != (self.state, self.reason):
                await self.save_status(run)
