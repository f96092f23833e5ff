"""aio-pika's robust connection, reconnecting with virtbus's backoff, node after node.

aio-pika retries at a fixed ``reconnect_interval``; a broker that comes back to hundreds
of agents at once would see them all at the same instant. Here the interval is
exponential, capped and jittered (:class:`virtbus.settings.Backoff`) and starts again
from the beginning once a connection is made.

aio-pika also reconnects only to the URL it was given. Here the connection knows the
nodes of a cluster (:func:`virtbus.bus.nodes.bus_nodes`) and every failure (a lost
connection, a failed attempt) moves it to the next node: a stopped node costs one
attempt, not a wait for that node to come back.

aio-pika (10.2) also swallows a cancellation that lands in a reconnect attempt unless the
connection was closed, and tries again: a task cancelled by a stopping daemon or a closing
event loop (a bus someone forgot to close) would reconnect for ever, and the loop's
shutdown would wait for it for ever. aio-pika reads ``reconnect_interval`` in that very
branch, so the interval re-raises a cancellation its task has pending.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from aio_pika import RobustConnection
from yarl import URL

from virtbus.aio import backoff_delays
from virtbus.bus.nodes import redacted
from virtbus.settings import Backoff

log = logging.getLogger(__name__)

# aio-pika reads the interval twice per failure (to log it, then to sleep): both reads
# within this window get the same delay, the next failure the next one.
_SAME_ATTEMPT = 0.05  # s


class BackoffRobustConnection(RobustConnection):
    policy: Backoff = Backoff()
    nodes: tuple[URL, ...] = ()  # empty: only the URL aio-pika was given

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._delays: Iterator[float] = backoff_delays(self.policy)
        self._delay = self.policy.initial
        self._read_at = 0.0
        self._node = 0
        self._connected_since_draw = False
        super().__init__(*args, **kwargs)

    # aio-pika connects to ``self.url`` on every attempt: the current node's.
    @property
    def url(self) -> URL:
        return self.nodes[self._node] if self.nodes else self._given_url

    @url.setter
    def url(self, value: URL) -> None:
        if self.nodes and value.password != self.nodes[self._node].password:
            # update_secret: every node's URL takes the new secret
            self.nodes = tuple(n.with_password(value.password) for n in self.nodes)
        self._given_url = value

    @property
    def reconnect_interval(self) -> float:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError  # see the module docstring: never swallowed
        now = time.monotonic()
        if now - self._read_at > _SAME_ATTEMPT:
            self._delay = next(self._delays)
            # One new delay per failure; the read aio-pika makes after a success is none.
            if self._connected_since_draw:
                self._connected_since_draw = False
            else:
                self._next_node()
        self._read_at = now
        return self._delay

    @reconnect_interval.setter
    def reconnect_interval(self, _value: float) -> None:
        """aio-pika sets its fixed interval here; the policy decides instead."""

    def _next_node(self) -> None:
        if len(self.nodes) > 1:
            self._node = (self._node + 1) % len(self.nodes)
            log.info("bus: the next attempt goes to %s", redacted(str(self.nodes[self._node])))

    async def _on_connected(self) -> None:
        await super()._on_connected()
        self._delays = backoff_delays(self.policy)
        self._read_at = 0.0
        self._connected_since_draw = True


def connection_class(policy: Backoff, nodes: Sequence[str] = ()) -> type[BackoffRobustConnection]:
    """A connection class bound to ``policy`` and the cluster's ``nodes``, the first one
    tried first (aio-pika instantiates the class itself)."""
    return type(
        "VirtbusRobustConnection",
        (BackoffRobustConnection,),
        {"policy": policy, "nodes": tuple(URL(n) for n in nodes)},
    )
