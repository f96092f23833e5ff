"""The ``domain.snapshot.*`` ops (libvirt's virDomainSnapshot API): internal snapshots,
and external ones (each disk goes on to a new qcow2 overlay; the memory, when asked, goes
to a file that ``domain.restore`` loads).

Snapshots are named per domain; ``snapshot`` is the name (virsh's ``snapshotname``).
Listing filters (``--tree``, ``--roots``, ``--leaves``, ``--parent``) are applied by the
caller over ``domain.snapshot.list``, which answers every snapshot with its relations.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from virtbus.protocol.base import Message, NonNegInt
from virtbus.protocol.domain import DOMAIN_READ_SECURE, DomainStatus, DomainTarget
from virtbus.protocol.registry import Access, Service, Target, field, op

SnapshotName = Annotated[str, Meta(min_length=1, max_length=255)]
SnapshotState = Literal["running", "paused", "shutoff", "disk-snapshot"]


class SnapshotCreate(DomainTarget):
    """``xml``: a ``<domainsnapshot>`` request (name, description, memory, disks); None
    takes every default (named after the time, memory when the domain runs).
    ``disk_only``: an external snapshot of the disks alone (virsh's ``--disk-only``);
    ``quiesce``: freeze the guest's file systems through its guest agent meanwhile;
    ``halt``: stop the domain once the snapshot is taken (virsh's ``--halt``); ``live``:
    an external memory snapshot without pausing the guest first (``--live``: QEMU pauses
    it only when its memory stream converges)."""

    xml: str | None = None
    disk_only: bool = False
    quiesce: bool = False
    halt: bool = False
    live: bool = False


class SnapshotTarget(DomainTarget):
    snapshot: SnapshotName


class SnapshotXmlRequest(SnapshotTarget):
    """``security_info``: with the secrets of its ``<domain>`` (graphics passwords), which
    are left out otherwise; the caller needs ``domain.read_secure`` too (libvirt's
    VIR_DOMAIN_SNAPSHOT_XML_SECURE and its domain:read_secure ACL)."""

    security_info: bool = False


class SnapshotRevert(SnapshotTarget):
    """``running`` / ``paused``: the state after the revert (default: the snapshot's)."""

    running: bool = False
    paused: bool = False


class SnapshotDelete(SnapshotTarget):
    """``children``: its descendants too; ``children_only``: only its descendants;
    ``metadata``: forget the snapshots, leave the images' snapshots in place."""

    children: bool = False
    children_only: bool = False
    metadata: bool = False


class SnapshotInfo(Message):
    """One snapshot and its place in the tree (``virsh snapshot-info``)."""

    name: str
    domain: str
    state: SnapshotState
    creation_time: NonNegInt
    memory: bool  # the guest's memory is in it
    parent: str | None = None
    description: str | None = None
    current: bool = False
    children: NonNegInt = 0
    descendants: NonNegInt = 0
    location: str = "internal"  # internal | external (the disks' overlays hold what follows)


class SnapshotList(Message):
    snapshots: list[SnapshotInfo]


class SnapshotXml(Message):
    xml: str


class SnapshotsDeleted(Message):
    deleted: list[str]


_A, _D = Service.AGENT, Target.DOMAIN
_ref = field("domain")


DOMAIN_SNAPSHOT_CREATE = op(
    "domain.snapshot.create", SnapshotCreate, SnapshotInfo, _A,
    "take a snapshot from <domainsnapshot> XML: internal (with memory while the domain"
    " runs) or external onto new qcow2 overlays (the memory, if asked, into a save image)",
    access=Access.CONFIG, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_SNAPSHOT_LIST = op(
    "domain.snapshot.list", DomainTarget, SnapshotList, _A,
    "a domain's snapshots, each with its parent, children and whether it is current",
    access=Access.READ, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_SNAPSHOT_INFO = op(
    "domain.snapshot.info", SnapshotTarget, SnapshotInfo, _A, "one snapshot (snapshot-info)",
    access=Access.READ, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_SNAPSHOT_CURRENT = op(
    "domain.snapshot.current", DomainTarget, SnapshotInfo, _A,
    "the current snapshot (NO_DOMAIN_SNAPSHOT when there is none)",
    access=Access.READ, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_SNAPSHOT_XML = op(
    "domain.snapshot.xml", SnapshotXmlRequest, SnapshotXml, _A,
    "a snapshot's <domainsnapshot> XML (snapshot-dumpxml), its domain's secrets left out"
    " unless security_info (which needs domain.read_secure too)",
    access=Access.READ, target=_D, target_of=_ref, serial=True,
    flag_requires={"security_info": DOMAIN_READ_SECURE},
)  # fmt: skip
DOMAIN_SNAPSHOT_REVERT = op(
    "domain.snapshot.revert", SnapshotRevert, DomainStatus, _A,
    "bring the domain back to a snapshot (memory too when it has it)",
    access=Access.LIFECYCLE, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
DOMAIN_SNAPSHOT_DELETE = op(
    "domain.snapshot.delete", SnapshotDelete, SnapshotsDeleted, _A,
    "delete a snapshot (children: with its descendants; metadata: the record only)",
    access=Access.CONFIG, target=_D, target_of=_ref, serial=True,
)  # fmt: skip
