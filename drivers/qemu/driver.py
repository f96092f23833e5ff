"""The QEMU driver: libvirt's QEMU driver behaviour behind virtbus' Driver protocol.

Each running domain has one QEMU process (started with ``-S -no-shutdown``, outliving the
agent), one QMP connection and one event task (:mod:`drivers.qemu.domain`): the API
methods here send a command, mark what they asked for (``pending``) and wait for that
task to see its effect, so an event is emitted exactly once, in QEMU's order, and
suspend/resume cost one QMP round trip.

Definitions and per-run status files live on disk (:mod:`drivers.qemu.state`); ``open``
reloads them, reattaches every QEMU left running and publishes, marked ``reconciled``,
what happened while the agent was away. ``close`` leaves every guest running.
``undefine`` is allowed only on a shut-off domain (virtbus has no transient domains yet).

``open`` and the reattach logic live in :mod:`drivers.qemu.reattach`, the live-migration
steps in :mod:`drivers.qemu.migrate_steps`: both are mixins of :class:`QemuDriver`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
from pathlib import Path
from typing import Any

import aiofiles.os

from drivers.base import DomainInfo, DomainRef, HostResources
from drivers.qemu import events as ev
from drivers.qemu import migration as mig
from drivers.qemu.argv import (
    QemuLaunch,
    QemuPaths,
    build_command,
    disk_paths,
    graphics_needing_ports,
)
from drivers.qemu.capabilities import QemuCapabilities, probe
from drivers.qemu.domain import Domain, Run, Runtime
from drivers.qemu.migrate_steps import HV_TYPES as _HV_TYPES
from drivers.qemu.migrate_steps import free_tcp_port as _free_tcp_port
from drivers.qemu.monitor import EventQueue
from drivers.qemu.process import cpu_time_ns, log_tail, read_pidfile, spawn
from drivers.qemu.reattach import QemuReattach
from drivers.qemu.settings import QemuSettings
from drivers.qemu.state import StateStore, UnknownQemu
from drivers.qemu.stats import QemuStats, StatsTarget, host_stats
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
from virtbus.store import read_bytes

log = logging.getLogger(__name__)
S = DomainState
_Domain = Domain  # the names used before the split (drivers/qemu/domain.py)
_Run = Run


class QemuDriver(QemuReattach):
    """QEMU/KVM domains on this host (see module docstring)."""

    name = "qemu"

    def __init__(
        self, state_dir: Path, run_dir: Path, settings: QemuSettings | None = None
    ) -> None:
        self._state_dir = Path(state_dir)
        self._run_dir = Path(run_dir)
        self._settings = settings or QemuSettings()
        self._store = StateStore(self._state_dir, self._run_dir)
        self._rt = Runtime(self._settings, self._store)
        self._domains: dict[str, Domain] = {}  # by uuid
        self._by_name: dict[str, str] = {}
        self._next_id = 1
        self._kvm: bool | None = None
        self._caps: QemuCapabilities | None = None
        self._stats = QemuStats()  # libvirt domstats (drivers/qemu/stats.py)
        self.unknown_processes: list[UnknownQemu] = []  # QEMUs seen at open, not ours
        self._migrations: dict[str, mig.Job] = {}  # by uuid: live migrations in or out

    # --- plumbing -----------------------------------------------------------------------
    async def close(self) -> None:
        """Disconnect QMP; every guest keeps running."""
        await asyncio.gather(*(dom.close() for dom in self._domains.values()))
        self._rt.sink = lambda _event: None

    def lookup(self, ref: str) -> DomainRef | None:
        dom = self._find(ref)
        return dom.ref if dom else None

    def state(self, ref: str) -> tuple[DomainState, str]:
        dom = self._get(ref)
        return dom.state, dom.reason

    def _find(self, ref: str) -> Domain | None:
        dom = self._domains.get(ref) or self._domains.get(ref.lower())
        if dom is None and (uuid := self._by_name.get(ref)):
            dom = self._domains.get(uuid)
        if dom is None and len(ref) == 32:
            dom = self._domains.get(f"{ref[:8]}-{ref[8:12]}-{ref[12:16]}-{ref[16:20]}-{ref[20:]}")
        return dom

    def _get(self, ref: str) -> Domain:
        dom = self._find(ref)
        if dom is None:
            raise NoDomainError(f"domain not found: no domain with matching name or uuid '{ref}'")
        return dom

    def _add(self, defn: DomainDefinition) -> Domain:
        dom = Domain(defn, self._rt)
        self._domains[defn.uuid] = dom
        self._by_name[defn.name] = defn.uuid
        return dom

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
            existing.emit("defined", "updated")
            return existing.ref
        dom = self._add(defn)
        dom.emit("defined", "added")
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
        await self._store.remove_definition(dom.defn.uuid)
        del self._domains[dom.defn.uuid]
        self._by_name.pop(dom.defn.name, None)
        dom.emit("undefined", "removed")

    async def _persist(self, defn: DomainDefinition) -> None:
        await self._store.save_definition(defn)

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
        for stray in self.unknown_processes:  # its status file was lost: never run it twice
            if stray.uuid == dom.defn.uuid and await aiofiles.os.path.exists(f"/proc/{stray.pid}"):
                raise OperationInvalid(
                    f"a QEMU process this agent does not manage (pid {stray.pid}) already runs "
                    f"domain '{dom.defn.name}'; stop it before starting the domain"
                )
        live = dom.defn.copy()
        if live.hv_type == "kvm" and not self.kvm_usable():
            raise ConfigUnsupported(
                f"domain '{live.name}' has type 'kvm' but /dev/kvm is not usable on this host"
            )
        await self._check_files(live)
        launch = self._build(live, await self.capabilities())
        macs_generated = self._apply_generated(live, launch)
        qmp_socket = Path(launch.qmp_socket)
        await self._store.check_bind_paths(launch.bind_paths)
        await self._store.remove_own_sockets((*launch.sockets, qmp_socket))
        logfile = Path(launch.logfile)
        process = await spawn(list(launch.argv), uuid=live.uuid, logfile=logfile)
        run = Run(
            self._next_id, live, process, qmp_socket, EventQueue(self._settings.event_queue),
            pidfile=Path(launch.pidfile), logfile=logfile, sockets=tuple(launch.sockets),
        )  # fmt: skip
        self._next_id += 1
        run.pending.add(ev.Pending.START)
        previous = dom.reason
        dom.run, dom.state, dom.reason = run, S.PAUSED, "starting_up"
        try:
            await dom.attach(run)
            pid = await read_pidfile(Path(launch.pidfile))
            if pid is not None and pid != process.pid:
                log.warning("pidfile of %s says %d, child is %d", live.name, pid, process.pid)
            await self._apply_runtime(run, launch)
            await dom.save_status(run)
            await run.monitor.execute("cont")  # type: ignore[union-attr]
            await dom.wait(run, lambda: ev.Pending.START not in run.pending, "start")
            if dom.run is not run:
                raise OperationFailed("QEMU exited during start")
        except BaseException as exc:
            await dom.abort_start(run, previous)
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

    async def _apply_runtime(self, run: Run, launch: QemuLaunch) -> None:
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
        run.live_xml = None  # runtime values written back: serialise it again

    # --- lifecycle ----------------------------------------------------------------------
    async def shutdown(self, ref: str, timeout: float | None = None) -> None:
        dom = self._get(ref)
        run = dom.require(S.RUNNING, verb="shut down")
        await dom.execute(run, "system_powerdown")
        if timeout is not None:
            try:
                await asyncio.wait_for(run.ended.wait(), timeout)
            except TimeoutError:
                raise OperationTimeout(
                    f"domain '{dom.defn.name}' did not shut down within {timeout}s"
                ) from None

    async def destroy(self, ref: str) -> None:
        dom = self._get(ref)
        run = dom.require(*[s for s in S if s != S.SHUTOFF], verb="destroy")
        run.pending.add(ev.Pending.DESTROY)
        await dom.stop_process(run)
        if run.process.alive():
            raise OperationFailed(
                f"QEMU pid {run.process.pid} of '{dom.defn.name}' survived SIGKILL"
            )
        try:
            await asyncio.wait_for(run.ended.wait(), self._settings.exit_wait)
        except TimeoutError:
            await dom.on_exit(run)  # the event task is stuck: finish it here

    async def reboot(self, ref: str) -> None:
        dom = self._get(ref)
        run = dom.require(S.RUNNING, verb="reboot")
        if run.live.on_reboot == "destroy":
            await dom.execute(run, "system_powerdown")  # SHUTDOWN -> stopped(shutdown)
            return
        run.pending.add(ev.Pending.FAKE_REBOOT)
        try:
            await dom.execute(run, "system_powerdown")
        except VirtbusError:
            run.pending.discard(ev.Pending.FAKE_REBOOT)
            raise
        for task in [t for t in run.helpers if t.get_name().startswith("qemu-reboot-")]:
            task.cancel()
        dom.helper(run, self._reboot_fallback(dom, run), f"qemu-reboot-{dom.defn.name}")

    async def _reboot_fallback(self, dom: Domain, run: Run) -> None:
        """The guest ignored ACPI: reset it (its RESET event gives the reboot event)."""
        await asyncio.sleep(self._settings.reboot_fallback)
        pending = run.pending
        if ev.Pending.FAKE_REBOOT in pending and ev.Pending.NEEDS_CONT not in pending:
            await dom.execute(run, "system_reset")

    async def reset(self, ref: str) -> None:
        dom = self._get(ref)
        run = dom.require(S.RUNNING, S.PAUSED, S.CRASHED, S.BLOCKED, verb="reset")
        await dom.execute(run, "system_reset")

    async def suspend(self, ref: str) -> None:
        await self._vcpus(ref, S.RUNNING, ev.Pending.PAUSE, "stop", "suspend")

    async def resume(self, ref: str) -> None:
        await self._vcpus(ref, S.PAUSED, ev.Pending.RESUME, "cont", "resume")

    async def _vcpus(self, ref: str, state: S, pending: ev.Pending, cmd: str, verb: str) -> None:
        """stop/cont, returning once the event task has seen the resulting QMP event (so
        the event is emitted once, by that task, and no extra QMP call is needed)."""
        dom = self._get(ref)
        run = dom.require(state, verb=verb)
        run.pending.add(pending)
        try:
            await dom.execute(run, cmd)
            await dom.wait(run, lambda: pending not in run.pending, verb)
        finally:
            run.pending.discard(pending)

    # --- inspection ---------------------------------------------------------------------
    async def info(self, ref: str) -> DomainInfo:
        return await self._info(self._get(ref))

    async def _info(self, dom: Domain) -> DomainInfo:
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
            persistent=not self._incoming(dom),
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

    # --- statistics (drivers/qemu/stats.py) ----------------------------------------------
    async def stats(
        self, refs: list[str] | None = None, groups: frozenset[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        doms = list(self._domains.values()) if refs is None else [self._get(r) for r in refs]
        return await self._stats.collect([self._stats_target(d) for d in doms], groups)

    def _stats_target(self, dom: Domain) -> StatsTarget:
        run = dom.run
        if run is None:
            return StatsTarget(dom.defn.name, dom.state, dom.reason, dom.defn)
        monitor = run.monitor  # None while reconnecting: QMP fields are left out
        execute = monitor.execute if monitor is not None and monitor.connected else None
        return StatsTarget(dom.defn.name, dom.state, dom.reason, run.live, run.process.pid,
                           execute, kvm=run.live.hv_type == "kvm")  # fmt: skip

    async def host_stats(self) -> dict[str, Any]:
        out = host_stats()
        out["domains.active"] = sum(d.run is not None for d in self._domains.values())
        return out

    @property
    def qmp_connections(self) -> int:
        """Open QMP connections (the agent's health metrics)."""
        return sum(
            1 for d in self._domains.values()
            if d.run is not None and d.run.monitor is not None and d.run.monitor.connected
        )  # fmt: skip

    async def host_resources(self) -> HostResources:
        meminfo = ((await read_bytes(Path("/proc/meminfo"))) or b"").decode(errors="replace")
        cpuinfo = ((await read_bytes(Path("/proc/cpuinfo"))) or b"").decode(errors="replace")
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
