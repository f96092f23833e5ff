"""libvirt's ``<domainsnapshot>`` XML: what a caller asks for, and what a snapshot records.

A request (``virsh snapshot-create``) names the snapshot, describes it and says what it
covers: ``<memory snapshot='internal|no'/>`` and per disk ``<disk name='vda'
snapshot='internal|no'/>``. Only internal snapshots are supported: ``external`` (and
``manual``) is refused with NO_SUPPORT naming what is missing, before anything is done.

A recorded snapshot (:class:`SnapshotDef`) adds what libvirt keeps: the state the domain
was in, the parent, the creation time and the domain definition of that moment; its
:meth:`SnapshotDef.to_xml` is what ``snapshot-dumpxml`` prints, valid against libvirt's
``domainsnapshot.rng``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from lxml import etree

from virtbus.domain.serialize import dumps
from virtbus.domain.xml import parse_untrusted_root
from virtbus.errors import InvalidArgument, NoSupport, XMLError

MAX_SNAPSHOT_NAME = 255  # bytes: a file name, and QEMU's tag
SNAPSHOT_STATES = ("running", "paused", "shutoff")
_KNOWN = frozenset({"name", "description", "memory", "disks", "domain", "state", "parent",
                    "creationTime", "active", "inactiveDomain", "cookie"})  # fmt: skip


def check_snapshot_name(name: str) -> str:
    """libvirt refuses '/' in a snapshot name; virtbus also keeps it a safe file name."""
    if not name or len(name.encode()) > MAX_SNAPSHOT_NAME:
        raise InvalidArgument(f"snapshot name must be 1-{MAX_SNAPSHOT_NAME} bytes")
    if "/" in name or name.startswith(".") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidArgument(
            f"invalid snapshot name {name!r}: no '/', control characters or leading '.'"
        )
    return name


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """What ``snapshot-create`` asks for (``name`` None: libvirt's default, the time)."""

    name: str | None = None
    description: str | None = None
    memory: str | None = None  # internal | no | None (the driver's default for the state)
    disks: dict[str, str] = field(default_factory=dict)  # target -> internal | no


def parse_snapshot_request(xml: str | None) -> SnapshotRequest:
    """A ``<domainsnapshot>`` request (None or empty: all defaults); XMLError, NoSupport."""
    if xml is None or not xml.strip():
        return SnapshotRequest()
    root = parse_untrusted_root(xml, "domainsnapshot")
    if root.tag != "domainsnapshot":
        raise XMLError(f"expected <domainsnapshot>, got <{root.tag}>")
    for child in root:
        if isinstance(child.tag, str) and child.tag not in _KNOWN:
            raise XMLError(f"unknown element <{child.tag}> in <domainsnapshot>")
    name = _text(root, "name")
    if name is not None:
        check_snapshot_name(name)
    memory = None
    mem = root.find("memory")
    if mem is not None:
        memory = mem.get("snapshot")
        if memory in ("external", "manual") or mem.get("file"):
            raise NoSupport("external snapshots with memory (memory snapshot='external')"
                            " are not supported yet: use an internal snapshot")  # fmt: skip
        if memory not in ("internal", "no"):
            raise XMLError(f"unknown memory snapshot mode {memory!r} (internal, no)")
    disks: dict[str, str] = {}
    for disk in root.findall("disks/disk"):
        target, mode = disk.get("name"), disk.get("snapshot") or "internal"
        if not target:
            raise XMLError("<disk> in <domainsnapshot> needs a name (its target, vda)")
        if mode in ("external", "manual") or disk.find("source") is not None:
            raise NoSupport(f"external disk snapshots (disk '{target}') are not supported yet:"
                            " use an internal snapshot")  # fmt: skip
        if mode not in ("internal", "no"):
            raise XMLError(f"unknown snapshot mode {mode!r} of disk '{target}' (internal, no)")
        disks[target] = mode
    return SnapshotRequest(name, _text(root, "description"), memory, disks)


def _text(root: etree._Element, tag: str) -> str | None:
    node = root.find(tag)
    return node.text.strip() if node is not None and node.text and node.text.strip() else None


@dataclass(frozen=True, slots=True)
class SnapshotDef:
    """One recorded internal snapshot (see module docstring)."""

    name: str
    state: str  # running | paused | shutoff: the domain's state when it was taken
    creation_time: int
    memory: bool  # the guest's memory is in it (a revert resumes it where it was)
    disks: tuple[str, ...]  # targets that have it
    domain_xml: str  # the definition at that moment
    parent: str | None = None
    description: str | None = None

    def with_parent(self, parent: str | None) -> SnapshotDef:
        return replace(self, parent=parent)

    def to_xml(self) -> str:
        root = etree.Element("domainsnapshot")
        etree.SubElement(root, "name").text = self.name
        if self.description:
            etree.SubElement(root, "description").text = self.description
        etree.SubElement(root, "state").text = self.state
        if self.parent is not None:
            etree.SubElement(etree.SubElement(root, "parent"), "name").text = self.parent
        etree.SubElement(root, "creationTime").text = str(self.creation_time)
        etree.SubElement(root, "memory", snapshot="internal" if self.memory else "no")
        disks = etree.SubElement(root, "disks")
        for target in self.disks:
            etree.SubElement(disks, "disk", name=target, snapshot="internal")
        root.append(parse_untrusted_root(self.domain_xml, "domain"))
        return dumps(root)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "state": self.state, "creation_time": self.creation_time,
                "memory": self.memory, "disks": list(self.disks), "domain_xml": self.domain_xml,
                "parent": self.parent, "description": self.description}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, object]) -> SnapshotDef:
        disks = data.get("disks")
        parent, description = data.get("parent"), data.get("description")
        return cls(
            name=str(data["name"]), state=str(data["state"]),
            creation_time=int(str(data["creation_time"])), memory=bool(data["memory"]),
            disks=tuple(str(d) for d in disks) if isinstance(disks, list) else (),
            domain_xml=str(data["domain_xml"]),
            parent=str(parent) if parent is not None else None,
            description=str(description) if description is not None else None,
        )  # fmt: skip


def default_name(taken: set[str], now: float | None = None) -> str:
    """libvirt's default name: the creation time in seconds (made unique if taken)."""
    base = str(int(time.time() if now is None else now))
    name, n = base, 1
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name
