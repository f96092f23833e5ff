"""Events on their way to the broker: numbered, kept on disk, published in order, confirmed.

The driver's sink stamps each event with the next per-host sequence number and hands it
here without blocking. One publisher task first appends new events to the on-disk log
(``<state-dir>/outbox/events.log``, group commit; fsynced while the broker is away), then
publishes them in order with publisher confirms; an event leaves the outbox only once
the broker confirmed it (an ``ack`` record says so).

Confirms are pipelined: up to ``window`` events are published before the first confirm is
awaited (aiormq writes a channel's publishes in the order they are made, and the broker
routes them in that order), then their confirms are taken in order. One confirm round trip
covers a window instead of one event: a backlog after an outage replays at the broker's
pace, not at one round trip per event. With ``publish_window`` (the AMQP bus's) a window
is handed over at once and goes out as one write, one future per event, instead of a
publish task per event (virtbus/bus/amqp_consumers.py, ONE WRITE PER WINDOW); what follows
is the same either way. When a publish of the window fails retryably, the events from that
one on are published again, in order, after the backoff; some of them may have been
confirmed meanwhile, so a subscriber can see a duplicate (it deduplicates by ``(host,
seq)``, as after any redelivery), never a gap. While the broker is unreachable events keep
accumulating on disk and in memory, and after a restart the log gives back both the
unconfirmed events (with their original numbers) and the sequence counter, so numbers
never repeat.

Only what is in the log survives a killed agent, and the publisher appends new events only
between windows: a call's events would wait for the confirms of the window in flight. So
the ack of a call that changed something waits for :meth:`durable` (agent/dispatch.py):
the events stamped so far are written first, as its reply is. Otherwise a define answered
and acked just before a kill -9 had lost its ``defined`` event for good, and the next
agent reused its sequence number: no gap showed it.

Overflow policy: at most ``capacity`` unconfirmed events; past that the *oldest* is
dropped with a warning, so a subscriber sees a gap in the sequence numbers rather than a
silent loss.

Poison: no single event may stop the outbox. A publish that fails for a reason that
retrying cannot fix (a non-retryable error: the event cannot be encoded, its routing key
or size is over a limit, or an unexpected exception) sets that event aside in
``rejected.log`` next to the event log (one JSON line each, with the error) with a warning
and a counter, and the sequence goes on; only a retryable failure (the broker is away)
holds the queue and retries. An event record in the log that cannot be read back — from
an older version, or damaged — is set aside the same way at load.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.statedisk import StateDisk
from virtbus.aio import backoff_delays
from virtbus.errors import ProtocolError, VirtbusError
from virtbus.protocol.codec import decode, encode
from virtbus.protocol.envelope import Envelope
from virtbus.settings import Backoff
from virtbus.store import RecordLog

log = logging.getLogger(__name__)

Publish = Callable[[Envelope], Awaitable[None]]
# A window's events, in order -> one future per event, done when it was confirmed.
PublishWindow = Callable[[list[Envelope]], Awaitable[list["asyncio.Future[None]"]]]
COMPACT_AFTER = 10_000  # records in the log before it is rewritten (when nothing is pending)


def _seq(envelope: Envelope) -> int:
    return int(envelope.body["seq"])


#: the body field each event kind's routing key names (domain events: ``domain``)
_SUBJECTS = {"storage.pool.event": "pool", "network.event": "network", "job.event": "job"}


def event_fault(envelope: Envelope) -> str | None:
    """Why a stored event cannot be published, or None (the fields the publisher needs)."""
    body = envelope.body
    seq = body.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        return f"'seq' must be a positive integer, not {seq!r}"[:200]
    subject = _SUBJECTS.get(envelope.op, "domain")  # what the routing key names
    for key in (subject, "event"):
        if not isinstance(body.get(key), str):
            return f"'{key}' must be a string"
    return None


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"base64": base64.b64encode(value).decode()}
    return repr(value)


class RejectedLog:
    """``rejected.log``: events that could not be published, one JSON line each, kept for
    a human (never replayed). Past ``max_bytes`` it is rotated to ``rejected.log.1``."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self._max_bytes = max_bytes

    async def add(self, entry: dict[str, Any]) -> None:
        line = json.dumps({"rejected_at": time.time(), **entry}, default=_json_default)
        await asyncio.to_thread(self._append, line + "\n")

    def _append(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if self.path.stat().st_size + len(line) > self._max_bytes:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        except FileNotFoundError:
            pass
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)


class EventOutbox:
    def __init__(
        self,
        publish: Publish,
        *,
        path: Path | None,
        capacity: int,
        retry: Backoff,
        rejected_max_bytes: int = 16 << 20,
        window: int = 256,
        disk: StateDisk | None = None,
        publish_window: PublishWindow | None = None,
    ) -> None:
        self._publish = publish
        self._publish_window = publish_window
        self._disk = disk
        if disk is not None:
            disk.on_recover(self.wake)  # write what it owes
        self._window = max(1, window)
        self._log = RecordLog(path) if path is not None else None
        self._rejected = (
            RejectedLog(path.with_name("rejected.log"), rejected_max_bytes)
            if path is not None
            else None
        )
        self._capacity = capacity
        self._retry = retry
        self._seq = 0
        self._pending: deque[Envelope] = deque()  # unconfirmed, oldest first
        self._unsaved: list[Envelope] = []  # not yet in the log
        self._dropped_upto = 0  # oldest events dropped on overflow, not yet recorded
        self._confirmed_upto = 0  # every event up to this one was confirmed
        self._ack_owed = False  # an ack could not be written: the next save writes it
        self._saved_upto = 0  # every event up to this one is in the log (or confirmed)
        self._save_lock = asyncio.Lock()  # one append at a time: the publisher or durable()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._retry_now = False
        self._broker_away = False  # the last publish failed
        self.dropped = 0
        self.published = 0
        self.restored = 0
        self.rejected = 0  # events set aside in rejected.log (poison, never published)

    # --- numbering and queueing (synchronous: called from the driver's sink) ---------
    @property
    def last_seq(self) -> int:
        return self._seq

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def put(self, envelope: Envelope) -> None:
        if len(self._pending) >= self._capacity:
            lost = self._pending.popleft()
            self.dropped += 1
            self._dropped_upto = _seq(lost)
            if self._unsaved and self._unsaved[0] is lost:
                self._unsaved.pop(0)
            log.warning(
                "event outbox full (%d unconfirmed): dropped the oldest event seq=%d",
                self._capacity,
                _seq(lost),
            )
        self._pending.append(envelope)
        self._unsaved.append(envelope)
        self._idle.clear()
        self._wakeup.set()

    def __len__(self) -> int:
        return len(self._pending)

    # --- the log ------------------------------------------------------------------
    async def load(self) -> None:
        """Before the first event: restore the counter and what was never confirmed."""
        if self._log is None:
            return
        acked, highest, events, rejected = 0, 0, [], 0
        for record in await self._log.load():
            if isinstance(record.get("ack"), int) and not isinstance(record["ack"], bool):
                acked = max(acked, record["ack"])
                continue
            raw = record.get("event")
            try:
                if not isinstance(raw, bytes):
                    raise ProtocolError("neither an event nor an ack")
                event = decode(raw)
                fault = event_fault(event)
                if fault is not None:
                    seq = event.body.get("seq")
                    if isinstance(seq, int) and not isinstance(seq, bool):
                        highest = max(highest, seq)  # its number was used: never reuse it
                    raise ProtocolError(fault)
            except ProtocolError as exc:
                await self._reject(None, exc, record=record)
                rejected += 1
                continue
            events.append(event)
        self._seq = max([acked, highest, *(_seq(e) for e in events)])
        self._saved_upto = self._seq
        unconfirmed = sorted((e for e in events if _seq(e) > acked), key=_seq)
        self._pending.extend(unconfirmed[-self._capacity :])
        self.restored = len(self._pending)
        if rejected:  # rewrite without them, so the next start does not reject them again
            await self._log.rewrite(
                [{"ack": acked}, *({"event": encode(e)} for e in self._pending)]
            )
        if self._pending:
            self._idle.clear()
            self._wakeup.set()
            log.info("outbox: %d unconfirmed events from before the restart", self.restored)

    async def _reject(
        self,
        envelope: Envelope | None,
        exc: BaseException,
        *,
        record: dict[str, Any] | None = None,
    ) -> None:
        """Set one poisonous event aside (rejected.log, warning, counter); never raises
        for want of disk: the outbox must go on either way."""
        self.rejected += 1
        seq = envelope.body.get("seq") if envelope is not None else None
        where = self._rejected.path if self._rejected is not None else "nowhere (no state dir)"
        log.warning("outbox: event seq=%s cannot be published (%s): set aside in %s",
                    seq, exc, where)  # fmt: skip
        if self._rejected is None:
            return
        entry: dict[str, Any] = {"seq": seq, "error": f"{type(exc).__name__}: {exc}"}
        if envelope is not None:
            entry["envelope"] = envelope.to_map()
        else:
            entry["record"] = record
        try:
            await self._rejected.add(entry)
        except OSError as err:
            log.error("outbox: cannot write %s: %s", self._rejected.path, err)

    async def durable(self) -> None:
        """Return once every event stamped so far is in the log (at once when it is, or
        when it cannot be written: the StateDisk then refuses new work, see _save)."""
        if self._log is None or self._saved_upto >= self._seq:
            return
        await self._save()

    async def _save(self) -> None:
        async with self._save_lock:
            await self._save_unlocked()

    async def _save_unlocked(self) -> None:
        """Append what is new to the log. When the log cannot be written (a full disk) the
        events stay in memory and are published anyway, the failure goes to the
        StateDisk (which stops new work) and the next save tries again; an event
        confirmed meanwhile is not written any more."""
        if self._log is None:
            self._unsaved, self._dropped_upto = [], 0
            return
        dropped, self._dropped_upto = self._dropped_upto, 0
        batch, self._unsaved = self._unsaved, []
        records: list[dict[str, Any]] = []
        if dropped or self._ack_owed:
            records.append({"ack": max(dropped, self._confirmed_upto)})
        records.extend({"event": encode(e)} for e in batch if _seq(e) > self._confirmed_upto)
        upto = max((_seq(e) for e in batch), default=0)
        if not records:
            self._saved_upto = max(self._saved_upto, upto)
            return
        try:
            # Written before publishing either way (an agent crash loses nothing); synced
            # to the disk only while the broker is away, when the events depend on it.
            await self._log.append(records, fsync=self._broker_away)
        except OSError as exc:
            self._unsaved = [*batch, *self._unsaved]
            self._dropped_upto = max(self._dropped_upto, dropped)
            self._disk_failed(exc)
            return
        self._saved_upto = max(self._saved_upto, upto)
        self._ack_owed = False
        if self._disk is not None:
            self._disk.ok("event outbox")

    def _disk_failed(self, exc: OSError) -> None:
        self._ack_owed = True
        if self._disk is not None:
            self._disk.failed("event outbox", exc)
        else:
            log.error("outbox: cannot write its log: %s", exc)

    async def _write_ack(self, seq: int, before: int) -> None:
        """Everything up to ``seq`` was confirmed (``before``: the last seq recorded so): the
        log gets an ack when the outbox ran empty or ``seq`` crossed a multiple of 64."""
        if self._log is None:
            return
        try:
            async with self._save_lock:  # durable() may be appending meanwhile
                if (not self._pending and not self._unsaved
                        and self._log.records_on_disk > COMPACT_AFTER):  # fmt: skip
                    await self._log.rewrite([{"ack": seq}])
                elif self._ack_owed:
                    await self._save_unlocked()  # the owed ack, with what is new
                elif not self._pending or seq // 64 != before // 64:
                    await self._log.append([{"ack": seq}])
        except OSError as exc:
            self._disk_failed(exc)

    # --- publishing ----------------------------------------------------------------
    async def run(self) -> None:
        """Publish forever, in order, a window at a time; a failed publish is retried with
        capped backoff, from that event on.

        A window's ack record (an fsynced append: milliseconds) is written once the next
        window is on the wire, not before it is published: the broker works meanwhile.
        It is written before the outbox reports itself idle or waits out a backoff, and
        one still owed when the task ends is written by :meth:`save_unsent` (ack owed).
        """
        delays = backoff_delays(self._retry)
        ack: tuple[int, int] | None = None  # (last, before) of a confirmed window, not written
        try:
            while True:
                if self._unsaved or self._dropped_upto or self._ack_owed:
                    await self._save()
                if not self._pending:
                    if ack is not None:
                        await self._write_ack(*ack)
                        ack = None
                        continue  # events may have come meanwhile
                    self._idle.set()
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                batch = list(itertools.islice(self._pending, self._window))
                flying = await self._start(batch)
                if ack is not None:  # the last window's, while this one is on the wire
                    await self._write_ack(*ack)
                    ack = None
                before, last, failed = _seq(batch[0]) - 1, 0, None
                try:
                    for envelope, publish in zip(batch, flying, strict=True):
                        try:
                            await publish
                        except VirtbusError as exc:
                            if exc.retryable:
                                failed = (envelope, exc)
                                break
                            await self._reject(envelope, exc)  # this event's own fault
                        except Exception as exc:  # noqa: BLE001 - a bug must not wedge the outbox
                            await self._reject(envelope, exc)
                        else:
                            self.published += 1
                        if self._pending and self._pending[0] is envelope:
                            self._pending.popleft()
                        last = _seq(envelope)
                finally:
                    rest = [f for f in flying if not f.done()]
                    for f in rest:
                        f.cancel()
                    await asyncio.gather(*flying, return_exceptions=True)
                if last:
                    self._confirmed_upto = max(self._confirmed_upto, last)
                    ack = (last, before)
                if failed is None:
                    delays = backoff_delays(self._retry)
                    self._broker_away = False
                    continue
                if ack is not None:
                    await self._write_ack(*ack)
                    ack = None
                stuck, error = failed
                self._broker_away = True
                delay = next(delays)
                log.warning("publishing event seq=%d failed (%s); retry in %.2fs",
                            _seq(stuck), error, delay)  # fmt: skip
                await self._wait_to_retry(delay)
        finally:
            if ack is not None:
                self._ack_owed = True  # the next save (save_unsent at stop) writes it

    async def _start(self, batch: list[Envelope]) -> list[asyncio.Future[None]]:
        """Publish the window's events in order: one future per event, done when the
        broker confirmed it."""
        if self._publish_window is None:
            # Created in order, started in order: the publishes reach the channel in order.
            return [asyncio.ensure_future(self._publish(e)) for e in batch]
        try:
            flying = await self._publish_window(batch)
        except Exception as exc:  # noqa: BLE001 - a bug must not wedge the outbox
            flying = []
            for _ in batch:
                failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                failed.set_exception(exc)
                flying.append(failed)
        if len(flying) != len(batch):
            raise AssertionError(f"{len(flying)} futures for a window of {len(batch)} events")
        return flying

    async def _wait_to_retry(self, delay: float) -> None:
        """Sleep out the backoff, still saving new events to disk; a restored connection
        (``wake(retry=True)``) ends the wait at once."""
        deadline = asyncio.get_running_loop().time() + delay
        self._retry_now = False
        while not self._retry_now:
            self._wakeup.clear()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            try:
                async with asyncio.timeout(left):
                    await self._wakeup.wait()
            except TimeoutError:
                return
            if self._unsaved or self._dropped_upto or self._ack_owed:
                await self._save()

    def wake(self, *, retry: bool = False) -> None:
        """Nudge the publisher; ``retry`` cuts a backoff wait short (the bus is back)."""
        self._retry_now = self._retry_now or retry
        self._wakeup.set()

    async def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far was confirmed; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def save_unsent(self) -> bool:
        """At stop, after the publisher task ended: what is still in memory goes to disk;
        False when it could not be written (a full disk)."""
        await self._save()
        return not self._unsaved
