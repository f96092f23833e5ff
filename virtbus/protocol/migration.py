"""Live migration on the wire: libvirt's v3 steps as agent ops, and their shapes.

The scheduler (or any tool) drives a migration by calling, in turn, ``migration.begin``
(source) → ``migration.prepare`` (destination, answers the URI) → ``migration.perform``
(source) → ``migration.status`` until done → ``migration.finish`` (destination) →
``migration.confirm`` (source). :class:`MigrationParams` is the one declaration of what a
caller may ask of a migration; the scheduler checks it at submit with this same type, so
a migration it accepts is never refused at prepare for its parameters.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from msgspec import Meta
from msgspec import field as default

from virtbus.errors import ProtocolError
from virtbus.netaddr import is_host
from virtbus.protocol.base import Accepted, BadValue, Message, Name, NonNegInt, XmlText
from virtbus.protocol.registry import Access, Op, Req, Res, Service, Target, field, op

MAX_PARALLEL = 255  # QEMU's multifd-channels maximum
MAX_BANDWIDTH_MIB_S = 1 << 20  # 1 TiB/s: QEMU's max-bandwidth (bytes/s) fits with room
MAX_DOWNTIME_MS = 2_000_000  # QEMU's MAX_MIGRATE_DOWNTIME (2000 s)
DEFAULT_LISTEN = "127.0.0.1"
# `$(?!\n)`: Python's `$` also matches before a final newline (JSON Schema's does not)
Address = Annotated[
    str, Meta(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9.:_\[\]%-]+$(?!\n)")
]


class MigrationParams(Message):
    """What the caller asks of a live migration (libvirt's flags and QEMU's parameters)."""

    bandwidth_mib_s: Annotated[int, Meta(gt=0, le=MAX_BANDWIDTH_MIB_S)] | None = None
    max_downtime_ms: Annotated[int, Meta(gt=0, le=MAX_DOWNTIME_MS)] | None = None
    auto_converge: bool = False
    postcopy: bool = False  # postcopy-ram; switched to postcopy after the first pass
    parallel: Annotated[int, Meta(ge=0, le=MAX_PARALLEL)] = 0  # multifd channels; 0 = off
    # where the destination listens for the stream; None: the destination host's own
    # migration address (the scheduler fills it in from the host's heartbeat)
    listen_address: Address | None = None
    # libvirt's VIR_MIGRATE_NON_SHARED_DISK (--copy-storage-all): the destination makes
    # the volumes, the source mirrors every writable disk into them over NBD first
    copy_storage_all: bool = False
    # VIR_MIGRATE_NON_SHARED_INC (--copy-storage-inc): only each disk's top image is
    # copied; its backing image must already be in the same pool on the destination
    copy_storage_inc: bool = False
    # VIR_MIGRATE_TLS (--tls): the stream, and a copy-storage migration's NBD copy, go
    # over TLS with the hosts' x509 certificates (each QEMU host's
    # migrate_tls_x509_cert_dir); the destination's certificate must name the host
    tls: bool = False
    # VIR_MIGRATE_PARAM_TLS_DESTINATION (--tls-destination): the name the destination's
    # certificate must carry; None: the destination host's name (its CN under virtbus pki)
    tls_destination: Address | None = None

    def __post_init__(self) -> None:
        """What QEMU would refuse only once the destination was prepared (msgspec runs this
        on every decode, so the scheduler refuses it at submit, as the agents do)."""
        if self.postcopy and self.parallel:
            raise BadValue("postcopy cannot be combined with parallel (multifd)")
        if self.postcopy and self.copy_storage:  # libvirt refuses it too
            raise BadValue("postcopy cannot be combined with copy-storage")
        if self.copy_storage_all and self.copy_storage_inc:
            raise BadValue("copy_storage_all and copy_storage_inc are alternatives")
        if self.tls_destination is not None and not self.tls:
            raise BadValue("tls_destination is given without tls")
        if self.tls_destination is not None and not is_host(self.tls_destination):
            raise BadValue(f"tls_destination {self.tls_destination!r:.60} is not a host name")
        if self.listen_address is not None and not is_host(self.listen_address):
            raise BadValue(
                f"listen_address {self.listen_address!r:.60} is not an IP address or a host "
                "name (it goes into the tcp:HOST:PORT migration URI)"
            )

    @property
    def listen(self) -> str:
        return self.listen_address or DEFAULT_LISTEN

    @property
    def copy_storage(self) -> bool:
        """The disks move with the guest (all of them, or their top images)."""
        return self.copy_storage_all or self.copy_storage_inc


class MigrationState(StrEnum):
    """QEMU's ``query-migrate`` statuses (the ``status`` of :class:`MigrationStatus`)."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"

    @classmethod
    def lookup(cls, text: object) -> MigrationState | None:
        """The member spelled ``text``, or None (an event from a newer QEMU is ignored)."""
        return cls._value2member_map_.get(str(text))  # type: ignore[return-value]

    @classmethod
    def parse(cls, text: object) -> MigrationState:
        """A status as QEMU (or a peer) spells it; RPC_ERROR for one it never defined."""
        try:
            return cls(str(text))
        except ValueError:
            raise ProtocolError(f"unknown migration status {text!r:.40}") from None


class CopyPhase(StrEnum):
    """Which part of a copy-storage migration is moving: the disks first, then memory."""

    DISK = "disk"
    MEMORY = "memory"


class MigrationStatus(Message):
    """Progress of a migration as QEMU reports it (libvirt's job info); a copy-storage
    migration adds ``phase`` and the disks' bytes (libvirt's disk_processed/disk_total)."""

    status: MigrationState
    transferred: NonNegInt = 0
    remaining: NonNegInt = 0
    total: NonNegInt = 0
    passes: NonNegInt = 0
    downtime_ms: int | None = None
    total_time_ms: int | None = None
    error: str | None = None
    phase: CopyPhase | None = None
    disk_transferred: NonNegInt = 0
    disk_total: NonNegInt = 0

    @property
    def ended(self) -> bool:
        return self.status in (
            MigrationState.COMPLETED,
            MigrationState.FAILED,
            MigrationState.CANCELLED,
        )


class RecordState(StrEnum):
    """Where a scheduler-driven migration stands."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({RecordState.COMPLETED, RecordState.FAILED, RecordState.CANCELLED})


class MigrationPhase(StrEnum):
    """The step a migration is about to take (or is taking); journaled before each."""

    QUEUED = "queued"
    BEGIN = "begin"
    PREPARE = "prepare"
    PERFORM = "perform"
    STORAGE = "storage"  # copy-storage: the disks are mirrored, memory not sent yet
    PROGRESS = "progress"
    FINISH = "finish"
    CONFIRM = "confirm"
    DONE = "done"
    ROLLBACK = "rollback"
    ROLLED_BACK = "rolled_back"


class MigrationRecord(Message):
    """A scheduler-driven migration, as ``scheduler.migration`` answers it."""

    id: str
    domain: str
    uuid: str
    source: str
    destination: str
    params: MigrationParams
    timeout: float
    state: RecordState
    phase: MigrationPhase
    created: float
    updated: float
    started: float | None = None
    ended: float | None = None
    uri: str | None = None
    progress: dict[str, Any] = default(default_factory=dict)
    error: str | None = None
    cancel_requested: bool = False
    drain: str | None = None
    history: list[tuple[str, float]] = default(default_factory=list)
    cleanup: list[dict[str, Any]] = default(default_factory=list)


# --- agent step requests and results -------------------------------------------------
class MigrationDomain(Message):
    domain: Name


STATUS_WAIT_MAX = 60.0  # s, the longest ``migration.status`` long poll


class MigrationStatusQuery(Message):
    """``wait`` (s): a long poll, answered once the migration reached an end state
    (completed, failed, cancelled) or after ``wait``, whichever comes first, so that the
    coordinator hears the end from QEMU's own event instead of a polling interval. A
    driver that cannot wait, or an older agent (it ignores the field), answers at once."""

    domain: Name
    wait: Annotated[float, Meta(ge=0, le=STATUS_WAIT_MAX)] | None = None


class MigrationBegin(Message):
    """``params``: what the migration will do; with copy_storage_all the source lists the
    disks it will copy (``MigrationSource.disks``) and refuses one it cannot."""

    domain: Name
    params: MigrationParams = default(default_factory=MigrationParams)


class CopyDisk(Message):
    """One disk a copy-storage migration copies: the destination makes a volume this big
    in this format where its own definition puts the disk (``target``: its dev)."""

    target: Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^[a-z0-9]+$(?!\n)")]
    format: Annotated[str, Meta(pattern=r"^(raw|qcow2)$(?!\n)")]
    capacity: NonNegInt
    allocation: NonNegInt = 0  # what the source's image holds now: what the copy writes
    # copy_storage_inc: the top image's backing (a volume name in the same pool) and format
    backing: Annotated[str, Meta(min_length=1, max_length=255)] | None = None
    backing_format: Annotated[str, Meta(pattern=r"^(raw|qcow2)$(?!\n)")] | None = None


class NbdTarget(Message):
    """Where the destination serves the disks it made: NBD on ``host``:``port``, one
    writable export per disk, named by its target dev."""

    host: Address
    port: Annotated[int, Meta(gt=0, lt=65536)]
    exports: list[Annotated[str, Meta(min_length=1, max_length=32)]]


MigrationId = Annotated[str, Meta(min_length=1, max_length=128)]


class MigrationPrepare(Message):
    """``migration``: the coordinator's id of this migration; the destination records the
    URI it answers under it, and the source streams only to that URI (``perform``)."""

    xml: XmlText
    params: MigrationParams = default(default_factory=MigrationParams)
    migration: MigrationId | None = None
    disks: list[CopyDisk] = default(default_factory=list)  # copy_storage_all: from begin


class MigrationPerform(Message):
    """``migration`` and ``destination``: whose ``prepare`` answered ``uri``; the source asks
    that host (``migration.prepared``) and streams only to the URI it answered. Required
    when the agent enforces a policy (AUTH_DENIED otherwise)."""

    domain: Name
    uri: Annotated[str, Meta(min_length=1, max_length=1024)]
    params: MigrationParams = default(default_factory=MigrationParams)
    migration: MigrationId | None = None
    destination: Name | None = None
    nbd: NbdTarget | None = None  # copy_storage_all: what the destination's prepare serves


class MigrationRef(Message):
    migration: MigrationId


class PreparedUri(Message):
    uri: str


class MigrationEnd(Message):
    """``success``: finish (destination) or confirm (source) the migration, or undo it."""

    domain: Name
    success: bool


class MigrationSource(Message):
    xml: str
    name: str
    uuid: str
    state: str
    disks: list[CopyDisk] = default(default_factory=list)  # copy_storage_all: to copy


class MigrationTarget(Message):
    uri: str
    name: str
    uuid: str
    nbd: NbdTarget | None = None  # copy_storage_all: where the source mirrors the disks


class MigrationOutcome(Message):
    """The domain's state after finish/confirm; ``absent`` when it is gone from the host."""

    state: str
    reason: str | None = None
    persistent: bool | None = None


_A, _D = Service.AGENT, Target.DOMAIN
_ref = field("domain")


def _step(
    name: str, request: type[Req], result: type[Res], summary: str, serial: bool = True
) -> Op[Req, Res]:
    return op(
        name, request, result, _A, summary,
        access=Access.MIGRATE, target=_D, target_of=_ref, serial=serial,
    )  # fmt: skip


MIGRATION_BEGIN = _step(
    "migration.begin", MigrationBegin, MigrationSource,
    "source: check the domain can migrate; its XML for the destination",
)  # fmt: skip
MIGRATION_PREPARE = op(
    "migration.prepare", MigrationPrepare, MigrationTarget, _A,
    "destination: start a paused incoming instance; the URI to stream to",
    access=Access.MIGRATE, target=_D, serial=True,
)  # fmt: skip  # its target is the name inside the XML
MIGRATION_PREPARED = op(
    "migration.prepared", MigrationRef, PreparedUri, _A,
    "destination: the URI its prepare answered for a migration id (the source checks"
    " perform against it)",
    access=Access.READ, target=Target.MIGRATION, target_of=field("migration"), serial=False,
)  # fmt: skip
MIGRATION_PERFORM = _step(
    "migration.perform", MigrationPerform, Accepted, "source: start streaming to the URI"
)
MIGRATION_STATUS = _step(
    "migration.status", MigrationStatusQuery, MigrationStatus,
    "source: progress of the migration", serial=False,
)  # fmt: skip  # overtakes a busy chain
MIGRATION_CANCEL = _step(
    "migration.cancel", MigrationDomain, Accepted,
    "source: abort; the guest keeps running at the source", serial=False,
)  # fmt: skip
MIGRATION_FINISH = _step(
    "migration.finish", MigrationEnd, MigrationOutcome,
    "destination: resume and own the domain, or kill the incoming one (idempotent)",
)  # fmt: skip
MIGRATION_CONFIRM = _step(
    "migration.confirm", MigrationEnd, MigrationOutcome,
    "source: drop the old instance, or resume it after a failure (idempotent)",
)  # fmt: skip
