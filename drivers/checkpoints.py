"""Checkpoint metadata of every domain of one driver, on disk, and the checks a checkpoint
and a backup share between the QEMU and test drivers.

As libvirt does, the metadata (name, parent, disks, time) is the agent's and the data
(one persistent dirty bitmap per disk, named after the checkpoint) is the image's. One
JSON file per domain (``<dir>/<uuid>.json``), replaced atomically; ``dir=None`` keeps it
in memory (the test driver). Every checkpoint's bitmap stays active, as in libvirt since
6.0: a checkpoint's bitmap alone holds everything written since it, so an incremental
backup from it copies that bitmap's clusters, and deleting a checkpoint removes only its
own bitmaps (its children take its parent as theirs).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

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
from virtbus.store import atomic_write, quarantine, read_bytes


@dataclass(slots=True)
class DomainCheckpoints:
    checkpoints: dict[str, CheckpointDef] = field(default_factory=dict)  # creation order
    current: str | None = None  # the newest: the next one's parent

    def children(self, name: str | None) -> list[str]:
        return [c.name for c in self.checkpoints.values() if c.parent == name]

    def descendants(self, name: str) -> list[str]:
        out: list[str] = []
        todo = self.children(name)
        while todo:
            child = todo.pop(0)
            out.append(child)
            todo.extend(self.children(child))
        return out


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


class CheckpointStore:
    """Every domain's :class:`DomainCheckpoints`, by domain uuid (module docstring)."""

    def __init__(self, directory: Path | None) -> None:
        self._dir = directory
        self._domains: dict[str, DomainCheckpoints] = {}

    async def load(self) -> None:
        if self._dir is None or not self._dir.is_dir():
            return
        for path in sorted(self._dir.glob("*.json")):
            data = await read_bytes(path)
            if data is None:
                continue
            try:
                raw = json.loads(data)
                tree = DomainCheckpoints(
                    {c["name"]: CheckpointDef.from_json(c) for c in raw["checkpoints"]},
                    raw.get("current"),
                )
            except (ValueError, KeyError, TypeError) as exc:
                await quarantine(path, f"unreadable checkpoint metadata: {exc}")
                continue
            self._domains[path.stem] = tree

    def of(self, uuid: str) -> DomainCheckpoints:
        return self._domains.get(uuid) or DomainCheckpoints()

    def has_any(self, uuid: str) -> bool:
        return bool(self.of(uuid).checkpoints)

    def get(self, uuid: str, domain: str, name: str) -> CheckpointDef:
        found = self.of(uuid).checkpoints.get(name)
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
        return [self.info(uuid, domain, n) for n in self.of(uuid).checkpoints]

    def new(self, uuid: str, domain: str, req: CheckpointRequest,
            disks: list[Disk]) -> CheckpointDef:  # fmt: skip
        """The record of a checkpoint about to be created (a child of the newest)."""
        now = time.time()
        tree = self.of(uuid)
        name = req.name or str(int(now))
        if name in tree.checkpoints:
            raise OperationInvalid(f"domain '{domain}' already has a checkpoint named '{name}'")
        return CheckpointDef(name=name, creation_time=int(now),
                             disks=tuple(d.target_dev for d in disks), parent=tree.current,
                             description=req.description)  # fmt: skip

    async def add(self, uuid: str, c: CheckpointDef) -> None:
        tree = self._domains.setdefault(uuid, DomainCheckpoints())
        tree.checkpoints[c.name] = c
        tree.current = c.name
        await self._save(uuid)

    async def remove(self, uuid: str, name: str) -> None:
        """Forget one checkpoint: its children take its parent."""
        tree = self.of(uuid)
        gone = tree.checkpoints.pop(name, None)
        if gone is None:
            return
        for child in [c for c in tree.checkpoints.values() if c.parent == name]:
            tree.checkpoints[child.name] = CheckpointDef(
                child.name, child.creation_time, child.disks, gone.parent, child.description
            )
        if tree.current == name:
            tree.current = gone.parent
        await self._save(uuid)

    async def forget(self, uuid: str) -> None:
        self._domains.pop(uuid, None)
        if self._dir is not None:
            (self._dir / f"{uuid}.json").unlink(missing_ok=True)

    async def _save(self, uuid: str) -> None:
        tree = self.of(uuid)
        if not tree.checkpoints:
            self._domains.pop(uuid, None)
            if self._dir is not None:
                (self._dir / f"{uuid}.json").unlink(missing_ok=True)
            return
        if self._dir is None:
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        body = {"current": tree.current,
                "checkpoints": [c.to_json() for c in tree.checkpoints.values()]}  # fmt: skip
        await atomic_write(self._dir / f"{uuid}.json", json.dumps(body).encode())
