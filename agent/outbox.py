"""Events on their way to the broker: stamped, ordered, published with confirms.

The driver's sink stamps each event with the next per-host sequence number and appends it
here without blocking; one publisher task sends them in order and removes an event only
after the broker confirmed it. While the broker is unreachable events wait (bounded by
``capacity``; when full the *oldest* is dropped with a log line, so a subscriber sees the
gap in sequence numbers rather than a silent loss).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from virtbus.aio import backoff_delays
from virtbus.errors import VirtbusError
from virtbus.protocol.envelope import Envelope
from virtbus.settings import Backoff

log = logging.getLogger(__name__)

Publish = Callable[[Envelope], Awaitable[None]]


class EventOutbox:
    def __init__(self, publish: Publish, *, capacity: int, retry: Backoff) -> None:
        self._publish = publish
        self._capacity = capacity
        self._retry = retry
        self._pending: deque[Envelope] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.dropped = 0
        self.published = 0

    def put(self, envelope: Envelope) -> None:
        if len(self._pending) >= self._capacity:
            lost = self._pending.popleft()
            self.dropped += 1
            log.warning(
                "event outbox full (%d): dropped the oldest event seq=%s",
                self._capacity,
                lost.body.get("seq"),
            )
        self._pending.append(envelope)
        self._idle.clear()
        self._wakeup.set()

    def __len__(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        """Publish forever, in order; a failed publish is retried with backoff."""
        while True:
            if not self._pending:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            envelope = self._pending[0]
            delays = backoff_delays(self._retry)
            while True:
                try:
                    await self._publish(envelope)
                    break
                except VirtbusError as exc:
                    delay = next(delays)
                    log.warning(
                        "publishing event seq=%s failed (%s); retry in %.2fs",
                        envelope.body.get("seq"),
                        exc,
                        delay,
                    )
                    await asyncio.sleep(delay)
            if self._pending and self._pending[0] is envelope:
                self._pending.popleft()
            self.published += 1

    async def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far was confirmed; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
