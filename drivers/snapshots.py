"""Snapshot metadata of every domain of one driver: the tree, the current snapshot, on disk.

libvirt keeps snapshot metadata beside the images (which hold the snapshots' data): the
tree of parents, which snapshot is current, the state and definition each was taken in.
Here one JSON file per domain (``<dir>/<uuid>.json``), replaced atomically on every
change, so a restarted agent knows its snapshots again; a corrupt file is set aside, never
fatal. ``dir=None`` keeps everything in memory (the test driver, as test:///default).

The drivers share this: what differs between them is only how the data is taken,
reverted and deleted (QMP jobs, qemu-img, or nothing).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from virtbus.domain import DomainDefinition
from virtbus.domain.model import Disk
from virtbus.domain.snapshot import SnapshotDef
from virtbus.errors import (
    ConfigUnsupported,
    InvalidArgument,
    NoDomainSnapshot,
    NoSupport,
    OperationInvalid,
)
from virtbus.protocol.snapshot import SnapshotInfo
from virtbus.store import atomic_write, quarantine, read_bytes

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DomainSnapshots:
    """One domain's snapshots (insertion order is creation order) and its current one."""

    snapshots: dict[str, SnapshotDef] = field(default_factory=dict)
    current: str | None = None

    def children(self, name: str | None) -> list[str]:
        return [s.name for s in self.snapshots.values() if s.parent == name]

    def descendants(self, name: str) -> list[str]:
        """Every descendant of ``name``, parents before their children."""
        out: list[str] = []
        todo = self.children(name)
        while todo:
            child = todo.pop(0)
            out.append(child)
            todo.extend(self.children(child))
        return out


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
                f" a qcow2 image; its format is {fmt} (external snapshots are not supported yet)"
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


class SnapshotStore:
    """Every domain's :class:`DomainSnapshots`, by domain uuid (see module docstring)."""

    def __init__(self, directory: Path | None) -> None:
        self._dir = directory
        self._domains: dict[str, DomainSnapshots] = {}

    async def load(self) -> None:
        """Read what a previous agent recorded (corrupt files are set aside)."""
        if self._dir is None or not self._dir.is_dir():
            return
        for path in sorted(self._dir.glob("*.json")):
            data = await read_bytes(path)
            if data is None:
                continue
            try:
                raw = json.loads(data)
                tree = DomainSnapshots(
                    {s["name"]: SnapshotDef.from_json(s) for s in raw["snapshots"]},
                    raw.get("current"),
                )
            except (ValueError, KeyError, TypeError) as exc:
                await quarantine(path, f"unreadable snapshot metadata: {exc}")
                continue
            self._domains[path.stem] = tree

    def of(self, uuid: str) -> DomainSnapshots:
        return self._domains.get(uuid) or DomainSnapshots()

    def has_any(self, uuid: str) -> bool:
        return bool(self.of(uuid).snapshots)

    def get(self, uuid: str, domain: str, name: str) -> SnapshotDef:
        snap = self.of(uuid).snapshots.get(name)
        if snap is None:
            raise NoDomainSnapshot(f"domain '{domain}' has no snapshot named '{name}'")
        return snap

    def current(self, uuid: str, domain: str) -> SnapshotDef:
        tree = self.of(uuid)
        if tree.current is None or tree.current not in tree.snapshots:
            raise NoDomainSnapshot(f"domain '{domain}' has no current snapshot")
        return tree.snapshots[tree.current]

    def info(self, uuid: str, domain: str, name: str) -> SnapshotInfo:
        snap = self.get(uuid, domain, name)
        tree = self.of(uuid)
        return SnapshotInfo(
            name=snap.name, domain=domain, state=snap.state,  # type: ignore[arg-type]
            creation_time=snap.creation_time, memory=snap.memory, parent=snap.parent,
            description=snap.description, current=tree.current == snap.name,
            children=len(tree.children(snap.name)),
            descendants=len(tree.descendants(snap.name)),
        )  # fmt: skip

    def infos(self, uuid: str, domain: str) -> list[SnapshotInfo]:
        return [self.info(uuid, domain, name) for name in self.of(uuid).snapshots]

    def check_new(self, uuid: str, domain: str, name: str) -> None:
        if name in self.of(uuid).snapshots:
            raise OperationInvalid(f"domain '{domain}' already has a snapshot named '{name}'")

    async def add(self, uuid: str, snap: SnapshotDef) -> None:
        """Record a new snapshot (a child of the current one) and make it current."""
        tree = self._domains.setdefault(uuid, DomainSnapshots())
        tree.snapshots[snap.name] = snap
        tree.current = snap.name
        await self._save(uuid)

    async def set_current(self, uuid: str, name: str) -> None:
        self._domains.setdefault(uuid, DomainSnapshots()).current = name
        await self._save(uuid)

    def plan_delete(
        self, uuid: str, domain: str, name: str, *, children: bool, children_only: bool
    ) -> list[str]:
        """The snapshots a delete removes, children before parents; a snapshot with
        children is refused unless they go too (its images' data depends on nothing, but
        the tree would be rewritten behind the user's back)."""
        self.get(uuid, domain, name)
        below = self.of(uuid).descendants(name)
        if children_only:
            return list(reversed(below))
        if below and not children:
            raise OperationInvalid(
                f"snapshot '{name}' of domain '{domain}' has {len(below)} descendant(s)"
                f" ({', '.join(below[:5])}): delete them first, or use --children"
            )
        return [*reversed(below), name]

    async def remove(self, uuid: str, names: list[str]) -> None:
        """Forget ``names``; a deleted current snapshot passes 'current' to its parent."""
        tree = self.of(uuid)
        for name in names:
            snap = tree.snapshots.pop(name, None)
            if snap is not None and tree.current == name:
                tree.current = snap.parent
        while tree.current is not None and tree.current not in tree.snapshots:
            tree.current = None
        await self._save(uuid)

    async def forget(self, uuid: str) -> None:
        self._domains.pop(uuid, None)
        if self._dir is not None:
            (self._dir / f"{uuid}.json").unlink(missing_ok=True)

    async def _save(self, uuid: str) -> None:
        if self._dir is None:
            return
        tree = self.of(uuid)
        path = self._dir / f"{uuid}.json"
        if not tree.snapshots:
            path.unlink(missing_ok=True)
            self._domains.pop(uuid, None)
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        snaps = [s.to_json() for s in tree.snapshots.values()]
        body = {"current": tree.current, "snapshots": snaps}
        await atomic_write(path, json.dumps(body).encode())
