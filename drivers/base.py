"""The one Driver protocol every hypervisor implements, and what it reports.

The agent never knows which hypervisor it talks to: it calls these methods and receives
:class:`DriverEvent` values through the ``sink`` callable it hands the driver. The sink is
synchronous and never blocks (the agent stamps the per-host sequence number and queues
the event for publishing), so event order is exactly the order the driver saw things
happen, with no queue of the driver's own in between.

A domain reference (``ref``) is a name or a UUID string. Errors are ``virtbus.errors``
types: ``NoDomainError`` for an unknown ref, ``OperationInvalid`` for a wrong state,
``OperationFailed`` for a duplicate name/uuid or a failed operation, ``XMLError`` /
``ConfigUnsupported`` for definitions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from virtbus.domain.bandwidth import Bandwidth, RateChange
from virtbus.protocol.backup import BackupStarted, CheckpointInfo, DomainJobInfo
from virtbus.protocol.blockjob import (
    BlockCommit,
    BlockCopy,
    BlockError,
    BlockJobEnd,
    BlockJobInfo,
    BlockPull,
)
from virtbus.protocol.domain import DomainInfo as DomainInfoMessage
from virtbus.protocol.domain import StateName
from virtbus.protocol.events import DomainState
from virtbus.protocol.migration import CopyDisk, MigrationParams, MigrationStatus, NbdTarget
from virtbus.protocol.snapshot import SnapshotInfo


@dataclass(frozen=True, slots=True)
class DriverEvent:
    """One event in libvirt's vocabulary (``event`` and ``detail`` as in protocol/events.py)."""

    domain: str
    uuid: str
    event: str
    detail: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    reconciled: bool = False


EventSink = Callable[[DriverEvent], None]


@dataclass(frozen=True, slots=True)
class DomainRef:
    name: str
    uuid: str


@dataclass(slots=True)
class DomainInfo:
    """What ``virsh dominfo`` shows."""

    name: str
    uuid: str
    state: DomainState
    reason: str
    max_memory_kib: int
    memory_kib: int
    vcpus: int
    cpu_time_ns: int = 0
    persistent: bool = True
    autostart: bool = False
    id: int | None = None  # hypervisor id while active, None when shut off
    hv_type: str = ""
    managed_save: bool = False  # a managed save image waits for the next start
    owner: str | None = None  # who defined it (its definition's virtbus metadata)
    groups: frozenset[str] = frozenset()  # its anti-affinity groups (placement metadata)

    def to_wire(self, *, with_owner: bool = False) -> DomainInfoMessage:
        """``with_owner``: dominfo shows the owner; a domain list leaves it out (nil)."""
        return DomainInfoMessage(
            name=self.name,
            uuid=self.uuid,
            id=self.id,
            state=StateName.of(self.state),
            state_code=int(self.state),
            reason=self.reason,
            max_memory_kib=self.max_memory_kib,
            memory_kib=self.memory_kib,
            vcpus=self.vcpus,
            cpu_time_ns=self.cpu_time_ns,
            persistent=self.persistent,
            autostart=self.autostart,
            type=self.hv_type,
            managed_save=self.managed_save,
            owner=self.owner if with_owner else None,
            groups=sorted(self.groups),
        )


@dataclass(frozen=True, slots=True)
class HostResources:
    """What a host offers, for heartbeats and placement."""

    cpus: int
    memory_total_kib: int
    memory_free_kib: int
    arch: str
    cpu_model: str
    hypervisor: str

    def to_map(self) -> dict[str, Any]:
        return {
            "cpus": self.cpus,
            "memory_total_kib": self.memory_total_kib,
            "memory_free_kib": self.memory_free_kib,
            "arch": self.arch,
            "cpu_model": self.cpu_model,
            "hypervisor": self.hypervisor,
        }


@dataclass(frozen=True, slots=True)
class ResolvedVolume:
    """What a ``<disk type='volume'><source pool='p' volume='v'/>`` means on this host.

    ``kind`` is how QEMU opens it: ``file`` or ``block`` (``path`` is a local file or
    device) or ``network`` (``network`` holds QEMU's blockdev options of the protocol
    node, e.g. libiscsi's, and ``path`` its URL for humans).
    """

    pool: str
    volume: str
    kind: str
    path: str
    format: str
    network: Mapping[str, Any] = field(default_factory=dict)


class VolumeResolver(Protocol):
    """The agent's storage, as a hypervisor driver sees it (drivers never import
    drivers.storage: the agent hands its pools to the driver through this)."""

    async def resolve(self, pool: str, volume: str, domain: str) -> ResolvedVolume:
        """The volume for domain ``domain`` (a uuid), leased to it until released: a leased
        volume cannot be deleted. NoStoragePool/NoStorageVol/OperationInvalid name the pool
        and the volume."""

    def release(self, domain: str, pool: str | None = None, volume: str | None = None) -> None:
        """Drop the domain's lease on one volume, or (no pool/volume) on all of them."""

    def pool_targets(self) -> tuple[str, ...]:
        """The target paths of the active pools: a domain's host paths may be inside one
        (the QEMU driver's path confinement, drivers/qemu/confine.py)."""


@dataclass(frozen=True, slots=True)
class ResolvedTap:
    """A tap made for one guest NIC on a virtual network's bridge, in the agent's network
    namespace. ``fd`` is the agent's open descriptor of it: QEMU inherits (or is handed)
    it, so QEMU never needs CAP_NET_ADMIN; the tap is not persistent, so it goes away
    with the last descriptor (QEMU's exit) even when nobody removes it."""

    network: str
    bridge: str
    ifname: str
    fd: int


class TapProvider(Protocol):
    """The agent's virtual networks, as a hypervisor driver sees them (drivers never
    import drivers.network: the agent hands its networks in through this)."""

    def has_network(self, name: str) -> bool:
        """A network of that name is defined on this host (active or not)."""

    async def open_tap(self, network: str, domain: str, mac: str,
                       bandwidth: Bandwidth | None = None) -> ResolvedTap:  # fmt: skip
        """A tap for domain ``domain`` (a uuid) on ``network``'s bridge, up, its MAC
        derived from the guest's ``mac`` (libvirt's fe:..), shaped by the NIC's
        ``bandwidth`` before it is handed over; NO_NETWORK for an unknown network,
        OPERATION_INVALID for an inactive one."""

    async def set_tap_bandwidth(self, domain: str, ifname: str,
                                bandwidth: Bandwidth | None) -> None:  # fmt: skip
        """Replace the shaping of the domain's tap ``ifname`` (None: none; domiftune)."""

    async def release_taps(self, domain: str, ifname: str | None = None) -> None:
        """Remove the domain's taps (or the one named ``ifname``) and their shaping;
        idempotent."""


@runtime_checkable
class UsesNetworks(Protocol):
    """A driver that can run ``<interface type='network'>`` NICs on the agent's networks."""

    def set_tap_provider(self, provider: TapProvider) -> None: ...


@dataclass(frozen=True, slots=True)
class Affect:
    """libvirt's VIR_DOMAIN_AFFECT_* flags of a device change, resolved by the driver:
    neither set means CURRENT (the live domain when it runs, else its definition)."""

    live: bool = False
    config: bool = False


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """``virsh domblkinfo``: sizes in bytes of one disk as the hypervisor sees it."""

    target: str
    capacity: int
    allocation: int
    physical: int

    def to_map(self) -> dict[str, Any]:
        return {"target": self.target, "capacity": self.capacity,
                "allocation": self.allocation, "physical": self.physical}  # fmt: skip


@runtime_checkable
class Hotplug(Protocol):
    """A driver that changes a domain's devices (libvirt's attach/detach-device and
    domblkinfo). Optional: the agent answers NO_SUPPORT for a driver without it."""

    async def attach_device(self, ref: str, xml: str, affect: Affect) -> None:
        """Add the device (a ``<disk>``, or an ``<interface>`` where the driver can) live
        and/or to the definition."""

    async def detach_device(self, ref: str, xml: str, affect: Affect) -> None:
        """Remove the device matching ``xml`` (a disk by its target dev, a NIC by its MAC,
        else its target dev); live, it waits for the guest to let go (OPERATION_TIMEOUT
        when it does not)."""

    async def block_info(self, ref: str, target: str) -> BlockInfo: ...


@runtime_checkable
class MemoryTuning(Protocol):
    """A driver that changes a domain's memory (setmem, setmaxmem). Optional.

    Live, ``kib`` is the balloon's target: INVALID_ARG above ``<memory>``, OPERATION_INVALID
    without a balloon; the guest reaches it in its own time (a ``balloon_change`` event).
    ``maximum`` changes ``<memory>`` and only in the definition, as libvirt's QEMU driver:
    live it is OPERATION_INVALID."""

    async def set_memory(self, ref: str, kib: int, maximum: bool, affect: Affect) -> None: ...


@runtime_checkable
class InterfaceLinks(Protocol):
    """A driver that sets a NIC's link up or down (domif-setlink). Optional."""

    async def set_interface_link(self, ref: str, interface: str, up: bool,
                                 affect: Affect) -> None:  # fmt: skip
        """``interface``: the NIC's target dev or MAC; OPERATION_FAILED when none is."""


@runtime_checkable
class InterfaceTuning(Protocol):
    """A driver with libvirt's interface parameters: a NIC's ``<bandwidth>`` (domiftune).
    Optional. ``interface``: the NIC's target dev or MAC, INVALID_ARG when none is; the
    rules of a change are :func:`virtbus.domain.bandwidth.tuned`'s."""

    async def interface_bandwidth(self, ref: str, interface: str,
                                  affect: Affect) -> Bandwidth | None:  # fmt: skip
        """The NIC's limits, live or in the definition (not both)."""

    async def tune_interface(self, ref: str, interface: str, inbound: RateChange | None,
                             outbound: RateChange | None, affect: Affect) -> None:  # fmt: skip
        """Change the NIC's limits (a direction not given is kept)."""


@runtime_checkable
class Snapshots(Protocol):
    """A driver with libvirt's internal snapshots (virDomainSnapshot*). Optional: the agent
    answers NO_SUPPORT for a driver without them. ``name`` is the snapshot's name;
    unknown names are NO_DOMAIN_SNAPSHOT, a snapshot of another domain is unknown here."""

    async def snapshot_create(self, ref: str, xml: str | None, disk_only: bool = False,
                              quiesce: bool = False, halt: bool = False,
                              live: bool = False) -> SnapshotInfo:  # fmt: skip
        """Take a snapshot from a ``<domainsnapshot>`` request (``disk_only``: external,
        onto new overlays; ``quiesce``: through the guest agent; ``halt``: stop the domain
        afterwards; ``live``: external memory without pausing first); it becomes current."""

    async def snapshot_list(self, ref: str) -> list[SnapshotInfo]: ...
    async def snapshot_info(self, ref: str, name: str | None) -> SnapshotInfo:
        """One snapshot; None: the current one."""

    async def snapshot_xml(self, ref: str, name: str) -> str: ...
    async def snapshot_revert(self, ref: str, name: str, running: bool, paused: bool) -> None:
        """Bring the domain to the snapshot; ``running``/``paused`` override its state."""

    async def snapshot_delete(
        self, ref: str, name: str, children: bool, children_only: bool, metadata: bool
    ) -> list[str]:
        """Delete (``metadata``: only forget) snapshots; the names deleted."""


@runtime_checkable
class SavedState(Protocol):
    """A driver that saves a guest's state to a file and restores it (virDomainSave,
    virDomainRestore, virDomainManagedSave). Optional: NO_SUPPORT without it."""

    async def save(self, ref: str, file: str, running: bool, paused: bool) -> None:
        """Save and stop the guest: stopped(saved); the file is on this host."""

    async def restore(self, file: str, running: bool, paused: bool) -> DomainRef:
        """Start the domain the file holds from it: started(restored); the file is kept."""

    async def managed_save(self, ref: str, running: bool, paused: bool) -> None:
        """Save where the next ``start`` resumes from."""

    async def managed_save_remove(self, ref: str) -> None: ...


@runtime_checkable
class BlockJobs(Protocol):
    """A driver that runs block jobs in a running domain's disk chains (virDomainBlock*
    Commit/Pull, the BlockJob calls, virDomainGetDiskErrors). Optional: NO_SUPPORT."""

    async def block_commit(self, ref: str, req: BlockCommit) -> BlockJobInfo:
        """Start a commit; it is followed as ``block_job`` events."""

    async def block_pull(self, ref: str, req: BlockPull) -> BlockJobInfo:
        """Start a pull; it is followed as ``block_job`` events."""

    async def block_copy(self, ref: str, req: BlockCopy) -> BlockJobInfo:
        """Start mirroring a disk onto a new image; followed as ``block_job`` events."""

    async def block_job_info(self, ref: str, disk: str) -> BlockJobInfo | None: ...
    async def block_job_abort(self, ref: str, disk: str, pivot: bool) -> None:
        """Cancel the disk's job (``pivot``: finish a ready active commit); returns when
        it ended."""

    async def block_job_speed(self, ref: str, disk: str, bandwidth: int) -> BlockJobInfo: ...
    def block_job_end(self, ref: str, disk: str) -> BlockJobEnd | None:
        """How the disk's last job ended (None: none ended since the agent started)."""

    async def block_errors(self, ref: str) -> list[BlockError]: ...


@runtime_checkable
class Backups(Protocol):
    """A driver with libvirt's checkpoints and push-mode backups (virDomainCheckpoint*,
    virDomainBackupBegin, the job calls for a backup). Optional: NO_SUPPORT. Unknown
    checkpoint names are NO_DOMAIN_CHECKPOINT."""

    async def checkpoint_create(self, ref: str, xml: str | None) -> CheckpointInfo: ...
    async def checkpoint_list(self, ref: str) -> list[CheckpointInfo]: ...
    async def checkpoint_info(self, ref: str, name: str) -> CheckpointInfo: ...
    async def checkpoint_xml(self, ref: str, name: str) -> str: ...
    async def checkpoint_delete(self, ref: str, name: str, metadata: bool) -> list[str]: ...
    async def backup_begin(self, ref: str, backup_xml: str | None,
                           checkpoint_xml: str | None) -> BackupStarted:  # fmt: skip
        """Start a backup; it runs on, its end is a ``job_completed`` event."""

    async def backup_xml(self, ref: str) -> str: ...
    async def job_info(self, ref: str, completed: bool) -> DomainJobInfo: ...
    async def job_abort(self, ref: str) -> DomainJobInfo:
        """Cancel the running backup; returns once it ended (its final info)."""


@runtime_checkable
class CopyStorage(Protocol):
    """A driver that live-migrates with non-shared disks (libvirt's --copy-storage-all):
    the source mirrors each disk into an NBD export of the destination's incoming
    instance, then migrates memory. Optional: NO_SUPPORT. The agent makes (and on a
    rollback removes) the destination's volumes; the driver only moves the bytes."""

    async def migrate_disks(self, ref: str, incremental: bool = False) -> list[CopyDisk]:
        """Source: the disks a copy would move (writable file and volume disks; read-only,
        shareable and empty ones stay); CONFIG_UNSUPPORTED for a writable disk of another
        type. ``incremental`` (copy-storage-inc): each top image's backing is named."""

    async def migrate_nbd_start(self, ref: str, disks: list[str], listen: str) -> NbdTarget:
        """Destination, after prepare: serve the incoming instance's ``disks`` (target
        devs) writable over NBD on ``listen``."""

    async def migrate_perform_copy(
        self, ref: str, uri: str, params: MigrationParams, nbd: NbdTarget
    ) -> None:
        """Source: mirror the disks into ``nbd``; once every mirror is ready, stream memory
        to ``uri``; at switchover the mirrors are cancelled (the destination keeps the
        copy). Progress: ``migration`` events with ``phase`` disk, then memory."""


@runtime_checkable
class MigrationTls(Protocol):
    """A driver that migrates over TLS (libvirt's --tls). Optional: a migration with
    ``params.tls`` is NO_SUPPORT on a driver without it."""

    def migrate_check_tls(self, params: MigrationParams) -> None:
        """Before anything moves (begin, prepare): OPERATION_INVALID when this host refuses
        ``params`` (it allows migration only over TLS and ``params.tls`` is off)."""


@runtime_checkable
class MigrationWait(Protocol):
    """A driver that can tell the end of an outgoing migration as it happens. Optional:
    without it ``migration.status`` with ``wait`` answers at once."""

    async def migrate_wait(self, ref: str, timeout: float) -> None:
        """Source: return once the migration of ``ref`` reached an end state (completed,
        failed, cancelled), when there is none in progress, or after ``timeout``."""


@runtime_checkable
class UsesVolumes(Protocol):
    """A driver that can run ``<disk type='volume'>`` disks given the agent's resolver."""

    def set_volume_resolver(self, resolver: VolumeResolver) -> None: ...


@runtime_checkable
class Driver(Protocol):
    """A hypervisor. All methods are coroutines except ``lookup`` and ``state`` (cheap,
    local)."""

    name: str

    async def open(self, sink: EventSink) -> None:
        """Connect (and reattach to guests left running); events go to ``sink`` from now on."""

    async def close(self) -> None:
        """Release connections; running guests are left running."""

    def lookup(self, ref: str) -> DomainRef | None:
        """Resolve a name or UUID without I/O; None when unknown."""

    def state(self, ref: str) -> tuple[DomainState, str]:
        """The domain's state and reason as the driver last saw it, without I/O (what a
        lifecycle op answers); NoDomainError for an unknown ref."""

    async def define(self, xml: str) -> DomainRef: ...
    async def undefine(self, ref: str) -> None: ...
    async def start(self, ref: str) -> None: ...
    async def shutdown(self, ref: str, timeout: float | None = None) -> None:
        """Ask the guest to power off (ACPI); with ``timeout`` wait for it, else return at once."""

    async def destroy(self, ref: str) -> None: ...
    async def reboot(self, ref: str) -> None: ...
    async def reset(self, ref: str) -> None: ...
    async def suspend(self, ref: str) -> None: ...
    async def resume(self, ref: str) -> None: ...
    async def info(self, ref: str) -> DomainInfo: ...
    async def list_domains(self, include_inactive: bool = True) -> list[DomainInfo]: ...
    async def xml(self, ref: str) -> str: ...
    async def host_resources(self) -> HostResources: ...

    # --- statistics (libvirt domstats field names, flat maps) -----------------------
    async def stats(
        self, refs: list[str] | None = None, groups: frozenset[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Per domain *name*: ``{"state.state": 1, "cpu.time": ..., ...}``; None = all/all groups.

        Groups are libvirt's: state, cpu-total, balloon, vcpu, interface, block.
        """

    async def host_stats(self) -> dict[str, Any]:
        """Host-wide figures (cpu, memory, load) for the host metrics message."""

    # --- live migration: libvirt's v3 protocol (begin/prepare/perform/finish/confirm) ---
    async def migrate_begin(self, ref: str) -> str:
        """Source: check the domain can migrate (running or paused); its XML for the destination."""

    async def migrate_prepare(self, xml: str, params: MigrationParams) -> str:
        """Destination: start an incoming instance paused; return the URI to stream to."""

    async def migrate_perform(self, ref: str, uri: str, params: MigrationParams) -> None:
        """Source: start streaming to ``uri``; returns once started. Progress is reported by
        ``migration`` events (data: MigrationStatus map) and ``migrate_status``."""

    async def migrate_status(self, ref: str) -> MigrationStatus: ...

    async def migrate_cancel(self, ref: str) -> None:
        """Source: abort a running migration (the guest keeps running at the source)."""

    async def migrate_finish(self, ref: str, success: bool) -> None:
        """Destination: on success resume and own the definition (started/resumed(migrated));
        on failure kill the incoming instance and forget it."""

    async def migrate_confirm(self, ref: str, success: bool) -> None:
        """Source: on success stop the old instance (stopped(migrated)) and drop the
        definition; on failure resume the guest if the migration left it paused."""
