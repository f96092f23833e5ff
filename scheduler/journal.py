"""The migration journal: on the bus (:class:`BusJournal`, what the scheduler uses), with
one JSON file per migration in flight in the state dir as its local cache (:class:`Journal`).

The coordinator writes a record *before* each remote step (write-ahead), so a scheduler
that restarts knows how far a migration may have got and can ask both agents for the
truth. Writes go to a temp file, then are renamed over the old one, in a worker thread so
the event loop never blocks on the disk. ``fsync`` (file and directory) is optional: it
guards against losing the scheduler's *host*, not its process (the page cache survives a
killed scheduler), costs 10-200 ms per phase on a busy disk, and a journal left one phase
behind is still resolved safely because recovery asks both agents what really happened.
A finished migration's file is removed. The set of draining hosts lives here too.
Cluster networks live only on the bus (:meth:`BusJournal.save_network`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec

from virtbus.aio import backoff_delays
from virtbus.bus.base import Bus
from virtbus.bus.topology import JOURNAL_EXCHANGE
from virtbus.errors import BusUnavailable, InvalidArgument, VirtbusError
from virtbus.protocol.base import decode, to_wire
from virtbus.protocol.envelope import Envelope, Kind
from virtbus.protocol.messages import (
    JOURNAL_RECORD,
    MESSAGES,
    ClusterNetworkRecord,
    JournalEntry,
)
from virtbus.protocol.migration import (
    TERMINAL_STATES,
    MigrationParams,
    MigrationPhase,
    RecordState,
)
from virtbus.protocol.migration import MigrationRecord as MigrationRecordMessage
from virtbus.settings import Backoff
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


class MigrationJournal(Protocol):
    """What the coordinator, the cleanups and the service need of a journal."""

    async def open(self) -> None: ...
    async def save(self, record: MigrationRecord) -> None: ...
    async def remove(self, record: MigrationRecord) -> None: ...
    async def load(self) -> list[MigrationRecord]: ...
    async def save_draining(self, hosts: set[str]) -> None: ...
    async def load_draining(self) -> set[str]: ...


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
        await self.write(record)

    async def write(self, record: MigrationRecord) -> None:
        """:meth:`save` without stamping ``updated``."""
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


REPLAY_TIMEOUT = 60.0  # s to read the journal stream to the replaying scheduler's mark


@dataclass(slots=True)
class Replayed:
    """What a replay of the journal stream found: the live state."""

    records: dict[str, MigrationRecord]
    draining: set[str]
    networks: dict[str, ClusterNetworkRecord]


class BusJournal:
    """The journal on the bus: every save, removal and drain set is appended, persistent
    and confirmed, to the stream ``virtbus.scheduler.journal`` (``JOURNAL_EXCHANGE``),
    which a RabbitMQ cluster replicates like the call queues. A scheduler that becomes
    active reads the stream up to a mark of its own; the newest entry per id wins, a
    ``removed`` entry ends a migration (``network-removed`` a cluster network). A standby
    on another machine therefore needs no shared directory. The state dir keeps the file
    journal as a local cache: it adds only records of ids the stream does not know at all
    (a scheduler upgraded from the file journal, entries older than the retention), never
    overrides the stream. Cluster networks have no cache: the stream is their store.

    Compaction: the active scheduler appends every live record, every cluster network and
    the drain set again once it has replayed, so the stream's oldest segments hold only
    finished or superseded entries and its retention (``x-max-age``) drops them.

    Only entries published by the scheduler's own bus user are believed: RabbitMQ
    checks ``user_id``, and other users may be able to publish on the exchange.
    """

    def __init__(self, bus: Bus, cache: Journal, replay_timeout: float = REPLAY_TIMEOUT) -> None:
        self.bus = bus
        self.cache = cache
        self._replay_timeout = replay_timeout
        self._replayed: Replayed | None = None
        self._lock = asyncio.Lock()  # entries go out in the order they were made
        self._delays = Backoff(initial=0.2, maximum=5.0)

    async def open(self) -> None:
        await self.cache.open()

    async def save(self, record: MigrationRecord) -> None:
        """Appended to the stream and written to the cache at once; returns when both are
        done (the coordinator's next step waits for it), raising what failed."""
        record.updated = time.time()
        entry = JournalEntry(entry="migration", id=record.id, record=record.to_wire())
        written = await asyncio.gather(
            self.cache.write(record), self._append(entry), return_exceptions=True
        )
        for outcome in written:
            if isinstance(outcome, BaseException):
                raise outcome

    async def remove(self, record: MigrationRecord) -> None:
        await self.cache.remove(record)
        await self._append(JournalEntry(entry="removed", id=record.id))

    async def save_draining(self, hosts: set[str]) -> None:
        await self.cache.save_draining(hosts)
        await self._append(JournalEntry(entry="draining", id="draining", hosts=sorted(hosts)))

    async def save_network(self, network: ClusterNetworkRecord) -> None:
        """A cluster network, defined or changed (the stream is its only store)."""
        await self._append(JournalEntry(entry="network", id=network.name, network=network))

    async def remove_network(self, name: str) -> None:
        await self._append(JournalEntry(entry="network-removed", id=name))

    async def load(self) -> list[MigrationRecord]:
        return list((await self._replay()).records.values())

    async def load_draining(self) -> set[str]:
        return set((await self._replay()).draining)

    async def load_networks(self) -> list[ClusterNetworkRecord]:
        return list((await self._replay()).networks.values())

    async def _append(self, entry: JournalEntry) -> None:
        """Publish ``entry`` confirmed; while the bus is away, retry (write-ahead: the
        coordinator's next remote step waits for it, and needs the bus anyway)."""
        envelope = Envelope(kind=Kind.JOURNAL, op=JOURNAL_RECORD, body=to_wire(entry),
                            src=self.bus.src)  # fmt: skip
        key = MESSAGES[JOURNAL_RECORD].key(entry=entry.entry, id=entry.id)
        delays = backoff_delays(self._delays)
        async with self._lock:
            while True:
                try:
                    await self.bus.publish(JOURNAL_EXCHANGE, key, envelope, confirm=True)
                    return
                except BusUnavailable as exc:
                    delay = next(delays)
                    log.warning("journal entry %s %s not appended (%s): retry in %.1fs",
                                entry.entry, entry.id, exc, delay)  # fmt: skip
                    await asyncio.sleep(delay)

    async def _replay(self) -> Replayed:
        if self._replayed is None:
            self._replayed = await self._read()
            for record in self._replayed.records.values():  # compaction (see the class)
                await self.save(record)
            for network in self._replayed.networks.values():
                await self.save_network(network)
            await self.save_draining(self._replayed.draining)
            await self._sync_cache(self._replayed.records)
        return self._replayed

    async def _read(self) -> Replayed:
        mark = uuid.uuid4().hex
        sub = await self.bus.history("first", JOURNAL_EXCHANGE)
        records: dict[str, MigrationRecord] = {}
        seen: set[str] = set()  # every id the stream knows, removed ones included
        draining: set[str] | None = None
        networks: dict[str, ClusterNetworkRecord] = {}
        entries = 0
        try:
            await self._append(JournalEntry(entry="mark", id=mark))
            async with asyncio.timeout(self._replay_timeout):
                async for env in sub:
                    if env.kind != Kind.JOURNAL or env.user != self.bus.user:
                        continue
                    try:
                        entry = decode(env.body, JournalEntry)
                        if entry.entry == "migration" and entry.record is not None:
                            record = MigrationRecord.from_map(to_wire(entry.record))
                    except (InvalidArgument, ValueError) as exc:
                        log.error("skipping a bad journal entry %s: %s", env.id, exc)
                        continue
                    entries += 1
                    if entry.entry == "mark":
                        if entry.id == mark:
                            break
                    elif entry.entry == "migration" and entry.record is not None:
                        records[entry.id] = record
                        seen.add(entry.id)
                    elif entry.entry == "removed":
                        records.pop(entry.id, None)
                        seen.add(entry.id)
                    elif entry.entry == "draining":
                        draining = set(entry.hosts)
                    elif entry.entry == "network" and entry.network is not None:
                        networks[entry.id] = entry.network
                    elif entry.entry == "network-removed":
                        networks.pop(entry.id, None)
        except TimeoutError:
            raise BusUnavailable(
                f"the journal stream was not read to its end within {self._replay_timeout:g}s"
            ) from None
        finally:
            await sub.close()
        # What the stream never knew (a scheduler upgraded from the file journal, entries
        # older than the stream's retention) comes from the cache: recovery asks the agents.
        cached = [r for r in await self.cache.load() if r.id not in seen]
        records.update((r.id, r) for r in cached)
        if draining is None:
            draining = await self.cache.load_draining()
        log.info("journal replayed: %d entries from the bus, %d record(s) only in the local"
                 " cache, %d in flight, %d cluster network(s)", entries, len(cached),
                 len(records), len(networks))  # fmt: skip
        return Replayed(records, draining, networks)

    async def _sync_cache(self, records: dict[str, MigrationRecord]) -> None:
        """The local cache holds what the bus holds: stale files of migrations another
        scheduler finished are removed."""
        for cached in await self.cache.load():
            if cached.id not in records:
                await self.cache.remove(cached)
