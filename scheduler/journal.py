"""The migration journal: one JSON file per migration in flight, written atomically.

The coordinator writes a record *before* each remote step (write-ahead), so a scheduler
that restarts knows how far a migration may have got and can ask both agents for the
truth. Writes go to a temp file, then are renamed over the old one, in a worker thread so
the event loop never blocks on the disk. ``fsync`` (file and directory) is optional: it
guards against losing the scheduler's *host*, not its process (the page cache survives a
killed scheduler), costs 10-200 ms per phase on a busy disk, and a journal left one phase
behind is still resolved safely because recovery asks both agents what really happened.
A finished migration's file is removed. The set of draining hosts lives here too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from virtbus.errors import VirtbusError
from virtbus.protocol.base import decode, to_wire
from virtbus.protocol.migration import (
    TERMINAL_STATES,
    MigrationParams,
    MigrationPhase,
    RecordState,
)
from virtbus.protocol.migration import MigrationRecord as MigrationRecordMessage
from virtbus.store import quarantine, replace_file

log = logging.getLogger(__name__)


@dataclass(slots=True)
class MigrationRecord:
    domain: str
    uuid: str
    source: str
    destination: str
    params: MigrationParams
    timeout: float
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: RecordState = RecordState.QUEUED
    phase: MigrationPhase = MigrationPhase.QUEUED
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    uri: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    cancel_requested: bool = False
    drain: str | None = None  # the host being drained, when a drain asked for it
    history: list[tuple[str, float]] = field(default_factory=list)  # (phase, time)
    # steps a silent host still owes (scheduler/cleanup.py): {host, op, success}, in order
    cleanup: list[dict[str, Any]] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def deadline(self) -> float:
        return (self.started or self.created) + self.timeout

    def enter(self, phase: MigrationPhase) -> None:
        now = time.time()
        self.phase, self.updated = phase, now
        self.history.append((phase, now))

    def to_map(self) -> dict[str, Any]:
        """Plain values: the journal's JSON, and the wire map."""
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["params"] = to_wire(self.params)
        data["history"] = [list(h) for h in self.history]
        data["cleanup"] = [dict(step) for step in self.cleanup]
        return data

    def to_wire(self) -> MigrationRecordMessage:
        return msgspec.convert(self.to_map(), MigrationRecordMessage)

    @classmethod
    def from_map(cls, data: dict[str, Any]) -> MigrationRecord:
        """A journaled record, checked as the wire type (ValueError when malformed)."""
        msg = decode(data, MigrationRecordMessage)
        fields = {k: getattr(msg, k) for k in cls.__dataclass_fields__}
        fields["history"] = [(str(p), float(t)) for p, t in msg.history]
        return cls(**fields)


class Journal:
    """``<state-dir>/migrations/<id>.json`` and ``<state-dir>/draining.json``."""

    def __init__(self, state_dir: Path, fsync: bool = False) -> None:
        self.dir = state_dir / "migrations"
        self._fsync = fsync
        self._draining = state_dir / "draining.json"
        self._lock = asyncio.Lock()  # one writer at a time: renames never race

    async def open(self) -> None:
        await asyncio.to_thread(self.dir.mkdir, parents=True, exist_ok=True)

    async def save(self, record: MigrationRecord) -> None:
        record.updated = time.time()
        data = json.dumps(record.to_map(), sort_keys=True).encode()
        async with self._lock:
            await asyncio.to_thread(
                replace_file, self.dir / f"{record.id}.json", data, fsync=self._fsync
            )

    async def remove(self, record: MigrationRecord) -> None:
        async with self._lock:
            await asyncio.to_thread((self.dir / f"{record.id}.json").unlink, True)

    async def load(self) -> list[MigrationRecord]:
        """Every record on disk; a corrupt file is set aside (quarantined), never fatal."""
        records, bad = await asyncio.to_thread(self._load_sync)
        for path, reason in bad:
            try:
                await quarantine(path, f"unreadable journal file: {reason}")
            except OSError as exc:  # cannot even rename it: skip it, load the rest
                log.error("journal file %s is unreadable (%s) and stays: %s", path, reason, exc)
        return records

    def _load_sync(self) -> tuple[list[MigrationRecord], list[tuple[Path, str]]]:
        records, bad = [], []
        for path in sorted(self.dir.glob("*.json")):
            try:
                records.append(MigrationRecord.from_map(json.loads(path.read_bytes())))
            except (OSError, ValueError, TypeError, KeyError, AttributeError, VirtbusError) as exc:
                bad.append((path, f"{type(exc).__name__}: {exc}"))
        return records, bad

    async def save_draining(self, hosts: set[str]) -> None:
        data = json.dumps(sorted(hosts)).encode()
        async with self._lock:
            await asyncio.to_thread(replace_file, self._draining, data, fsync=True)

    async def load_draining(self) -> set[str]:
        def read() -> set[str]:
            try:
                value = json.loads(self._draining.read_bytes())
            except FileNotFoundError:
                return set()
            except (OSError, ValueError) as exc:
                log.error("%s is unreadable (%s): no host is draining", self._draining, exc)
                return set()
            return {str(h) for h in value} if isinstance(value, list) else set()

        return await asyncio.to_thread(read)
