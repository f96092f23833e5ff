"""The robust connection reconnects with exponential, capped, jittered delays."""

from __future__ import annotations

import time

from virtbus.bus.reconnect import connection_class
from virtbus.settings import Backoff


async def test_reconnect_interval_backs_off_and_is_stable_within_an_attempt() -> None:
    cls = connection_class(Backoff(initial=0.1, maximum=0.8, factor=2.0, jitter=0.5))
    conn = cls("amqp://guest:guest@127.0.0.1:1/")
    delays = []
    for _ in range(7):
        first = conn.reconnect_interval
        assert conn.reconnect_interval == first  # logged and slept: the same value
        delays.append(first)
        conn._read_at = time.monotonic() - 1  # the next attempt
    assert 0.05 <= delays[0] <= 0.1
    assert all(d <= 0.8 for d in delays) and delays[-1] >= 0.4  # grew, capped
    conn.reconnect_interval = 5.0  # aio-pika's own setting is ignored
    assert conn.reconnect_interval <= 0.8
