"""The two ways a lost RabbitMQ node kept a server off the bus (issue 18), one test each.

- A connection that closes while aio-pika restores it (its reconnect callbacks wait for
  the connection to be ready, in the very task that would make it ready) must count as a
  failed attempt, not hang for ever (virtbus/bus/reconnect.py ``_on_connected``). Over the
  shared broker: the test closes its own connection from inside the restore.
- A reply to a caller whose node has stopped makes RabbitMQ 3.10/3.11 close the server's
  connection (541 INTERNAL_ERROR); the call comes back, and must be acked before its reply
  goes again (virtbus/bus/amqp_consumers.py, POISONED REPLIES). Its test needs 3 nodes and
  is in tests/integration/test_rabbit_cluster.py, which starts them once for both of its
  tests.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from virtbus.bus.amqp import AmqpBus
from virtbus.bus.topology import HOSTS_EXCHANGE
from virtbus.protocol.envelope import Envelope, Kind
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
