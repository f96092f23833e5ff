"""The checkpoint and backup ops (libvirt's virDomainCheckpoint* and virDomainBackup*,
virDomainGetJobStats/AbortJob for a backup).

A checkpoint (``checkpoint``: its name, per domain) is a persistent dirty bitmap on each
covered disk; ``domain.backup.begin`` copies the disks to new images in push mode: all of
each disk, or (``<incremental>``) what changed since a checkpoint. The call returns once
the backup runs; ``domain.job.info`` shows its progress and a ``job_completed`` event
tells how it ended. One backup per domain at a time.
"""

from __future__ import annotations

from typing import Literal

from virtbus.protocol.base import Message, NonNegInt
from virtbus.protocol.domain import DomainTarget
from virtbus.protocol.registry import Access, Service, Target, field, op
from virtbus.protocol.snapshot import SnapshotName

JobType = Literal["none", "unbounded", "completed", "failed", "cancelled"]


class CheckpointCreate(DomainTarget):
    """``xml``: a ``<domaincheckpoint>`` (name, description, disks); None: defaults (named
    after the time, every writable qcow2 disk)."""

    xml: str | None = None


class CheckpointTarget(DomainTarget):
    checkpoint: SnapshotName


class CheckpointDelete(CheckpointTarget):
    """``metadata``: forget the checkpoint, leave its bitmaps in the images."""

    metadata: bool = False


class CheckpointInfo(Message):
    """One checkpoint and its place in the tree (``virsh checkpoint-info``)."""

    name: str
    domain: str
    creation_time: NonNegInt
    disks: list[str]
    parent: str | None = None
    description: str | None = None
    children: NonNegInt = 0
    descendants: NonNegInt = 0


class CheckpointList(Message):
    checkpoints: list[CheckpointInfo]


class CheckpointXml(Message):
    xml: str


class CheckpointsDeleted(Message):
    deleted: list[str]


class BackupBegin(DomainTarget):
    """``backup_xml``: a push-mode ``<domainbackup>`` (None: a full backup of every
    writable disk beside its image); ``checkpoint_xml``: a ``<domaincheckpoint>`` taken at
    the backup's instant."""

    backup_xml: str | None = None
    checkpoint_xml: str | None = None


class BackupStarted(Message):
    xml: str  # the backup's <domainbackup>, every target filled in
    checkpoint: str | None = None  # the checkpoint it created


class BackupXml(Message):
    xml: str


class JobInfoRequest(DomainTarget):
    """``completed``: the last job that ended (virsh domjobinfo --completed)."""

    completed: bool = False


class DomainJobInfo(Message):
    """A domain's job as ``virsh domjobinfo`` shows it (bytes over all disks)."""

    type: JobType
    operation: str | None = None  # backup
    time_elapsed_ms: NonNegInt = 0
    data_processed: NonNegInt = 0
    data_total: NonNegInt = 0
    data_remaining: NonNegInt = 0
    error: str | None = None


_A, _D = Service.AGENT, Target.DOMAIN
_ref = field("domain")

DOMAIN_CHECKPOINT_CREATE = op(
    "domain.checkpoint.create", CheckpointCreate, CheckpointInfo, _A,
    "create a checkpoint from <domaincheckpoint> XML: a persistent dirty bitmap per disk",
    access=Access.CONFIG, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_CHECKPOINT_LIST = op(
    "domain.checkpoint.list", DomainTarget, CheckpointList, _A,
    "a domain's checkpoints, each with its parent and children",
    access=Access.READ, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_CHECKPOINT_INFO = op(
    "domain.checkpoint.info", CheckpointTarget, CheckpointInfo, _A,
    "one checkpoint (checkpoint-info)",
    access=Access.READ, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_CHECKPOINT_XML = op(
    "domain.checkpoint.xml", CheckpointTarget, CheckpointXml, _A,
    "a checkpoint's <domaincheckpoint> XML (checkpoint-dumpxml)",
    access=Access.READ, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_CHECKPOINT_DELETE = op(
    "domain.checkpoint.delete", CheckpointDelete, CheckpointsDeleted, _A,
    "delete a checkpoint and its bitmaps (metadata: the record only)",
    access=Access.CONFIG, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_BACKUP_BEGIN = op(
    "domain.backup.begin", BackupBegin, BackupStarted, _A,
    "start a push-mode backup, full or incremental, into new images (backup-begin)",
    access=Access.CONFIG, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_BACKUP_XML = op(
    "domain.backup.xml", DomainTarget, BackupXml, _A,
    "the running backup's <domainbackup> XML (backup-dumpxml)",
    access=Access.READ, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_JOB_INFO = op(
    "domain.job.info", JobInfoRequest, DomainJobInfo, _A,
    "a domain's backup job and its progress, or the last one that ended (domjobinfo)",
    access=Access.READ, target=_D, target_of=_ref,
)  # fmt: skip
DOMAIN_JOB_ABORT = op(
    "domain.job.abort", DomainTarget, DomainJobInfo, _A,
    "cancel a domain's backup job; returns once it ended (domjobabort)",
    access=Access.CONFIG, target=_D, target_of=_ref,
)  # fmt: skip
