"""memory:// bus: the same RPC and pub/sub semantics as AMQP, inside one process."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from virtbus.bus.factory import open_bus
from virtbus.bus.memory import MemoryBus, memory_broker, topic_matches
from virtbus.bus.topology import EVENTS_EXCHANGE, METRICS_EXCHANGE
from virtbus.errors import (
    BusUnavailable,
    InvalidArgument,
    NoConnect,
    NoDomainError,
    OperationTimeout,
    ProtocolError,
)
from virtbus.protocol.codec import DecodeLimits
from virtbus.protocol.envelope import Envelope, Kind, ok_body
from virtbus.settings import BusSettings


@pytest.fixture
async def url() -> AsyncIterator[str]:
    yield f"memory://test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def pair(url: str) -> AsyncIterator[tuple[MemoryBus, MemoryBus]]:
    settings = BusSettings(url=url, stop_grace=0.2)
    server, client = MemoryBus(url, "agent", settings), MemoryBus(url, "cli", settings)
    await server.connect()
    await client.connect()
    yield server, client
    await client.close()
    await server.close()


def echo_handler(calls: list[Envelope] | None = None) -> Any:
    async def answer(call: Envelope) -> dict[str, Any]:
        return ok_body({"op": call.op, "body": call.body})

    def handler(call: Envelope) -> Any:
        if calls is not None:
            calls.append(call)
        return answer(call)

    return handler


def event(op: str, n: int = 0) -> Envelope:
    return Envelope(kind=Kind.EVENT, op=op, body={"n": n}, src="agent")


async def test_call_reply(pair: tuple[MemoryBus, MemoryBus]) -> None:
    server, client = pair
    await server.serve("agent.h1", echo_handler())
    result = await client.call("agent.h1", "host.ping", {"x": [1, 2]}, timeout=1)
    assert result == {"op": "host.ping", "body": {"x": [1, 2]}}


async def test_error_reply_is_typed(pair: tuple[MemoryBus, MemoryBus]) -> None:
    server, client = pair

    async def fail(call: Envelope) -> dict[str, Any]:
        raise NoDomainError(f"no domain {call.body['domain']!r}")

    await server.serve("agent.h1", fail)
    with pytest.raises(NoDomainError, match="no domain 'd1'"):
        await client.call("agent.h1", "domain.info", {"domain": "d1"}, timeout=1)


async def test_handler_bug_is_internal_error_and_server_survives(
    pair: tuple[MemoryBus, MemoryBus],
) -> None:
    server, client = pair
    state = {"n": 0}

    def handler(call: Envelope) -> Any:
        state["n"] += 1
        if state["n"] == 1:
            raise RuntimeError("boom")
        return echo_handler()(call)

    await server.serve("agent.h1", handler)
    with pytest.raises(Exception, match="INTERNAL_ERROR: RuntimeError: boom"):
        await client.call("agent.h1", "host.ping", {}, timeout=1)
    assert (await client.call("agent.h1", "host.ping", {}, timeout=1))["op"] == "host.ping"


async def test_timeout(pair: tuple[MemoryBus, MemoryBus]) -> None:
    server, client = pair

    async def slow(call: Envelope) -> dict[str, Any]:
        await asyncio.sleep(5)
        return ok_body(None)

    await server.serve("agent.h1", slow)
    start = time.monotonic()
    with pytest.raises(OperationTimeout):
        await client.call("agent.h1", "host.ping", {}, timeout=0.2)
    assert time.monotonic() - start < 0.7


async def test_no_server_is_no_host_at_once(pair: tuple[MemoryBus, MemoryBus]) -> None:
    _, client = pair
    start = time.monotonic()
    with pytest.raises(NoConnect, match="nothing serves route"):
        await client.call("agent.nowhere", "host.ping", {}, timeout=5)
    assert time.monotonic() - start < 0.1


async def test_handlers_called_in_call_order(pair: tuple[MemoryBus, MemoryBus]) -> None:
    server, client = pair
    calls: list[Envelope] = []
    await server.serve("agent.h1", echo_handler(calls))
    await asyncio.gather(
        *(client.call("agent.h1", "host.ping", {"i": i}, timeout=2) for i in range(100))
    )
    assert [c.body["i"] for c in calls] == list(range(100))


async def test_stopped_server_gets_nothing_more(pair: tuple[MemoryBus, MemoryBus]) -> None:
    server, client = pair
    srv = await server.serve("agent.h1", echo_handler())
    await srv.stop()
    with pytest.raises(NoConnect):
        await client.call("agent.h1", "host.ping", {}, timeout=0.2)


async def test_decode_limits_apply(url: str) -> None:
    small = BusSettings(url=url, limits=DecodeLimits(max_bytes=200))
    server, client = MemoryBus(url, "agent", small), MemoryBus(url, "cli")
    await server.connect()
    await client.connect()
    try:
        await server.serve("agent.h1", echo_handler())
        with pytest.raises(ProtocolError, match="exceeds"):
            await client.call("agent.h1", "host.ping", {"blob": "x" * 500}, timeout=1)
    finally:
        await client.close()
        await server.close()


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("h1.d1.started", "h1.d1.started", True),
        ("h1.*.started", "h1.d1.started", True),
        ("h1.*", "h1.d1.started", False),
        ("*.*.*", "h1.d1.started", True),
        ("h1.#", "h1.d1.started", True),
        ("h1.#", "h1", True),
        ("#", "h1.d1.started", True),
        ("#.started", "h1.d1.started", True),
        ("#.stopped", "h1.d1.started", False),
        ("h1.#.started", "h1.started", True),
        ("h1.#.started", "h1.a.b.started", True),
        ("*.d1.#", "h2.d1", True),
        ("*.d1.#", "d1", False),
        ("h2.#", "h1.d1.started", False),
        ("*", "h1.d1", False),
    ],
)
def test_topic_matching(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


async def test_publish_subscribe_topics(pair: tuple[MemoryBus, MemoryBus]) -> None:
    agent, client = pair
    sub = await client.subscribe(EVENTS_EXCHANGE, ["h1.*.started", "h2.#"])
    await agent.publish(EVENTS_EXCHANGE, "h1.d1.started", event("started", 1), confirm=True)
    await agent.publish(EVENTS_EXCHANGE, "h1.d1.stopped", event("stopped", 2))
    await agent.publish(METRICS_EXCHANGE, "h2.d1", event("metrics", 3))  # other exchange
    await agent.publish(EVENTS_EXCHANGE, "h2.d9.crashed", event("crashed", 4))
    got = [await asyncio.wait_for(sub.__anext__(), 1) for _ in range(2)]
    assert [e.body["n"] for e in got] == [1, 4]
    await sub.close()
    with pytest.raises(StopAsyncIteration):
        await sub.__anext__()


async def test_subscription_buffer_drops_oldest(url: str) -> None:
    settings = BusSettings(url=url, subscription_buffer=3)
    bus = MemoryBus(url, "x", settings)
    await bus.connect()
    try:
        sub = await bus.subscribe(EVENTS_EXCHANGE, ["#"])
        for n in range(5):
            await bus.publish(EVENTS_EXCHANGE, "h.d.e", event("e", n))
        assert sub.dropped == 2
        assert [(await sub.__anext__()).body["n"] for _ in range(3)] == [2, 3, 4]
    finally:
        await bus.close()


async def test_outage_fails_calls_and_fires_listeners(pair: tuple[MemoryBus, MemoryBus]) -> None:
    server, client = pair
    seen: list[bool] = []
    client.add_connection_listener(seen.append)

    async def slow(call: Envelope) -> dict[str, Any]:
        await asyncio.sleep(5)
        return ok_body(None)

    await server.serve("agent.h1", slow)
    pending = asyncio.create_task(client.call("agent.h1", "host.ping", {}, timeout=5))
    await asyncio.sleep(0.05)
    memory_broker(client.url).set_available(False)
    with pytest.raises(BusUnavailable):
        await pending
    with pytest.raises(BusUnavailable):
        await client.publish(EVENTS_EXCHANGE, "h.d.e", event("e"), confirm=True)
    memory_broker(client.url).set_available(True)
    assert seen == [False, True]
    assert client.connected


async def test_factory() -> None:
    bus = open_bus("memory://factory", "x")
    assert isinstance(bus, MemoryBus)
    from virtbus.bus.amqp import AmqpBus

    assert isinstance(open_bus("amqp://guest:guest@127.0.0.1:5672/", "x"), AmqpBus)
    assert isinstance(open_bus("amqps://h/", "x"), AmqpBus)
    with pytest.raises(InvalidArgument):
        open_bus("http://nope", "x")
