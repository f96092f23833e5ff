"""The StorageBackend protocol every pool type implements, and the values it trades in.

libvirt's split: a backend knows one kind of pool (a directory, a mounted device, a
partitioned disk, an iSCSI target) and does the pool's and its volumes' work through the
tools of that kind (qemu-img, sfdisk, mount, iscsi-ls). It keeps no state of its own:
the agent's StoragePools manager owns definitions, names, locks, jobs and events, and
hands a backend the pool's definition with every call.

Errors are virtbus errors: NO_SUPPORT for what the pool type cannot do (with the reason),
OPERATION_FAILED for a tool that failed, INVALID_ARG for a request that cannot mean
anything (a partition name that is not the next one, a shrink without ``shrink``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from drivers.storage.tools import Progress
from virtbus.storage import Backing, PoolDefinition, PoolSizes, VolumeFacts

WIPE_ALGORITHMS = (
    "zero",
    "nnsa",
    "dod",
    "bsi",
    "gutmann",
    "schneier",
    "pfitzner7",
    "pfitzner33",
    "random",
    "trim",
)


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """Bounds of the tools a backend runs (seconds) and of its own I/O."""

    tool_timeout: float = 60.0  # a quick tool (qemu-img create/info, sfdisk, mount)
    mkfs_timeout: float = 600.0
    device_wait: float = 10.0  # a new partition's device node appears
    device_poll: float = 0.05
    io_chunk: int = 1 << 20  # bytes per write of a zero wipe or a transfer
    lock_timeout: float = 0.0  # no waiting for a volume's file lock (qemu-img -U reads)


@dataclass(frozen=True, slots=True)
class VolumeSpec:
    """What to create: a volume definition with the pool's defaults filled in."""

    name: str
    format: str
    capacity: int | None  # None: the backing store's (qcow2 overlays)
    allocation: int | None  # None: as much as the capacity (libvirt's default)
    backing: Backing | None = None
    compat: str | None = None
    lazy_refcounts: bool = False
    cluster_size: int | None = None
    prealloc_metadata: bool = False  # virsh --prealloc-metadata (qcow2)
    mode: int | None = None


@dataclass(frozen=True, slots=True)
class ImageSource:
    """An image qemu-img or QEMU can open: a path or a ``json:`` spec, and its format."""

    spec: str
    format: str
    capacity: int
    kind: str = "file"  # file | block | network (how QEMU opens it)
    network: dict[str, object] = field(default_factory=dict)  # QEMU blockdev of a network one


@dataclass(frozen=True, slots=True)
class PoolScan:
    """What a refresh found: the pool's sizes and its volumes."""

    sizes: PoolSizes
    volumes: tuple[VolumeFacts, ...]


@runtime_checkable
class StorageBackend(Protocol):
    """One pool type. Every method gets the pool's definition; none keeps state."""

    type: str
    #: volume formats this backend creates (the first is the default)
    create_formats: tuple[str, ...]
    #: True: volumes are files that can be written under a temporary name and renamed
    files: bool

    def check(self, pool: PoolDefinition) -> None:
        """Refuse (NO_SUPPORT, with the reason) a pool this host cannot run."""

    async def build(self, pool: PoolDefinition, *, overwrite: bool | None) -> None:
        """pool-build: make the pool (a directory, a file system, a partition table).
        ``overwrite``: None = libvirt's default, True = --overwrite, False = --no-overwrite."""

    async def start(self, pool: PoolDefinition) -> None: ...
    async def stop(self, pool: PoolDefinition) -> None: ...
    async def delete(self, pool: PoolDefinition) -> None:
        """pool-delete: remove what build made (the pool must be inactive)."""

    async def active(self, pool: PoolDefinition) -> bool:
        """Is the pool usable as it is (after an agent restart: still mounted, still there)?"""

    async def sizes(self, pool: PoolDefinition) -> PoolSizes:
        """Capacity, allocation and available space now (cheap for file pools)."""

    async def scan(self, pool: PoolDefinition, known: dict[str, str]) -> PoolScan:
        """Sizes and volumes; ``known`` maps volume names to the format they were created
        with (a stored format wins over probing, so a guest cannot turn raw into qcow2)."""

    async def volume(self, pool: PoolDefinition, name: str, fmt: str | None) -> VolumeFacts:
        """One volume's facts (NO_STORAGE_VOL-like OperationFailed... see manager)."""

    async def create(
        self, pool: PoolDefinition, spec: VolumeSpec, progress: Progress | None
    ) -> VolumeFacts: ...
    async def clone(
        self,
        pool: PoolDefinition,
        spec: VolumeSpec,
        source: ImageSource,
        progress: Progress | None,
    ) -> VolumeFacts: ...
    async def remove(self, pool: PoolDefinition, facts: VolumeFacts) -> None: ...
    async def wipe(
        self,
        pool: PoolDefinition,
        facts: VolumeFacts,
        algorithm: str,
        progress: Progress | None,
    ) -> None: ...
    async def resize(
        self,
        pool: PoolDefinition,
        facts: VolumeFacts,
        capacity: int,
        *,
        shrink: bool,
        allocate: bool,
    ) -> None: ...

    def image(self, pool: PoolDefinition, facts: VolumeFacts) -> ImageSource:
        """How qemu-img and QEMU open this volume."""

    async def upload(self, pool: PoolDefinition, facts: VolumeFacts, length: int) -> UploadSink:
        """A sink for a new content of ``length`` bytes (NO_SUPPORT where a cut-off upload
        could not leave the previous content intact)."""

    def download_path(self, pool: PoolDefinition, facts: VolumeFacts) -> str:
        """A local file or device to read the volume from (NO_SUPPORT for network ones)."""


class UploadSink(Protocol):
    """Where vol-upload writes: a temporary copy that becomes the volume only on commit."""

    async def write(self, offset: int, data: bytes) -> None: ...
    async def commit(self) -> None:
        """Make the upload the volume's content (atomically, durably)."""

    async def abort(self) -> None:
        """Forget the upload; the volume keeps its previous content."""
