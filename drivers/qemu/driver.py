"""The QEMU driver: libvirt's QEMU driver behaviour behind virtbus' Driver protocol.

Each running domain has one QEMU process (started with ``-S -no-shutdown``, outliving the
agent), one QMP connection and one named task, ``qemu-domain-<name>``, that consumes the
domain's event queue in order. Every lifecycle event is emitted from that task, from what
QEMU reported (STOP, RESUME, SHUTDOWN, ...) mapped by :mod:`drivers.qemu.events`; the API
methods send the command, mark what they asked for (``pending``) and wait for the task to
see its effect. So an event is emitted exactly once, in QEMU's order, and suspend/resume
cost one QMP round trip.

Persistent definitions live in memory and in ``<state_dir>/domains/<uuid>.xml``; each
running domain has ``<run_dir>/<uuid>.json`` (pid, QMP socket, id) so a restarted agent
reattaches (:meth:`QemuDriver.open`). ``undefine`` is allowed only on a shut-off domain
(virtbus has no transient domains yet).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os

from drivers.base import DomainInfo, DomainRef, DriverEvent, EventSink, HostResources
from drivers.qemu import events as ev
from drivers.qemu.argv import (
    QemuLaunch,
    QemuPaths,
    build_command,
    disk_paths,
    graphics_needing_ports,
)
from drivers.qemu.capabilities import QemuCapabilities, probe
from drivers.qemu.monitor import EventQueue, Kick, Monitor, MonitorLost, QmpEvent
from drivers.qemu.process import (
    QemuProcess,
    cpu_time_ns,
    is_domain_process,
    log_tail,
    read_pidfile,
    spawn,
)
from drivers.qemu.settings import QemuSettings
from virtbus.domain import DomainDefinition, parse_domain_xml
from virtbus.errors import (
    ConfigUnsupported,
    NoDomainError,
    OperationFailed,
    OperationInvalid,
    OperationTimeout,
    VirtbusError,
)
from virtbus.protocol.events import DomainState

log = logging.getLogger(__name__)
S = DomainState
_HV_TYPES = ("qemu", "kvm")


@dataclass(eq=False, slots=True)
class _Run:
    """A running QEMU of one domain."""

    id: int
    live: DomainDefinition  # the definition it runs with, runtime values written back
    process: QemuProcess
    qmp_socket: Path
    queue: EventQueue
    pidfile: Path | None = None
    sockets: tuple[Path, ...] = ()  # UNIX sockets QEMU created: removed after it exits
    monitor: Monitor | None = None
    pending: set[ev.Pending] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    helpers: set[asyncio.Task[None]] = field(default_factory=set)  # stop/reboot fallbacks
    waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False, slots=True)
class _Domain:
    defn: DomainDefinition  # persistent definition
    state: DomainState = S.SHUTOFF
    reason: str = "unknown"
    run: _Run | None = None

    @property
    def ref(self) -> DomainRef:
        return DomainRef(self.defn.name, self.defn.uuid)


class QemuDriver:
    """QEMU/KVM domains on this host (see module docstring)."""

    name = "qemu"

    def __init__(
        self, state_dir: Path, run_dir: Path, settings: QemuSettings | None = None
    ) -> None:
        self._state_dir = Path(state_dir)
        self._run_dir = Path(run_dir)
        self._settings = settings or QemuSettings()
        self._domains: dict[str, _Domain] = {}  # by uuid
        self._by_name: dict[str, str] = {}
        self._next_id = 1
        self._sink: EventSink = lambda _event: None
        self._kvm: bool | None = None
        self._caps: QemuCapabilities | None = None

    # --- plumbing -----------------------------------------------------------------------
    @property
    def _defs_dir(self) -> Path:
        return self._state_dir / "domains"

    async def open(self, sink: EventSink) -> None:
        self._sink = sink
        await aiofiles.os.makedirs(self._defs_dir, exist_ok=True)
        await aiofiles.os.makedirs(self._run_dir, exist_ok=True)
        for entry in sorted(await aiofiles.os.listdir(self._defs_dir)):
            if not entry.endswith(".xml"):
                continue
            try:
                async with aiofiles.open(self._defs_dir / entry, encoding="utf-8") as fh:
                    defn = parse_domain_xml(await fh.read())
            except (OSError, VirtbusError) as exc:
                log.error("skipping definition %s: %s", entry, exc)
                continue
            self._add(defn)
        for dom in list(self._domains.values()):
            await self._reattach(dom)

    async def close(self) -> None:
        for dom in self._domains.values():
            run = dom.run
            if run is None:
                continue
            tasks = [t for t in (run.task, *run.helpers) if t is not None]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
            if run.monitor is not None:
                await run.monitor.close()
            dom.run = None
        self._sink = lambda _event: None

    def lookup(self, ref: str) -> DomainRef | None:
        dom = self._find(ref)
        return dom.ref if dom else None

    def _find(self, ref: str) -> _Domain | None:
        dom = self._domains.get(ref) or self._domains.get(ref.lower())
        if dom is None and (uuid := self._by_name.get(ref)):
            dom = self._domains.get(uuid)
        if dom is None and len(ref) == 32:
            dom = self._domains.get(f"{ref[:8]}-{ref[8:12]}-{ref[12:16]}-{ref[16:20]}-{ref[20:]}")
        return dom

    def _get(self, ref: str) -> _Domain:
        dom = self._find(ref)
        if dom is None:
            raise NoDomainError(f"domain not found: no domain with matching name or uuid '{ref}'")
        return dom

    def _add(self, defn: DomainDefinition) -> _Domain:
        dom = _Domain(defn)
        self._domains[defn.uuid] = dom
        self._by_name[defn.name] = defn.uuid
        return dom

    def _emit(self, dom: _Domain, event: str, detail: str | None = None,
              data: dict[str, Any] | None = None, reconciled: bool = False) -> None:  # fmt: skip
        self._sink(DriverEvent(dom.defn.name, dom.defn.uuid, event, detail, data or {}, reconciled))

    def _require(self, dom: _Domain, *states: DomainState, verb: str) -> _Run:
        if dom.run is None or dom.state == S.SHUTOFF:
            raise OperationInvalid(f"domain '{dom.defn.name}' is not running")
        if dom.state not in states:
            raise OperationInvalid(
                f"cannot {verb} domain '{dom.defn.name}': it is {dom.state.label}"
            )
        return dom.run

    # --- definitions --------------------------------------------------------------------
    async def define(self, xml: str) -> DomainRef:
        defn = parse_domain_xml(xml)
        if defn.hv_type not in _HV_TYPES:
            raise ConfigUnsupported(
                f"domain type '{defn.hv_type}' is not supported by the qemu driver "
                f"(use {' or '.join(_HV_TYPES)})"
            )
        self._validate(defn)
        other = self._by_name.get(defn.name)
        if other is not None and other != defn.uuid:
            raise OperationFailed(f"domain '{defn.name}' already exists with uuid {other}")
        existing = self._domains.get(defn.uuid)
        if existing is not None and existing.defn.name != defn.name:
            raise OperationFailed(
                f"domain '{existing.defn.name}' is already defined with uuid {defn.uuid}"
            )
        await self._persist(defn)
        if existing is not None:
            existing.defn = defn  # a running domain keeps its live definition until restarted
            self._emit(existing, "defined", "updated")
            return existing.ref
        dom = self._add(defn)
        self._emit(dom, "defined", "added")
        return dom.ref

    def _validate(self, defn: DomainDefinition) -> None:
        """Reject at define time what start would reject (CONFIG_UNSUPPORTED naming it).

        KVM availability and the binary's capabilities are checked at start only: a
        definition may be meant for another host.
        """
        ports = dict.fromkeys(graphics_needing_ports(defn), 5900)
        build_command(
            defn.copy(), QemuPaths(self._run_dir), kvm_available=True,
            emulator=self._settings.emulator, graphics_ports=ports,
        )  # fmt: skip

    async def undefine(self, ref: str) -> None:
        dom = self._get(ref)
        if dom.run is not None or dom.state != S.SHUTOFF:
            raise OperationInvalid(
                f"cannot undefine domain '{dom.defn.name}': it is {dom.state.label}"
                " (destroy it first)"
            )
        path = self._defs_dir / f"{dom.defn.uuid}.xml"
        if await aiofiles.os.path.exists(path):
            await aiofiles.os.remove(path)
        del self._domains[dom.defn.uuid]
        self._by_name.pop(dom.defn.name, None)
        self._emit(dom, "undefined", "removed")

    async def _persist(self, defn: DomainDefinition) -> None:
        await _write_atomic(self._defs_dir / f"{defn.uuid}.xml", defn.to_xml())

    # --- start --------------------------------------------------------------------------
    def kvm_usable(self) -> bool:
        """/dev/kvm is readable, writable and really opens (cached)."""
        if self._kvm is None:
            self._kvm = False
            if os.access("/dev/kvm", os.R_OK | os.W_OK):
                try:
                    os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
                    self._kvm = True
                except OSError:
                    pass
        return self._kvm

    async def _check_files(self, defn: DomainDefinition) -> None:
        """Every host file QEMU would open exists: a clear error instead of QEMU's."""
        for path in disk_paths(defn):
            if not await aiofiles.os.path.exists(path):
                raise OperationFailed(
                    f"cannot access storage file '{path}' (domain '{defn.name}'):"
                    " No such file or directory"
                )

    async def capabilities(self) -> QemuCapabilities | None:
        """What the emulator supports (probed once; None if probing failed)."""
        if self._caps is None:
            try:
                self._caps = await probe(self._settings.emulator)
            except VirtbusError as exc:
                log.warning("cannot probe %s: %s", self._settings.emulator, exc)
                return None
        return self._caps

    def _build(self, live: DomainDefinition, caps: QemuCapabilities | None) -> QemuLaunch:
        ports = {index: _free_tcp_port() for index in graphics_needing_ports(live)}
        return build_command(
            live, QemuPaths(self._run_dir), kvm_available=self.kvm_usable(),
            emulator=self._settings.emulator, graphics_ports=ports, caps=caps,
        )  # fmt: skip

    async def start(self, ref: str) -> None:
        dom = self._get(ref)
        if dom.run is not None or dom.state != S.SHUTOFF:
            raise OperationInvalid(f"domain '{dom.defn.name}' is already active")
        live = dom.defn.copy()
        if live.hv_type == "kvm" and not self.kvm_usable():
            raise ConfigUnsupported(
                f"domain '{live.name}' has type 'kvm' but /dev/kvm is not usable on this host"
            )
        await self._check_files(live)
        launch = self._build(live, await self.capabilities())
        macs_generated = self._apply_generated(live, launch)
        qmp_socket = Path(launch.qmp_socket)
        for stale in (*launch.sockets, qmp_socket):
            if await aiofiles.os.path.exists(stale):
                await aiofiles.os.remove(stale)
        logfile = Path(launch.logfile)
        process = await spawn(list(launch.argv), uuid=live.uuid, logfile=logfile)
        run = _Run(
            self._next_id, live, process, qmp_socket, EventQueue(self._settings.event_queue),
            pidfile=Path(launch.pidfile), sockets=tuple(launch.sockets),
        )  # fmt: skip
        self._next_id += 1
        run.pending.add(ev.Pending.START)
        previous = dom.reason
        dom.run, dom.state, dom.reason = run, S.PAUSED, "starting_up"
        try:
            await self._attach(dom, run)
            pid = await read_pidfile(Path(launch.pidfile))
            if pid is not None and pid != process.pid:
                log.warning("pidfile of %s says %d, child is %d", live.name, pid, process.pid)
            await self._apply_runtime(run, launch)
            await self._write_status(dom, run, logfile)
            await run.monitor.execute("cont")  # type: ignore[union-attr]
            await self._wait(run, lambda: ev.Pending.START not in run.pending, "start")
            if dom.run is not run:
                raise OperationFailed("QEMU exited during start")
        except BaseException as exc:
            await self._abort_start(dom, run, previous)
            if isinstance(exc, VirtbusError | OSError):
                tail = await log_tail(logfile, self._settings.log_tail_bytes)
                raise OperationFailed(
                    f"QEMU failed to start domain '{live.name}': {exc}"
                    + (f"\n--- log tail ({logfile}):\n{tail}" if tail else "")
                ) from exc
            raise
        if macs_generated:
            await self._persist(dom.defn)

    def _apply_generated(self, live: DomainDefinition, launch: QemuLaunch) -> bool:
        """Write MACs the builder generated into the live and persistent definitions."""
        dom = self._domains[live.uuid]
        changed = False
        for index, mac in launch.generated_macs.items():
            live.set_interface_mac(index, mac)
            if index < len(dom.defn.interfaces) and not dom.defn.interfaces[index].mac:
                dom.defn.set_interface_mac(index, mac)
                changed = True
        return changed

    async def _apply_runtime(self, run: _Run, launch: QemuLaunch) -> None:
        """Balloon target, graphics ports and pty paths, while QEMU is still stopped.

        Each QMP call here happens only when the definition needs it.
        """
        monitor = run.monitor
        assert monitor is not None
        live = run.live
        if launch.balloon and launch.balloon_target_kib is not None:
            await monitor.execute("balloon", {"value": launch.balloon_target_kib * 1024})
        for gfx in live.graphics:
            if gfx.type == "vnc" and launch.vnc is not None:
                port = None
                if launch.vnc.autoport:
                    vnc = await monitor.execute("query-vnc")
                    service = str(vnc.get("service", "")) if isinstance(vnc, dict) else ""
                    port = int(service) if service.isdigit() else None
                elif launch.vnc.display is not None:
                    port = 5900 + launch.vnc.display
                if port is not None:
                    live.set_graphics_port(gfx.index, port)
            elif gfx.type == "spice" and launch.spice is not None:
                live.set_graphics_port(gfx.index, launch.spice.port)
        ptys = [c for c in launch.chardevs if c.type == "pty"]
        if ptys:
            found = await monitor.execute("query-chardev")
            by_label = {c.get("label"): str(c.get("filename", "")) for c in found or []}
            for cd in ptys:
                name = by_label.get(cd.chardev_id, "")
                if name.startswith("pty:"):
                    live.set_chardev_source_path(cd.kind, cd.index, name[4:])

    async def _attach(self, dom: _Domain, run: _Run) -> None:
        """Connect QMP and start the domain's event task."""
        monitor = Monitor(dom.defn.name, run.qmp_socket, self._settings, run.queue)
        await monitor.connect(
            self._settings.connect_timeout, run.process.alive, self._settings.exit_poll
        )
        run.monitor = monitor
        run.task = asyncio.create_task(
            self._domain_loop(dom, run), name=f"qemu-domain-{dom.defn.name}"
        )
        run.task.add_done_callback(_log_task_failure)

    async def _abort_start(self, dom: _Domain, run: _Run, previous_reason: str) -> None:
        run.pending.add(ev.Pending.DESTROY)
        if not await run.process.kill(self._settings):
            log.error("QEMU pid %d of %s survived SIGKILL", run.process.pid, dom.defn.name)
        await self._teardown(dom, run)
        dom.state, dom.reason = S.SHUTOFF, previous_reason

    # --- the per-domain event task ------------------------------------------------------
    async def _domain_loop(self, dom: _Domain, run: _Run) -> None:
        while dom.run is run:
            item = await run.queue.get()
            try:
                if isinstance(item, QmpEvent):
                    await self._on_qmp_event(dom, run, item)
                elif isinstance(item, MonitorLost):
                    if item.monitor is run.monitor:
                        run.monitor = None
                        await self._on_monitor_lost(dom, run)
                elif isinstance(item, Kick) and not run.process.alive():
                    await self._on_exit(dom, run)
            except VirtbusError as exc:
                log.warning("domain %s: handling %r failed: %s", dom.defn.name, item, exc)

    async def _on_qmp_event(self, dom: _Domain, run: _Run, item: QmpEvent) -> None:
        ctx = self._context(dom, run)
        status_reason = None
        if ev.needs_status(item.name, ctx) and run.monitor is not None:
            try:
                status = await run.monitor.execute("query-status")
                status_reason = ev.pause_reason(str(status.get("status", "")))
            except VirtbusError:
                status_reason = "unknown"
            ctx = self._context(dom, run)
        outcome = ev.map_event(item.name, item.data, ctx, status_reason=status_reason)
        self._apply(dom, run, outcome)
        for action in outcome.actions:
            if action == ev.Action.QUIT:
                self._helper(run, self._stop_process(dom, run), f"qemu-stop-{dom.defn.name}")
            elif run.monitor is not None:
                try:
                    await run.monitor.execute(action.value)
                except VirtbusError as exc:
                    log.warning("domain %s: %s failed: %s", dom.defn.name, action.value, exc)

    def _context(self, dom: _Domain, run: _Run) -> ev.Context:
        live = run.live
        return ev.Context(
            dom.state, dom.reason,
            ev.Lifecycle(live.on_poweroff, live.on_reboot, live.on_crash),
            frozenset(run.pending),
        )  # fmt: skip

    def _apply(self, dom: _Domain, run: _Run, outcome: ev.Outcome, *, silent: bool = False,
               reconciled: bool = False) -> None:  # fmt: skip
        run.pending |= outcome.add
        run.pending -= outcome.clear
        if outcome.state is not None:
            dom.state, dom.reason = outcome.state
        if not silent:
            for event, detail, data in outcome.events:
                self._emit(dom, event, detail, data, reconciled)
        self._notify(run)

    def _notify(self, run: _Run) -> None:
        keep = []
        for ready, fut in run.waiters:
            if fut.done():
                continue
            if ready() or run.ended.is_set():
                fut.set_result(None)
            else:
                keep.append((ready, fut))
        run.waiters = keep

    async def _wait(self, run: _Run, ready: Callable[[], bool], what: str,
                    timeout: float | None = None) -> None:  # fmt: skip
        """Wait until the event task made ``ready()`` true (or the run ended)."""
        if ready() or run.ended.is_set():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        run.waiters.append((ready, fut))
        limit = self._settings.qmp_timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(fut, limit)
        except TimeoutError:
            raise OperationTimeout(f"{what}: QEMU did not report the change in {limit}s") from None

    async def _on_monitor_lost(self, dom: _Domain, run: _Run) -> None:
        if await run.process.wait_exit(self._settings.exit_wait, self._settings.exit_poll):
            await self._on_exit(dom, run)
            return
        backoff = self._settings.reconnect
        delay = backoff.initial
        while run.process.alive():
            monitor = Monitor(dom.defn.name, run.qmp_socket, self._settings, run.queue)
            try:
                await monitor.connect(
                    self._settings.connect_timeout, run.process.alive, self._settings.exit_poll
                )
            except VirtbusError as exc:
                log.info("domain %s: QMP reconnect failed: %s", dom.defn.name, exc)
            else:
                run.monitor = monitor
                await self._resync(dom, run)
                return
            pause = delay * (1 - backoff.jitter * random.random())
            item = await run.queue.get_within(pause)
            if isinstance(item, QmpEvent):
                await self._on_qmp_event(dom, run, item)
            delay = min(delay * backoff.factor, backoff.maximum)
        await self._on_exit(dom, run)

    async def _resync(self, dom: _Domain, run: _Run, reconciled: bool = True) -> None:
        """After (re)connecting: take QEMU's run state as the truth."""
        assert run.monitor is not None
        status = await run.monitor.execute("query-status")
        running = bool(status.get("running"))
        if running and dom.state == S.PAUSED:
            self._apply(dom, run, ev.Outcome(
                events=(("resumed", "unpaused", {}),), state=(S.RUNNING, "unpaused")
            ), reconciled=reconciled)  # fmt: skip
        elif not running and dom.state == S.RUNNING:
            reason = ev.pause_reason(str(status.get("status", "")))
            self._apply(dom, run, ev.Outcome(
                events=(("suspended", "paused", {}),), state=(S.PAUSED, reason)
            ), reconciled=reconciled)  # fmt: skip

    async def _on_exit(self, dom: _Domain, run: _Run) -> None:
        if dom.run is not run:
            return
        starting = ev.Pending.START in run.pending
        # a QEMU that dies during start() is start's error, not an event
        self._apply(dom, run, ev.map_exit(self._context(dom, run)), silent=starting)
        await self._teardown(dom, run)

    async def _teardown(self, dom: _Domain, run: _Run) -> None:
        """Forget the run: tasks, monitor, status file, socket. Idempotent."""
        if dom.run is run:
            dom.run = None
        run.ended.set()
        self._notify(run)
        current = asyncio.current_task()
        for task in (run.task, *run.helpers):
            if task is not None and task is not current:
                task.cancel()
        if run.monitor is not None:
            monitor, run.monitor = run.monitor, None
            await monitor.close()
        for path in (self._status_path(dom.defn.uuid), run.qmp_socket, run.pidfile, *run.sockets):
            if path is not None and await aiofiles.os.path.exists(path):
                await aiofiles.os.remove(path)

    def _helper(self, run: _Run, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        run.helpers.add(task)
        task.add_done_callback(run.helpers.discard)
        task.add_done_callback(_log_task_failure)

    async def _stop_process(self, dom: _Domain, run: _Run) -> None:
        """Make QEMU exit: `quit`, then SIGTERM/SIGKILL (bounded). The exit is seen by EOF."""
        if run.monitor is not None:
            try:
                await run.monitor.execute("quit", timeout=self._settings.quit_wait)
            except VirtbusError as exc:
                log.debug("domain %s: quit: %s", dom.defn.name, exc)
        if not await run.process.wait_exit(self._settings.quit_wait, self._settings.exit_poll):
            await run.process.kill(self._settings)
        run.queue.put_control(Kick())

    # --- lifecycle ----------------------------------------------------------------------
    async def shutdown(self, ref: str, timeout: float | None = None) -> None:
        dom = self._get(ref)
        run = self._require(dom, S.RUNNING, verb="shut down")
        await self._execute(run, "system_powerdown")
        if timeout is not None:
            try:
                await asyncio.wait_for(run.ended.wait(), timeout)
            except TimeoutError:
                raise OperationTimeout(
                    f"domain '{dom.defn.name}' did not shut down within {timeout}s"
                ) from None

    async def destroy(self, ref: str) -> None:
        dom = self._get(ref)
        run = self._require(dom, *[s for s in S if s != S.SHUTOFF], verb="destroy")
        run.pending.add(ev.Pending.DESTROY)
        await self._stop_process(dom, run)
        if run.process.alive():
            raise OperationFailed(
                f"QEMU pid {run.process.pid} of '{dom.defn.name}' survived SIGKILL"
            )
        try:
            await asyncio.wait_for(run.ended.wait(), self._settings.exit_wait)
        except TimeoutError:
            await self._on_exit(dom, run)  # the event task is stuck: finish it here

    async def reboot(self, ref: str) -> None:
        dom = self._get(ref)
        run = self._require(dom, S.RUNNING, verb="reboot")
        if run.live.on_reboot == "destroy":
            await self._execute(run, "system_powerdown")  # SHUTDOWN -> stopped(shutdown)
            return
        run.pending.add(ev.Pending.FAKE_REBOOT)
        try:
            await self._execute(run, "system_powerdown")
        except VirtbusError:
            run.pending.discard(ev.Pending.FAKE_REBOOT)
            raise
        for task in [t for t in run.helpers if t.get_name().startswith("qemu-reboot-")]:
            task.cancel()
        self._helper(run, self._reboot_fallback(run), f"qemu-reboot-{dom.defn.name}")

    async def _reboot_fallback(self, run: _Run) -> None:
        """The guest ignored ACPI: reset it (its RESET event gives the reboot event)."""
        await asyncio.sleep(self._settings.reboot_fallback)
        pending = run.pending
        if ev.Pending.FAKE_REBOOT in pending and ev.Pending.NEEDS_CONT not in pending:
            await self._execute(run, "system_reset")

    async def reset(self, ref: str) -> None:
        dom = self._get(ref)
        run = self._require(dom, S.RUNNING, S.PAUSED, S.CRASHED, S.BLOCKED, verb="reset")
        await self._execute(run, "system_reset")

    async def suspend(self, ref: str) -> None:
        dom = self._get(ref)
        run = self._require(dom, S.RUNNING, verb="suspend")
        run.pending.add(ev.Pending.PAUSE)
        try:
            await self._execute(run, "stop")
            await self._wait(run, lambda: ev.Pending.PAUSE not in run.pending, "suspend")
        finally:
            run.pending.discard(ev.Pending.PAUSE)

    async def resume(self, ref: str) -> None:
        dom = self._get(ref)
        run = self._require(dom, S.PAUSED, verb="resume")
        run.pending.add(ev.Pending.RESUME)
        try:
            await self._execute(run, "cont")
            await self._wait(run, lambda: ev.Pending.RESUME not in run.pending, "resume")
        finally:
            run.pending.discard(ev.Pending.RESUME)

    async def _execute(self, run: _Run, cmd: str, args: dict[str, Any] | None = None) -> Any:
        if run.monitor is None:
            raise OperationFailed(f"{cmd}: the monitor of this domain is reconnecting")
        return await run.monitor.execute(cmd, args)

    # --- inspection ---------------------------------------------------------------------
    async def info(self, ref: str) -> DomainInfo:
        return await self._info(self._get(ref))

    async def _info(self, dom: _Domain) -> DomainInfo:
        run = dom.run
        defn = run.live if run else dom.defn
        memory = defn.current_memory_kib
        cpu = 0
        if run is not None:
            cpu = sum(cpu_time_ns(run.process.pid))
            if run.monitor is not None and (
                defn.memballoon is None or defn.memballoon.model != "none"
            ):
                try:
                    balloon = await run.monitor.execute("query-balloon")
                    memory = int(balloon["actual"]) // 1024
                except (VirtbusError, KeyError, TypeError, ValueError):
                    pass
        return DomainInfo(
            name=defn.name, uuid=defn.uuid, state=dom.state, reason=dom.reason,
            max_memory_kib=defn.memory_kib, memory_kib=memory, vcpus=defn.current_vcpus,
            cpu_time_ns=cpu, id=run.id if run else None, hv_type=defn.hv_type,
        )  # fmt: skip

    async def list_domains(self, include_inactive: bool = True) -> list[DomainInfo]:
        return [
            await self._info(dom)
            for dom in list(self._domains.values())
            if include_inactive or dom.run is not None
        ]

    async def xml(self, ref: str) -> str:
        dom = self._get(ref)
        if dom.run is None:
            return dom.defn.to_xml()
        live = dom.run.live.copy()
        live.root.set("id", str(dom.run.id))  # libvirt's <domain id='N'> while active
        return live.to_xml()

    async def host_resources(self) -> HostResources:
        meminfo = await _read_text("/proc/meminfo")
        cpuinfo = await _read_text("/proc/cpuinfo")
        mem = {
            line.split(":")[0]: int(line.split()[1])
            for line in meminfo.splitlines()
            if line.endswith("kB")
        }
        model = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
             if line.startswith("model name")),
            platform.processor() or "unknown",
        )  # fmt: skip
        return HostResources(
            cpus=os.cpu_count() or 1,
            memory_total_kib=mem.get("MemTotal", 0),
            memory_free_kib=mem.get("MemAvailable", mem.get("MemFree", 0)),
            arch=platform.machine(),
            cpu_model=model,
            hypervisor="kvm" if self.kvm_usable() else "qemu",
        )

    # --- status files / reattach --------------------------------------------------------
    def _status_path(self, uuid: str) -> Path:
        return self._run_dir / f"{uuid}.json"

    async def _write_status(self, dom: _Domain, run: _Run, logfile: Path) -> None:
        status = {"uuid": dom.defn.uuid, "pid": run.process.pid, "id": run.id,
                  "qmp_socket": str(run.qmp_socket), "logfile": str(logfile),
                  "pidfile": str(run.pidfile or ""), "sockets": [str(p) for p in run.sockets],
                  "xml": run.live.to_xml()}  # fmt: skip
        await _write_atomic(self._status_path(dom.defn.uuid), json.dumps(status))

    async def _reattach(self, dom: _Domain) -> None:
        path = self._status_path(dom.defn.uuid)
        if not await aiofiles.os.path.exists(path):
            return
        try:
            status = json.loads(await _read_text(path))
            pid, run_id, qmp_socket = int(status["pid"]), int(status["id"]), status["qmp_socket"]
            live = parse_domain_xml(status["xml"]) if status.get("xml") else dom.defn.copy()
        except (OSError, ValueError, KeyError, TypeError, VirtbusError) as exc:
            log.error("bad status file %s: %s", path, exc)
            await aiofiles.os.remove(path)
            return
        self._next_id = max(self._next_id, run_id + 1)
        if not is_domain_process(pid, dom.defn.uuid):
            await aiofiles.os.remove(path)
            dom.state, dom.reason = S.SHUTOFF, "unknown"
            self._emit(dom, "stopped", "failed", reconciled=True)
            return
        run = _Run(run_id, live, QemuProcess(pid, dom.defn.uuid), Path(qmp_socket),
                   EventQueue(self._settings.event_queue),
                   pidfile=Path(status["pidfile"]) if status.get("pidfile") else None,
                   sockets=tuple(Path(p) for p in status.get("sockets", ())))  # fmt: skip
        dom.run, dom.state, dom.reason = run, S.RUNNING, "unknown"
        try:
            await self._attach(dom, run)
            await self._resync(dom, run, reconciled=True)
        except VirtbusError as exc:
            log.error("domain %s: cannot reattach to QEMU pid %d: %s", dom.defn.name, pid, exc)
            if run.task is None:  # no event task to reconnect: keep retrying through one
                run.task = asyncio.create_task(
                    self._reconnect_then_loop(dom, run), name=f"qemu-domain-{dom.defn.name}"
                )
                run.task.add_done_callback(_log_task_failure)

    async def _reconnect_then_loop(self, dom: _Domain, run: _Run) -> None:
        await self._on_monitor_lost(dom, run)
        if dom.run is run:
            await self._domain_loop(dom, run)


def _free_tcp_port() -> int:
    """A port free right now on 127.0.0.1, for a SPICE server QEMU cannot autoport."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file."""
    await aiofiles.os.makedirs(path.parent, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    async with aiofiles.open(tmp, "w", encoding="utf-8") as fh:
        await fh.write(text)
        await fh.flush()
    await aiofiles.os.replace(tmp, path)


async def _read_text(path: str | Path) -> str:
    async with aiofiles.open(path, encoding="utf-8", errors="replace") as fh:
        return str(await fh.read())


def _log_task_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())
