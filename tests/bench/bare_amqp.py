"""The floor virtbus RPC is measured against: a bare aio-pika request/reply.

``bare_roundtrips`` uses no virtbus code: a server connection consumes a queue and echoes
each body to the caller's direct reply-to address; a client connection publishes and
waits. ``virtbus_roundtrips`` does the same through two ``AmqpBus`` (caller and server)
with a trivial echo handler. ``python -m tests.bench.bare_amqp`` prints both and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
import uuid
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from tests.bench.common import add_force, check_load

URL = "amqp://guest:guest@127.0.0.1:5672/"
WARMUP = 50


async def bare_server(url: str, queue_name: str, ready: asyncio.Event | None = None) -> None:
    """Echo every request on ``queue_name`` to its direct reply-to address, until cancelled."""
    conn = await aio_pika.connect_robust(url)
    try:
        channel = await conn.channel(publisher_confirms=False)
        queue = await channel.declare_queue(queue_name, auto_delete=True)

        async def on_request(message: AbstractIncomingMessage) -> None:
            assert message.reply_to is not None
            await channel.default_exchange.publish(
                aio_pika.Message(message.body, correlation_id=message.correlation_id),
                routing_key=message.reply_to,
                mandatory=False,
            )
            await message.ack()

        await queue.consume(on_request)
        if ready is not None:
            ready.set()
        await asyncio.Future()  # serve until cancelled
    finally:
        await conn.close()


async def bare_client(url: str, queue_name: str, n: int, payload_size: int) -> list[float]:
    """Seconds per request/reply round trip against a :func:`bare_server`."""
    conn = await aio_pika.connect_robust(url)
    try:
        client_ch = await conn.channel(publisher_confirms=False)
        pending: dict[str, asyncio.Future[bytes]] = {}

        async def on_reply(message: AbstractIncomingMessage) -> None:
            fut = pending.pop(message.correlation_id or "", None)
            if fut is not None and not fut.done():
                fut.set_result(message.body)

        replies = await client_ch.declare_queue("amq.rabbitmq.reply-to", passive=True)
        await replies.consume(on_reply, no_ack=True)
        payload = b"x" * payload_size
        loop = asyncio.get_running_loop()
        times: list[float] = []
        for i in range(n + WARMUP):
            start = time.perf_counter()
            cid = uuid.uuid4().hex
            fut: asyncio.Future[bytes] = loop.create_future()
            pending[cid] = fut
            await client_ch.default_exchange.publish(
                aio_pika.Message(payload, correlation_id=cid, reply_to="amq.rabbitmq.reply-to"),
                routing_key=queue_name,
                mandatory=False,
            )
            await asyncio.wait_for(fut, 5)
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
        return times
    finally:
        await conn.close()


async def bare_roundtrips(n: int, payload_size: int, url: str = URL) -> list[float]:
    """Seconds per request/reply round trip, bare aio-pika, server in this process."""
    queue_name = f"bench.bare.{uuid.uuid4().hex[:8]}"
    ready = asyncio.Event()
    server = asyncio.create_task(bare_server(url, queue_name, ready), name="bench:bare-server")
    try:
        await asyncio.wait_for(ready.wait(), 10)
        return await bare_client(url, queue_name, n, payload_size)
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


async def virtbus_roundtrips(n: int, payload_size: int, url: str = URL) -> list[float]:
    """Seconds per ``AmqpBus.call`` round trip to a trivial echo handler."""
    from virtbus.bus.amqp import AmqpBus
    from virtbus.protocol.envelope import Envelope, ok_body
    from virtbus.settings import BusSettings

    settings = BusSettings(url=url)
    route = f"agent.bench-{uuid.uuid4().hex[:8]}"
    server, client = AmqpBus(url, "bench-server", settings), AmqpBus(url, "bench-client", settings)
    await server.connect()
    await client.connect()
    try:

        async def echo(body: dict[str, Any]) -> dict[str, Any]:
            return ok_body(body)

        def handler(call: Envelope) -> Any:
            return echo(call.body)

        srv = await server.serve(route, handler)
        body = {"p": b"x" * payload_size}
        times: list[float] = []
        for i in range(n + WARMUP):
            start = time.perf_counter()
            await client.call(route, "bench.echo", body, timeout=5)
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
        await srv.stop()
        return times
    finally:
        await _delete_queue(url, f"virtbus.{route}")
        await client.close()
        await server.close()


async def _delete_queue(url: str, name: str) -> None:
    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel()
        await channel.queue_delete(name)
    finally:
        await conn.close()


def percentiles(times: list[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    cuts = statistics.quantiles(times, n=100)
    return cuts[49] * 1000, cuts[98] * 1000


async def _main(n: int, payload_size: int, rounds: int) -> None:
    for r in range(rounds):
        bare = percentiles(await bare_roundtrips(n, payload_size))
        ours = percentiles(await virtbus_roundtrips(n, payload_size))
        print(
            f"round {r + 1}: bare p50={bare[0]:.3f}ms p99={bare[1]:.3f}ms | "
            f"virtbus p50={ours[0]:.3f}ms p99={ours[1]:.3f}ms | "
            f"ratio p50={ours[0] / bare[0]:.2f} p99={ours[1] / bare[1]:.2f}"
        )


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--serve":  # a bare server in its own process
        asyncio.run(bare_server(URL, sys.argv[2]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--payload", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    add_force(parser)
    args = parser.parse_args()
    check_load(args.force)
    asyncio.run(_main(args.n, args.payload, args.rounds))
