"""The block job ops (libvirt's virDomainBlockCommit/BlockPull/GetBlockJobInfo/
BlockJobAbort/BlockJobSetSpeed, and virDomainGetDiskErrors): long copies inside a running
domain's disk chains, run by QEMU and followed by the agent as ``block_job`` events.

``disk`` is the disk's target (``vda``). A job is started and the call returns; its
progress is ``domain.block.job.info`` and the ``block_job`` events (``running`` with
``cur``/``end``, then ``ready`` for an active commit, ``completed``, ``failed`` or
``canceled``). One job per disk. ``bandwidth`` is MiB/s (0: unlimited), as virsh's.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from virtbus.protocol.base import Message, NonNegInt
from virtbus.protocol.domain import DomainTarget
from virtbus.protocol.registry import Access, Service, Target, field, op

DiskTarget = Annotated[str, Meta(min_length=1, max_length=64)]
ImagePath = Annotated[str, Meta(min_length=1, max_length=4096)]
Bandwidth = Annotated[int, Meta(ge=0, le=1 << 40)]  # MiB/s
BlockJobType = Literal["commit", "active-commit", "pull", "copy"]


class BlockTarget(DomainTarget):
    disk: DiskTarget


class BlockCommit(BlockTarget):
    """Merge ``top`` (default: the active layer, which needs ``active``) into ``base``
    (default: the chain's bottom image; ``shallow``: the image right below ``top``)."""

    base: ImagePath | None = None
    top: ImagePath | None = None
    active: bool = False
    shallow: bool = False
    bandwidth: Bandwidth = 0


class BlockPull(BlockTarget):
    """Copy the backing chain above ``base`` (default: all of it) into the active layer."""

    base: ImagePath | None = None
    bandwidth: Bandwidth = 0


class BlockCopy(BlockTarget):
    """Mirror the disk onto a new image ``dest`` (``format`` qcow2 or raw; ``shallow``:
    only the active layer, the copy backed by the same image). Once ready, ``blockjob
    --pivot`` makes the disk run on the copy, ``--abort`` leaves a consistent copy."""

    dest: ImagePath
    format: Literal["qcow2", "raw"] = "qcow2"
    shallow: bool = False
    bandwidth: Bandwidth = 0


class BlockJobAbort(BlockTarget):
    """``pivot``: a ready active commit finishes on its base (a ready copy on the copy),
    the disk then runs on it."""

    pivot: bool = False


class BlockJobSpeed(BlockTarget):
    bandwidth: Bandwidth


class BlockJobInfo(Message):
    """One disk's job, as ``virsh blockjob --info`` shows it."""

    disk: str
    type: BlockJobType
    cur: NonNegInt
    end: NonNegInt
    bandwidth: NonNegInt  # MiB/s, 0: unlimited
    ready: bool  # an active commit copied everything: it can pivot
    status: str  # QEMU's: running, ready, paused, concluded, aborting ...


class BlockJobEnd(Message):
    """How the disk's last job ended (what a ``--wait`` reports once it is gone)."""

    type: BlockJobType
    status: Literal["completed", "canceled", "failed"]
    error: str | None = None


class BlockJobState(Message):
    job: BlockJobInfo | None = None  # None: no job on that disk
    last: BlockJobEnd | None = None  # the disk's last job that ended, since the agent started


class BlockError(Message):
    disk: str
    error: Literal["none", "unspec", "no_space"]


class BlockErrors(Message):
    errors: list[BlockError]


_A, _D = Service.AGENT, Target.DOMAIN
_ref = field("domain")

DOMAIN_BLOCK_COMMIT = op(
    "domain.block.commit", BlockCommit, BlockJobInfo, _A,
    "start merging a disk's image chain down into a base image (blockcommit)",
    access=Access.CONFIG, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_BLOCK_PULL = op(
    "domain.block.pull", BlockPull, BlockJobInfo, _A,
    "start copying a disk's backing chain into its active layer (blockpull)",
    access=Access.CONFIG, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_BLOCK_COPY = op(
    "domain.block.copy", BlockCopy, BlockJobInfo, _A,
    "start mirroring a disk onto a new image (blockcopy, blockdev-mirror)",
    access=Access.CONFIG, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_BLOCK_JOB_INFO = op(
    "domain.block.job.info", BlockTarget, BlockJobState, _A,
    "a disk's block job and its progress (blockjob --info)",
    access=Access.READ, target=_D, target_of=_ref,
)  # fmt: skip
DOMAIN_BLOCK_JOB_ABORT = op(
    "domain.block.job.abort", BlockJobAbort, BlockJobState, _A,
    "cancel a disk's block job, or pivot a ready active commit (blockjob --abort/--pivot)",
    access=Access.CONFIG, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_BLOCK_JOB_SPEED = op(
    "domain.block.job.speed", BlockJobSpeed, BlockJobState, _A,
    "change a running block job's bandwidth (blockjob --bandwidth)",
    access=Access.CONFIG, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_BLOCK_ERRORS = op(
    "domain.block.errors", DomainTarget, BlockErrors, _A,
    "the disks that saw an I/O error since the domain started (domblkerror)",
    access=Access.READ, target=_D, target_of=_ref,
)  # fmt: skip
