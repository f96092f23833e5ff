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


_CANCEL_WAIT = 5.0  # s for a cancelled restore to end


def _consume_result(task: asyncio.Future[None]) -> None:
    """Retrieve a given-up restore's outcome (no "exception never retrieved")."""
    if not task.cancelled():
        task.exception()


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
        """aio-pika's restore of the channels and its reconnect callbacks, given up (a
        failed attempt) if the new connection closes meanwhile.

        aio-pika (10.2) runs them in its reconnect task, and they wait for the connection
        to be ready (``RobustChannel.get_underlay_channel`` waits for ``connected``, in
        aio-pika's own ``_on_open`` too). A connection that the broker closes right after
        it opened (a cluster node that went: issue 18) clears ``connected`` while they
        wait, and only that very task would set it again: the connection never came back
        and every wait on it (an agent's stop) hung. Raced against the connection's
        closing here, the attempt fails instead and the task tries the next node.
        """
        transport = self.transport
        closing = transport.connection.closing if transport is not None else None
        restore = asyncio.ensure_future(super()._on_connected())
        lost = False
        try:
            if closing is not None:
                await asyncio.wait((restore, closing), return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.wait((restore,))
            lost = not restore.done()
        finally:
            if closing is not None:
                closing.cancel()  # an observer only: the connection is not touched
            if not restore.done():
                restore.cancel()
                # Bounded: aiormq turns a cancellation that lands in an RPC of a closed
                # connection into the connection's error (aiormq.abc.TaskWrapper), which
                # a callback may catch and go on.
                await asyncio.wait((restore,), timeout=_CANCEL_WAIT)
                if not restore.done():
                    log.warning("bus: a cancelled connection restore goes on: left alone")
                restore.add_done_callback(_consume_result)
        if lost:
            raise ConnectionError("the broker closed the connection while it was restored")
        restore.result()
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
