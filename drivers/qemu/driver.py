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
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import socket
from pathlib import Path
from typing import Any

import aiofiles.os

from drivers.base import (
    DomainInfo,
    DomainRef,
    EventSink,
    HostResources,
    MigrationParams,
    MigrationStatus,
)
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
from drivers.qemu.monitor import EventQueue
from drivers.qemu.process import cpu_time_ns, log_tail, read_pidfile, spawn
from drivers.qemu.settings import QemuSettings
from drivers.qemu.state import RunStatus, StateStore, UnknownQemu, remove_files
from drivers.qemu.stats import QemuStats, StatsTarget, host_stats
from virtbus.domain import DomainDefinition, parse_domain_xml
from virtbus.errors import (
    ConfigUnsupported,
    MigrateFailed,
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
_HV_TYPES = ("qemu", "kvm")
_Domain = Domain  # the names used before the split (drivers/qemu/domain.py)
_Run = Run


class QemuDriver:
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
    async def open(self, sink: EventSink) -> None:
        """Load definitions, reattach every QEMU left running (concurrently), reconcile."""
        self._rt.sink = sink
        await self._store.prepare()
        for defn in await self._store.load_definitions():
            self._add(defn)
        found: list[tuple[Domain, RunStatus]] = []
        for uuid in await self._store.status_uuids():
            status = await self._store.read_status(uuid)
            if status is None:
                continue
            dom = self._domains.get(uuid)
            if dom is None and _job_kind(status) == "incoming":
                dom = self._transient(status)  # never persisted before finish(True)
            elif dom is None:
                dom = await self._restore_definition(status)
            if dom is not None and dom.run is None:
                found.append((dom, status))
                self._next_id = max(self._next_id, status.id + 1)
        await asyncio.gather(*(self._reattach(dom, status) for dom, status in found))
        known = {d.run.process.pid for d in self._domains.values() if d.run is not None}
        self.unknown_processes = await self._store.unknown_qemus(known)
        for proc in self.unknown_processes:
            log.warning("QEMU pid %d (uuid %s) runs in %s but is not known to this agent;"
                        " leaving it alone", proc.pid, proc.uuid, self._run_dir)  # fmt: skip

    async def _restore_definition(self, status: RunStatus) -> Domain | None:
        """A running QEMU whose definition is lost: re-create it from the live XML."""
        try:
            defn = parse_domain_xml(status.xml)
        except VirtbusError as exc:
            log.error("status of %s has no usable XML (%s): its QEMU is left alone",
                      status.uuid, exc)  # fmt: skip
            return None
        if defn.uuid != status.uuid or defn.name in self._by_name:
            log.error("status of %s does not match its definition: left alone", status.uuid)
            return None
        log.warning("definition of running domain %s was missing: restored from its status",
                    defn.name)  # fmt: skip
        await self._persist(defn)
        return self._add(defn)

    def _transient(self, status: RunStatus) -> Domain | None:
        """The domain of an incoming migration's QEMU, in memory only (see _reattach)."""
        try:
            defn = parse_domain_xml(status.xml)
        except VirtbusError as exc:
            log.error("status of incoming %s has no usable XML (%s): its QEMU is left alone",
                      status.uuid, exc)  # fmt: skip
            return None
        if defn.uuid != status.uuid or defn.name in self._by_name:
            log.error("status of incoming %s does not match: left alone", status.uuid)
            return None
        return self._add(defn)

    async def _reattach(self, dom: Domain, status: RunStatus) -> None:
        """Reattach a QEMU, then the migration job it was in, so a coordinator that asks
        (``migrate_status``, ``info``) hears the truth and can finish or roll it back.

        An incoming QEMU whose migration was not finished stays transient and paused
        (migration): only ``migrate_finish`` resumes it or kills it. An outgoing one gets
        its job back from ``query-migrate`` (QEMU kept migrating while we were away).
        """
        kind = _job_kind(status)
        await dom.reattach(status)
        run = dom.run
        job_map = status.job or {}
        params = MigrationParams.from_map(dict(job_map.get("params") or {}))
        if kind == "incoming":
            new_domain = bool(job_map.get("new_domain", True))
            job = mig.Job("destination", params, self.migration_settings,
                          defn=dom.defn.copy(), new_domain=new_domain)  # fmt: skip
            if run is None:  # the incoming QEMU died meanwhile: nothing came of it
                self._drop_incoming(dom, job)
                return
            run.migration = job
            run.pending.add(ev.Pending.INCOMING)
            dom.state, dom.reason = S.PAUSED, "migration"  # never resumed by a reattach
            self._migrations[dom.defn.uuid] = job
            dom.helper(run, self._watch_incoming(dom, run, job), f"qemu-incoming-{dom.defn.name}")
            await self._refresh_job(dom, run, job)
            log.warning("domain %s: incoming migration reattached (%s), kept paused",
                        dom.defn.name, job.status.status)  # fmt: skip
        elif kind == "outgoing" and run is not None:
            job = mig.Job("source", params, self.migration_settings)
            await self._refresh_job(dom, run, job)
            if job.status.status == "none":  # it never started (or QEMU forgot it)
                run.job = None
                await dom.save_status(run)
                return
            self._migrations[dom.defn.uuid] = run.migration = job
            run.pending.add(ev.Pending.MIGRATING)
            if job.active:
                emit = lambda st: dom.emit("migration", None, st.to_map())  # noqa: E731

                async def execute(cmd: str, args: dict[str, Any] | None = None) -> Any:
                    return await dom.execute(run, cmd, args)

                dom.helper(run, job.follow(execute, emit), f"qemu-migrate-{dom.defn.name}")
            log.warning("domain %s: outgoing migration reattached (%s)",
                        dom.defn.name, job.status.status)  # fmt: skip

    async def _refresh_job(self, dom: Domain, run: Run, job: mig.Job) -> None:
        """The job's status from ``query-migrate`` (an end status ends the job)."""
        try:
            fresh = mig.status_from_query(await dom.execute(run, "query-migrate"))
        except VirtbusError as exc:
            log.warning("domain %s: query-migrate after reattach: %s", dom.defn.name, exc)
            return
        job.status = fresh
        if fresh.status in mig.POSTCOPY:
            job.postcopy_started = True
        if fresh.status in mig.TERMINAL:
            job.end(fresh.status, fresh.error)

    async def close(self) -> None:
        """Disconnect QMP; every guest keeps running."""
        await asyncio.gather(*(dom.close() for dom in self._domains.values()))
        self._rt.sink = lambda _event: None

    def lookup(self, ref: str) -> DomainRef | None:
        dom = self._find(ref)
        return dom.ref if dom else None

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
        for stale in (*launch.sockets, qmp_socket):
            if await aiofiles.os.path.exists(stale):
                await aiofiles.os.remove(stale)
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
        dom = self._get(ref)
        run = dom.require(S.RUNNING, verb="suspend")
        run.pending.add(ev.Pending.PAUSE)
        try:
            await dom.execute(run, "stop")
            await dom.wait(run, lambda: ev.Pending.PAUSE not in run.pending, "suspend")
        finally:
            run.pending.discard(ev.Pending.PAUSE)

    async def resume(self, ref: str) -> None:
        dom = self._get(ref)
        run = dom.require(S.PAUSED, verb="resume")
        run.pending.add(ev.Pending.RESUME)
        try:
            await dom.execute(run, "cont")
            await dom.wait(run, lambda: ev.Pending.RESUME not in run.pending, "resume")
        finally:
            run.pending.discard(ev.Pending.RESUME)

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

    # --- live migration: libvirt's v3 steps (QMP sequences in drivers/qemu/migration.py) --
    migration_settings = mig.MigrationSettings()  # replace per instance to tune

    def _incoming(self, dom: Domain) -> bool:
        """A transient domain: an incoming migration not finished yet."""
        job = self._migrations.get(dom.defn.uuid)
        return job is not None and job.role == "destination" and not job.finished

    async def migrate_begin(self, ref: str) -> str:
        dom = self._get(ref)
        run = dom.require(S.RUNNING, S.PAUSED, verb="migrate")
        job = self._migrations.get(dom.defn.uuid)
        if ev.Pending.INCOMING in run.pending or (job is not None and job.active):
            raise OperationInvalid(f"domain '{dom.defn.name}' is already migrating")
        return run.live.to_xml()  # what the source runs: the destination must run the same

    async def migrate_prepare(self, xml: str, params: MigrationParams) -> str:
        """Start an incoming QEMU (``-incoming defer``, paused) and ``migrate-incoming``."""
        mig.validate(params)
        defn = parse_domain_xml(xml)
        if defn.hv_type not in _HV_TYPES:
            raise ConfigUnsupported(f"domain type '{defn.hv_type}' is not supported here")
        other = self._by_name.get(defn.name)
        if other is not None and other != defn.uuid:
            raise OperationFailed(f"domain '{defn.name}' already exists with uuid {other}")
        dom = self._domains.get(defn.uuid)
        if dom is not None and (dom.run is not None or dom.state != S.SHUTOFF):
            raise OperationInvalid(f"domain '{defn.name}' is already active on this host")
        if defn.hv_type == "kvm" and not self.kvm_usable():
            raise ConfigUnsupported(f"domain '{defn.name}' needs KVM: /dev/kvm is not usable")
        await self._check_files(defn)
        live = defn.copy()
        ports = {index: _free_tcp_port() for index in graphics_needing_ports(live)}
        launch = build_command(
            live, QemuPaths(self._run_dir), kvm_available=self.kvm_usable(), incoming="defer",
            emulator=self._settings.emulator, graphics_ports=ports, caps=await self.capabilities(),
        )  # fmt: skip
        qmp_socket, logfile = Path(launch.qmp_socket), Path(launch.logfile)
        await remove_files(*launch.sockets, qmp_socket)
        process = await spawn(list(launch.argv), uuid=live.uuid, logfile=logfile)
        run = Run(
            self._next_id, live, process, qmp_socket, EventQueue(self._settings.event_queue),
            pidfile=Path(launch.pidfile), logfile=logfile, sockets=tuple(launch.sockets),
            job={"migration": "incoming", "params": params.to_map(), "new_domain": dom is None},
        )  # fmt: skip
        self._next_id += 1
        job = mig.Job("destination", params, self.migration_settings, defn=defn,
                      new_domain=dom is None)  # fmt: skip
        run.migration = job
        run.pending.add(ev.Pending.INCOMING)
        dom = dom or self._add(defn)
        previous = dom.reason
        dom.run, dom.state, dom.reason = run, S.PAUSED, "migration"
        self._migrations[defn.uuid] = job
        try:
            await dom.attach(run)
            execute = run.monitor.execute  # type: ignore[union-attr]
            await mig.configure(execute, params, "destination", self.migration_settings)
            uri = await mig.start_incoming(execute, params, self.migration_settings)
            await dom.save_status(run)
        except BaseException as exc:
            await dom.abort_start(run, previous)
            self._drop_incoming(dom, job)
            if isinstance(exc, VirtbusError | OSError):
                tail = await log_tail(logfile, self._settings.log_tail_bytes)
                raise MigrateFailed(
                    f"cannot prepare the incoming migration of '{defn.name}': {exc}"
                    + (f"\n--- log tail ({logfile}):\n{tail}" if tail else "")
                ) from exc
            raise
        dom.helper(run, self._watch_incoming(dom, run, job), f"qemu-incoming-{defn.name}")
        dom.emit("started", "migrated")  # libvirt emits it at prepare (paused, migration)
        return uri

    async def _watch_incoming(self, dom: Domain, run: Run, job: mig.Job) -> None:
        """An incoming QEMU that ends before finish(True) takes its transient domain along
        (the run's teardown cancels this helper after setting ``ended``)."""
        try:
            await run.ended.wait()
        finally:
            if run.ended.is_set() and not job.finished:
                self._drop_incoming(dom, job)

    def _drop_incoming(self, dom: Domain, job: mig.Job) -> None:
        if self._migrations.get(dom.defn.uuid) is job:
            del self._migrations[dom.defn.uuid]
        if job.new_domain and dom.run is None and self._domains.get(dom.defn.uuid) is dom:
            del self._domains[dom.defn.uuid]  # transient: vanishes without `undefined`
            self._by_name.pop(dom.defn.name, None)

    async def migrate_perform(self, ref: str, uri: str, params: MigrationParams) -> None:
        """Configure the source and ``migrate``; a job task follows and reports progress."""
        mig.validate(params)
        mig.parse_tcp_uri(uri)
        dom = self._get(ref)
        run = dom.require(S.RUNNING, S.PAUSED, verb="migrate")
        old = self._migrations.get(dom.defn.uuid)
        if ev.Pending.INCOMING in run.pending or (old is not None and old.active):
            raise OperationInvalid(f"domain '{dom.defn.name}' is already migrating")

        async def execute(cmd: str, args: dict[str, Any] | None = None) -> Any:
            return await dom.execute(run, cmd, args)

        settings = self.migration_settings
        try:
            await mig.configure(execute, params, "source", settings)
        except VirtbusError as exc:
            raise MigrateFailed(
                f"cannot configure the migration of '{dom.defn.name}': {exc}"
            ) from exc
        job = mig.Job("source", params, settings)
        self._migrations[dom.defn.uuid] = run.migration = job
        run.pending -= {ev.Pending.MIGRATED_OUT}
        run.pending.add(ev.Pending.MIGRATING)
        emit = lambda st: dom.emit("migration", None, st.to_map())  # noqa: E731
        dom.helper(run, job.follow(execute, emit), f"qemu-migrate-{dom.defn.name}")
        run.job = {"migration": "outgoing", "uri": uri, "params": params.to_map()}
        try:
            await execute("migrate", {"uri": uri})
        except VirtbusError as exc:
            job.end("failed", str(exc))
            run.pending.discard(ev.Pending.MIGRATING)
            run.job = None
            raise MigrateFailed(f"migration of '{dom.defn.name}' to {uri} failed: {exc}") from exc
        await dom.save_status(run)

    async def migrate_status(self, ref: str) -> MigrationStatus:
        dom = self._get(ref)
        job = self._migrations.get(dom.defn.uuid)
        if job is None:
            return MigrationStatus("none")
        run = dom.run
        if job.active and run is not None and run.monitor is not None:
            try:
                fresh = mig.status_from_query(await run.monitor.execute("query-migrate"))
            except VirtbusError:
                return job.status
            if fresh.status != "none":
                fresh.passes = max(fresh.passes, job.status.passes)
                return fresh
        return job.status

    async def migrate_cancel(self, ref: str) -> None:
        dom = self._get(ref)
        job = self._migrations.get(dom.defn.uuid)
        if job is None or job.role != "source" or not job.active or dom.run is None:
            raise OperationInvalid(f"no migration in progress for domain '{dom.defn.name}'")
        if job.in_postcopy:  # libvirt refuses too: the destination already runs the guest
            raise OperationInvalid(
                f"cannot cancel the migration of '{dom.defn.name}' in postcopy mode"
            )
        await dom.execute(dom.run, "migrate_cancel")
        if not await job.wait_done(self.migration_settings.cancel_wait):
            raise OperationTimeout(f"migration of '{dom.defn.name}' did not stop after cancel")

    async def migrate_finish(self, ref: str, success: bool) -> None:
        """Destination: resume and own the definition, or kill the incoming QEMU."""
        dom = self._get(ref)
        job = self._migrations.get(dom.defn.uuid)
        run = dom.run
        if job is None or job.role != "destination":
            raise OperationInvalid(f"domain '{dom.defn.name}' is not an incoming migration")
        if not success or run is None:
            if run is not None:
                run.pending.add(ev.Pending.DESTROY)  # with INCOMING: stopped(failed)
                await dom.stop_process(run)
                await self._wait_ended(dom, run)
            self._drop_incoming(dom, job)
            if success:
                raise MigrateFailed(f"the incoming QEMU of '{dom.defn.name}' is gone")
            return
        try:
            await self._resume_incoming(dom, run, job)
        except VirtbusError as exc:  # as libvirt: a failed finish kills the destination
            await self.migrate_finish(ref, False)
            raise MigrateFailed(f"cannot finish the migration of '{dom.defn.name}': {exc}") from exc

    async def _resume_incoming(self, dom: Domain, run: Run, job: mig.Job) -> None:
        settings = self.migration_settings
        done = ("completed", "postcopy-active")
        if job.status.status not in done:  # the MIGRATION event may still be on its way
            fresh = mig.status_from_query(await dom.execute(run, "query-migrate"))
            if fresh.status in done:
                job.status = fresh
            elif not await job.wait_status(lambda st: st.status in done, settings.finish_wait):
                raise MigrateFailed(f"incoming migration is '{job.status.status}', not completed")
        job.finished = True
        defn = job.defn or run.live.copy()
        await self._persist(defn)
        dom.defn = defn
        dom.emit("defined", "added" if job.new_domain else "updated")
        await dom.execute(run, "cont")  # RESUME with INCOMING: resumed(migrated)
        await dom.wait(run, lambda: ev.Pending.INCOMING not in run.pending, "migrate_finish")
        if self._migrations.get(dom.defn.uuid) is job:
            del self._migrations[dom.defn.uuid]
        run.migration, run.job = None, None
        await dom.save_status(run)

    async def migrate_confirm(self, ref: str, success: bool) -> None:
        """Source: stop and forget the old instance, or resume it if the migration paused it."""
        dom = self._get(ref)
        uuid = dom.defn.uuid
        job = self._migrations.get(uuid)
        run = dom.run
        if success:
            if job is not None and job.active:  # its last MIGRATION event may be on its way
                done = mig.TERMINAL
                await job.wait_status(lambda st: st.status in done, self._settings.qmp_timeout)
            if job is None or job.status.status != "completed":
                raise OperationInvalid(f"migration of domain '{dom.defn.name}' has not completed")
            if run is not None:
                run.pending.add(ev.Pending.MIGRATED_OUT)  # its exit: stopped(migrated)
                await dom.stop_process(run)
                await self._wait_ended(dom, run)
            self._migrations.pop(uuid, None)
            await self._store.remove_definition(uuid)
            self._domains.pop(uuid, None)
            self._by_name.pop(dom.defn.name, None)
            dom.emit("undefined", "removed")
            return
        if job is not None and job.active and not job.in_postcopy:
            await self.migrate_cancel(ref)
        self._migrations.pop(uuid, None)
        if run is None:
            return
        run.migration, run.job = None, None
        if job is not None and job.in_postcopy:
            dom.state, dom.reason = S.PAUSED, "postcopy_failed"
            dom.emit("suspended", "postcopy_failed")
            run.pending.discard(ev.Pending.MIGRATING)
            raise MigrateFailed(
                f"the migration of '{dom.defn.name}' failed after switching to postcopy: the"
                " guest's memory is split between the hosts, it cannot be resumed here"
            )
        if dom.state == S.PAUSED and dom.reason == "migration":
            run.pending.add(ev.Pending.RESUME)
            try:
                await dom.execute(run, "cont")  # RESUME with MIGRATING: resumed(migrated)
                await dom.wait(run, lambda: ev.Pending.RESUME not in run.pending, "confirm")
            finally:
                run.pending.discard(ev.Pending.RESUME)
        run.pending.discard(ev.Pending.MIGRATING)
        await dom.save_status(run)

    async def _wait_ended(self, dom: Domain, run: Run) -> None:
        try:
            await asyncio.wait_for(run.ended.wait(), self._settings.exit_wait)
        except TimeoutError:
            await dom.on_exit(run)  # the event task is stuck: finish it here


def _job_kind(status: RunStatus) -> str | None:
    """``incoming``/``outgoing`` when the run was in a live migration, else None."""
    job = status.job or {}
    kind = job.get("migration")
    return kind if kind in ("incoming", "outgoing") else None


def _free_tcp_port() -> int:
    """A port free right now on 127.0.0.1, for a SPICE server QEMU cannot autoport."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
