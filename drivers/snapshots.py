"""Snapshot metadata of every domain of one driver: the tree, the current snapshot, on disk.

libvirt keeps snapshot metadata beside the images (which hold the snapshots' data): the
tree of parents, which snapshot is current, the state and definition each was taken in.
How it is kept on disk is :mod:`drivers.metadata`'s (shared with checkpoints).

The drivers share this: what differs between them is only how the data is taken,
reverted and deleted (QMP jobs, qemu-img, or nothing). So do the checks of an external
snapshot (:func:`external_disks`) and the definition it leaves (:func:`with_overlays`):
each disk's new qcow2 overlay on top, the image before it as its ``<backingStore>``.

An external snapshot with memory (``<memory snapshot='external' file=...>``) also writes
the guest's state to a file (:func:`check_memory_file` checks it first); the file is a
save image, which ``restore`` loads.

What libvirt 9.0 refuses for external snapshots is refused here too, with its error:
a revert (CONFIG_UNSUPPORTED "revert to external snapshot not supported yet"). Deleting
an external snapshot's data (libvirt 9.0 block-commits it) is not done yet: only
``--metadata`` deletes one (the overlays stay the disks' images).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

from lxml import etree

from drivers.metadata import TreeStore
from virtbus.domain import DomainDefinition
from virtbus.domain.model import Disk
from virtbus.domain.snapshot import SnapshotDef, SnapshotRequest
from virtbus.errors import (
    ConfigUnsupported,
    InvalidArgument,
    NoDomainSnapshot,
    NoSupport,
    OperationInvalid,
    XMLError,
)
from virtbus.protocol.snapshot import SnapshotInfo

log = logging.getLogger(__name__)


def snapshot_disks(defn: DomainDefinition, only: dict[str, str]) -> list[Disk]:
    """The disks a snapshot covers: writable ``<disk device='disk'>`` with an image,
    minus those the request marks ``no``. Every one must be qcow2 (libvirt's default
    format is raw); INVALID_ARG for a target the domain does not have."""
    targets = {d.target_dev for d in defn.disks}
    for target in only:
        if target not in targets:
            raise InvalidArgument(f"domain '{defn.name}' has no disk '{target}'")
    disks = [
        d for d in defn.disks
        if d.device == "disk" and not d.readonly and only.get(d.target_dev) != "no"
    ]  # fmt: skip
    for disk in disks:
        fmt = disk.driver_type or "raw"
        if fmt != "qcow2":
            raise ConfigUnsupported(
                f"internal snapshot of disk '{disk.target_dev}' of domain '{defn.name}' needs"
                f" a qcow2 image; its format is {fmt} (an external snapshot, --disk-only, does"
                " not)"
            )
        if disk.type not in ("file", "block") or not disk.source_path:
            raise NoSupport(
                f"internal snapshots of <disk type='{disk.type}'> ('{disk.target_dev}') are not"
                " supported yet (file and block disks are)"
            )
    if not disks:
        raise ConfigUnsupported(
            f"domain '{defn.name}' has no writable qcow2 disk to hold an internal snapshot"
        )
    return disks


def default_overlay(source: str, snapshot: str) -> str:
    """libvirt's name of an external snapshot's overlay: the image's path with its suffix
    replaced by the snapshot's name (``/p/disk.qcow2`` -> ``/p/disk.s1``)."""
    head, tail = os.path.split(source)
    stem = tail.rsplit(".", 1)[0] if "." in tail.lstrip(".") else tail
    return os.path.join(head, f"{stem}.{snapshot}")


def external_disks(defn: DomainDefinition, files: dict[str, str], only: dict[str, str],
                   snapshot: str, memory: bool = False) -> list[tuple[Disk, str]]:  # fmt: skip
    """The disks an external snapshot covers, each with its new overlay's path: writable
    ``<disk type='file' device='disk'>`` minus those marked ``no``. Checked before
    anything is written: a file disk only (a volume's overlay would be its pool's to
    create), distinct overlays that do not exist yet. None at all only with ``memory``
    (libvirt takes a memory-only external snapshot)."""
    targets = {d.target_dev for d in defn.disks}
    for target in only:
        if target not in targets:
            raise InvalidArgument(f"domain '{defn.name}' has no disk '{target}'")
    out: list[tuple[Disk, str]] = []
    seen: set[str] = set()
    for disk in defn.disks:
        if disk.device != "disk" or disk.readonly or only.get(disk.target_dev) == "no":
            continue
        if disk.type != "file" or not disk.source_path:
            raise NoSupport(
                f"external snapshot of <disk type='{disk.type}'> ('{disk.target_dev}') is not"
                " supported yet (file disks are; mark it snapshot='no' to leave it out)"
            )
        overlay = files.get(disk.target_dev) or default_overlay(disk.source_path, snapshot)
        if (
            overlay in seen
            or overlay == disk.source_path
            or overlay in (d.source_path for d in defn.disks)
        ):
            raise ConfigUnsupported(f"external snapshot file '{overlay}' of disk"
                                    f" '{disk.target_dev}' is used twice")  # fmt: skip
        if os.path.lexists(overlay):
            raise ConfigUnsupported(f"external snapshot file for disk '{disk.target_dev}'"
                                    f" already exists: {overlay}")  # fmt: skip
        seen.add(overlay)
        out.append((disk, overlay))
    if not out and not memory:
        raise ConfigUnsupported(f"domain '{defn.name}' has no writable disk to snapshot")
    return out


def check_live(req: SnapshotRequest, active: bool, live: bool) -> None:
    """libvirt's ``--live``: only for a full system snapshot (memory to a file) of an
    active domain; NO_SUPPORT with its words otherwise."""
    if live and (not active or req.memory != "external"):
        raise NoSupport("live snapshot creation is supported only during full system snapshots"
                        " (--memspec file=... of a running domain)")  # fmt: skip


def check_memory_file(defn: DomainDefinition, file: str, active: bool,
                      pairs: list[tuple[Disk, str]]) -> None:  # fmt: skip
    """An external memory snapshot's file, checked before anything is written: the domain
    runs (libvirt: a shut-off domain has no memory state), the file is new, in a directory
    that exists, and is none of the disks' images or overlays."""
    if not active:
        raise XMLError("memory state cannot be saved with offline or disk-only snapshot"
                       f" (domain '{defn.name}' is shut off)")  # fmt: skip
    if file in (o for _, o in pairs) or file in (d.source_path for d in defn.disks):
        raise ConfigUnsupported(f"external snapshot memory file '{file}' is a disk's image"
                                " or overlay")  # fmt: skip
    if os.path.lexists(file):
        raise ConfigUnsupported(f"external snapshot memory file already exists: {file}")
    if not os.path.isdir(os.path.dirname(file)):
        raise InvalidArgument(f"cannot write the memory of domain '{defn.name}' to '{file}':"
                              f" no directory {os.path.dirname(file)}")  # fmt: skip


def with_overlays(defn: DomainDefinition, overlays: dict[str, str]) -> DomainDefinition:
    """A copy of ``defn`` whose disks of ``overlays`` (target -> file) run on their qcow2
    overlay, the image before it (and its own chain) as the overlay's ``<backingStore>``,
    as libvirt writes the definition after an external snapshot."""
    new = defn.copy()
    with new.edit():
        for disk in new.disks:
            overlay = overlays.get(disk.target_dev)
            if overlay is None:
                continue
            el = disk.element
            backing = etree.Element("backingStore", type=el.get("type", "file"))
            etree.SubElement(backing, "format", type=disk.driver_type or "raw")
            source = el.find("source")
            backing.append(copy.deepcopy(source) if source is not None
                           else etree.Element("source"))  # fmt: skip
            old = el.find("backingStore")
            if old is not None:
                el.remove(old)
                backing.append(old)
            driver = el.find("driver")
            if driver is None:
                driver = etree.SubElement(el, "driver", name="qemu")
            driver.set("type", "qcow2")
            if source is None:
                source = etree.SubElement(el, "source")
            for attr in list(source.attrib):
                if attr != "index":
                    del source.attrib[attr]
            source.set("file", overlay)
            for child in list(source):
                source.remove(child)
            source.addnext(backing)
    return new


GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"


def check_quiesce(defn: DomainDefinition) -> None:
    """``--quiesce`` freezes the guest's file systems through its QEMU guest agent: a
    domain without the agent's channel is refused as libvirt refuses it; one with it too
    (virtbus does not speak to guest agents yet), before anything is written."""
    channels = defn.root.findall("devices/channel/target")
    if not any(t.get("name") == GUEST_AGENT_CHANNEL for t in channels):
        raise ConfigUnsupported(
            f"cannot quiesce domain '{defn.name}': QEMU guest agent is not configured"
            f" (no <channel> named {GUEST_AGENT_CHANNEL})"
        )
    raise NoSupport(f"cannot quiesce domain '{defn.name}': virtbus does not talk to the QEMU"
                    " guest agent yet; take the snapshot without --quiesce")  # fmt: skip


class SnapshotStore(TreeStore[SnapshotDef]):
    """Every domain's snapshot tree, by domain uuid (see :mod:`drivers.metadata`)."""

    def __init__(self, directory: Path | None) -> None:
        super().__init__(directory, key="snapshots", from_json=SnapshotDef.from_json)

    def get(self, uuid: str, domain: str, name: str) -> SnapshotDef:
        snap = self.of(uuid).records.get(name)
        if snap is None:
            raise NoDomainSnapshot(f"domain '{domain}' has no snapshot named '{name}'")
        return snap

    def current(self, uuid: str, domain: str) -> SnapshotDef:
        tree = self.of(uuid)
        if tree.current is None or tree.current not in tree.records:
            raise NoDomainSnapshot(f"domain '{domain}' has no current snapshot")
        return tree.records[tree.current]

    def info(self, uuid: str, domain: str, name: str) -> SnapshotInfo:
        snap = self.get(uuid, domain, name)
        tree = self.of(uuid)
        return SnapshotInfo(
            name=snap.name, domain=domain, state=snap.state,  # type: ignore[arg-type]
            creation_time=snap.creation_time, memory=snap.memory, parent=snap.parent,
            description=snap.description, current=tree.current == snap.name,
            children=len(tree.children(snap.name)),
            descendants=len(tree.descendants(snap.name)),
            location="external" if snap.external else "internal",
        )  # fmt: skip

    def infos(self, uuid: str, domain: str) -> list[SnapshotInfo]:
        return [self.info(uuid, domain, name) for name in self.of(uuid).records]

    def check_new(self, uuid: str, domain: str, name: str) -> None:
        if name in self.of(uuid).records:
            raise OperationInvalid(f"domain '{domain}' already has a snapshot named '{name}'")

    def for_revert(self, uuid: str, domain: str, name: str) -> SnapshotDef:
        """The snapshot to revert to; an external one is refused as libvirt 9.0 does."""
        snap = self.get(uuid, domain, name)
        if snap.external:
            raise ConfigUnsupported(
                f"revert to external snapshot '{name}' of domain '{domain}' not supported yet"
            )
        return snap

    def plan_delete(
        self, uuid: str, domain: str, name: str, *, children: bool, children_only: bool,
        metadata: bool = False,
    ) -> list[str]:  # fmt: skip
        """The snapshots a delete removes, children before parents; a snapshot with
        children is refused unless they go too (its images' data depends on nothing, but
        the tree would be rewritten behind the user's back)."""
        self.get(uuid, domain, name)
        below = self.of(uuid).descendants(name)
        if children_only:
            victims = list(reversed(below))
        elif below and not children:
            raise OperationInvalid(
                f"snapshot '{name}' of domain '{domain}' has {len(below)} descendant(s)"
                f" ({', '.join(below[:5])}): delete them first, or use --children"
            )
        else:
            victims = [*reversed(below), name]
        external = [v for v in victims if self.of(uuid).records[v].external]
        if external and not metadata:
            raise ConfigUnsupported(
                f"deletion of {len(external)} external disk snapshot(s) ({', '.join(external)})"
                f" of domain '{domain}' is not supported yet: delete with --metadata (the"
                " overlays stay the disks' images)"
            )
        return victims

    async def remove(self, uuid: str, names: list[str]) -> None:
        """Forget ``names``; a deleted current snapshot passes 'current' to its parent."""
        tree = self.of(uuid)
        for name in names:
            snap = tree.records.pop(name, None)
            if snap is not None and tree.current == name:
                tree.current = snap.parent
        while tree.current is not None and tree.current not in tree.records:
            tree.current = None
        await self._save(uuid)
