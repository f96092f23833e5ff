"""Checkpoint metadata of every domain of one driver, on disk, and the checks a checkpoint
and a backup share between the QEMU and test drivers.

As libvirt does, the metadata (name, parent, disks, time) is the agent's and the data
(one persistent dirty bitmap per disk, named after the checkpoint) is the image's; the
metadata is kept as :mod:`drivers.metadata` keeps every per-domain tree. Every
checkpoint's bitmap stays active, as in libvirt since 6.0: a checkpoint's bitmap alone
holds everything written since it, so an incremental
backup from it copies that bitmap's clusters, and deleting a checkpoint removes only its
own bitmaps (its children take its parent as theirs).
"""

from __future__ import annotations

import time
from pathlib import Path

from drivers.metadata import TreeStore
from virtbus.domain import DomainDefinition
from virtbus.domain.checkpoint import (
    BackupDisk,
    BackupRequest,
    CheckpointDef,
    CheckpointRequest,
    default_backup_file,
)
from virtbus.domain.model import Disk
from virtbus.errors import (
    ConfigUnsupported,
    InvalidArgument,
    NoDomainCheckpoint,
    NoSupport,
    OperationInvalid,
)
from virtbus.protocol.backup import CheckpointInfo


def _writable(defn: DomainDefinition) -> list[Disk]:
    return [d for d in defn.disks if d.device == "disk" and not d.readonly]


def checkpoint_disks(defn: DomainDefinition, only: dict[str, str]) -> list[Disk]:
    """The disks a checkpoint covers: writable disks minus those marked ``no``; each must
    be a qcow2 file or block image (a raw image cannot hold a persistent bitmap)."""
    targets = {d.target_dev for d in defn.disks}
    for target in only:
        if target not in targets:
            raise InvalidArgument(f"domain '{defn.name}' has no disk '{target}'")
    disks = [d for d in _writable(defn) if only.get(d.target_dev) != "no"]
    for disk in disks:
        fmt = disk.driver_type or "raw"
        if fmt != "qcow2":
            raise ConfigUnsupported(
                f"checkpoint of disk '{disk.target_dev}' of domain '{defn.name}' needs a qcow2"
                f" image to hold its persistent bitmap; its format is {fmt} (mark it"
                " checkpoint='no' to leave it out)"
            )
        if disk.type not in ("file", "block") or not disk.source_path:
            raise NoSupport(f"checkpoints of <disk type='{disk.type}'> ('{disk.target_dev}')"
                            " are not supported yet (file and block disks are)")  # fmt: skip
    if not disks:
        raise ConfigUnsupported(f"domain '{defn.name}' has no writable disk for a checkpoint")
    return disks


def backup_disks(
    defn: DomainDefinition, req: BackupRequest, start: float
) -> list[tuple[Disk, BackupDisk]]:
    """The disks a backup copies, each with its filled-in target (libvirt's default: the
    image's path with the start time); an incremental one needs qcow2 disks."""
    listed = {d.target: d for d in req.disks}
    targets = {d.target_dev for d in defn.disks}
    for target in [*listed, *req.skip]:
        if target not in targets:
            raise InvalidArgument(f"domain '{defn.name}' has no disk '{target}'")
    out: list[tuple[Disk, BackupDisk]] = []
    seen: set[str] = set()
    for disk in _writable(defn):
        if disk.target_dev in req.skip:
            continue
        if disk.type not in ("file", "block") or not disk.source_path:
            raise NoSupport(f"backup of <disk type='{disk.type}'> ('{disk.target_dev}') is not"
                            " supported yet (file and block disks are)")  # fmt: skip
        if req.incremental is not None and (disk.driver_type or "raw") != "qcow2":
            raise ConfigUnsupported(
                f"incremental backup of disk '{disk.target_dev}' of domain '{defn.name}' needs"
                f" a qcow2 image with dirty bitmaps; its format is {disk.driver_type or 'raw'}"
            )
        asked = listed.get(disk.target_dev) or BackupDisk(disk.target_dev, None)
        file = asked.file or default_backup_file(disk.source_path, start)
        if file in seen or file in (d.source_path for d in defn.disks):
            raise ConfigUnsupported(f"backup file '{file}' of disk '{disk.target_dev}' is used"
                                    " twice")  # fmt: skip
        seen.add(file)
        out.append((disk, BackupDisk(disk.target_dev, file, asked.format)))
    if not out:
        raise ConfigUnsupported(f"domain '{defn.name}' has no disk to back up")
    return out


class CheckpointStore(TreeStore[CheckpointDef]):
    """Every domain's checkpoint tree, by domain uuid (see :mod:`drivers.metadata`)."""

    def __init__(self, directory: Path | None) -> None:
        super().__init__(directory, key="checkpoints", from_json=CheckpointDef.from_json)

    def get(self, uuid: str, domain: str, name: str) -> CheckpointDef:
        found = self.of(uuid).records.get(name)
        if found is None:
            raise NoDomainCheckpoint(f"domain '{domain}' has no checkpoint named '{name}'")
        return found

    def info(self, uuid: str, domain: str, name: str) -> CheckpointInfo:
        c = self.get(uuid, domain, name)
        tree = self.of(uuid)
        return CheckpointInfo(
            name=c.name, domain=domain, creation_time=c.creation_time, disks=list(c.disks),
            parent=c.parent, description=c.description, children=len(tree.children(c.name)),
            descendants=len(tree.descendants(c.name)),
        )  # fmt: skip

    def infos(self, uuid: str, domain: str) -> list[CheckpointInfo]:
        return [self.info(uuid, domain, n) for n in self.of(uuid).records]

    def new(self, uuid: str, domain: str, req: CheckpointRequest,
            disks: list[Disk]) -> CheckpointDef:  # fmt: skip
        """The record of a checkpoint about to be created (a child of the newest)."""
        now = time.time()
        tree = self.of(uuid)
        name = req.name or str(int(now))
        if name in tree.records:
            raise OperationInvalid(f"domain '{domain}' already has a checkpoint named '{name}'")
        return CheckpointDef(name=name, creation_time=int(now),
                             disks=tuple(d.target_dev for d in disks), parent=tree.current,
                             description=req.description)  # fmt: skip

    async def remove(self, uuid: str, name: str) -> None:
        """Forget one checkpoint: its children take its parent."""
        tree = self.of(uuid)
        gone = tree.records.pop(name, None)
        if gone is None:
            return
        for child in [c for c in tree.records.values() if c.parent == name]:
            tree.records[child.name] = CheckpointDef(
                child.name, child.creation_time, child.disks, gone.parent, child.description
            )
        if tree.current == name:
            tree.current = gone.parent
        await self._save(uuid)
