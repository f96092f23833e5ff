"""libvirt's ``<domainsnapshot>`` XML: what a caller asks for, and what a snapshot records.

A request (``virsh snapshot-create``) names the snapshot, describes it and says what it
covers: ``<memory snapshot='internal|no'/>`` and per disk ``<disk name='vda'
snapshot='internal|external|no'>`` (an external disk may name its overlay with ``<source
file=.../>`` and ``<driver type='qcow2'/>``). ``<memory snapshot='external' file=.../>``
(a ``file`` alone implies external) asks the memory into a file, every disk then external
by default, as libvirt aligns them; ``manual`` disks are refused with NO_SUPPORT.

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
from virtbus.domain.xml import XMLLimits, hide_secrets, may_hold_secrets, parse_untrusted_root
from virtbus.errors import ConfigUnsupported, InvalidArgument, NoSupport, XMLError

MAX_SNAPSHOT_NAME = 255  # bytes: a file name, and QEMU's tag
SNAPSHOT_STATES = ("running", "paused", "shutoff", "disk-snapshot")
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
    memory: str | None = None  # internal | external | no | None (the state's default)
    disks: dict[str, str] = field(default_factory=dict)  # target -> internal | external | no
    files: dict[str, str] = field(default_factory=dict)  # target -> its external overlay
    memory_file: str | None = None  # where memory='external' writes the guest's state

    def external(self, disk_only: bool) -> bool:
        """Whether this is an external snapshot: ``--disk-only``, a disk asked external,
        or the memory asked into a file (its disks then default to external, as libvirt
        aligns them). Mixing internal and external targets is refused, as libvirt does."""
        modes = {m for m in self.disks.values() if m != "no"}
        if self.memory == "external":
            if disk_only:
                raise XMLError("memory state cannot be saved with offline or disk-only snapshot")
            modes.add("external")
        if "external" in modes and "internal" in modes:
            raise ConfigUnsupported("mixing internal and external targets for a snapshot is"
                                    " not supported")  # fmt: skip
        if disk_only and "internal" in modes:
            raise ConfigUnsupported("--disk-only snapshots are external: a disk asked"
                                    " snapshot='internal'")  # fmt: skip
        external = disk_only or "external" in modes
        if external and self.memory == "internal":
            raise ConfigUnsupported(
                "an external disk snapshot cannot hold the memory internally"
                " (memory snapshot='no', or --disk-only)"
            )
        return external


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
    memory, memory_file = _memory(root.find("memory"))
    disks: dict[str, str] = {}
    files: dict[str, str] = {}
    for disk in root.findall("disks/disk"):
        target, mode = disk.get("name"), disk.get("snapshot") or "internal"
        if not target:
            raise XMLError("<disk> in <domainsnapshot> needs a name (its target, vda)")
        source = disk.find("source")
        if source is not None and disk.get("snapshot") is None:
            mode = "external"  # libvirt: a <source> implies an external snapshot
        if mode == "manual":
            raise NoSupport(f"manual disk snapshots (disk '{target}') are not supported")
        if mode not in ("internal", "external", "no"):
            raise XMLError(f"unknown snapshot mode {mode!r} of disk '{target}'"
                           " (internal, external, no)")  # fmt: skip
        if target in disks:
            raise XMLError(f"disk '{target}' is named twice in <domainsnapshot>")
        disks[target] = mode
        if mode == "external":
            fmt = disk.find("driver")
            if fmt is not None and fmt.get("type", "qcow2") != "qcow2":
                raise ConfigUnsupported(f"external snapshot of disk '{target}': the overlay"
                                        f" must be qcow2, not {fmt.get('type')}")  # fmt: skip
            if disk.get("type", "file") != "file":
                raise NoSupport(
                    f"external snapshot of disk '{target}' onto a"
                    f" <disk type='{disk.get('type')}'> is not supported (file is)"
                )
            path = source.get("file") if source is not None else None
            if path:
                if not path.startswith("/"):
                    raise InvalidArgument(f"external snapshot file '{path}' of disk"
                                          f" '{target}' must be an absolute path")  # fmt: skip
                files[target] = path
        elif source is not None:
            raise XMLError(f"disk '{target}': a <source> needs snapshot='external'")
    return SnapshotRequest(name, _text(root, "description"), memory, disks, files, memory_file)


def _memory(mem: etree._Element | None) -> tuple[str | None, str | None]:
    """``<memory snapshot=... file=...>``: the mode and the file, libvirt's rules."""
    if mem is None:
        return None, None
    file = mem.get("file") or None
    mode = mem.get("snapshot") or ("external" if file else None)
    if mode == "manual":
        raise NoSupport("manual memory snapshots are not supported (external, internal are)")
    if mode not in ("internal", "external", "no"):
        raise XMLError(f"unknown memory snapshot mode {mode!r} (internal, external, no)")
    if file and mode != "external":
        raise XMLError(f"memory filename '{file}' requires external snapshot")
    if mode == "external" and not file:
        raise XMLError("external memory snapshots require a filename")
    if file and not file.startswith("/"):
        raise XMLError(f"memory snapshot file path ({file}) must be absolute")
    return mode, file


def _text(root: etree._Element, tag: str) -> str | None:
    node = root.find(tag)
    return node.text.strip() if node is not None and node.text and node.text.strip() else None


@dataclass(frozen=True, slots=True)
class SnapshotDef:
    """One recorded snapshot (see module docstring): internal, or external when
    ``overlays`` names the overlay each disk went on to (the image before it keeps the
    data of the snapshot) or ``memory_file`` the save image holding its memory."""

    name: str
    state: str  # running | paused | shutoff | disk-snapshot: when it was taken
    creation_time: int
    memory: bool  # the guest's memory is in it (a revert resumes it where it was)
    disks: tuple[str, ...]  # targets that have it
    domain_xml: str  # the definition at that moment
    parent: str | None = None
    description: str | None = None
    overlays: tuple[tuple[str, str], ...] = ()  # (target, overlay file) of an external one
    memory_file: str | None = None  # external memory: a save image (virtbus restore FILE)

    @property
    def external(self) -> bool:
        return bool(self.overlays) or self.memory_file is not None

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
        if self.memory_file is not None:
            etree.SubElement(root, "memory", snapshot="external", file=self.memory_file)
        else:
            etree.SubElement(root, "memory", snapshot="internal" if self.memory else "no")
        disks = etree.SubElement(root, "disks")
        files = dict(self.overlays)
        for target in self.disks:
            if target in files:
                el = etree.SubElement(disks, "disk", name=target, snapshot="external",
                                      type="file")  # fmt: skip
                etree.SubElement(el, "driver", type="qcow2")
                etree.SubElement(el, "source", file=files[target])
            else:
                etree.SubElement(disks, "disk", name=target, snapshot="internal")
        root.append(parse_untrusted_root(self.domain_xml, "domain"))
        return dumps(root)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "state": self.state, "creation_time": self.creation_time,
                "memory": self.memory, "disks": list(self.disks), "domain_xml": self.domain_xml,
                "parent": self.parent, "description": self.description,
                "overlays": [list(o) for o in self.overlays],
                "memory_file": self.memory_file}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, object]) -> SnapshotDef:
        disks = data.get("disks")
        parent, description = data.get("parent"), data.get("description")
        overlays, memory_file = data.get("overlays"), data.get("memory_file")
        return cls(
            name=str(data["name"]), state=str(data["state"]),
            creation_time=int(str(data["creation_time"])), memory=bool(data["memory"]),
            disks=tuple(str(d) for d in disks) if isinstance(disks, list) else (),
            domain_xml=str(data["domain_xml"]),
            parent=str(parent) if parent is not None else None,
            description=str(description) if description is not None else None,
            overlays=tuple((str(o[0]), str(o[1])) for o in overlays)
            if isinstance(overlays, list) else (),
            memory_file=str(memory_file) if memory_file is not None else None,
        )  # fmt: skip


# A <domainsnapshot> is the agent's own document around a <domain> of at most the
# domain limit (1 MiB): room for both.
_SNAPSHOT_LIMITS = XMLLimits(max_bytes=2 * XMLLimits().max_bytes)


def snapshot_without_secrets(xml: str) -> str:
    """A ``<domainsnapshot>`` as snapshot-dumpxml shows it without ``--security-info``:
    its ``<domain>`` with the secrets dumpxml hides left out (:func:`hide_secrets`, as
    libvirt without VIR_DOMAIN_SNAPSHOT_XML_SECURE)."""
    if not may_hold_secrets(xml):  # the common case: nothing to hide, no parse
        return xml
    root = parse_untrusted_root(xml, "domainsnapshot", limits=_SNAPSHOT_LIMITS)
    hidden = [hide_secrets(domain) for domain in root.findall("domain")]
    return dumps(root) if any(hidden) else xml


def default_name(taken: set[str], now: float | None = None) -> str:
    """libvirt's default name: the creation time in seconds (made unique if taken)."""
    base = str(int(time.time() if now is None else now))
    name, n = base, 1
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name
