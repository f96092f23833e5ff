"""The audit trail of a daemon: every call it served or refused, on disk and on the bus.

Each call becomes an :class:`~virtbus.protocol.messages.AuditRecord` (user, op, target,
result code, duration). :meth:`AuditTrail.record` is called on the call path, so it only
appends to a bounded buffer and wakes the writer task. The writer waits a short window
(``FLUSH_WINDOW``) for the records of the calls that follow, so a busy daemon pays one
write and one thread hop for many calls, not one each; then it appends the records as JSON
lines to the daemon's audit log (in a worker thread: the event loop never waits on the
disk), rotating it by size (``audit.log`` -> ``audit.log.1`` ... ``.N``), and
then publishes them on ``virtbus.audit``, whose stream ``virtbus.audit.history`` keeps
them for ``virtbus audit``: one ``audit.calls`` message per run of consecutive records of
the same user (at most ``BATCH`` records), not one per call. The file is the record that
survives a broker outage: publishing is best effort (a record the broker did not take is
logged, not retried).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from virtbus.errors import VirtbusError
from virtbus.protocol.base import decode, to_wire
from virtbus.protocol.envelope import Envelope, Kind
from virtbus.protocol.messages import AUDIT_CALLS, MESSAGES, AuditBatch, AuditRecord

log = logging.getLogger(__name__)

Publish = Callable[[str, Envelope], Awaitable[None]]  # (routing key, envelope)
BUFFER = 100_000  # records waiting for the writer; the oldest go first (counted, logged)
# s the writer waits, once woken, for more records before it writes: a stop, or an explicit
# flush(), writes what is pending at once, so no record is lost to the window.
FLUSH_WINDOW = 0.05
BATCH = 500  # records per audit.calls message (~150 bytes each: far below the message limit)


def result_code(reply: dict[str, Any]) -> str:
    """``OK`` or the error code of a reply body."""
    if reply.get("ok"):
        return "OK"
    error = reply.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else "RPC_ERROR"


_ENCODER = msgspec.json.Encoder(order="sorted")  # a JSON line per record, keys sorted


class AuditTrail:
    """One daemon's audit log and its publisher (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        daemon: str,
        *,
        max_bytes: int,
        keep: int,
        publish: Publish | None = None,
    ) -> None:
        self.path = path
        self.daemon = daemon
        self._max_bytes = max_bytes
        self._keep = keep
        self._publish = publish
        self._pending: deque[AuditRecord] = deque()
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()  # one flush at a time: records leave in call order
        self.dropped = 0  # records lost because the writer fell behind by BUFFER
        self.written = 0

    def record(
        self,
        call: Envelope,
        target: str | None,
        reply: dict[str, Any],
        seconds: float,
    ) -> None:
        """Note one answered call; never blocks (the writer task does the I/O)."""
        rec = AuditRecord(
            ts=time.time() - seconds, daemon=self.daemon, user=call.user, op=call.op, target=target,
            code=result_code(reply), ms=round(seconds * 1000, 3), id=call.id, src=call.src,
        )  # fmt: skip
        if len(self._pending) >= BUFFER:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(rec)
        self._wake.set()

    async def run(self) -> None:
        """The writer: a supervised task for the daemon's lifetime."""
        while True:
            await self._wake.wait()
            await asyncio.sleep(FLUSH_WINDOW)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write (and publish) what is pending now, after any flush already under way (a
        second flush overtaking the writer's would publish newer records first)."""
        async with self._flushing:
            batch = list(self._pending)
            self._pending.clear()
            if not batch:
                return
            lines = b"".join(_ENCODER.encode(r) + b"\n" for r in batch)
            try:
                await asyncio.to_thread(self._append, lines)
                self.written += len(batch)
            except OSError as exc:  # a full disk must not stop the daemon serving
                log.error("cannot write the audit log %s: %s", self.path, exc)
            if self._publish is not None:
                for run in runs_of_one_user(batch):
                    await self._send(run)

    async def _send(self, run: list[AuditRecord]) -> None:
        assert self._publish is not None
        first = run[0]
        key = MESSAGES[AUDIT_CALLS].key(daemon=first.daemon, user=first.user or "-")
        body = to_wire(AuditBatch(records=run))
        env = Envelope(kind=Kind.AUDIT, op=AUDIT_CALLS, body=body, src=self.daemon)
        try:
            await self._publish(key, env)
        except VirtbusError as exc:
            log.debug("%d audit records from %s not published: %s", len(run), first.id, exc)

    def _append(self, data: bytes) -> None:
        """Append, rotating first when the file would pass ``max_bytes`` (worker thread)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self._max_bytes:
            for i in range(self._keep - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def runs_of_one_user(records: list[AuditRecord]) -> list[list[AuditRecord]]:
    """``records`` cut where the user changes (or every ``BATCH``): each run is one message
    under its user's routing key, and the runs in order keep the calls' order."""
    runs: list[list[AuditRecord]] = []
    for rec in records:
        if runs and runs[-1][0].user == rec.user and len(runs[-1]) < BATCH:
            runs[-1].append(rec)
        else:
            runs.append([rec])
    return runs


def read_log(path: Path) -> list[AuditRecord]:
    """The records of an audit log and its rotated files, oldest first (bad lines skipped)."""
    files = sorted(
        path.parent.glob(f"{path.name}.*"),
        key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0,
        reverse=True,
    )
    records: list[AuditRecord] = []
    for file in [*files, path]:
        if not file.exists():
            continue
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(decode(json.loads(line), AuditRecord))
            except (ValueError, VirtbusError):
                continue
    return records
