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

:class:`QemuDriver` is the one class implementing :class:`drivers.base.Driver`; it is
composed of collaborators, each with one job, and delegates to them:

- :class:`~drivers.qemu.registry.DomainRegistry`: the domains by uuid and name, lookups;
- :class:`~drivers.qemu.launch.Launcher`: the one launch of a QEMU (``start`` and an
  incoming migration), and the launch steps that acquire host resources for it;
- :class:`~drivers.qemu.migrate_steps.MigrationSteps`: the live-migration steps and jobs;
- :class:`~drivers.qemu.reattach.Reattacher`: ``open``, the reattach of running QEMUs;
- :class:`~drivers.qemu.snapshots.QemuSnapshots`: internal snapshots (QMP jobs, qemu-img),
  their metadata in :class:`~drivers.snapshots.SnapshotStore` under the state dir;
  external disk-only ones in :mod:`drivers.qemu.external`;
- :class:`~drivers.qemu.backup.QemuBackups`: checkpoints (persistent dirty bitmaps, their
  metadata in :class:`~drivers.checkpoints.CheckpointStore`) and push-mode backups;
- :class:`~drivers.qemu.blockjobs.QemuBlockJobs`: block jobs (commit, pull), followed as
  ``block_job`` events, adopted again after a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from drivers.base import (
    Affect,
    BlockInfo,
    DomainInfo,
    DomainRef,
    EventSink,
    HostResources,
    TapProvider,
    VolumeResolver,
)
from drivers.checkpoints import CheckpointStore
from drivers.host import host_resources as read_host_resources
from drivers.memory import has_balloon
from drivers.qemu import events as ev
from drivers.qemu.argv_common import ArgvSettings
from drivers.qemu.backup import QemuBackups
from drivers.qemu.blockjobs import QemuBlockJobs
from drivers.qemu.capabilities import QemuCapabilities
from drivers.qemu.cgroup import DeviceCgroups
from drivers.qemu.dac import DacLabels
from drivers.qemu.devices import DeviceChanges, VolumeLeases
from drivers.qemu.domain import Domain, Run, Runtime
from drivers.qemu.launch import GraphicsPorts, Launcher, LaunchStep
from drivers.qemu.migrate_steps import MigrationSteps
from drivers.qemu.migration import MigrationSettings
from drivers.qemu.nics import NicChanges
from drivers.qemu.process import cpu_time_ns
from drivers.qemu.reattach import Reattacher
from drivers.qemu.registry import DomainRegistry
from drivers.qemu.saves import QemuSaves
from drivers.qemu.settings import QemuSettings
from drivers.qemu.snapshots import QemuSnapshots
from drivers.qemu.state import StateStore
from drivers.qemu.stats import QemuStats, StatsTarget, host_stats
from drivers.qemu.taps import TapLeases
from drivers.snapshots import SnapshotStore
from virtbus.domain import DomainDefinition, parse_domain_xml
from virtbus.domain.bandwidth import Bandwidth, RateChange
from virtbus.errors import OperationFailed, OperationInvalid, OperationTimeout, VirtbusError
from virtbus.protocol.backup import BackupStarted, CheckpointInfo, DomainJobInfo
from virtbus.protocol.blockjob import (
    BlockCommit,
    BlockCopy,
    BlockError,
    BlockJobEnd,
    BlockJobInfo,
    BlockPull,
)
from virtbus.protocol.events import DomainState
from virtbus.protocol.migration import CopyDisk, MigrationParams, MigrationStatus, NbdTarget
from virtbus.protocol.snapshot import SnapshotInfo

log = logging.getLogger(__name__)
S = DomainState


class QemuDriver:
    """QEMU/KVM domains on this host (see module docstring).

    ``steps`` are launch steps (:class:`~drivers.qemu.launch.LaunchStep`) run by every
    launch after the built-in ones; ``migration`` tunes the live-migration jobs.
    """

    name = "qemu"

    def __init__(
        self, state_dir: Path, run_dir: Path, settings: QemuSettings | None = None, *,
        migration: MigrationSettings | None = None, steps: Sequence[LaunchStep] = (),
        caps: QemuCapabilities | None = None,
    ) -> None:  # fmt: skip
        """``caps``: the emulator's capabilities when already known (None: probed once)."""
        self._settings = settings or QemuSettings()
        self._store = StateStore(Path(state_dir), Path(run_dir))
        self._volumes = VolumeLeases()  # <disk type='volume'>: the agent hands its pools in
        # after the volumes: their paths are given to the QEMU user too
        state = Path(state_dir)
        self._dac = DacLabels(self._settings.qemu_user, Path(run_dir),
                              uid_range=self._settings.qemu_uid_range, state_dir=state)  # fmt: skip
        # last: the volumes are resolved, and a refused rule fails before QEMU exists
        self._cgroups = DeviceCgroups(self._settings.cgroup_devices, Path(run_dir),
                                      extra=self._settings.cgroup_devices_allow)  # fmt: skip
        argv = self._settings.argv or ArgvSettings.under(state)
        self._taps = TapLeases(argv)  # <interface type='network'>: the agent hands its networks in
        self._rt = Runtime(
            self._settings, self._store,
            steps=(GraphicsPorts(), self._volumes, self._taps, self._dac, self._cgroups, *steps),
        )  # fmt: skip
        self._registry = DomainRegistry(self._rt)
        self._launcher = Launcher(self._rt, self._registry, argv, caps=caps,
                                  pools=self._volumes.pool_targets, dac=self._dac,
                                  cgroups=self._cgroups,
                                  tap_placeholders=self._taps.placeholders)  # fmt: skip
        self._devices = DeviceChanges(
            self._registry, self._launcher, self._store, self._settings, self._volumes,
            NicChanges(self._taps, self._settings.detach_timeout), self._cgroups,
        )  # fmt: skip
        self._migrations = MigrationSteps(
            self._registry, self._launcher, self._store, self._settings,
            migration or MigrationSettings(),
        )  # fmt: skip
        self._reattacher = Reattacher(self._registry, self._store, self._migrations)
        self._stats = QemuStats()  # libvirt domstats (drivers/qemu/stats.py)
        self._saves = QemuSaves(
            self._registry, self._launcher, self._store, self._settings, state / "save"
        )
        self._snapshot_store = SnapshotStore(state / "snapshots")
        self._snapshots = QemuSnapshots(self._registry, self._launcher, self._snapshot_store,
                                        self._settings, self._store, self._saves)  # fmt: skip
        self._blockjobs = QemuBlockJobs(self._registry, self._store, self._settings,
                                        self._launcher, self._snapshots.run_job)  # fmt: skip
        self._checkpoint_store = CheckpointStore(state / "checkpoints")
        self._backups = QemuBackups(self._registry, self._launcher, self._checkpoint_store,
                                    self._settings, self._snapshots.run_job,
                                    state / "backups")  # fmt: skip

    # --- plumbing -----------------------------------------------------------------------
    async def open(self, sink: EventSink) -> None:
        """Load definitions, reattach every QEMU left running, reconcile (reattach.py)."""
        self._cgroups.check()  # cgroup_devices=on needs the v1 hierarchy
        self._rt.sink = sink
        await self._snapshot_store.load()
        await self._checkpoint_store.load()
        await self._reattacher.open()
        # uids (qemu_uid_range) of domains lost while the agent was away are free again
        await asyncio.to_thread(self._launcher.prune_uids, {d.defn.uuid for d in self._registry})
        await self._blockjobs.adopt()
        await self._backups.adopt()

    async def close(self) -> None:
        """Disconnect QMP; every guest keeps running (and its block jobs go on)."""
        await self._blockjobs.close()
        await self._backups.close()
        await asyncio.gather(*(dom.close() for dom in self._registry))
        self._rt.sink = lambda _event: None

    def lookup(self, ref: str) -> DomainRef | None:
        dom = self._registry.find(ref)
        return dom.ref if dom else None

    def state(self, ref: str) -> tuple[DomainState, str]:
        dom = self._registry.get(ref)
        return dom.state, dom.reason

    # --- storage and devices (devices.py) -----------------------------------------------
    def set_volume_resolver(self, resolver: VolumeResolver) -> None:
        self._volumes.resolver = resolver

    def set_tap_provider(self, provider: TapProvider) -> None:
        self._taps.provider = provider

    async def attach_device(self, ref: str, xml: str, affect: Affect) -> None:
        await self._devices.attach_device(ref, xml, affect)

    async def set_interface_link(self, ref: str, interface: str, up: bool,
                                 affect: Affect) -> None:  # fmt: skip
        await self._devices.set_interface_link(ref, interface, up, affect)

    async def interface_bandwidth(self, ref: str, interface: str,
                                  affect: Affect) -> Bandwidth | None:  # fmt: skip
        return await self._devices.interface_bandwidth(ref, interface, affect)

    async def tune_interface(self, ref: str, interface: str, inbound: RateChange | None,
                             outbound: RateChange | None, affect: Affect) -> None:  # fmt: skip
        await self._devices.tune_interface(ref, interface, inbound, outbound, affect)

    async def set_memory(self, ref: str, kib: int, maximum: bool, affect: Affect) -> None:
        await self._devices.set_memory(ref, kib, maximum, affect)

    async def detach_device(self, ref: str, xml: str, affect: Affect) -> None:
        await self._devices.detach_device(ref, xml, affect)

    async def block_info(self, ref: str, target: str) -> BlockInfo:
        return await self._devices.block_info(ref, target)

    # --- snapshots (snapshots.py) ------------------------------------------------------
    async def snapshot_create(self, ref: str, xml: str | None, disk_only: bool = False,
                              quiesce: bool = False, halt: bool = False,
                              live: bool = False) -> SnapshotInfo:  # fmt: skip
        return await self._snapshots.create(ref, xml, disk_only, quiesce, halt, live)

    async def snapshot_list(self, ref: str) -> list[SnapshotInfo]:
        return self._snapshots.all(ref)

    async def snapshot_info(self, ref: str, name: str | None) -> SnapshotInfo:
        return self._snapshots.info(ref, name)

    async def snapshot_xml(self, ref: str, name: str) -> str:
        return self._snapshots.xml(ref, name)

    async def snapshot_revert(self, ref: str, name: str, running: bool, paused: bool) -> None:
        await self._snapshots.revert(ref, name, running, paused)

    async def snapshot_delete(
        self, ref: str, name: str, children: bool, children_only: bool, metadata: bool
    ) -> list[str]:
        return await self._snapshots.delete(ref, name, children, children_only, metadata)

    # --- checkpoints and backups (backup.py) -------------------------------------------
    async def checkpoint_create(self, ref: str, xml: str | None) -> CheckpointInfo:
        return await self._backups.create(ref, xml)

    async def checkpoint_list(self, ref: str) -> list[CheckpointInfo]:
        return self._backups.all(ref)

    async def checkpoint_info(self, ref: str, name: str) -> CheckpointInfo:
        return self._backups.info(ref, name)

    async def checkpoint_xml(self, ref: str, name: str) -> str:
        return self._backups.xml(ref, name)

    async def checkpoint_delete(self, ref: str, name: str, metadata: bool) -> list[str]:
        return await self._backups.delete(ref, name, metadata)

    async def backup_begin(self, ref: str, backup_xml: str | None,
                           checkpoint_xml: str | None) -> BackupStarted:  # fmt: skip
        return await self._backups.begin(ref, backup_xml, checkpoint_xml)

    async def backup_xml(self, ref: str) -> str:
        return self._backups.dumpxml(ref)

    async def job_info(self, ref: str, completed: bool) -> DomainJobInfo:
        return await self._backups.job_info(ref, completed)

    async def job_abort(self, ref: str) -> DomainJobInfo:
        return await self._backups.job_abort(ref)

    # --- block jobs (blockjobs.py) -----------------------------------------------------
    async def block_commit(self, ref: str, req: BlockCommit) -> BlockJobInfo:
        return await self._blockjobs.commit(ref, req)

    async def block_pull(self, ref: str, req: BlockPull) -> BlockJobInfo:
        return await self._blockjobs.pull(ref, req)

    async def block_copy(self, ref: str, req: BlockCopy) -> BlockJobInfo:
        return await self._blockjobs.copy(ref, req)

    async def block_job_info(self, ref: str, disk: str) -> BlockJobInfo | None:
        return await self._blockjobs.info(ref, disk)

    def block_job_end(self, ref: str, disk: str) -> BlockJobEnd | None:
        return self._blockjobs.end(ref, disk)

    async def block_job_abort(self, ref: str, disk: str, pivot: bool) -> None:
        await self._blockjobs.abort(ref, disk, pivot)

    async def block_job_speed(self, ref: str, disk: str, bandwidth: int) -> BlockJobInfo:
        return await self._blockjobs.speed(ref, disk, bandwidth)

    async def block_errors(self, ref: str) -> list[BlockError]:
        return await self._blockjobs.errors(ref)

    # --- saved state (saves.py) ---------------------------------------------------------
    async def save(self, ref: str, file: str, running: bool, paused: bool) -> None:
        await self._saves.save(ref, Path(file), running, paused)

    async def restore(self, file: str, running: bool, paused: bool) -> DomainRef:
        return (await self._saves.restore(Path(file), running, paused)).ref

    async def managed_save(self, ref: str, running: bool, paused: bool) -> None:
        await self._saves.managed_save(ref, running, paused)

    async def managed_save_remove(self, ref: str) -> None:
        await self._saves.managed_remove(ref)

    # --- definitions --------------------------------------------------------------------
    async def define(self, xml: str) -> DomainRef:
        defn = parse_domain_xml(xml)
        # libvirt's defaults, implicit devices, firmware and addresses, persisted
        await self._launcher.complete(defn)
        self._launcher.validate(defn)
        await self._launcher.confine(defn)  # every host path it names (drivers/qemu/confine.py)
        self._registry.check_free(defn)
        existing = self._registry.by_uuid(defn.uuid)
        await self._store.save_definition(defn)
        if existing is not None:
            existing.defn = defn  # a running domain keeps its live definition until restarted
            existing.emit("defined", "updated")
            return existing.ref
        dom = self._registry.add(defn)
        dom.emit("defined", "added")
        return dom.ref

    async def undefine(self, ref: str) -> None:
        dom = self._registry.get(ref)
        if dom.run is not None or dom.state != S.SHUTOFF:
            raise OperationInvalid(
                f"cannot undefine domain '{dom.defn.name}': it is {dom.state.label}"
                " (destroy it first)"
            )
        if self._saves.has_managed(dom.defn.uuid):  # libvirt refuses it too
            raise OperationInvalid(
                f"cannot undefine domain '{dom.defn.name}': it has a managed save image"
                " (managedsave-remove it first)"
            )
        if self._snapshot_store.has_any(dom.defn.uuid):  # libvirt refuses it too
            count = len(self._snapshot_store.of(dom.defn.uuid).records)
            raise OperationInvalid(
                f"cannot undefine domain '{dom.defn.name}': it has {count} snapshot(s);"
                " delete them first (snapshot-delete)"
            )
        if self._checkpoint_store.has_any(dom.defn.uuid):  # libvirt refuses it too
            raise OperationInvalid(
                f"cannot undefine domain '{dom.defn.name}': it has checkpoints;"
                " delete them first (checkpoint-delete)"
            )
        await self._store.remove_definition(dom.defn.uuid)
        await asyncio.to_thread(self._launcher.forget, dom.defn.uuid)  # its TPM state too
        self._registry.remove(dom)
        dom.emit("undefined", "removed")

    # --- start --------------------------------------------------------------------------
    async def start(self, ref: str) -> None:
        dom = self._registry.get(ref)
        if dom.run is not None or dom.state != S.SHUTOFF:
            raise OperationInvalid(f"domain '{dom.defn.name}' is already active")
        name = dom.defn.name
        if await self._saves.start_managed(dom, paused=False):  # libvirt: start resumes it
            return

        def failure(detail: str) -> OperationFailed:
            return OperationFailed(f"QEMU failed to start domain '{name}': {detail}")

        async with self._launcher.launch(
            dom, dom.defn.copy(), pending=ev.Pending.START, reason="starting_up", failure=failure
        ) as launched:
            run = launched.run
            await dom.save_status(run)
            await dom.execute(run, "cont")
            await dom.wait(run, lambda: ev.Pending.START not in run.pending, "start")
            if dom.run is not run:
                raise OperationFailed("QEMU exited during start")
        if _adopt_macs(dom.defn, launched.generated_macs):
            await self._store.save_definition(dom.defn)

    # --- lifecycle ----------------------------------------------------------------------
    async def shutdown(self, ref: str, timeout: float | None = None) -> None:
        dom = self._registry.get(ref)
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
        dom = self._registry.get(ref)
        run = dom.require(*[s for s in S if s != S.SHUTOFF], verb="destroy")
        run.pending.add(ev.Pending.DESTROY)
        await dom.stop_process(run)
        if run.process.alive():
            raise OperationFailed(
                f"QEMU pid {run.process.pid} of '{dom.defn.name}' survived SIGKILL"
            )
        await dom.wait_ended(run)

    async def reboot(self, ref: str) -> None:
        dom = self._registry.get(ref)
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
        dom = self._registry.get(ref)
        run = dom.require(S.RUNNING, S.PAUSED, S.CRASHED, S.BLOCKED, verb="reset")
        await dom.execute(run, "system_reset")

    async def suspend(self, ref: str) -> None:
        await self._vcpus(ref, S.RUNNING, ev.Pending.PAUSE, "stop", "suspend")

    async def resume(self, ref: str) -> None:
        await self._vcpus(ref, S.PAUSED, ev.Pending.RESUME, "cont", "resume")

    async def _vcpus(self, ref: str, state: S, pending: ev.Pending, cmd: str, verb: str) -> None:
        """stop/cont, returning once the event task has seen the resulting QMP event (so
        the event is emitted once, by that task, and no extra QMP call is needed)."""
        dom = self._registry.get(ref)
        run = dom.require(state, verb=verb)
        run.pending.add(pending)
        try:
            await dom.execute(run, cmd)
            await dom.wait(run, lambda: pending not in run.pending, verb)
        finally:
            run.pending.discard(pending)

    # --- live migration (drivers/qemu/migrate_steps.py) -----------------------------------
    async def migrate_begin(self, ref: str) -> str:
        return await self._migrations.begin(ref)

    async def migrate_prepare(self, xml: str, params: MigrationParams) -> str:
        return await self._migrations.prepare(xml, params)

    async def migrate_perform(self, ref: str, uri: str, params: MigrationParams) -> None:
        await self._migrations.perform(ref, uri, params)

    async def migrate_status(self, ref: str) -> MigrationStatus:
        return await self._migrations.status(ref)

    async def migrate_wait(self, ref: str, timeout: float) -> None:
        await self._migrations.wait(ref, timeout)

    def migrate_check_tls(self, params: MigrationParams) -> None:
        self._migrations.check_tls(params)

    async def migrate_disks(self, ref: str, incremental: bool = False) -> list[CopyDisk]:
        return await self._migrations.disks(ref, incremental)

    async def migrate_nbd_start(self, ref: str, disks: list[str], listen: str) -> NbdTarget:
        return await self._migrations.nbd_start(ref, disks, listen)

    async def migrate_perform_copy(
        self, ref: str, uri: str, params: MigrationParams, nbd: NbdTarget
    ) -> None:
        await self._migrations.perform_copy(ref, uri, params, nbd)

    async def migrate_cancel(self, ref: str) -> None:
        await self._migrations.cancel(ref)

    async def migrate_finish(self, ref: str, success: bool) -> None:
        await self._migrations.finish(ref, success)

    async def migrate_confirm(self, ref: str, success: bool) -> None:
        await self._migrations.confirm(ref, success)

    # --- inspection ---------------------------------------------------------------------
    async def info(self, ref: str) -> DomainInfo:
        return await self._info(self._registry.get(ref))

    async def _info(self, dom: Domain) -> DomainInfo:
        run = dom.run
        defn = run.live if run else dom.defn
        memory = defn.current_memory_kib
        cpu = 0
        if run is not None:
            cpu = sum(cpu_time_ns(run.process.pid))
            if run.monitor is not None and has_balloon(defn):
                try:
                    balloon = await run.monitor.execute("query-balloon")
                    memory = int(balloon["actual"]) // 1024
                except (VirtbusError, KeyError, TypeError, ValueError):
                    pass
        return DomainInfo(
            name=defn.name, uuid=defn.uuid, state=dom.state, reason=dom.reason,
            max_memory_kib=defn.memory_kib, memory_kib=memory, vcpus=defn.current_vcpus,
            cpu_time_ns=cpu, id=run.id if run else None, hv_type=defn.hv_type,
            persistent=not self._migrations.transient(dom),
            managed_save=run is None and self._saves.has_managed(defn.uuid), owner=defn.owner,
            groups=defn.placement_groups,
        )  # fmt: skip

    async def list_domains(self, include_inactive: bool = True) -> list[DomainInfo]:
        return [
            await self._info(dom)
            for dom in self._registry
            if include_inactive or dom.run is not None
        ]

    async def xml(self, ref: str) -> str:
        dom = self._registry.get(ref)
        if dom.run is None:
            return dom.defn.to_xml()
        live = dom.run.live.copy()
        live.root.set("id", str(dom.run.id))  # libvirt's <domain id='N'> while active
        return live.to_xml()

    # --- statistics (drivers/qemu/stats.py) ----------------------------------------------
    async def stats(
        self, refs: list[str] | None = None, groups: frozenset[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        doms = list(self._registry) if refs is None else [self._registry.get(r) for r in refs]
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
        out["domains.active"] = sum(d.run is not None for d in self._registry)
        return out

    @property
    def qmp_connections(self) -> int:
        """Open QMP connections (the agent's health metrics)."""
        return sum(
            1 for d in self._registry
            if d.run is not None and d.run.monitor is not None and d.run.monitor.connected
        )  # fmt: skip

    async def host_resources(self) -> HostResources:
        return await read_host_resources("kvm" if self._launcher.kvm_usable() else "qemu")


def _adopt_macs(defn: DomainDefinition, macs: dict[int, str]) -> bool:
    """Write the MACs a launch generated into the persistent definition; True if changed."""
    changed = False
    for index, mac in macs.items():
        if index < len(defn.interfaces) and not defn.interfaces[index].mac:
            defn.set_interface_mac(index, mac)
            changed = True
    return changed
