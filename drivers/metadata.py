"""Per-domain metadata trees kept by the agent: snapshots and checkpoints.

libvirt keeps both beside the images that hold their data: a tree of named records, each
with a parent, and the current (newest) one. Here one JSON file per domain
(``<dir>/<uuid>.json``, ``{"current": ..., "<key>": [records]}``), replaced atomically on
every change, so a restarted agent knows its records again; a corrupt file is set aside,
never fatal. ``dir=None`` keeps everything in memory (the test driver, as
test:///default). :class:`~drivers.snapshots.SnapshotStore` and
:class:`~drivers.checkpoints.CheckpointStore` add only what differs: their records, their
errors and their rules for a delete.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from virtbus.store import atomic_write, quarantine, read_bytes


class Record(Protocol):
    """What a tree needs of its records: a name, a parent and a JSON form."""

    @property
    def name(self) -> str: ...

    @property
    def parent(self) -> str | None: ...

    def to_json(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=Record)


@dataclass(slots=True)
class Tree(Generic[R]):
    """One domain's records (insertion order is creation order) and its current one."""

    records: dict[str, R] = field(default_factory=dict)
    current: str | None = None

    def children(self, name: str | None) -> list[str]:
        return [r.name for r in self.records.values() if r.parent == name]

    def descendants(self, name: str) -> list[str]:
        """Every descendant of ``name``, parents before their children."""
        out: list[str] = []
        todo = self.children(name)
        while todo:
            child = todo.pop(0)
            out.append(child)
            todo.extend(self.children(child))
        return out


class TreeStore(Generic[R]):
    """Every domain's :class:`Tree`, by domain uuid (module docstring).

    ``key`` names the records' list in the file (and the kind in error messages);
    ``from_json`` reads one record back.
    """

    def __init__(
        self, directory: Path | None, *, key: str, from_json: Callable[[dict[str, Any]], R]
    ) -> None:
        self._dir = directory
        self._key = key
        self._from_json = from_json
        self._domains: dict[str, Tree[R]] = {}

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
                records = [self._from_json(r) for r in raw[self._key]]
                tree = Tree({r.name: r for r in records}, raw.get("current"))
            except (ValueError, KeyError, TypeError) as exc:
                await quarantine(path, f"unreadable {self._key} metadata: {exc}")
                continue
            self._domains[path.stem] = tree

    def of(self, uuid: str) -> Tree[R]:
        """The domain's tree (an empty one, not stored, when it has none)."""
        return self._domains.get(uuid) or Tree()

    def has_any(self, uuid: str) -> bool:
        return bool(self.of(uuid).records)

    async def add(self, uuid: str, record: R) -> None:
        """Record a new one (a child of the current one) and make it current."""
        tree = self._domains.setdefault(uuid, Tree())
        tree.records[record.name] = record
        tree.current = record.name
        await self._save(uuid)

    async def set_current(self, uuid: str, name: str | None) -> None:
        tree = self._domains.setdefault(uuid, Tree())
        if tree.current == name and tree.records:
            return  # e.g. a revert to the current snapshot: nothing to write (and fsync)
        tree.current = name
        await self._save(uuid)

    async def forget(self, uuid: str) -> None:
        """The domain is gone: its metadata goes with it."""
        self._domains.pop(uuid, None)
        if self._dir is not None:
            (self._dir / f"{uuid}.json").unlink(missing_ok=True)

    async def _save(self, uuid: str) -> None:
        """Write the domain's tree; an empty one removes the file."""
        tree = self.of(uuid)
        if not tree.records:
            await self.forget(uuid)
            return
        if self._dir is None:
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        body = {"current": tree.current, self._key: [r.to_json() for r in tree.records.values()]}
        await atomic_write(self._dir / f"{uuid}.json", json.dumps(body).encode())
