"""aio-pika's robust connection, reconnecting with virtbus's backoff.

aio-pika retries at a fixed ``reconnect_interval``; a broker that comes back to hundreds
of agents at once would see them all at the same instant. Here the interval is
exponential, capped and jittered (:class:`virtbus.settings.Backoff`) and starts again
from the beginning once a connection is made.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from aio_pika import RobustConnection

from virtbus.aio import backoff_delays
from virtbus.settings import Backoff

# aio-pika reads the interval twice per attempt (to log it, then to sleep): both reads
# within this window get the same delay, the next attempt the next one.
_SAME_ATTEMPT = 0.05  # s


class BackoffRobustConnection(RobustConnection):
    policy: Backoff = Backoff()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._delays: Iterator[float] = backoff_delays(self.policy)
        self._delay = self.policy.initial
        self._read_at = 0.0
        super().__init__(*args, **kwargs)

    @property
    def reconnect_interval(self) -> float:
        now = time.monotonic()
        if now - self._read_at > _SAME_ATTEMPT:
            self._delay = next(self._delays)
        self._read_at = now
        return self._delay

    @reconnect_interval.setter
    def reconnect_interval(self, _value: float) -> None:
        """aio-pika sets its fixed interval here; the policy decides instead."""

    async def _on_connected(self) -> None:
        await super()._on_connected()
        self._delays = backoff_delays(self.policy)
        self._read_at = 0.0


def connection_class(policy: Backoff) -> type[BackoffRobustConnection]:
    """A connection class bound to ``policy`` (aio-pika instantiates it itself)."""
    return type("VirtbusRobustConnection", (BackoffRobustConnection,), {"policy": policy})
