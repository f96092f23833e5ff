"""The ``storage.*`` and ``job.*`` ops an agent serves (libvirt's virStoragePool and
virStorageVol APIs), the device ops of ``domain.*`` (attach/detach-device, domblkinfo),
and the pool and job events.

A ``pool`` argument is a pool's name or UUID, ``volume`` a volume's name in its pool.
Sizes are bytes. Long operations (clone, wipe, upload, download) answer a :class:`JobInfo`
at once; follow the job with ``job.info``/``job.wait`` or its events on the bus.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta
from msgspec import field as default

from virtbus.protocol.base import (
    Accepted,
    Empty,
    HostName,
    Message,
    Name,
    NonNegInt,
    Seconds,
    XmlText,
)
from virtbus.protocol.registry import Access, Service, Target, field, op

Bytes = Annotated[int, Meta(ge=0, le=2**63 - 1)]  # msgspec bounds are int64
JobId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$(?!\n)")]
#: a transfer chunk: at most 2 MiB on the wire (the agent's chunk_size bounds it further)
Chunk = Annotated[bytes, Meta(max_length=2 << 20)]
WipeAlgorithm = Literal[
    "zero", "nnsa", "dod", "bsi", "gutmann", "schneier", "pfitzner7", "pfitzner33", "random",
    "trim",
]  # fmt: skip


# --- pools ----------------------------------------------------------------------------
class PoolXmlRequest(Message):
    xml: XmlText


class PoolCreate(PoolXmlRequest):
    """pool-create: a transient pool, started at once (``build`` first)."""

    build: bool = False
    overwrite: bool | None = None  # pool-build --overwrite (True) / --no-overwrite (False)


class PoolTarget(Message):
    pool: Name


class PoolBuild(PoolTarget):
    overwrite: bool | None = None


class PoolStart(PoolTarget):
    build: bool = False
    overwrite: bool | None = None


class PoolAutostart(PoolTarget):
    autostart: bool = True


class PoolListRequest(Message):
    all: bool = True  # inactive pools too (virsh pool-list --all)


class PoolRef(Message):
    name: str
    uuid: str


class PoolInfo(Message):
    """virsh pool-info."""

    name: str
    uuid: str
    type: str
    state: str  # running | inactive
    persistent: bool
    autostart: bool
    capacity: Bytes = 0
    allocation: Bytes = 0
    available: Bytes = 0
    volumes: NonNegInt = 0
    supported: bool = True  # False: this host cannot run the pool's type (NO_SUPPORT)
    owner: str | None = None  # the bus user that defined it (None: nobody's)


class PoolList(Message):
    pools: list[PoolInfo]


class PoolXml(Message):
    xml: str


class PoolSummary(Message):
    """One pool in a heartbeat (the scheduler's storage filter reads these)."""

    name: str
    uuid: str = ""
    type: str = ""
    state: str = ""
    capacity: Bytes = 0
    allocation: Bytes = 0
    available: Bytes = 0
    volumes: NonNegInt = 0


# --- volumes --------------------------------------------------------------------------
class VolumeTarget(Message):
    pool: Name
    volume: Name


class VolumeCreate(Message):
    pool: Name
    xml: XmlText
    prealloc_metadata: bool = False


class VolumeCreateFrom(Message):
    """vol-create-from / vol-clone: a new volume (``xml``) with ``source``'s content."""

    pool: Name
    xml: XmlText
    source_pool: Name
    source: Name


class VolumeWipe(VolumeTarget):
    algorithm: WipeAlgorithm = "zero"


class VolumeResize(VolumeTarget):
    capacity: Bytes
    delta: bool = False
    shrink: bool = False
    allocate: bool = False


class VolumeLookup(Message):
    """A volume by its path or key (vol-key, vol-pool, vol-path with a path)."""

    path: Annotated[str, Meta(min_length=1, max_length=4096)]


class VolumePoolRequest(Message):
    pool: Name


class Backing(Message):
    path: str
    format: str | None = None


class VolumeInfo(Message):
    """virsh vol-info, plus where it is (vol-path, vol-key, vol-pool)."""

    pool: str
    name: str
    type: str
    path: str
    key: str
    format: str
    capacity: Bytes
    allocation: Bytes
    physical: Bytes
    backing: Backing | None = None
    owner: str | None = None  # the bus user that created it (None: nobody's)


class VolumeList(Message):
    volumes: list[VolumeInfo]


class VolumeXml(Message):
    xml: str


# --- jobs -----------------------------------------------------------------------------
class JobInfo(Message):
    """A long operation: its kind, target, state and progress."""

    id: str
    kind: str
    target: dict[str, str]
    state: str  # running | completed | failed | cancelled
    processed: NonNegInt = 0
    total: NonNegInt = 0
    started: float = 0.0
    ended: float | None = None
    error: dict[str, str] | None = None
    result: dict[str, Any] | None = None
    owner: str | None = None  # the user that started it (a transfer is driven by it only)


class UploadRequest(VolumeTarget):
    length: Bytes


class TransferStart(Message):
    """A transfer's job and how to feed it: chunks of at most ``chunk_size`` bytes, at
    most ``window`` of them in flight."""

    job: JobInfo
    length: Bytes
    chunk_size: NonNegInt
    window: NonNegInt


class UploadChunk(Message):
    job: JobId
    offset: Bytes
    data: Chunk


class TransferAck(Message):
    offset: Bytes  # the next byte the agent expects


class TransferTarget(Message):
    job: JobId


class DownloadChunkRequest(Message):
    job: JobId
    offset: Bytes


class DownloadChunk(Message):
    data: bytes


class JobList(Message):
    jobs: list[JobInfo]


class JobWait(TransferTarget):
    timeout: Seconds = 5.0  # the agent answers after this long even if still running


# --- domain devices -------------------------------------------------------------------
class DeviceChange(Message):
    """attach-device/detach-device: a ``<disk>``; neither flag = libvirt's CURRENT."""

    domain: Name
    xml: XmlText
    live: bool = False
    config: bool = False


class BlockInfoRequest(Message):
    domain: Name
    target: Annotated[str, Meta(min_length=1, max_length=64)]


class BlockInfo(Message):
    target: str
    capacity: Bytes
    allocation: Bytes
    physical: Bytes


# --- events ---------------------------------------------------------------------------
class PoolEvent(Message):
    """A storage pool lifecycle event (the domain event's shape with ``pool``)."""

    host: HostName
    seq: NonNegInt
    pool: str
    uuid: str
    event: str  # defined, undefined, started, stopped, created, deleted, refreshed
    detail: str | None = None
    data: dict[str, Any] = default(default_factory=dict)
    reconciled: bool = False
    ts: float | None = None


class JobEvent(Message):
    host: HostName
    seq: NonNegInt
    job: str
    event: str  # started, progress, completed, failed, cancelled
    data: JobInfo
    ts: float | None = None


# --- ops ------------------------------------------------------------------------------
_A, _P, _V = Service.AGENT, Target.POOL, Target.VOLUME
_pool = field("pool")


def _vol(req: Any) -> str | None:
    return f"{req.pool}/{getattr(req, 'volume', None) or ''}"


STORAGE_POOL_DEFINE = op(
    "storage.pool.define", PoolXmlRequest, PoolRef, _A, "define a storage pool from XML",
    access=Access.CONFIG, target=_P,
)  # fmt: skip
STORAGE_POOL_CREATE = op(
    "storage.pool.create", PoolCreate, PoolRef, _A, "create and start a transient pool",
    access=Access.CONFIG, target=_P,
)  # fmt: skip
STORAGE_POOL_UNDEFINE = op(
    "storage.pool.undefine", PoolTarget, Accepted, _A, "remove an inactive pool's definition",
    access=Access.CONFIG, target=_P, target_of=_pool, serial=True,
)  # fmt: skip
STORAGE_POOL_BUILD = op(
    "storage.pool.build", PoolBuild, Accepted, _A, "build a pool (directory, file system, label)",
    access=Access.CONFIG, target=_P, target_of=_pool, serial=True,
)  # fmt: skip
STORAGE_POOL_START = op(
    "storage.pool.start", PoolStart, PoolInfo, _A, "start (activate) a pool",
    access=Access.LIFECYCLE, target=_P, target_of=_pool, serial=True,
)  # fmt: skip
STORAGE_POOL_DESTROY = op(
    "storage.pool.destroy", PoolTarget, Accepted, _A, "stop a pool (its volumes stay)",
    access=Access.LIFECYCLE, target=_P, target_of=_pool, serial=True,
)  # fmt: skip
STORAGE_POOL_DELETE = op(
    "storage.pool.delete", PoolTarget, Accepted, _A, "delete what pool-build made",
    access=Access.CONFIG, target=_P, target_of=_pool, serial=True,
)  # fmt: skip
STORAGE_POOL_REFRESH = op(
    "storage.pool.refresh", PoolTarget, PoolInfo, _A, "rescan a pool's volumes",
    access=Access.LIFECYCLE, target=_P, target_of=_pool, serial=True,
)  # fmt: skip
STORAGE_POOL_AUTOSTART = op(
    "storage.pool.set_autostart", PoolAutostart, PoolInfo, _A, "start the pool with the agent",
    access=Access.CONFIG, target=_P, target_of=_pool, serial=True,
)  # fmt: skip
STORAGE_POOL_LIST = op(
    "storage.pool.list", PoolListRequest, PoolList, _A, "the host's storage pools",
    access=Access.READ, target=Target.HOST,
)  # fmt: skip
STORAGE_POOL_INFO = op(
    "storage.pool.info", PoolTarget, PoolInfo, _A, "a pool's state and sizes (pool-info)",
    access=Access.READ, target=_P, target_of=_pool,
)  # fmt: skip
STORAGE_POOL_XML = op(
    "storage.pool.xml", PoolTarget, PoolXml, _A, "a pool's XML with its sizes (pool-dumpxml)",
    access=Access.READ, target=_P, target_of=_pool,
)  # fmt: skip

STORAGE_VOL_CREATE = op(
    "storage.vol.create", VolumeCreate, VolumeInfo, _A, "create a volume from XML",
    access=Access.CONFIG, target=_V, target_of=_pool,
)  # fmt: skip
STORAGE_VOL_CREATE_FROM = op(
    "storage.vol.create_from", VolumeCreateFrom, JobInfo, _A,
    "clone a volume into a new one (a job; also across pools)",
    access=Access.CONFIG, target=_V, target_of=_pool,
)  # fmt: skip
STORAGE_VOL_DELETE = op(
    "storage.vol.delete", VolumeTarget, Accepted, _A, "delete a volume (not one in use)",
    access=Access.CONFIG, target=_V, target_of=_vol,
)  # fmt: skip
STORAGE_VOL_WIPE = op(
    "storage.vol.wipe", VolumeWipe, JobInfo, _A, "wipe a volume's content (a job)",
    access=Access.CONFIG, target=_V, target_of=_vol,
)  # fmt: skip
STORAGE_VOL_RESIZE = op(
    "storage.vol.resize", VolumeResize, VolumeInfo, _A, "grow (or with shrink, shrink) a volume",
    access=Access.CONFIG, target=_V, target_of=_vol,
)  # fmt: skip
STORAGE_VOL_INFO = op(
    "storage.vol.info", VolumeTarget, VolumeInfo, _A, "a volume's type and sizes (vol-info)",
    access=Access.READ, target=_V, target_of=_vol,
)  # fmt: skip
STORAGE_VOL_LIST = op(
    "storage.vol.list", VolumePoolRequest, VolumeList, _A, "a pool's volumes (vol-list)",
    access=Access.READ, target=_P, target_of=_pool,
)  # fmt: skip
STORAGE_VOL_XML = op(
    "storage.vol.xml", VolumeTarget, VolumeXml, _A, "a volume's XML (vol-dumpxml)",
    access=Access.READ, target=_V, target_of=_vol,
)  # fmt: skip
STORAGE_VOL_LOOKUP = op(
    "storage.vol.lookup", VolumeLookup, VolumeInfo, _A, "the volume with this path or key",
    access=Access.READ, target=Target.HOST,
)  # fmt: skip
STORAGE_VOL_UPLOAD = op(
    "storage.vol.upload", UploadRequest, TransferStart, _A,
    "begin replacing a volume's content (a job fed by upload_chunk)",
    access=Access.CONFIG, target=_V, target_of=_vol,
)  # fmt: skip
STORAGE_VOL_UPLOAD_CHUNK = op(
    "storage.vol.upload_chunk", UploadChunk, TransferAck, _A, "one chunk of an upload",
    access=Access.CONFIG, target=_V, idempotent=True,  # written at its offset: a repeat is a no-op
)  # fmt: skip
STORAGE_VOL_UPLOAD_FINISH = op(
    "storage.vol.upload_finish", TransferTarget, VolumeInfo, _A,
    "make a complete upload the volume's content",
    access=Access.CONFIG, target=_V,
)  # fmt: skip
STORAGE_VOL_DOWNLOAD = op(
    "storage.vol.download", VolumeTarget, TransferStart, _A,
    "begin reading a volume (a job served by download_chunk)",
    access=Access.READ, target=_V, target_of=_vol,
)  # fmt: skip
STORAGE_VOL_DOWNLOAD_CHUNK = op(
    "storage.vol.download_chunk", DownloadChunkRequest, DownloadChunk, _A,
    "one chunk of a download", access=Access.READ, target=_V,
)  # fmt: skip
STORAGE_VOL_DOWNLOAD_FINISH = op(
    "storage.vol.download_finish", TransferTarget, Accepted, _A, "end a download",
    access=Access.READ, target=_V,
)  # fmt: skip

JOB_INFO = op(
    "job.info", TransferTarget, JobInfo, _A, "a job's state and progress",
    access=Access.READ, target=Target.HOST,
)  # fmt: skip
JOB_LIST = op("job.list", Empty, JobList, _A, "the host's jobs", access=Access.READ,
              target=Target.HOST)  # fmt: skip
JOB_WAIT = op(
    "job.wait", JobWait, JobInfo, _A, "a job once it ended, or after timeout (long poll)",
    access=Access.READ, target=Target.HOST,
)  # fmt: skip
JOB_CANCEL = op(
    "job.cancel", TransferTarget, JobInfo, _A, "cancel a job (what it did is undone)",
    access=Access.LIFECYCLE, target=Target.HOST,
)  # fmt: skip

_dom = field("domain")
DOMAIN_ATTACH_DEVICE = op(
    "domain.attach_device", DeviceChange, Accepted, _A,
    "attach a <disk> (live, config or both; hot-plug)",
    access=Access.CONFIG, target=Target.DOMAIN, target_of=_dom, serial=True,
)  # fmt: skip
DOMAIN_DETACH_DEVICE = op(
    "domain.detach_device", DeviceChange, Accepted, _A,
    "detach a <disk> (waits for the guest to let go)",
    access=Access.CONFIG, target=Target.DOMAIN, target_of=_dom, serial=True,
)  # fmt: skip
DOMAIN_BLOCK_INFO = op(
    "domain.block_info", BlockInfoRequest, BlockInfo, _A, "a disk's sizes (domblkinfo)",
    access=Access.READ, target=Target.DOMAIN, target_of=_dom, serial=True,
)  # fmt: skip
