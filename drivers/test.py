"""An in-memory hypervisor, like libvirt's ``test:///default``: instant and deterministic.

It accepts any domain type (``test``, ``kvm``, ``qemu``, ``xen``) so the XML meant for a
real hypervisor can be tried on it. Guests are cooperative: an ACPI shutdown powers them
off at once. CPU time advances with wall time while a guest runs, so stats move.
It serves the demo, unit tests and scheduler scale tests (thousands of simulated hosts).

It migrates too, between processes: ``migrate_prepare`` opens a TCP listener for a paused
incoming domain and ``migrate_perform`` streams simulated memory pages to it (each page
acknowledged) over ``migration_time`` seconds, emitting ``migration`` events. A destination
that goes away breaks the stream, so the source fails the migration as QEMU would.

With ``copy_storage_all`` the disks really move, the way the QEMU driver moves them: the
destination serves its copies (the volumes the agent made) on a second listener, standing
in for NBD, and the source sends each disk's bytes first, in acknowledged 1 MiB chunks at
``bandwidth_mib_s`` if given (phase ``disk``), then the memory pages (phase ``memory``).

``event_rate`` (events per second, 0 by default: off) makes the host's running domains
emit libvirt's ``rtc_change`` event (round robin, ``data``: ``{"offset": n}`` with n
counting the host's ticks) at that rate, so load tests have a steady event stream to
lose, duplicate or delay (tests/integration/test_fault_matrix.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from drivers.base import (
    Affect,
    BlockInfo,
    DomainInfo,
    DomainRef,
    DriverEvent,
    EventSink,
    HostResources,
    VolumeResolver,
)
from drivers.blockjobs import disk_chain, plan_commit, plan_pull, with_chain
from drivers.checkpoints import CheckpointStore, backup_disks, checkpoint_disks
from drivers.copy_storage import copied_disks
from drivers.memory import check_live_memory, with_memory
from drivers.snapshots import (
    SnapshotStore,
    check_live,
    check_memory_file,
    check_quiesce,
    external_disks,
    snapshot_disks,
    with_overlays,
)
from virtbus.aio import TaskGroup
from virtbus.domain import DomainDefinition, parse_domain_xml
from virtbus.domain.bandwidth import Bandwidth, RateChange, tuned
from virtbus.domain.checkpoint import BackupDisk, parse_backup_request, parse_checkpoint_request
from virtbus.domain.checkpoint import backup_xml as backup_xml_of
from virtbus.domain.devices import (
    disk_target,
    only_disk,
    parse_disk_device,
    tuned_interface,
    volume_sources,
    with_disk,
    without_disk,
)
from virtbus.domain.model import Disk
from virtbus.domain.snapshot import (
    SnapshotDef,
    SnapshotRequest,
    check_snapshot_name,
    default_name,
    parse_snapshot_request,
)
from virtbus.errors import (
    ConfigUnsupported,
    InvalidArgument,
    MigrateFailed,
    NoDomainError,
    NoSupport,
    OperationFailed,
    OperationInvalid,
    VirtbusError,
)
from virtbus.protocol.backup import BackupStarted, CheckpointInfo, DomainJobInfo
from virtbus.protocol.base import to_wire
from virtbus.protocol.blockjob import (
    BlockCommit,
    BlockCopy,
    BlockError,
    BlockJobEnd,
    BlockJobInfo,
    BlockJobType,
    BlockPull,
)
from virtbus.protocol.domain import STATS_GROUPS
from virtbus.protocol.events import DomainState, reason_code
from virtbus.protocol.migration import (
    CopyDisk,
    CopyPhase,
    MigrationParams,
    MigrationState,
    MigrationStatus,
    NbdTarget,
)
from virtbus.protocol.snapshot import SnapshotInfo

_TEST_SAVE_MAGIC = b"VirtbusTestSave1\n"
_TEST_SAVE_END = b"VIRTBUS-TEST-SAVE-END\n"
_SNAPSHOT_STATES = {DomainState.RUNNING: "running", DomainState.PAUSED: "paused",
                    DomainState.SHUTOFF: "shutoff"}  # fmt: skip
_ACTIVE = (DomainState.RUNNING, DomainState.PAUSED, DomainState.BLOCKED, DomainState.CRASHED)


@dataclass(slots=True)
class _BlockJob:
    """A simulated active commit or copy, ready until pivoted onto ``base`` (the chain
    the disk then runs on) or aborted."""

    type: BlockJobType
    base: list[tuple[str, str]]
    bandwidth: int

    def info(self, disk: str) -> BlockJobInfo:
        return BlockJobInfo(disk=disk, type=self.type, cur=1, end=1, bandwidth=self.bandwidth,
                            ready=True, status="ready")  # fmt: skip


@dataclass(eq=False, slots=True)
class _TestBackup:
    """A simulated backup: it runs ``backup_time`` seconds, then completes."""

    incremental: str | None
    disks: list[BackupDisk]
    started: float = field(default_factory=time.monotonic)
    task: asyncio.Task[Any] | None = None


@dataclass(slots=True)
class _TestDomain:
    definition: DomainDefinition
    state: DomainState = DomainState.SHUTOFF
    reason: str = "unknown"
    id: int | None = None
    cpu_time_ns: int = 0
    running_since: float | None = None
    memory_kib: int = 0
    persistent: bool = True
    outgoing: _Outgoing | None = None
    incoming: _Incoming | None = None
    live: DomainDefinition | None = None  # while active: the definition it runs with
    managed_save: bytes | None = None  # a managed save image (in memory, as test:///)

    @property
    def ref(self) -> DomainRef:
        return DomainRef(self.definition.name, self.definition.uuid)

    def cpu_time(self) -> int:
        extra = 0
        if self.running_since is not None and self.state == DomainState.RUNNING:
            extra = int((time.monotonic() - self.running_since) * 1e9)
        return self.cpu_time_ns + extra

    def settle_cpu(self) -> None:
        self.cpu_time_ns = self.cpu_time()
        self.running_since = None


@dataclass(slots=True)
class _Outgoing:
    """A migration out of this host (the source side)."""

    status: MigrationStatus
    task: asyncio.Task[None] | None = None
    paused_by_migration: bool = False

    @property
    def active(self) -> bool:
        return self.status.status in _MIGRATION_ACTIVE


@dataclass(slots=True)
class _Incoming:
    """A migration into this host (the destination side): a listener for the stream."""

    server: asyncio.Server | None = None
    completed: bool = False
    previous: DomainDefinition | None = None  # an inactive definition the incoming replaced
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    disk_server: asyncio.Server | None = None  # copy-storage: receives the disks' bytes


_MIGRATION_ACTIVE = frozenset({"setup", "active", "postcopy-active"})
_MIGRATION_STEP = 0.1  # s between simulated pages
_TICK = 0.05  # s between bursts of ``event_rate`` events
_MIGRATION_ACK_TIMEOUT = 5.0  # s the source waits for the destination to acknowledge a page
_DISK_CHUNK = 1 << 20  # copy-storage: bytes per acknowledged chunk
_Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(frozen=True, slots=True)
class TestHostSpec:
    """The simulated machine; defaults to this machine's real size."""

    __test__ = False  # not a pytest test class, despite the name

    cpus: int = os.cpu_count() or 1
    memory_kib: int = 0  # 0: read /proc/meminfo
    arch: str = platform.machine() or "x86_64"
    cpu_model: str = "virtbus-test-cpu"


class TestDriver:
    """The ``test`` driver (see module docstring)."""

    name = "test"
    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self, host: TestHostSpec | None = None, op_delay: float = 0.0,
        migration_time: float = 0.0, backup_time: float = 0.0, event_rate: float = 0.0,
    ) -> None:  # fmt: skip
        if event_rate < 0:
            raise InvalidArgument(f"event_rate must be >= 0, not {event_rate:g}")
        self._event_rate = event_rate  # rtc_change events per second (0: none)
        self._ticks = 0
        self._host = host or TestHostSpec()
        self._op_delay = op_delay  # simulated hypervisor latency of every lifecycle op
        self._migration_time = migration_time  # simulated duration of a live migration
        self._domains: dict[str, _TestDomain] = {}  # by uuid
        self._by_name: dict[str, str] = {}
        self._next_id = 1
        self._sink: EventSink = lambda _event: None
        self._tasks = TaskGroup("test-driver")  # outgoing migration streams
        self._resolver: VolumeResolver | None = None  # the agent's storage (volume disks)
        self._snapshots = SnapshotStore(None)  # in memory, as test:///default keeps them
        self._checkpoints = CheckpointStore(None)
        self._backup_time = backup_time  # simulated duration of a backup
        self._backups: dict[str, _TestBackup] = {}  # running backups, by uuid
        self._last_jobs: dict[str, DomainJobInfo] = {}  # the last backup that ended
        self._block_jobs: dict[tuple[str, str], _BlockJob] = {}  # (uuid, disk) -> job
        self._block_ends: dict[tuple[str, str], BlockJobEnd] = {}  # how the last one ended

    # --- plumbing -------------------------------------------------------------------
    async def open(self, sink: EventSink) -> None:
        self._sink = sink
        if self._event_rate:
            self._tasks.spawn(self._tick(), name="test-driver:events")

    async def _tick(self) -> None:
        """``event_rate`` rtc_change events a second over the running domains, in bursts
        every 50 ms (a timer per event would cost more than the events at 200/s)."""
        loop = asyncio.get_running_loop()
        started, emitted = loop.time(), 0
        while True:
            await asyncio.sleep(_TICK)
            due = int((loop.time() - started) * self._event_rate) - emitted
            running = [d for d in self._domains.values() if d.state == DomainState.RUNNING]
            if not running:
                emitted += due  # nothing runs: no backlog either
                continue
            for _ in range(due):
                dom = running[self._ticks % len(running)]
                self._ticks += 1
                self._sink(DriverEvent(dom.definition.name, dom.definition.uuid, "rtc_change",
                                       data={"offset": self._ticks}))  # fmt: skip
            emitted += due

    async def close(self) -> None:
        for dom in list(self._domains.values()):
            self._abort_migration(dom)
        await self._tasks.cancel_all()
        self._sink = lambda _event: None

    def lookup(self, ref: str) -> DomainRef | None:
        dom = self._find(ref)
        return dom.ref if dom else None

    def state(self, ref: str) -> tuple[DomainState, str]:
        dom = self._get(ref)
        return dom.state, dom.reason

    def _find(self, ref: str) -> _TestDomain | None:
        dom = self._domains.get(ref)
        if dom is None:
            uuid = self._by_name.get(ref)
            dom = self._domains.get(uuid) if uuid else None
        if dom is None and len(ref) == 32:  # a UUID written without dashes
            dashed = f"{ref[:8]}-{ref[8:12]}-{ref[12:16]}-{ref[16:20]}-{ref[20:]}"
            dom = self._domains.get(dashed.lower())
        return dom

    async def _latency(self) -> None:
        if self._op_delay:
            await asyncio.sleep(self._op_delay)

    def _get(self, ref: str) -> _TestDomain:
        dom = self._find(ref)
        if dom is None:
            raise NoDomainError(f"domain not found: no domain with matching name or uuid '{ref}'")
        return dom

    def _emit(self, dom: _TestDomain, event: str, detail: str | None = None) -> None:
        self._sink(DriverEvent(dom.definition.name, dom.definition.uuid, event, detail))

    def _set(self, dom: _TestDomain, state: DomainState, reason: str) -> None:
        if state != DomainState.RUNNING:
            dom.settle_cpu()
        elif dom.running_since is None:
            dom.running_since = time.monotonic()
        dom.state, dom.reason = state, reason

    def _require(self, dom: _TestDomain, *states: DomainState, verb: str) -> None:
        if dom.state not in states:
            if dom.state == DomainState.SHUTOFF:
                raise OperationInvalid(f"domain '{dom.definition.name}' is not running")
            raise OperationInvalid(
                f"cannot {verb} domain '{dom.definition.name}': it is {dom.state.label}"
            )

    # --- definitions ----------------------------------------------------------------
    async def define(self, xml: str) -> DomainRef:
        defn = parse_domain_xml(xml)
        by_uuid = self._domains.get(defn.uuid)
        by_name_uuid = self._by_name.get(defn.name)
        if by_name_uuid is not None and by_name_uuid != defn.uuid:
            raise OperationFailed(f"domain '{defn.name}' already exists with uuid {by_name_uuid}")
        if by_uuid is not None and by_uuid.definition.name != defn.name:
            raise OperationFailed(
                f"domain '{by_uuid.definition.name}' is already defined with uuid {defn.uuid}"
            )
        if by_uuid is not None:
            by_uuid.definition = defn
            self._emit(by_uuid, "defined", "updated")
            return by_uuid.ref
        dom = _TestDomain(definition=defn, memory_kib=defn.current_memory_kib)
        self._domains[defn.uuid] = dom
        self._by_name[defn.name] = defn.uuid
        self._emit(dom, "defined", "added")
        return dom.ref

    async def undefine(self, ref: str) -> None:
        dom = self._get(ref)
        self._require(dom, DomainState.SHUTOFF, verb="undefine")
        if dom.managed_save is not None:
            raise OperationInvalid(
                f"cannot undefine domain '{dom.definition.name}': it has a managed save image"
            )
        if self._snapshots.has_any(dom.definition.uuid):  # as the QEMU driver (and libvirt)
            raise OperationInvalid(
                f"cannot undefine domain '{dom.definition.name}': it has snapshots;"
                " delete them first (snapshot-delete)"
            )
        if self._checkpoints.has_any(dom.definition.uuid):  # as the QEMU driver (and libvirt)
            raise OperationInvalid(
                f"cannot undefine domain '{dom.definition.name}': it has checkpoints;"
                " delete them first (checkpoint-delete)"
            )
        del self._domains[dom.definition.uuid]
        del self._by_name[dom.definition.name]
        self._emit(dom, "undefined", "removed")

    # --- lifecycle ------------------------------------------------------------------
    async def start(self, ref: str) -> None:
        await self._latency()
        dom = self._get(ref)
        if dom.state != DomainState.SHUTOFF:
            raise OperationInvalid(f"domain '{dom.definition.name}' is already active")
        await self._resolve(dom.definition)
        if dom.managed_save is not None:  # start resumes a managed save (kept on failure)
            data = self._read_image(
                dom.managed_save, f"the managed save of '{dom.definition.name}'"
            )
            self._boot_restored(dom, not data["running"])
            dom.managed_save = None
            return
        dom.id = self._next_id
        self._next_id += 1
        dom.memory_kib = dom.definition.current_memory_kib
        dom.live = dom.definition.copy()
        self._set(dom, DomainState.RUNNING, "booted")
        self._emit(dom, "started", "booted")

    def _stop(self, dom: _TestDomain, reason: str) -> None:
        self._abort_migration(dom)
        dom.id = None
        dom.live = None
        if self._resolver is not None:
            self._resolver.release(dom.definition.uuid)
        self._set(dom, DomainState.SHUTOFF, reason)
        self._emit(dom, "stopped", reason)
        if not dom.persistent:  # a transient domain (an incoming migration) vanishes
            self._forget(dom)

    def _forget(self, dom: _TestDomain) -> None:
        self._domains.pop(dom.definition.uuid, None)
        if self._by_name.get(dom.definition.name) == dom.definition.uuid:
            del self._by_name[dom.definition.name]

    async def shutdown(self, ref: str, timeout: float | None = None) -> None:
        await self._latency()
        dom = self._get(ref)
        self._require(dom, DomainState.RUNNING, verb="shut down")
        self._emit(dom, "shutdown", "guest")
        action = dom.definition.on_poweroff
        if action == "restart":
            self._emit(dom, "reboot")
            return
        if action == "preserve":
            self._set(dom, DomainState.SHUTDOWN, "user")
            return
        self._stop(dom, "shutdown")

    async def destroy(self, ref: str) -> None:
        await self._latency()
        dom = self._get(ref)
        self._require(dom, *_ACTIVE, DomainState.SHUTDOWN, verb="destroy")
        self._stop(dom, "destroyed")

    async def reboot(self, ref: str) -> None:
        await self._latency()
        dom = self._get(ref)
        self._require(dom, DomainState.RUNNING, verb="reboot")
        if dom.definition.on_reboot == "destroy":
            self._emit(dom, "shutdown", "guest")
            self._stop(dom, "shutdown")
            return
        self._emit(dom, "reboot")

    async def reset(self, ref: str) -> None:
        await self._latency()
        dom = self._get(ref)
        self._require(dom, *_ACTIVE, verb="reset")
        self._emit(dom, "reboot")

    async def suspend(self, ref: str) -> None:
        await self._latency()
        dom = self._get(ref)
        self._require(dom, DomainState.RUNNING, verb="suspend")
        self._set(dom, DomainState.PAUSED, "user")
        self._emit(dom, "suspended", "paused")

    async def resume(self, ref: str) -> None:
        await self._latency()
        dom = self._get(ref)
        self._require(dom, DomainState.PAUSED, verb="resume")
        self._set(dom, DomainState.RUNNING, "unpaused")
        self._emit(dom, "resumed", "unpaused")

    # --- saved state: the QEMU driver's rules and events; the file holds the definition --
    def _save_image(self, dom: _TestDomain, running: bool, paused: bool) -> bytes:
        self._require(dom, DomainState.RUNNING, DomainState.PAUSED, verb="save")
        keep = (dom.state == DomainState.RUNNING or running) and not paused
        xml = (dom.live or dom.definition).to_xml()
        body = json.dumps({"xml": xml, "running": keep, "memory_kib": dom.memory_kib})
        return _TEST_SAVE_MAGIC + body.encode() + b"\n" + _TEST_SAVE_END

    async def save(self, ref: str, file: str, running: bool, paused: bool) -> None:
        await self._latency()
        dom = self._get(ref)
        image = self._save_image(dom, running, paused)
        path = Path(file)
        if not path.is_absolute() or not path.parent.is_dir():
            raise InvalidArgument(f"cannot save to '{file}': not an absolute path in a directory")
        await asyncio.to_thread(path.write_bytes, image)
        self._stop(dom, "saved")

    async def managed_save(self, ref: str, running: bool, paused: bool) -> None:
        await self._latency()
        dom = self._get(ref)
        dom.managed_save = self._save_image(dom, running, paused)
        self._stop(dom, "saved")

    async def managed_save_remove(self, ref: str) -> None:
        dom = self._get(ref)
        if dom.managed_save is None:
            raise OperationInvalid(f"domain '{dom.definition.name}' has no managed save image")
        dom.managed_save = None

    @staticmethod
    def _read_image(image: bytes, where: str) -> dict[str, Any]:
        if not image.startswith(_TEST_SAVE_MAGIC):
            raise InvalidArgument(f"{where} is not a virtbus save file")
        if not image.endswith(_TEST_SAVE_END):
            raise InvalidArgument(f"{where} is truncated: it holds no complete guest state")
        try:
            data = json.loads(image[len(_TEST_SAVE_MAGIC) : -len(_TEST_SAVE_END)])
            return {"xml": str(data["xml"]), "running": bool(data["running"])}
        except (ValueError, KeyError, TypeError):
            raise InvalidArgument(f"{where} has a corrupt header") from None

    async def restore(self, file: str, running: bool, paused: bool) -> DomainRef:
        await self._latency()
        try:
            image = await asyncio.to_thread(Path(file).read_bytes)
        except OSError as exc:
            raise InvalidArgument(f"cannot read save file '{file}': {exc.strerror}") from None
        data = self._read_image(image, f"save file '{file}'")
        defn = parse_domain_xml(data["xml"])
        dom = self._domains.get(defn.uuid)
        if dom is None:
            await self.define(data["xml"])
            dom = self._domains[defn.uuid]
        elif dom.state != DomainState.SHUTOFF:
            raise OperationInvalid(f"domain '{dom.definition.name}' is already active")
        self._boot_restored(dom, paused or (not data["running"] and not running))
        return dom.ref

    def _boot_restored(self, dom: _TestDomain, paused: bool) -> None:
        dom.id = self._next_id
        self._next_id += 1
        dom.live = dom.definition.copy()
        self._set(dom, DomainState.RUNNING, "restored")
        self._emit(dom, "started", "restored")
        if paused:
            self._set(dom, DomainState.PAUSED, "unknown")
            self._emit(dom, "suspended", "restored")

    # --- snapshots: the QEMU driver's checks and events, no data -------------------
    async def snapshot_create(self, ref: str, xml: str | None, disk_only: bool = False,
                              quiesce: bool = False, halt: bool = False,
                              live: bool = False) -> SnapshotInfo:  # fmt: skip
        await self._latency()
        dom = self._get(ref)
        req = parse_snapshot_request(xml)
        state = _SNAPSHOT_STATES.get(dom.state)
        if state is None:
            raise OperationInvalid(f"cannot snapshot domain '{dom.definition.name}': it is"
                                   f" {dom.state.label}")  # fmt: skip
        active = dom.state != DomainState.SHUTOFF
        check_live(req, active, live)
        if req.external(disk_only):
            info = await self._snapshot_external(dom, req, active, state, quiesce)
        else:
            info = await self._snapshot_internal(dom, req, active, state, quiesce)
        if halt and active:
            self._stop(dom, "from_snapshot")  # as the QEMU driver: stopped(from_snapshot)
        return info

    async def _snapshot_internal(self, dom: _TestDomain, req: SnapshotRequest, active: bool,
                                 state: str, quiesce: bool) -> SnapshotInfo:  # fmt: skip
        uuid, name = dom.definition.uuid, dom.definition.name
        if quiesce:
            raise InvalidArgument("--quiesce needs an external disk-only snapshot (--disk-only)")
        if req.memory == "internal" and not active:
            raise OperationInvalid(f"domain '{name}' is shut off: it has no memory to snapshot")
        if active and req.memory == "no":
            raise NoSupport("a disk-only snapshot of a running domain needs an external"
                            " snapshot (--disk-only), not supported yet")  # fmt: skip
        defn = dom.live if active and dom.live is not None else dom.definition
        disks = snapshot_disks(defn, req.disks)
        snap_name = req.name or default_name(set(self._snapshots.of(uuid).records))
        check_snapshot_name(snap_name)
        self._snapshots.check_new(uuid, name, snap_name)
        await self._snapshots.add(uuid, SnapshotDef(
            name=snap_name, state=state, creation_time=int(time.time()), memory=active,
            disks=tuple(d.target_dev for d in disks), domain_xml=defn.to_xml(),
            parent=self._snapshots.of(uuid).current, description=req.description,
        ))  # fmt: skip
        return self._snapshots.info(uuid, name, snap_name)

    async def _snapshot_external(self, dom: _TestDomain, req: SnapshotRequest, active: bool,
                                 state: str, quiesce: bool) -> SnapshotInfo:  # fmt: skip
        """The QEMU driver's checks and definitions (the overlays exist in name only; an
        external memory file is this driver's save image, which its restore loads)."""
        uuid, name = dom.definition.uuid, dom.definition.name
        defn = dom.live if active and dom.live is not None else dom.definition
        if quiesce:
            check_quiesce(defn)
        snap_name = req.name or default_name(set(self._snapshots.of(uuid).records))
        check_snapshot_name(snap_name)
        self._snapshots.check_new(uuid, name, snap_name)
        memory = req.memory_file if req.memory == "external" else None
        pairs = external_disks(defn, req.files, req.disks, snap_name, memory=memory is not None)
        if memory is not None:
            await asyncio.to_thread(check_memory_file, defn, memory, active, pairs)
            image = self._save_image(dom, running=False, paused=False)
            await asyncio.to_thread(Path(memory).write_bytes, image)
        overlays = {d.target_dev: o for d, o in pairs}
        await self._snapshots.add(uuid, SnapshotDef(
            name=snap_name, state=state if memory else "disk-snapshot" if active else state,
            creation_time=int(time.time()), memory=memory is not None, disks=tuple(overlays),
            domain_xml=defn.to_xml(), parent=self._snapshots.of(uuid).current,
            description=req.description, overlays=tuple(overlays.items()), memory_file=memory,
        ))  # fmt: skip
        sources = {d.target_dev: d.source_path for d, _ in pairs}
        if active and dom.live is not None:
            dom.live = with_overlays(dom.live, overlays)
        same = {t: o for t, o in overlays.items()
                if any(d.target_dev == t and d.source_path == sources[t]
                       for d in dom.definition.disks)}  # fmt: skip
        if same:
            dom.definition = with_overlays(dom.definition, same)
        return self._snapshots.info(uuid, name, snap_name)

    async def snapshot_list(self, ref: str) -> list[SnapshotInfo]:
        dom = self._get(ref)
        return self._snapshots.infos(dom.definition.uuid, dom.definition.name)

    async def snapshot_info(self, ref: str, name: str | None) -> SnapshotInfo:
        dom = self._get(ref)
        uuid, dname = dom.definition.uuid, dom.definition.name
        return self._snapshots.info(uuid, dname, name or self._snapshots.current(uuid, dname).name)

    async def snapshot_xml(self, ref: str, name: str) -> str:
        dom = self._get(ref)
        return self._snapshots.get(dom.definition.uuid, dom.definition.name, name).to_xml()

    async def snapshot_revert(self, ref: str, name: str, running: bool, paused: bool) -> None:
        """The QEMU driver's transitions and events (libvirt's qemuSnapshotRevert)."""
        await self._latency()
        dom = self._get(ref)
        uuid = dom.definition.uuid
        snap = self._snapshots.for_revert(uuid, dom.definition.name, name)
        if dom.state not in _SNAPSHOT_STATES:
            raise OperationInvalid(
                f"cannot revert domain '{dom.definition.name}': it is {dom.state.label}"
            )
        want_paused = paused or (snap.state == "paused" and not running)
        if not snap.memory:
            if dom.state != DomainState.SHUTOFF:
                self._stop(dom, "from_snapshot")
            if running or paused:
                self._boot_from_snapshot(dom, paused)
        elif dom.state == DomainState.SHUTOFF:
            self._boot_from_snapshot(dom, want_paused)
        else:
            if dom.state == DomainState.RUNNING:
                self._set(dom, DomainState.PAUSED, "from_snapshot")
                self._emit(dom, "suspended", "from_snapshot")
            if want_paused:
                self._set(dom, DomainState.PAUSED, "from_snapshot")
            else:
                self._set(dom, DomainState.RUNNING, "from_snapshot")
                self._emit(dom, "resumed", "from_snapshot")
        await self._snapshots.set_current(uuid, name)

    def _boot_from_snapshot(self, dom: _TestDomain, paused: bool) -> None:
        dom.id = self._next_id
        self._next_id += 1
        dom.live = dom.definition.copy()
        self._set(dom, DomainState.RUNNING, "from_snapshot")
        self._emit(dom, "started", "from_snapshot")
        if paused:
            self._set(dom, DomainState.PAUSED, "from_snapshot")
            self._emit(dom, "suspended", "from_snapshot")

    async def snapshot_delete(
        self, ref: str, name: str, children: bool, children_only: bool, metadata: bool
    ) -> list[str]:
        dom = self._get(ref)
        uuid = dom.definition.uuid
        names = self._snapshots.plan_delete(uuid, dom.definition.name, name, children=children,
                                            children_only=children_only,
                                            metadata=metadata)  # fmt: skip
        await self._snapshots.remove(uuid, names)
        return names

    # --- block jobs: the QEMU driver's checks, chains and events; instant copies ------
    def _block_disk(self, ref: str, target: str, verb: str) -> tuple[_TestDomain, Disk]:
        dom = self._get(ref)
        if dom.state not in (DomainState.RUNNING, DomainState.PAUSED) or dom.live is None:
            raise OperationInvalid(f"{verb}: domain '{dom.definition.name}' is not running")
        disk = next((d for d in dom.live.disks if d.target_dev == target), None)
        if disk is None:
            raise InvalidArgument(f"domain '{dom.definition.name}' has no disk '{target}'")
        if (dom.definition.uuid, target) in self._block_jobs and verb != "blockjob":
            raise OperationInvalid(f"disk '{target}' of domain '{dom.definition.name}'"
                                   " already has a block job")  # fmt: skip
        return dom, disk

    def _block_event(self, dom: _TestDomain, target: str, type_: BlockJobType,
                     status: Literal["ready", "completed", "canceled"]) -> None:  # fmt: skip
        if status != "ready":
            self._block_ends[(dom.definition.uuid, target)] = BlockJobEnd(type=type_, status=status)
        self._sink(DriverEvent(dom.definition.name, dom.definition.uuid, "block_job", None,
                               {"disk": target, "type": type_, "status": status}))  # fmt: skip

    def _rechain(self, dom: _TestDomain, target: str, chain: list[tuple[str, str]]) -> None:
        assert dom.live is not None
        before = next(d.source_path for d in dom.live.disks if d.target_dev == target)
        dom.live = with_chain(dom.live, target, chain)
        if any(d.target_dev == target and d.source_path == before for d in dom.definition.disks):
            dom.definition = with_chain(dom.definition, target, chain)

    async def block_commit(self, ref: str, req: BlockCommit) -> BlockJobInfo:
        await self._latency()
        dom, disk = self._block_disk(ref, req.disk, "blockcommit")
        chain = disk_chain(disk)
        top, base = plan_commit(disk.target_dev, [f for f, _ in chain], req)
        if top == 0:  # an active commit: ready at once, until pivoted or aborted
            job = _BlockJob("active-commit", chain[base:], req.bandwidth)
            self._block_jobs[(dom.definition.uuid, disk.target_dev)] = job
            self._block_event(dom, disk.target_dev, job.type, "ready")
            return job.info(disk.target_dev)
        self._rechain(dom, disk.target_dev, chain[:top] + chain[base:])
        self._block_event(dom, disk.target_dev, "commit", "completed")
        return BlockJobInfo(disk=disk.target_dev, type="commit", cur=1, end=1,
                            bandwidth=req.bandwidth, ready=False, status="concluded")  # fmt: skip

    async def block_pull(self, ref: str, req: BlockPull) -> BlockJobInfo:
        await self._latency()
        dom, disk = self._block_disk(ref, req.disk, "blockpull")
        chain = disk_chain(disk)
        base = plan_pull(disk.target_dev, [f for f, _ in chain], req)
        self._rechain(dom, disk.target_dev, chain[:1] + (chain[base:] if base else []))
        self._block_event(dom, disk.target_dev, "pull", "completed")
        return BlockJobInfo(disk=disk.target_dev, type="pull", cur=1, end=1,
                            bandwidth=req.bandwidth, ready=False, status="concluded")  # fmt: skip

    async def block_copy(self, ref: str, req: BlockCopy) -> BlockJobInfo:
        await self._latency()
        dom, disk = self._block_disk(ref, req.disk, "blockcopy")
        if req.shallow:
            raise NoSupport("blockcopy --shallow is not supported yet (a full copy is)")
        if await asyncio.to_thread(os.path.lexists, req.dest):
            raise OperationInvalid(f"blockcopy destination {req.dest} already exists")
        job = _BlockJob("copy", [(req.dest, req.format)], req.bandwidth)
        self._block_jobs[(dom.definition.uuid, disk.target_dev)] = job
        self._block_event(dom, disk.target_dev, "copy", "ready")
        return job.info(disk.target_dev)

    def block_job_end(self, ref: str, disk: str) -> BlockJobEnd | None:
        return self._block_ends.get((self._get(ref).definition.uuid, disk))

    async def block_job_info(self, ref: str, disk: str) -> BlockJobInfo | None:
        dom, _disk = self._block_disk(ref, disk, "blockjob")
        job = self._block_jobs.get((dom.definition.uuid, disk))
        return None if job is None else job.info(disk)

    async def block_job_abort(self, ref: str, disk: str, pivot: bool) -> None:
        await self._latency()
        dom, _disk = self._block_disk(ref, disk, "blockjob")
        job = self._block_jobs.pop((dom.definition.uuid, disk), None)
        if job is None:
            raise OperationInvalid(f"disk '{disk}' of domain '{dom.definition.name}' has no"
                                   " block job")  # fmt: skip
        if pivot:
            self._rechain(dom, disk, job.base)
        self._block_event(dom, disk, job.type, "completed" if pivot else "canceled")

    async def block_job_speed(self, ref: str, disk: str, bandwidth: int) -> BlockJobInfo:
        dom, _disk = self._block_disk(ref, disk, "blockjob")
        job = self._block_jobs.get((dom.definition.uuid, disk))
        if job is None:
            raise OperationInvalid(f"disk '{disk}' of domain '{dom.definition.name}' has no"
                                   " block job")  # fmt: skip
        job.bandwidth = bandwidth
        return job.info(disk)

    async def block_errors(self, ref: str) -> list[BlockError]:
        dom = self._get(ref)
        self._require(dom, DomainState.RUNNING, DomainState.PAUSED, verb="domblkerror")
        return []  # the test driver's disks never fail

    # --- checkpoints and backups: the QEMU driver's checks and events, no data -------
    async def checkpoint_create(self, ref: str, xml: str | None) -> CheckpointInfo:
        await self._latency()
        dom = self._get(ref)
        req = parse_checkpoint_request(xml)
        defn = dom.live if dom.live is not None and dom.state in _ACTIVE else dom.definition
        disks = checkpoint_disks(defn, req.disks)
        uuid, name = dom.definition.uuid, dom.definition.name
        cp = self._checkpoints.new(uuid, name, req, disks)
        await self._checkpoints.add(uuid, cp)
        return self._checkpoints.info(uuid, name, cp.name)

    async def checkpoint_list(self, ref: str) -> list[CheckpointInfo]:
        dom = self._get(ref)
        return self._checkpoints.infos(dom.definition.uuid, dom.definition.name)

    async def checkpoint_info(self, ref: str, name: str) -> CheckpointInfo:
        dom = self._get(ref)
        return self._checkpoints.info(dom.definition.uuid, dom.definition.name, name)

    async def checkpoint_xml(self, ref: str, name: str) -> str:
        dom = self._get(ref)
        return self._checkpoints.get(dom.definition.uuid, dom.definition.name, name).to_xml()

    async def checkpoint_delete(self, ref: str, name: str, metadata: bool) -> list[str]:
        await self._latency()
        dom = self._get(ref)
        uuid = dom.definition.uuid
        self._checkpoints.get(uuid, dom.definition.name, name)
        backup = self._backups.get(uuid)
        if backup is not None and backup.incremental == name:
            raise OperationInvalid(f"checkpoint '{name}' of domain '{dom.definition.name}' is"
                                   " in use by the running backup")  # fmt: skip
        await self._checkpoints.remove(uuid, name)
        return [name]

    async def backup_begin(self, ref: str, backup_xml: str | None,
                           checkpoint_xml: str | None) -> BackupStarted:  # fmt: skip
        await self._latency()
        dom = self._get(ref)
        uuid, name = dom.definition.uuid, dom.definition.name
        if dom.live is None or dom.state not in _ACTIVE:
            raise OperationInvalid(f"backup-begin: domain '{name}' is not running")
        if uuid in self._backups:
            raise OperationInvalid(f"domain '{name}' already has an active backup job")
        req = parse_backup_request(backup_xml)
        base = None
        if req.incremental is not None:
            base = self._checkpoints.get(uuid, name, req.incremental)
        pairs = backup_disks(dom.live, req, time.time())
        if base is not None:
            for disk, _t in pairs:
                if disk.target_dev not in base.disks:
                    raise ConfigUnsupported(f"checkpoint '{base.name}' does not cover disk"
                                            f" '{disk.target_dev}'")  # fmt: skip
        cp = None
        if checkpoint_xml is not None:
            creq = parse_checkpoint_request(checkpoint_xml)
            cp = self._checkpoints.new(uuid, name, creq, checkpoint_disks(dom.live, creq.disks))
        for disk, target in pairs:
            if await asyncio.to_thread(os.path.lexists, target.file or ""):
                raise OperationInvalid(f"backup file {target.file} of disk '{disk.target_dev}'"
                                       " already exists")  # fmt: skip
        if cp is not None:
            await self._checkpoints.add(uuid, cp)
        backup = _TestBackup(req.incremental, [t for _d, t in pairs])
        self._backups[uuid] = backup
        backup.task = self._tasks.spawn(self._run_backup(dom, backup), f"backup-{name}")
        return BackupStarted(xml=backup_xml_of(req.incremental, backup.disks),
                             checkpoint=cp.name if cp is not None else None)  # fmt: skip

    async def _run_backup(self, dom: _TestDomain, backup: _TestBackup) -> None:
        status: Literal["completed", "cancelled"] = "cancelled"
        try:
            await asyncio.sleep(self._backup_time)
            status = "completed"
        finally:
            self._end_backup(dom, backup, status)

    def _end_backup(self, dom: _TestDomain, backup: _TestBackup,
                    status: Literal["completed", "failed", "cancelled"]) -> None:  # fmt: skip
        uuid = dom.definition.uuid
        if self._backups.get(uuid) is not backup:
            return
        del self._backups[uuid]
        elapsed = int((time.monotonic() - backup.started) * 1000)
        self._last_jobs[uuid] = DomainJobInfo(type=status, operation="backup",
                                              time_elapsed_ms=elapsed)  # fmt: skip
        self._sink(DriverEvent(dom.definition.name, uuid, "job_completed", None,
                               {"operation": "backup", "status": status,
                                "time_elapsed_ms": elapsed, "data_total": 0}))  # fmt: skip

    async def backup_xml(self, ref: str) -> str:
        dom = self._get(ref)
        backup = self._backups.get(dom.definition.uuid)
        if backup is None:
            raise OperationInvalid(f"domain '{dom.definition.name}' has no backup job")
        return backup_xml_of(backup.incremental, backup.disks)

    async def job_info(self, ref: str, completed: bool) -> DomainJobInfo:
        dom = self._get(ref)
        if completed:
            return self._last_jobs.get(dom.definition.uuid) or DomainJobInfo(type="none")
        backup = self._backups.get(dom.definition.uuid)
        if backup is None:
            return DomainJobInfo(type="none")
        elapsed = int((time.monotonic() - backup.started) * 1000)
        return DomainJobInfo(type="unbounded", operation="backup", time_elapsed_ms=elapsed)

    async def job_abort(self, ref: str) -> DomainJobInfo:
        dom = self._get(ref)
        backup = self._backups.get(dom.definition.uuid)
        if backup is None:
            raise OperationInvalid(f"no job is active on domain '{dom.definition.name}'")
        self._end_backup(dom, backup, "cancelled")
        if backup.task is not None:
            backup.task.cancel()
        return self._last_jobs[dom.definition.uuid]

    # --- live migration (libvirt's v3 steps) ---------------------------------------
    async def migrate_begin(self, ref: str) -> str:
        dom = self._get(ref)
        self._require(dom, DomainState.RUNNING, DomainState.PAUSED, verb="migrate")
        if dom.incoming is not None or (dom.outgoing is not None and dom.outgoing.active):
            raise OperationInvalid(f"domain '{dom.definition.name}' is already migrating")
        return dom.definition.to_xml()

    async def migrate_prepare(self, xml: str, params: MigrationParams) -> str:
        defn = parse_domain_xml(xml)
        previous = self._domains.get(defn.uuid)
        if previous is not None and previous.state != DomainState.SHUTOFF:
            raise OperationInvalid(f"domain '{defn.name}' is already active on this host")
        other = self._by_name.get(defn.name)
        if other is not None and other != defn.uuid:
            raise OperationFailed(f"domain '{defn.name}' already exists with uuid {other}")
        incoming = _Incoming(previous=previous.definition if previous else None)
        dom = _TestDomain(definition=defn, memory_kib=defn.current_memory_kib, persistent=False)
        dom.incoming, dom.id = incoming, self._next_id
        self._next_id += 1

        async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            incoming.writers.append(writer)
            with contextlib.suppress(ConnectionError, OSError):
                while line := await reader.readline():
                    if line.startswith(b"DONE"):
                        incoming.completed = True
                    writer.write(b"ACK\n")
                    await writer.drain()
            writer.close()

        incoming.server = await asyncio.start_server(receive, params.listen, 0)
        port = incoming.server.sockets[0].getsockname()[1]
        self._domains[defn.uuid] = dom
        self._by_name[defn.name] = defn.uuid
        self._set(dom, DomainState.PAUSED, "migration")
        self._emit(dom, "started", "migrated")
        return f"tcp:{params.listen}:{port}"

    async def migrate_perform(
        self, ref: str, uri: str, params: MigrationParams,
        copy: tuple[_Stream, dict[str, str | None]] | None = None,
    ) -> None:  # fmt: skip
        dom = self._get(ref)
        self._require(dom, DomainState.RUNNING, DomainState.PAUSED, verb="migrate")
        if dom.outgoing is not None and dom.outgoing.active:
            raise OperationInvalid(f"domain '{dom.definition.name}' is already migrating")
        scheme, _, rest = uri.partition(":")
        host, _, port = rest.rpartition(":")
        if scheme != "tcp" or not host or not port.isdigit():
            raise MigrateFailed(f"unsupported migration URI {uri!r}")
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError as exc:
            raise MigrateFailed(f"cannot connect to {uri}: {exc.strerror or exc}") from exc
        total = dom.definition.current_memory_kib * 1024
        out = _Outgoing(MigrationStatus(status=MigrationState.SETUP, remaining=total, total=total))
        dom.outgoing = out
        self._emit_migration(dom)
        out.task = self._tasks.spawn(
            self._stream(dom, out, reader, writer, params, copy), f"migrate:{dom.definition.name}"
        )

    def _duration(self, total: int, params: MigrationParams) -> float:
        if params.bandwidth_mib_s:
            return max(self._migration_time, total / (params.bandwidth_mib_s * 1024 * 1024))
        return self._migration_time

    async def _stream(
        self,
        dom: _TestDomain,
        out: _Outgoing,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        params: MigrationParams,
        copy: tuple[_Stream, dict[str, str | None]] | None = None,
    ) -> None:  # fmt: skip
        """Source side: send acknowledged pages, pause, switch over; fail on a broken stream
        (a copy-storage migration sends the disks first)."""
        status, started = out.status, time.monotonic()
        steps = max(1, math.ceil(self._duration(status.total, params) / _MIGRATION_STEP))
        try:
            if copy is not None:
                await self._copy_disks(dom, out, copy[0], copy[1], params)
            for step in range(1, steps + 1):
                await asyncio.sleep(self._duration(status.total, params) / steps)
                await self._page(reader, writer, b"PAGE\n")
                status.transferred = status.total * step // steps
                status.remaining = status.total - status.transferred
                status.passes = 1 if step < steps else 2
                late = params.postcopy and step > steps // 2
                status.status = MigrationState.POSTCOPY_ACTIVE if late else MigrationState.ACTIVE
                self._emit_migration(dom)
            if dom.state == DomainState.RUNNING:  # the final switch-over pauses the source
                out.paused_by_migration = True
                self._set(dom, DomainState.PAUSED, "migration")
                self._emit(dom, "suspended", "migrated")
            await self._page(reader, writer, b"DONE\n")
            status.status, status.remaining = MigrationState.COMPLETED, 0
            status.downtime_ms = 1
            status.total_time_ms = int((time.monotonic() - started) * 1000)
        except (OSError, EOFError, TimeoutError) as exc:
            status.status, status.error = (
                MigrationState.FAILED,
                f"migration stream broken: {exc or 'EOF'}",
            )
            self._resume_after_migration(dom, out)
        finally:
            writer.close()
        self._emit_migration(dom)

    @staticmethod
    async def _page(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
    ) -> None:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(_MIGRATION_ACK_TIMEOUT):
            if not await reader.readline():
                raise EOFError("destination closed the stream")

    def _emit_migration(self, dom: _TestDomain) -> None:
        if dom.outgoing is not None:
            data = to_wire(dom.outgoing.status)
            self._sink(
                DriverEvent(dom.definition.name, dom.definition.uuid, "migration", None, data)
            )

    def _resume_after_migration(self, dom: _TestDomain, out: _Outgoing) -> None:
        if out.paused_by_migration and dom.state == DomainState.PAUSED:
            out.paused_by_migration = False
            self._set(dom, DomainState.RUNNING, "migration_canceled")
            self._emit(dom, "resumed", "migrated")

    # --- copy-storage (drivers/base.py CopyStorage) --------------------------------------
    async def _disk_path(self, defn: DomainDefinition, disk: Disk) -> str | None:
        """Where a disk's bytes are on this host (a volume through the agent's pools)."""
        if disk.type != "volume":
            return disk.source_path
        src = disk.element.find("source")
        if self._resolver is None or src is None:
            raise OperationFailed(f"disk '{disk.target_dev}' is a volume but no storage here")
        pool, vol = src.get("pool") or "", src.get("volume") or ""
        path = (await self._resolver.resolve(pool, vol, f"peek-{defn.uuid}")).path
        self._resolver.release(f"peek-{defn.uuid}", pool, vol)
        return path

    async def migrate_disks(self, ref: str, incremental: bool = False) -> list[CopyDisk]:
        if incremental:
            raise NoSupport("the test driver copies whole disks only (--copy-storage-all)")
        dom = self._get(ref)
        self._require(dom, DomainState.RUNNING, DomainState.PAUSED, verb="migrate")
        defn = dom.live or dom.definition
        out = []
        for disk in copied_disks(defn):
            path = await self._disk_path(defn, disk)
            st = await asyncio.to_thread(os.stat, path) if path else None
            size = st.st_size if st else 0
            used = st.st_blocks * 512 if st else 0
            fmt = disk.driver_type or "raw"
            out.append(CopyDisk(target=disk.target_dev, format=fmt, capacity=size, allocation=used))
        return out

    async def migrate_nbd_start(self, ref: str, disks: list[str], listen: str) -> NbdTarget:
        dom = self._get(ref)
        incoming = dom.incoming
        if incoming is None or incoming.disk_server is not None:
            raise OperationInvalid(f"domain '{dom.definition.name}' is not an incoming migration")
        by_target = {d.target_dev: d for d in dom.definition.disks}
        unknown = sorted(set(disks) - set(by_target))
        if unknown:
            raise InvalidArgument(f"domain '{dom.definition.name}' has no disk "
                                  f"{', '.join(unknown)} here to copy into")  # fmt: skip
        await self._resolve(dom.definition)  # the incoming instance holds its volumes
        paths = {t: await self._disk_path(dom.definition, by_target[t]) for t in disks}

        def write(path: str, offset: int, data: bytes) -> None:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)

        async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            incoming.writers.append(writer)
            with contextlib.suppress(ConnectionError, OSError, ValueError,
                                     asyncio.IncompleteReadError):  # fmt: skip
                while line := await reader.readline():
                    target, offset, length = line.decode().split()
                    data = await reader.readexactly(int(length))
                    path = paths.get(target)
                    if path:
                        await asyncio.to_thread(write, path, int(offset), data)
                    writer.write(b"ACK\n")
                    await writer.drain()
            writer.close()

        incoming.disk_server = await asyncio.start_server(receive, listen, 0)
        port = int(incoming.disk_server.sockets[0].getsockname()[1])
        return NbdTarget(host=listen, port=port, exports=list(disks))

    async def migrate_perform_copy(
        self, ref: str, uri: str, params: MigrationParams, nbd: NbdTarget
    ) -> None:
        dom = self._get(ref)
        defn = dom.live or dom.definition
        disks = {d.target_dev: await self._disk_path(defn, d) for d in copied_disks(defn)}
        missing = sorted(set(disks) - set(nbd.exports))
        if missing:
            raise InvalidArgument(f"the destination exports no disk {', '.join(missing)}")
        try:
            disk_io = await asyncio.open_connection(nbd.host, nbd.port)
        except OSError as exc:
            raise MigrateFailed(f"cannot connect to the disks' target {nbd.host}:{nbd.port}:"
                                f" {exc.strerror or exc}") from exc  # fmt: skip
        try:
            await self.migrate_perform(ref, uri, params, copy=(disk_io, disks))
        except BaseException:
            disk_io[1].close()
            raise

    async def _copy_disks(
        self, dom: _TestDomain, out: _Outgoing, io: _Stream,
        disks: dict[str, str | None], params: MigrationParams,
    ) -> None:  # fmt: skip
        """Send each disk's bytes (phase ``disk``), acknowledged chunk by chunk."""
        reader, writer = io
        status = out.status
        sizes = {t: (await asyncio.to_thread(os.path.getsize, p)) if p else 0
                 for t, p in disks.items()}  # fmt: skip
        status.phase, status.disk_total = CopyPhase.DISK, sum(sizes.values())

        def read(path: str, offset: int) -> bytes:
            with open(path, "rb") as fh:
                fh.seek(offset)
                return fh.read(_DISK_CHUNK)

        try:
            for target, path in disks.items():
                for offset in range(0, sizes[target], _DISK_CHUNK):
                    assert path is not None
                    data = await asyncio.to_thread(read, path, offset)
                    if params.bandwidth_mib_s:
                        await asyncio.sleep(len(data) / (params.bandwidth_mib_s << 20))
                    writer.write(f"{target} {offset} {len(data)}\n".encode() + data)
                    await writer.drain()
                    async with asyncio.timeout(_MIGRATION_ACK_TIMEOUT):
                        if not await reader.readline():
                            raise EOFError("the destination closed the disks' stream")
                    status.disk_transferred += len(data)
                    self._emit_migration(dom)
        finally:
            writer.close()
        status.phase = CopyPhase.MEMORY
        self._emit_migration(dom)

    async def migrate_status(self, ref: str) -> MigrationStatus:
        dom = self._get(ref)
        return (
            dom.outgoing.status
            if dom.outgoing is not None
            else MigrationStatus(status=MigrationState.NONE)
        )

    async def migrate_wait(self, ref: str, timeout: float) -> None:
        """Until the outgoing stream of ``ref`` ended, or ``timeout`` (MigrationWait)."""
        out = self._get(ref).outgoing
        if out is not None and out.active and out.task is not None:
            await asyncio.wait([out.task], timeout=timeout)

    async def migrate_cancel(self, ref: str) -> None:
        dom = self._get(ref)
        out = dom.outgoing
        if out is None or not out.active:
            raise OperationInvalid(f"no migration in progress for domain '{dom.definition.name}'")
        await self._cancel_outgoing(dom, out)

    async def _cancel_outgoing(self, dom: _TestDomain, out: _Outgoing) -> None:
        if out.task is not None and not out.task.done():
            out.task.cancel()
            await asyncio.wait([out.task])  # our own caller's cancellation still reaches us
        if out.active:
            out.status.status = MigrationState.CANCELLED
            self._resume_after_migration(dom, out)
            self._emit_migration(dom)

    async def migrate_finish(self, ref: str, success: bool) -> None:
        dom = self._get(ref)
        incoming = dom.incoming
        if incoming is None:
            raise OperationInvalid(f"domain '{dom.definition.name}' is not an incoming migration")
        if success and not incoming.completed:
            raise MigrateFailed(f"incoming migration of '{dom.definition.name}' did not complete")
        self._close_incoming(dom)
        if not success:
            self._stop(dom, "failed")
            if incoming.previous is not None:  # give back the inactive definition it replaced
                back = _TestDomain(incoming.previous, memory_kib=incoming.previous.memory_kib)
                self._domains[back.definition.uuid] = back
                self._by_name[back.definition.name] = back.definition.uuid
            return
        dom.persistent = True
        self._emit(dom, "defined", "updated" if incoming.previous else "added")
        self._set(dom, DomainState.RUNNING, "migrated")
        self._emit(dom, "resumed", "migrated")

    async def migrate_confirm(self, ref: str, success: bool) -> None:
        dom = self._get(ref)
        out = dom.outgoing
        if success:
            if out is None or out.status.status != "completed":
                raise OperationInvalid(
                    f"migration of domain '{dom.definition.name}' has not completed"
                )
            dom.outgoing = None
            self._stop(dom, "migrated")
            self._forget(dom)
            self._emit(dom, "undefined", "removed")
            return
        if out is not None:
            await self._cancel_outgoing(dom, out)
            self._resume_after_migration(dom, out)
            dom.outgoing = None

    def _close_incoming(self, dom: _TestDomain) -> None:
        incoming, dom.incoming = dom.incoming, None
        if incoming is None:
            return
        if incoming.server is not None:
            incoming.server.close()
        if incoming.disk_server is not None:
            incoming.disk_server.close()
        for writer in incoming.writers:
            writer.close()

    def _abort_migration(self, dom: _TestDomain) -> None:
        """A stopped domain takes its migration down with it (as QEMU's exit does)."""
        self._close_incoming(dom)
        out = dom.outgoing
        if out is not None and out.task is not None and not out.task.done():
            out.task.cancel()
            out.status.status, out.status.error = MigrationState.CANCELLED, "domain stopped"

    # --- statistics -----------------------------------------------------------------
    async def stats(
        self, refs: list[str] | None = None, groups: frozenset[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        doms = list(self._domains.values()) if refs is None else [self._get(r) for r in refs]
        return {d.definition.name: _test_stats(d, groups) for d in doms}

    async def host_stats(self) -> dict[str, Any]:
        res = await self.host_resources()
        return {
            "cpu.count": res.cpus,
            "memory.total": res.memory_total_kib,
            "memory.free": res.memory_free_kib,
            "domains.active": sum(d.state != DomainState.SHUTOFF for d in self._domains.values()),
        }

    # --- inspection -----------------------------------------------------------------
    def _info(self, dom: _TestDomain) -> DomainInfo:
        defn = dom.definition
        active = dom.state != DomainState.SHUTOFF
        return DomainInfo(
            name=defn.name,
            uuid=defn.uuid,
            state=dom.state,
            reason=dom.reason,
            max_memory_kib=defn.memory_kib,
            memory_kib=dom.memory_kib if active else defn.current_memory_kib,
            vcpus=defn.current_vcpus,
            cpu_time_ns=dom.cpu_time(),
            id=dom.id,
            hv_type=defn.hv_type,
            persistent=dom.persistent,
            managed_save=dom.managed_save is not None,
            owner=(dom.live or defn).owner,  # the definition xml() shows
            groups=(dom.live or defn).placement_groups,
        )

    async def info(self, ref: str) -> DomainInfo:
        return self._info(self._get(ref))

    async def list_domains(self, include_inactive: bool = True) -> list[DomainInfo]:
        return [
            self._info(dom)
            for dom in self._domains.values()
            if include_inactive or dom.state != DomainState.SHUTOFF
        ]

    async def xml(self, ref: str) -> str:
        dom = self._get(ref)
        return (dom.live or dom.definition).to_xml(domain_id=dom.id)

    # --- storage and devices: disks are XML only, volumes really resolved ---------------
    def set_volume_resolver(self, resolver: VolumeResolver) -> None:
        self._resolver = resolver

    async def _resolve(self, defn: DomainDefinition) -> None:
        """A volume disk that does not resolve fails the start, as on a real hypervisor."""
        wanted = volume_sources(defn)
        if not wanted:
            return
        if self._resolver is None:
            raise OperationFailed(f"domain '{defn.name}' has volume disks but no storage here")
        try:
            for _index, pool, volume in wanted:
                try:
                    await self._resolver.resolve(pool, volume, defn.uuid)
                except VirtbusError as exc:
                    raise type(exc)(f"cannot start domain '{defn.name}': {exc.message}") from None
        except BaseException:
            self._resolver.release(defn.uuid)
            raise

    def _affect(self, dom: _TestDomain, affect: Affect) -> tuple[bool, bool]:
        running = dom.live is not None
        live, config = affect.live, affect.config
        if not live and not config:
            live, config = running, not running
        if live and not running:
            raise OperationInvalid(f"domain '{dom.definition.name}' is not running")
        return live, config

    async def attach_device(self, ref: str, xml: str, affect: Affect) -> None:
        dom = self._get(ref)
        el = parse_disk_device(xml)
        live, config = self._affect(dom, affect)
        persistent = with_disk(dom.definition, el) if config else None
        if live:
            assert dom.live is not None
            trial = with_disk(dom.live, el)
            disk = trial.disks[-1]
            await self._resolve(only_disk(trial, el))
            dom.live = trial
            self._sink(DriverEvent(dom.definition.name, dom.definition.uuid, "device_added",
                                   None, {"device": f"disk-{disk.target_dev}",
                                          "target": disk.target_dev}))  # fmt: skip
        if persistent is not None:
            dom.definition = persistent

    async def detach_device(self, ref: str, xml: str, affect: Affect) -> None:
        dom = self._get(ref)
        target = disk_target(parse_disk_device(xml))
        live, config = self._affect(dom, affect)
        name = dom.definition.name
        persistent = without_disk(dom.definition, target, f"'{name}'") if config else None
        if live:
            assert dom.live is not None
            disk = next((d for d in dom.live.disks if d.target_dev == target), None)
            dom.live = without_disk(dom.live, target, f"running domain '{name}'")
            src = disk.element.find("source") if disk is not None else None
            if disk is not None and disk.type == "volume" and src is not None and self._resolver:
                self._resolver.release(dom.definition.uuid, src.get("pool"), src.get("volume"))
            self._sink(DriverEvent(name, dom.definition.uuid, "device_removed", None,
                                   {"device": f"disk-{target}"}))  # fmt: skip
        if persistent is not None:
            dom.definition = persistent

    async def interface_bandwidth(self, ref: str, interface: str,
                                  affect: Affect) -> Bandwidth | None:  # fmt: skip
        """As the QEMU driver: the NIC's ``<bandwidth>``, live or in the definition."""
        dom = self._get(ref)
        live, _ = self._affect(dom, affect)
        defn = dom.live if live and dom.live is not None else dom.definition
        where = f"{'running domain' if live else 'the definition of'} '{defn.name}'"
        return tuned_interface(defn, interface, where).bandwidth

    async def tune_interface(self, ref: str, interface: str, inbound: RateChange | None,
                             outbound: RateChange | None, affect: Affect) -> None:  # fmt: skip
        """As the QEMU driver (the same rules, every check before a change); the simulated
        NIC has no tap, so only its XML carries the limits."""
        dom = self._get(ref)
        live, config = self._affect(dom, affect)
        changed: list[tuple[str, DomainDefinition]] = []
        for side, defn in (("live", dom.live if live else None),
                           ("config", dom.definition if config else None)):  # fmt: skip
            if defn is None:
                continue
            where = f"{'running domain' if side == 'live' else 'the definition of'} '{defn.name}'"
            nic = tuned_interface(defn, interface, where)
            new = defn.copy()
            new.set_interface_bandwidth(nic.index, tuned(nic.bandwidth, inbound, outbound, where))
            changed.append((side, new))
        for side, new in changed:
            if side == "live":
                dom.live = new
            else:
                dom.definition = new

    async def set_memory(self, ref: str, kib: int, maximum: bool, affect: Affect) -> None:
        """As the QEMU driver; the simulated guest's balloon reaches the target at once."""
        dom = self._get(ref)
        live, config = self._affect(dom, affect)
        if live:
            assert dom.live is not None
            check_live_memory(dom.live, kib, maximum)
        persistent = with_memory(dom.definition, kib, maximum) if config else None
        if live:
            assert dom.live is not None
            dom.live = with_memory(dom.live, kib, maximum=False)
            dom.memory_kib = kib
            self._sink(DriverEvent(dom.definition.name, dom.definition.uuid, "balloon_change",
                                   None, {"actual": kib}))  # fmt: skip
        if persistent is not None:
            dom.definition = persistent

    async def block_info(self, ref: str, target: str) -> BlockInfo:
        dom = self._get(ref)
        defn = dom.live or dom.definition
        disk = next((d for d in defn.disks if d.target_dev == target), None)
        if disk is None:
            raise InvalidArgument(f"domain '{defn.name}' has no disk {target}")
        path = disk.source_path
        if disk.type == "volume" and self._resolver is not None:
            src = disk.element.find("source")
            assert src is not None
            pool, vol = str(src.get("pool")), str(src.get("volume"))
            path = (await self._resolver.resolve(pool, vol, f"peek-{defn.uuid}")).path
            self._resolver.release(f"peek-{defn.uuid}", pool, vol)
        size = 0
        if path and path.startswith("/"):
            with contextlib.suppress(OSError):
                size = (await asyncio.to_thread(os.stat, path)).st_size
        return BlockInfo(target, size, size, size)

    async def host_resources(self) -> HostResources:
        total = self._host.memory_kib or _meminfo_total_kib()
        used = sum(
            d.definition.current_memory_kib
            for d in self._domains.values()
            if d.state != DomainState.SHUTOFF
        )
        return HostResources(
            cpus=self._host.cpus,
            memory_total_kib=total,
            memory_free_kib=max(0, total - used),
            arch=self._host.arch,
            cpu_model=self._host.cpu_model,
            hypervisor=self.name,
        )


def _test_stats(dom: _TestDomain, groups: frozenset[str] | None) -> dict[str, Any]:
    """libvirt domstats fields for a simulated guest (deterministic but moving CPU time)."""
    want = groups or frozenset(STATS_GROUPS)
    defn, active = dom.definition, dom.state != DomainState.SHUTOFF
    out: dict[str, Any] = {}
    if "state" in want:
        out["state.state"] = int(dom.state)
        out["state.reason"] = reason_code(dom.state, dom.reason)
    if "cpu-total" in want and active:
        cpu = dom.cpu_time()
        out.update({"cpu.time": cpu, "cpu.user": cpu // 2, "cpu.system": cpu // 4})
    if "balloon" in want:
        out["balloon.current"] = dom.memory_kib if active else defn.current_memory_kib
        out["balloon.maximum"] = defn.memory_kib
    if "vcpu" in want:
        out["vcpu.current"] = defn.current_vcpus
        out["vcpu.maximum"] = defn.vcpus
        if active:
            per = dom.cpu_time() // max(1, defn.current_vcpus)
            for n in range(defn.current_vcpus):
                out[f"vcpu.{n}.state"] = 1
                out[f"vcpu.{n}.time"] = per
    if "interface" in want:
        out["net.count"] = len(defn.interfaces) if active else 0
        for n, iface in enumerate(defn.interfaces if active else ()):
            out[f"net.{n}.name"] = iface.target_dev or f"vnet{n}"
            for field in (
                "rx.bytes",
                "rx.pkts",
                "rx.errs",
                "rx.drop",
                "tx.bytes",
                "tx.pkts",
                "tx.errs",
                "tx.drop",
            ):
                out[f"net.{n}.{field}"] = 0
    if "block" in want:
        out["block.count"] = len(defn.disks)
        for n, disk in enumerate(defn.disks):
            out[f"block.{n}.name"] = disk.target_dev
            if disk.source_path:
                out[f"block.{n}.path"] = disk.source_path
            for field in (
                "rd.reqs",
                "rd.bytes",
                "rd.times",
                "wr.reqs",
                "wr.bytes",
                "wr.times",
                "fl.reqs",
                "fl.times",
            ):
                out[f"block.{n}.{field}"] = 0
    return out


def _meminfo_total_kib() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:  # tiny procfs read, not disk I/O
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
