"""A bounded, closable FIFO shared by the subscriptions of both transports.

``asyncio.Queue`` cannot be closed and blocks the producer when full; a subscription
needs neither: its producer is a broker callback that must not block, and the bound is
enforced upstream (AMQP prefetch) or by dropping the oldest item (memory://).

A history stream is the exception: RabbitMQ delivers a stream in whole chunks, past the
prefetch count, so the bound there is kept by :class:`StreamWindow` (flow control by
offset) and a history read never drops.
"""

from __future__ import annotations

import asyncio
from collections import deque
from datetime import datetime
from enum import Enum
from typing import Generic, TypeVar

T = TypeVar("T")


class BoundedBuffer(Generic[T]):
    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("buffer size must be at least 1")
        self._items: deque[T] = deque()
        self._maxsize = maxsize
        self._wakeup = asyncio.Event()
        self._closed = False
        self.dropped = 0  # items pushed out because the buffer was full

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def maxsize(self) -> int:
        return self._maxsize

    def push(self, item: T) -> T | None:
        """Append ``item``; when full, drop and return the oldest item."""
        dropped: T | None = None
        if len(self._items) >= self._maxsize:
            dropped = self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self._wakeup.set()
        return dropped

    async def get(self) -> T:
        """Next item; raises StopAsyncIteration once closed and drained."""
        while True:
            if self._items:
                return self._items.popleft()
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    def close(self) -> list[T]:
        """Stop the iteration; returns the items that were never read."""
        self._closed = True
        left = list(self._items)
        self._items.clear()
        self._wakeup.set()
        return left


class Admit(Enum):
    KEEP = "keep"  # buffer it
    SKIP = "skip"  # already kept (a resumed consumer's overlap) or arriving while paused
    PAUSE = "pause"  # the buffer is full: stop the consumer, read it again from here later


class StreamWindow:
    """Where a history read stands, so it can stop and resume without a loss or a repeat.

    Each stream delivery carries its ``x-stream-offset``. When the buffer is full the
    transport cancels its consumer (:attr:`Admit.PAUSE`) and lets go of what still
    arrives; once the reader has taken half, it consumes again from :meth:`resume_from`,
    the first offset not kept. A reconnect resumes there too, not from the original start
    (which replayed the whole stream into a full buffer).
    """

    __slots__ = ("_capacity", "next", "paused", "start")

    def __init__(self, start: str | datetime, capacity: int) -> None:
        self.start = start
        self.next: int | None = None  # the offset after the last one kept
        self.paused = False
        self._capacity = capacity

    def resume_from(self) -> str | datetime | int:
        return self.next if self.next is not None else self.start

    def admit(self, offset: int | None, buffered: int) -> Admit:
        if self.paused or (offset is not None and self.next is not None and offset < self.next):
            return Admit.SKIP
        if buffered >= self._capacity:
            self.paused = True
            return Admit.PAUSE
        if offset is not None:
            self.next = offset + 1
        return Admit.KEEP

    def may_resume(self, buffered: int) -> bool:
        return self.paused and buffered <= self._capacity // 2

    def resume(self) -> None:
        """The transport consumes again from :meth:`resume_from`."""
        self.paused = False


def stream_offset_of(headers: object) -> int | None:
    """The ``x-stream-offset`` RabbitMQ puts on each delivery from a stream."""
    if isinstance(headers, dict):
        value = headers.get("x-stream-offset")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
