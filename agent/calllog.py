"""The replies of commands that changed something, kept on disk for redeliveries.

A command whose agent died after executing it but before acking it comes back from the
broker (``redelivered``). The restarted agent must answer it, not run it again, so the
reply is appended here *before* the transport acks the call. Writes are batched (group
commit, no fsync: this guards against a crashed agent, not a lost host) and the file is
compacted to the last ``keep`` replies.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from pathlib import Path
from typing import Any

from agent.statedisk import StateDisk
from virtbus.store import RecordLog, encode_record

log = logging.getLogger(__name__)

Reply = dict[str, Any]


def _encodable(record: dict[str, Any]) -> bool:
    """False (and logged) for a reply msgpack cannot store; it is answered, not recorded."""
    try:
        encode_record(record)
    except (TypeError, ValueError, OverflowError) as exc:
        log.error("reply to call %s cannot be recorded: %s", record.get("id"), exc)
        return False
    return True


class CallLog:
    def __init__(self, path: Path, keep: int, disk: StateDisk | None = None) -> None:
        self._log = RecordLog(path, fsync=False)
        self._disk = disk
        self._keep = keep
        self._recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self._batch: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def load(self) -> list[tuple[str, str | None, Reply]]:
        """The remembered (call id, fingerprint, reply), oldest first; the fingerprint
        (op and body digest) is None in records of versions that did not keep one."""
        for record in await self._log.load():
            fingerprint = record.get("fp")
            if (
                isinstance(record.get("id"), str)
                and isinstance(record.get("reply"), dict)
                and (fingerprint is None or isinstance(fingerprint, str))
            ):
                self._recent.append(record)
        return [(r["id"], r.get("fp"), r["reply"]) for r in self._recent]

    def record(self, call_id: str, fingerprint: str, reply: Reply) -> asyncio.Future[None]:
        """Queue one reply for the disk; the future is done once it was written."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._batch.append(({"id": call_id, "fp": fingerprint, "reply": reply}, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="agent:call-log")
        return done

    async def _write(self) -> None:
        while self._batch:
            batch, self._batch = self._batch, []
            records = [record for record, _ in batch]
            try:
                try:
                    await self._store(records)
                except (TypeError, ValueError, OverflowError):  # msgpack refused a reply
                    records = [r for r in records if _encodable(r)]
                    await self._store(records)
            except OSError as exc:  # answer anyway: a lost record only risks a re-run
                log.error("cannot record %d replies in %s: %s", len(batch), self._log.path, exc)
                if self._disk is not None:
                    self._disk.failed("reply log", exc)
            else:
                if self._disk is not None:
                    self._disk.ok("reply log")
            finally:
                # Always settle: a call's ack waits for this, and its domain's chain too.
                self._recent.extend(records)
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

    async def _store(self, records: list[dict[str, Any]]) -> None:
        if self._log.records_on_disk + len(records) > 2 * self._keep:
            await self._log.rewrite([*self._recent, *records][-self._keep :])
        else:
            await self._log.append(records)

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.wait([self._writer])
        self._log.close()
