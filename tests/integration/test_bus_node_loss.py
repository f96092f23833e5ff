"""The two ways a lost RabbitMQ node kept a server off the bus (issue 18), one test each.

- A connection that closes while aio-pika restores it (its reconnect callbacks wait for
  the connection to be ready, in the very task that would make it ready) must count as a
  failed attempt, not hang for ever (virtbus/bus/reconnect.py ``_on_connected``). Over the
  shared broker: the test closes its own connection from inside the restore.
- A reply to a caller whose node has stopped makes RabbitMQ 3.10/3.11 close the server's
  connection (541 INTERNAL_ERROR); the call comes back, and must be acked before its reply
  goes again (virtbus/bus/amqp_consumers.py, POISONED REPLIES). Over 3 nodes of the
  test's own (tests/rabbitnode.py).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest

from tests.rabbitnode import RabbitCluster, rabbit_cluster
from virtbus.bus.amqp import AmqpBus
from virtbus.bus.topology import HOSTS_EXCHANGE, call_queue_for
from virtbus.errors import BusUnavailable
from virtbus.protocol.envelope import Envelope, Kind, ok_body
from virtbus.settings import Backoff, BusSettings

pytestmark = pytest.mark.rabbitmq

URL = "amqp://guest:guest@127.0.0.1:5672/"
BACKOFF = Backoff(initial=0.1, maximum=0.5)
WAIT = 20.0  # s: a bound, not a figure


def _listener(event: asyncio.Event) -> Any:
    def on_link(up: bool) -> None:
        if up:
            event.set()

    return on_link


async def test_a_connection_closed_while_it_is_restored_comes_back(rabbitmq: None) -> None:
    bus = AmqpBus(URL, "node-loss-test", BusSettings(url=URL, reconnect=BACKOFF))
    await bus.connect()
    try:
        restores = 0
        check = bus._ensure_topology

        async def closed_during_the_first_restore(connection: Any) -> None:
            # The broker closes the new connection mid-restore (a node that just went, a
            # reply it refuses): the rest of the restore needs a connection not there.
            nonlocal restores
            restores += 1
            if restores == 1:
                transport = connection.transport
                assert transport is not None
                await transport.connection.close(ConnectionError("test: closed mid-restore"))
                async with asyncio.timeout(WAIT):  # aio-pika has seen it: not ready now
                    while connection.connected.is_set():
                        await asyncio.sleep(0.01)
                return  # the topology was there: what follows needs a connection
            await check(connection)

        bus._ensure_topology = closed_during_the_first_restore  # type: ignore[method-assign]
        up = asyncio.Event()
        bus.add_connection_listener(_listener(up))
        transport = bus._connection.transport  # type: ignore[union-attr]
        assert transport is not None
        await transport.connection.close(ConnectionError("test: drop the connection"))
        await asyncio.wait_for(up.wait(), WAIT)
        assert restores == 2  # the first restore failed as an attempt; the next one did it
        envelope = Envelope(kind=Kind.HEARTBEAT, op="host.heartbeat", body={}, src="node-loss")
        await bus.publish(HOSTS_EXCHANGE, "node-loss.heartbeat", envelope)  # it serves
    finally:
        await asyncio.wait_for(bus.close(), WAIT)


async def queue_messages(cluster: RabbitCluster, name: str) -> int:
    """Messages of a queue, ready and unacknowledged, as the cluster counts them."""
    out = await cluster.ctl("-q", "list_queues", "name", "messages")
    for line in out.splitlines():
        cols = line.split("\t")
        if cols[0] == name:
            return int(cols[1])
    raise AssertionError(f"no queue {name} in {out}")


@pytest.fixture
async def cluster() -> AsyncIterator[RabbitCluster]:
    async with rabbit_cluster(3) as c:
        yield c


def bus_to(cluster: RabbitCluster, first: int, src: str) -> AmqpBus:
    url = cluster.url_from(cluster.nodes[first])
    return AmqpBus(url, src, BusSettings(url=url, connect_timeout=5, reconnect=BACKOFF))


async def bounded(action: Awaitable[None]) -> None:
    await asyncio.wait_for(action, WAIT)


@pytest.mark.slow
async def test_a_reply_to_a_caller_of_a_stopped_node_does_not_bring_its_call_back(
    cluster: RabbitCluster,
) -> None:
    n1 = cluster.nodes[0]
    route = f"agent.nl-{uuid.uuid4().hex[:8]}"
    server = bus_to(cluster, 1, "server")  # on node 2: the queue's leader is there
    caller = bus_to(cluster, 0, "caller-on-n1")
    other = bus_to(cluster, 1, "caller-on-n2")
    deliveries: list[str] = []
    started = asyncio.Event()
    release = asyncio.Event()

    def handler(call: Envelope) -> Awaitable[dict[str, Any]]:
        deliveries.append(call.id)
        started.set()

        async def answer() -> dict[str, Any]:
            await release.wait()
            return ok_body({"echo": call.body})

        return answer()

    await server.connect()
    try:
        await server.serve(route, handler)
        await caller.connect()
        await other.connect()
        lost = asyncio.create_task(caller.call(route, "host.ping", {"n": 1}, timeout=60))
        await asyncio.wait_for(started.wait(), WAIT)
        await n1.stop_app()  # the caller's node stops; its reply address names that node
        with pytest.raises(BusUnavailable):
            await lost
        release.set()  # the server replies to the stopped node's caller
        queue = call_queue_for(route).name
        async with asyncio.timeout(WAIT):  # the call is acked at last, not back for ever
            while await queue_messages(cluster, queue) != 0:
                await asyncio.sleep(0.2)
        assert len(deliveries) <= 2, deliveries  # the first, and at most one redelivery
        assert set(deliveries) == {deliveries[0]}
        # The server serves on: a caller of a live node is answered.
        reply = await other.call(route, "host.ping", {"n": 2}, timeout=WAIT)
        assert reply == {"echo": {"n": 2}}
    finally:
        for bus in (other, caller, server):
            await bounded(bus.close())
