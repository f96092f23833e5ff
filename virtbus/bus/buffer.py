"""A bounded, closable FIFO shared by the subscriptions of both transports.

``asyncio.Queue`` cannot be closed and blocks the producer when full; a subscription
needs neither: its producer is a broker callback that must not block, and the bound is
enforced upstream (AMQP prefetch) or by dropping the oldest item (memory://).
"""

from __future__ import annotations

import asyncio
from collections import deque
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
