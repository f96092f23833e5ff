"""A libvirt storage volume: the definition as given (verbatim tree, typed views) and the
facts a backend reads from the disk, which vol-dumpxml writes into a copy of it.

Sizes are bytes. ``capacity`` may be absent in a definition (vol-create-from takes the
source's, a backing store gives its own); ``allocation`` absent means "as much as the
capacity", libvirt's default (a fully allocated raw file).
"""

from __future__ import annotations

import copy as _copy
from dataclasses import dataclass, field

from lxml import etree

from virtbus.domain.model import Element
from virtbus.domain.serialize import dumps
from virtbus.errors import InvalidArgument, XMLError
from virtbus.storage.names import check_name
from virtbus.storage.pool import Permissions, normalize_path, parse_permissions
from virtbus.storage.units import parse_scaled

VOLUME_TYPES = frozenset({"file", "block", "dir", "network", "netdir"})
#: every format storagevol.rng knows (files, file systems, partitions)
FILE_FORMATS = frozenset(
    {"unknown", "raw", "dir", "bochs", "cloop", "dmg", "iso", "vpc", "vdi", "fat", "vhd",
     "ploop", "luks", "cow", "qcow", "qcow2", "qed", "vmdk"}
)  # fmt: skip
DEVICE_FORMATS = frozenset(
    {"none", "auto", "ext2", "ext3", "ext4", "ufs", "iso9660", "udf", "gfs", "gfs2", "vfat",
     "hfs+", "xfs", "ocfs2", "vmfs"}
)  # fmt: skip
PARTITION_FORMATS = frozenset(
    {"none", "linux", "fat16", "fat32", "linux-swap", "linux-lvm", "linux-raid", "extended"}
)
ALL_FORMATS = FILE_FORMATS | DEVICE_FORMATS | PARTITION_FORMATS
#: formats with a backing chain (storageFormatBacking)
BACKING_FORMATS = frozenset({"cow", "qcow", "qcow2", "qed", "vmdk"})


def check_format(fmt: str, what: str = "volume format") -> str:
    """A format libvirt knows, else InvalidArgument naming the choices."""
    if fmt not in ALL_FORMATS:
        raise InvalidArgument(f"unknown {what} '{fmt}' (e.g. raw, qcow2)")
    return fmt


@dataclass(frozen=True, slots=True)
class Backing:
    path: str
    format: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class VolumeFacts:
    """What a backend knows of a volume on disk (vol-info, vol-dumpxml)."""

    name: str
    type: str  # file | block | network ...
    path: str  # target path (a file, a device, or an iscsi:// URL)
    key: str
    format: str
    capacity: int
    allocation: int
    physical: int
    backing: Backing | None = None
    mode: int | None = None
    owner: int | None = None
    group: int | None = None
    timestamps: dict[str, str] = field(default_factory=dict)  # atime/mtime/ctime "s.ns"

    def to_map(self) -> dict[str, object]:
        return {
            "name": self.name, "type": self.type, "path": self.path, "key": self.key,
            "format": self.format, "capacity": self.capacity, "allocation": self.allocation,
            "physical": self.physical,
            "backing": {"path": self.backing.path, "format": self.backing.format}
            if self.backing else None,
        }  # fmt: skip


def _text(parent: Element, path: str) -> str | None:
    el = parent.find(path)
    return el.text.strip() if el is not None and el.text is not None else None


def _size(root: Element, tag: str) -> int | None:
    el = root.find(tag)
    if el is None:
        return None
    return parse_scaled(el.text, el.get("unit"), tag)


class VolumeDefinition:
    """One volume's definition (what vol-create was given)."""

    name: str
    type: str | None
    capacity: int | None
    allocation: int | None
    format: str | None
    permissions: Permissions | None
    backing: Backing | None
    compat: str | None
    lazy_refcounts: bool
    cluster_size: int | None
    nocow: bool
    encrypted: bool

    def __init__(self, root: Element) -> None:
        self._root = root
        self._load()

    @property
    def root(self) -> Element:
        return self._root

    def copy(self) -> VolumeDefinition:
        return VolumeDefinition(_copy.deepcopy(self._root))

    def __repr__(self) -> str:
        return f"<VolumeDefinition {self.name!r} {self.format} {self.capacity}>"

    def to_xml(self, facts: VolumeFacts | None = None) -> str:
        """vol-dumpxml: the definition with what is true on disk now written in."""
        root = _copy.deepcopy(self._root)
        if facts is None:
            return dumps(root)
        root.set("type", facts.type)
        for tag in ("key", "capacity", "allocation", "physical"):
            for old in root.findall(tag):
                root.remove(old)
        name_el = root.find("name")
        assert name_el is not None
        pos = list(root).index(name_el) + 1
        key = etree.Element("key")
        key.text = facts.key
        root.insert(pos, key)
        anchor = root.find("source")
        pos = list(root).index(anchor if anchor is not None else key) + 1
        for offset, tag in enumerate(("capacity", "allocation", "physical")):
            el = etree.Element(tag, unit="bytes")
            el.text = str(getattr(facts, tag))
            root.insert(pos + offset, el)
        target = root.find("target")
        if target is None:
            target = etree.SubElement(root, "target")
        _set_target(target, facts.path, facts.format, facts)
        for old in root.findall("backingStore"):
            root.remove(old)
        if facts.backing is not None:
            back = etree.SubElement(root, "backingStore")
            _set_target(back, facts.backing.path, facts.backing.format, None)
        return dumps(root)

    # ------------------------------------------------------------------ parsing
    def _load(self) -> None:
        root = self._root
        if not isinstance(root.tag, str) or etree.QName(root).localname != "volume":
            raise XMLError(f"root element must be <volume>, not <{root.tag}>")
        if etree.QName(root).namespace is not None:
            raise XMLError("<volume> must not be in a namespace")
        vtype = root.get("type")
        if vtype is not None and vtype not in VOLUME_TYPES:
            raise XMLError(f"unknown <volume type='{vtype}'>")
        self.type = vtype
        name_el = root.find("name")
        raw = name_el.text if name_el is not None else None
        if raw is None:
            raise XMLError("missing <name> in storage volume")
        try:
            self.name = check_name(raw, "volume")
        except InvalidArgument as exc:
            raise XMLError(exc.message) from None
        self.capacity = _size(root, "capacity")
        self.allocation = _size(root, "allocation")
        target = root.find("target")
        fmt = target.find("format") if target is not None else None
        self.format = fmt.get("type") if fmt is not None else None
        if self.format is not None and self.format not in ALL_FORMATS:
            raise XMLError(f"unknown volume format type '{self.format}' (e.g. raw, qcow2)")
        self.permissions = parse_permissions(
            target.find("permissions") if target is not None else None, "<target>"
        )
        self.compat = _text(target, "compat") if target is not None else None
        if self.compat is not None and self.compat not in ("0.10", "1.1"):
            raise XMLError(f"unsupported <compat>{self.compat}</compat> (0.10 or 1.1)")
        features = target.find("features") if target is not None else None
        self.lazy_refcounts = features is not None and features.find("lazy_refcounts") is not None
        cluster = target.find("clusterSize") if target is not None else None
        self.cluster_size = (
            parse_scaled(cluster.text, cluster.get("unit"), "clusterSize")
            if cluster is not None else None
        )  # fmt: skip
        self.nocow = target is not None and target.find("nocow") is not None
        self.encrypted = target is not None and target.find("encryption") is not None
        back = root.find("backingStore")
        self.backing = None
        if back is not None:
            bpath = _text(back, "path")
            if not bpath:
                raise XMLError("missing <backingStore><path> in storage volume")
            bfmt_el = back.find("format")
            bfmt = bfmt_el.get("type") if bfmt_el is not None else None
            if bfmt is not None and bfmt not in ALL_FORMATS:
                raise XMLError(f"unknown <backingStore> format type '{bfmt}'")
            self.backing = Backing(normalize_path(bpath, "<backingStore><path>"), bfmt)


def _set_target(target: Element, path: str, fmt: str | None, facts: VolumeFacts | None) -> None:
    for tag in ("path", "format"):
        for old in target.findall(tag):
            target.remove(old)
    path_el = etree.Element("path")
    path_el.text = path
    target.insert(0, path_el)
    if fmt is not None:
        target.insert(1, etree.Element("format", type=fmt))
    if facts is None:
        return
    perms = target.find("permissions")
    if perms is None and facts.mode is not None:
        perms = etree.SubElement(target, "permissions")
    if perms is not None:
        for tag, value in (("mode", facts.mode), ("owner", facts.owner), ("group", facts.group)):
            for old in perms.findall(tag):
                perms.remove(old)
            if value is not None:
                el = etree.Element(tag)
                el.text = f"{value:04o}" if tag == "mode" else str(value)
                perms.insert(("mode", "owner", "group").index(tag), el)
    for old in target.findall("timestamps"):
        target.remove(old)
    if facts.timestamps:
        stamps = etree.SubElement(target, "timestamps")
        for tag in ("atime", "btime", "ctime", "mtime"):
            if tag in facts.timestamps:
                etree.SubElement(stamps, tag).text = facts.timestamps[tag]


def volume_xml(
    name: str,
    capacity: int | None,
    *,
    format: str | None = None,  # libvirt's word
    allocation: int | None = None,
    backing: Backing | None = None,
) -> str:
    """The ``<volume>`` XML virsh vol-create-as writes from its arguments."""
    root = etree.Element("volume")
    etree.SubElement(root, "name").text = name
    if capacity is not None:
        etree.SubElement(root, "capacity", unit="bytes").text = str(capacity)
    if allocation is not None:
        etree.SubElement(root, "allocation", unit="bytes").text = str(allocation)
    target = etree.SubElement(root, "target")
    if format is not None:
        etree.SubElement(target, "format", type=format)
    if backing is not None:
        back = etree.SubElement(root, "backingStore")
        etree.SubElement(back, "path").text = backing.path
        if backing.format is not None:
            etree.SubElement(back, "format", type=backing.format)
    return dumps(root)
