"""A libvirt storage pool definition: the lxml tree (kept verbatim) and typed views of it.

Every pool type of libvirt's ``storagepool.rng`` parses, whether or not this host can run
it (the backend decides that, with NO_SUPPORT and a reason). What a type requires (a
target path, a source device, hosts, a name ...) is checked here, as libvirt's
``virStoragePoolDefParseXML`` does, so a pool that cannot mean anything is refused at
define time with XML_ERROR naming the element. Runtime figures (capacity, allocation,
available) are never stored: :meth:`PoolDefinition.to_xml` writes the current ones.
"""

from __future__ import annotations

import copy as _copy
import posixpath
from dataclasses import dataclass, field

from lxml import etree

from virtbus.domain.model import Element
from virtbus.domain.serialize import dumps
from virtbus.errors import InvalidArgument, XMLError
from virtbus.storage.names import check_name, definition_uuid

POOL_TYPES = (
    "dir", "fs", "netfs", "logical", "disk", "iscsi", "iscsi-direct", "scsi", "mpath",
    "rbd", "sheepdog", "gluster", "zfs", "vstorage",
)  # fmt: skip

#: formats allowed in <source><format type=...> per pool type (storagepool.rng)
SOURCE_FORMATS: dict[str, frozenset[str]] = {
    "fs": frozenset(
        {"auto", "ext2", "ext3", "ext4", "ufs", "iso9660", "udf", "gfs", "gfs2", "vfat",
         "hfs+", "xfs", "ocfs2", "vmfs"}
    ),
    "netfs": frozenset({"auto", "nfs", "cifs", "glusterfs"}),
    "disk": frozenset({"unknown", "dos", "dvh", "gpt", "mac", "bsd", "pc98", "sun", "lvm2"}),
    "logical": frozenset({"unknown", "lvm2"}),
}  # fmt: skip
#: default <source><format> when absent (libvirt's)
DEFAULT_FORMATS = {"fs": "auto", "netfs": "auto", "disk": "unknown", "logical": "lvm2"}


@dataclass(frozen=True, slots=True)
class PoolRequirements:
    """What a pool type's XML must have (libvirt's poolTypeInfo options)."""

    target: bool = False  # <target><path> required
    device: bool = False  # at least one <source><device path>
    single_device: bool = False  # exactly one
    host: bool = False  # <source><host name>
    dir: bool = False  # <source><dir path>
    name: bool = False  # <source><name>
    adapter: bool = False  # <source><adapter>
    initiator: bool = False  # <source><initiator><iqn name>
    name_from_source: bool = False  # <name> may be omitted: taken from <source><name>


REQUIREMENTS: dict[str, PoolRequirements] = {
    "dir": PoolRequirements(target=True),
    "fs": PoolRequirements(target=True, device=True, single_device=True),
    "netfs": PoolRequirements(target=True, host=True, dir=True),
    "logical": PoolRequirements(name_from_source=True),
    "disk": PoolRequirements(target=True, device=True, single_device=True),
    "iscsi": PoolRequirements(target=True, host=True, device=True),
    "iscsi-direct": PoolRequirements(host=True, device=True, initiator=True),
    "scsi": PoolRequirements(target=True, adapter=True),
    "mpath": PoolRequirements(target=True),
    "rbd": PoolRequirements(host=True, name=True, name_from_source=True),
    "sheepdog": PoolRequirements(host=True, name=True, name_from_source=True),
    "gluster": PoolRequirements(host=True, name=True, name_from_source=True),
    "zfs": PoolRequirements(name=True, name_from_source=True),
    "vstorage": PoolRequirements(target=True, name=True, name_from_source=True),
}


@dataclass(frozen=True, slots=True)
class SourceHost:
    name: str
    port: int | None


@dataclass(frozen=True, slots=True)
class Permissions:
    mode: int | None
    owner: int | None
    group: int | None
    label: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolSource:
    devices: tuple[str, ...]
    part_separator: bool | None  # <device part_separator='yes|no'> (disk pools)
    dir: str | None
    hosts: tuple[SourceHost, ...]
    name: str | None
    format: str | None
    initiator_iqn: str | None
    auth_type: str | None
    auth_username: str | None
    adapter: Element | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class PoolSizes:
    """A pool's runtime figures in bytes, as pool-info shows them."""

    capacity: int = 0
    allocation: int = 0
    available: int = 0


def _text(parent: Element, path: str) -> str | None:
    el = parent.find(path)
    return el.text.strip() if el is not None and el.text is not None else None


def _yes_no(value: str | None, what: str) -> bool | None:
    if value is None:
        return None
    if value in ("yes", "no"):
        return value == "yes"
    raise XMLError(f"invalid {what}='{value}': expected 'yes' or 'no'")


def parse_permissions(el: Element | None, where: str) -> Permissions | None:
    """``<permissions>``: octal mode, numeric owner/group (-1 = unchanged), label."""
    if el is None:
        return None
    mode_text = _text(el, "mode")
    mode = None
    if mode_text is not None:
        try:
            mode = int(mode_text, 8)
        except ValueError:
            raise XMLError(f"invalid <mode>{mode_text}</mode> in {where}: expected octal") from None
        if not 0 <= mode <= 0o7777:
            raise XMLError(f"invalid <mode>{mode_text}</mode> in {where}")
    ids: list[int | None] = []
    for tag in ("owner", "group"):
        raw = _text(el, tag)
        if raw is None or raw == "-1":
            ids.append(None)
            continue
        if not raw.isdigit():
            raise XMLError(f"invalid <{tag}>{raw}</{tag}> in {where}: expected a number")
        ids.append(int(raw))
    return Permissions(mode, ids[0], ids[1], _text(el, "label"))


def normalize_path(raw: str, what: str) -> str:
    """An absolute path without trailing slashes or ``.``/``..`` components (libvirt's
    virFileSanitizePath, plus refusing ``..`` rather than resolving it)."""
    if not raw.startswith("/"):
        raise XMLError(f"{what} '{raw}' must be an absolute path")
    if "\0" in raw or any(ord(c) < 32 for c in raw):
        raise XMLError(f"{what} {raw!r} must not contain control characters")
    if ".." in raw.split("/"):
        raise XMLError(f"{what} '{raw}' must not contain '..'")
    return posixpath.normpath(raw) if raw != "/" else raw


class PoolDefinition:
    """One pool's definition. Views are read-only; runtime sizes go through to_xml."""

    type: str
    name: str
    uuid: str
    target_path: str | None
    target_permissions: Permissions | None
    source: PoolSource
    cow: bool | None  # <features><cow state=...> (btrfs)

    def __init__(self, root: Element) -> None:
        self._root = root
        self._load()

    @property
    def root(self) -> Element:
        return self._root

    @property
    def source_format(self) -> str | None:
        """The <source><format type>, or libvirt's default for the pool type."""
        return self.source.format or DEFAULT_FORMATS.get(self.type)

    def to_xml(self, sizes: PoolSizes | None = None) -> str:
        """pool-dumpxml: the definition with the current sizes (zeros when inactive)."""
        root = _copy.deepcopy(self._root)
        for tag in ("capacity", "allocation", "available"):
            for old in root.findall(tag):
                root.remove(old)
        figures = sizes or PoolSizes()
        anchor = root.find("uuid")
        if anchor is None:
            anchor = root.find("name")
        position = list(root).index(anchor) + 1 if anchor is not None else 0
        for offset, tag in enumerate(("capacity", "allocation", "available")):
            el = etree.Element(tag, unit="bytes")
            el.text = str(getattr(figures, tag))
            root.insert(position + offset, el)
        if self.target_path is not None and root.find("target") is None:
            target = etree.SubElement(root, "target")  # a default path, written as libvirt does
            etree.SubElement(target, "path").text = self.target_path
        return dumps(root)

    def copy(self) -> PoolDefinition:
        return PoolDefinition(_copy.deepcopy(self._root))

    def __repr__(self) -> str:
        return f"<PoolDefinition {self.type} {self.name!r} {self.uuid}>"

    # ------------------------------------------------------------------ parsing
    def _load(self) -> None:
        root = self._root
        if not isinstance(root.tag, str) or etree.QName(root).localname != "pool":
            raise XMLError(f"root element must be <pool>, not <{root.tag}>")
        if etree.QName(root).namespace is not None:
            raise XMLError("<pool> must not be in a namespace")
        ptype = root.get("type")
        if ptype is None:
            raise XMLError("missing <pool type=...>")
        if ptype not in POOL_TYPES:
            raise XMLError(f"unknown storage pool type '{ptype}' (one of {', '.join(POOL_TYPES)})")
        self.type = ptype
        need = REQUIREMENTS[ptype]
        src_el = root.find("source")
        self.source = self._parse_source(src_el, ptype)
        self.name = self._parse_name(root, need)
        self.uuid = definition_uuid(root, "storage pool")
        target = root.find("target")
        path = _text(target, "path") if target is not None else None
        if need.target and not path:
            raise XMLError(f"missing <target><path> in storage pool '{self.name}' ({ptype})")
        self.target_path = normalize_path(path, "<target><path>") if path else None
        if ptype == "logical" and self.target_path is None and self.source.name:
            self.target_path = f"/dev/{self.source.name}"  # libvirt's default for a VG
        self.target_permissions = parse_permissions(
            target.find("permissions") if target is not None else None, "<target>"
        )
        cow = root.find("features/cow")
        self.cow = _yes_no(cow.get("state"), "<cow state") if cow is not None else None
        self._check_requirements(need)

    @staticmethod
    def _parse_name(root: Element, need: PoolRequirements) -> str:
        name_el = root.find("name")
        raw = name_el.text if name_el is not None else None
        if raw is None and need.name_from_source:
            raw = _text(root, "source/name")
            if raw is not None:  # libvirt writes it back as the pool's name
                name_el = etree.Element("name")
                name_el.text = raw
                root.insert(0, name_el)
        if raw is None:
            raise XMLError("missing <name> in storage pool")
        try:
            return check_name(raw, "pool")
        except InvalidArgument as exc:
            raise XMLError(exc.message) from None

    @staticmethod
    def _parse_source(src: Element | None, ptype: str) -> PoolSource:
        if src is None:
            return PoolSource(devices=(), part_separator=None, dir=None, hosts=(), name=None,
                              format=None, initiator_iqn=None, auth_type=None,
                              auth_username=None)  # fmt: skip
        devices: list[str] = []
        part_sep = None
        for dev in src.findall("device"):
            path = dev.get("path")
            if not path:
                raise XMLError("missing <source><device path=...> in storage pool")
            if path.startswith("/"):
                path = normalize_path(path, "<source><device path")
            devices.append(path)
            part_sep = _yes_no(dev.get("part_separator"), "<device part_separator") or part_sep
        hosts = []
        for host in src.findall("host"):
            hname = host.get("name")
            if not hname:
                raise XMLError("missing <source><host name=...> in storage pool")
            port_raw = host.get("port")
            port = None
            if port_raw is not None:
                if not port_raw.isdigit() or not 0 < int(port_raw) < 65536:
                    raise XMLError(f"invalid <host port='{port_raw}'> in storage pool")
                port = int(port_raw)
            hosts.append(SourceHost(hname, port))
        dir_el = src.find("dir")
        fmt_el = src.find("format")
        fmt = fmt_el.get("type") if fmt_el is not None else None
        allowed = SOURCE_FORMATS.get(ptype)
        if fmt is not None and allowed is not None and fmt not in allowed:
            raise XMLError(
                f"unknown <source><format type='{fmt}'> for a {ptype} pool"
                f" (one of {', '.join(sorted(allowed))})"
            )
        auth = src.find("auth")
        iqn = src.find("initiator/iqn")
        return PoolSource(
            devices=tuple(devices),
            part_separator=part_sep,
            dir=dir_el.get("path") if dir_el is not None else None,
            hosts=tuple(hosts),
            name=_text(src, "name"),
            format=fmt,
            initiator_iqn=iqn.get("name") if iqn is not None else None,
            auth_type=auth.get("type") if auth is not None else None,
            auth_username=auth.get("username") if auth is not None else None,
            adapter=src.find("adapter"),
        )  # fmt: skip

    def _check_requirements(self, need: PoolRequirements) -> None:
        src, what = self.source, f"storage pool '{self.name}' ({self.type})"
        if need.device and not src.devices:
            raise XMLError(f"missing <source><device path=...> in {what}")
        if need.single_device and len(src.devices) > 1:
            raise XMLError(f"{what} takes exactly one <source><device>")
        if need.host and not src.hosts:
            raise XMLError(f"missing <source><host name=...> in {what}")
        if need.dir and not src.dir:
            raise XMLError(f"missing <source><dir path=...> in {what}")
        if need.name and not src.name:
            raise XMLError(f"missing <source><name> in {what}")
        if need.adapter and src.adapter is None:
            raise XMLError(f"missing <source><adapter> in {what}")
        if need.initiator and not src.initiator_iqn:
            raise XMLError(f"missing <source><initiator><iqn name=...> in {what}")
        if self.type == "logical" and not (src.name or src.devices):
            raise XMLError(f"missing <source><name> or <device> in {what}")
        if self.type == "iscsi-direct" and not src.devices[0].startswith("iqn."):
            raise XMLError(f"<source><device path='{src.devices[0]}'> of {what} must be an IQN")
