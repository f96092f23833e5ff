"""libvirt's checkpoint and backup XML (``<domaincheckpoint>``, ``<domainbackup>``): the
requests a user sends, the records the agent keeps and dumps. No I/O.

A checkpoint is a point in time from which a later backup copies only what changed: each
covered disk gets a persistent dirty bitmap named after the checkpoint (libvirt's
``bitmap`` attribute), which QEMU keeps in the qcow2 image. A backup (push mode) copies
each covered disk to a new image: everything (full), or what changed since a checkpoint
(``<incremental>``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from lxml import etree

from virtbus.domain.serialize import dumps
from virtbus.domain.snapshot import check_snapshot_name
from virtbus.domain.xml import parse_untrusted_root
from virtbus.errors import InvalidArgument, NoSupport, XMLError

_CHECKPOINT_KNOWN = frozenset({"name", "description", "disks", "parent", "creationTime",
                               "domain"})  # fmt: skip
_BACKUP_KNOWN = frozenset({"incremental", "disks", "server"})
BACKUP_FORMATS = ("qcow2", "raw")


def check_checkpoint_name(name: str) -> str:
    """The rules of a snapshot's name (a bitmap's name in the image too)."""
    try:
        return check_snapshot_name(name)
    except InvalidArgument as exc:
        raise InvalidArgument(str(exc).replace("snapshot", "checkpoint")) from None


@dataclass(frozen=True, slots=True)
class CheckpointRequest:
    """What a ``<domaincheckpoint>`` asks: ``disks`` maps a target to ``bitmap`` or ``no``."""

    name: str | None = None
    description: str | None = None
    disks: dict[str, str] = field(default_factory=dict)


def parse_checkpoint_request(xml: str | None) -> CheckpointRequest:
    if xml is None or not xml.strip():
        return CheckpointRequest()
    root = parse_untrusted_root(xml, "domaincheckpoint")
    if root.tag != "domaincheckpoint":
        raise XMLError(f"expected <domaincheckpoint>, got <{root.tag}>")
    for child in root:
        if isinstance(child.tag, str) and child.tag not in _CHECKPOINT_KNOWN:
            raise XMLError(f"unknown element <{child.tag}> in <domaincheckpoint>")
    name = _text(root, "name")
    if name is not None:
        check_checkpoint_name(name)
    disks: dict[str, str] = {}
    for disk in root.findall("disks/disk"):
        target, mode = disk.get("name"), disk.get("checkpoint") or "bitmap"
        if not target:
            raise XMLError("<disk> in <domaincheckpoint> needs a name (its target, vda)")
        if mode not in ("bitmap", "no"):
            raise XMLError(f"unknown checkpoint mode {mode!r} of disk '{target}' (bitmap, no)")
        bitmap = disk.get("bitmap")
        if bitmap is not None and bitmap != name:
            raise NoSupport(f"disk '{target}': a bitmap named other than the checkpoint"
                            " is not supported")  # fmt: skip
        if target in disks:
            raise XMLError(f"disk '{target}' is named twice in <domaincheckpoint>")
        disks[target] = mode
    return CheckpointRequest(name, _text(root, "description"), disks)


@dataclass(frozen=True, slots=True)
class CheckpointDef:
    """One recorded checkpoint: each disk of ``disks`` has a bitmap named ``name``."""

    name: str
    creation_time: int
    disks: tuple[str, ...]
    parent: str | None = None
    description: str | None = None

    def to_xml(self) -> str:
        root = etree.Element("domaincheckpoint")
        etree.SubElement(root, "name").text = self.name
        if self.description:
            etree.SubElement(root, "description").text = self.description
        if self.parent is not None:
            etree.SubElement(etree.SubElement(root, "parent"), "name").text = self.parent
        etree.SubElement(root, "creationTime").text = str(self.creation_time)
        disks = etree.SubElement(root, "disks")
        for target in self.disks:
            etree.SubElement(disks, "disk", name=target, checkpoint="bitmap", bitmap=self.name)
        return dumps(root)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "creation_time": self.creation_time,
                "disks": list(self.disks), "parent": self.parent,
                "description": self.description}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, object]) -> CheckpointDef:
        disks, parent, description = data.get("disks"), data.get("parent"), data.get("description")
        return cls(
            name=str(data["name"]), creation_time=int(str(data["creation_time"])),
            disks=tuple(str(d) for d in disks) if isinstance(disks, list) else (),
            parent=str(parent) if parent is not None else None,
            description=str(description) if description is not None else None,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class BackupDisk:
    target: str  # the disk's target (vda)
    file: str | None  # the backup image (None: the default beside the disk's image)
    format: str = "qcow2"


@dataclass(frozen=True, slots=True)
class BackupRequest:
    """A push-mode ``<domainbackup>``: ``incremental`` names the checkpoint it starts from;
    ``disks`` the disks listed (``skip``: those with backup='no')."""

    incremental: str | None = None
    disks: tuple[BackupDisk, ...] = ()
    skip: frozenset[str] = frozenset()


def parse_backup_request(xml: str | None) -> BackupRequest:
    if xml is None or not xml.strip():
        return BackupRequest()
    root = parse_untrusted_root(xml, "domainbackup")
    if root.tag != "domainbackup":
        raise XMLError(f"expected <domainbackup>, got <{root.tag}>")
    for child in root:
        if isinstance(child.tag, str) and child.tag not in _BACKUP_KNOWN:
            raise XMLError(f"unknown element <{child.tag}> in <domainbackup>")
    mode = root.get("mode", "push")
    if mode == "pull" or root.find("server") is not None:
        raise NoSupport("pull-mode backups (an NBD export) are not supported yet: use push")
    if mode != "push":
        raise XMLError(f"unknown backup mode {mode!r} (push, pull)")
    incremental = _text(root, "incremental")
    if incremental is not None:
        check_checkpoint_name(incremental)
    disks: list[BackupDisk] = []
    skip: set[str] = set()
    for disk in root.findall("disks/disk"):
        target = disk.get("name")
        if not target:
            raise XMLError("<disk> in <domainbackup> needs a name (its target, vda)")
        if target in skip or any(d.target == target for d in disks):
            raise XMLError(f"disk '{target}' is named twice in <domainbackup>")
        if disk.get("backup", "yes") == "no":
            skip.add(target)
            continue
        if disk.get("backup", "yes") != "yes":
            raise XMLError(f"disk '{target}': backup must be yes or no")
        if disk.get("type", "file") != "file":
            raise NoSupport(f"backup of disk '{target}' to a <disk type='{disk.get('type')}'>"
                            " is not supported (file is)")  # fmt: skip
        fmt_el = disk.find("driver")
        fmt = fmt_el.get("type", "qcow2") if fmt_el is not None else "qcow2"
        if fmt not in BACKUP_FORMATS:
            raise XMLError(f"backup of disk '{target}': format {fmt!r} (qcow2, raw)")
        tgt = disk.find("target")
        path = tgt.get("file") if tgt is not None else None
        if path is not None and not path.startswith("/"):
            raise InvalidArgument(f"backup file '{path}' of disk '{target}' must be an"
                                  " absolute path")  # fmt: skip
        disks.append(BackupDisk(target, path, fmt))
    return BackupRequest(incremental, tuple(disks), frozenset(skip))


def default_backup_file(source: str, now: float | None = None) -> str:
    """libvirt's default push target: the disk's image path with the backup's start time."""
    return f"{source}.{int(time.time() if now is None else now)}"


def backup_xml(incremental: str | None, disks: list[BackupDisk]) -> str:
    """The running backup's ``<domainbackup>`` (backup-dumpxml): every target filled in."""
    root = etree.Element("domainbackup", mode="push")
    if incremental is not None:
        etree.SubElement(root, "incremental").text = incremental
    el = etree.SubElement(root, "disks")
    for disk in disks:
        d = etree.SubElement(el, "disk", name=disk.target, backup="yes", type="file")
        etree.SubElement(d, "driver", type=disk.format)
        etree.SubElement(d, "target", file=disk.file or "")
    return dumps(root)


def _text(root: etree._Element, tag: str) -> str | None:
    node = root.find(tag)
    return node.text.strip() if node is not None and node.text and node.text.strip() else None
