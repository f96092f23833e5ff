"""Call queues are quorum queues (or classic, with ``bus.call_queue_type``), and a call
queue of the other type (a classic queue left by an older virtbus, or a quorum queue once
the setting says classic) is replaced when that loses nothing (empty, unconsumed) and
refused with what to do when it would not. Against the real RabbitMQ on 127.0.0.1:5672
(random queue names, deleted afterwards)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from tests.procs import agent_process, unique_host
from virtbus.bus.amqp import AmqpBus
from virtbus.bus.topology import DEAD_LETTER_EXCHANGE, RPC_EXCHANGE, call_queue_for
from virtbus.errors import OperationFailed
from virtbus.protocol.envelope import Envelope
from virtbus.settings import BusSettings

pytestmark = pytest.mark.rabbitmq

URL = "amqp://guest:guest@127.0.0.1:5672/"
CLASSIC_ARGS = {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE}  # what virtbus declared before
QUORUM_ARGS = {**CLASSIC_ARGS, "x-queue-type": "quorum"}


async def queue_type(name: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", "list_queues", "name", "type",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    types = dict(line.split("\t")[:2] for line in out.decode().splitlines() if "\t" in line)
    return types[name]


async def echo(call: Envelope) -> dict[str, Any]:
    return {"ok": True, "result": call.body}


@pytest.fixture
async def raw(rabbitmq: None) -> AsyncIterator[AbstractChannel]:
    conn = await aio_pika.connect(URL)
    async with conn:
        yield await conn.channel()


@pytest.fixture
def route() -> str:
    return f"agent.qq-{uuid.uuid4().hex[:10]}"


async def delete_queue(name: str) -> None:
    conn = await aio_pika.connect(URL)
    async with conn:
        await (await conn.channel()).queue_delete(name)


async def open_bus(route: str, queue_type: str = "quorum") -> AmqpBus:
    settings = BusSettings(url=URL, stop_grace=1.0, call_queue_type=queue_type)
    bus = AmqpBus(URL, "test-quorum", settings)
    await bus.connect()
    return bus


@pytest.fixture
async def bus(rabbitmq: None, route: str) -> AsyncIterator[AmqpBus]:
    bus = await open_bus(route)
    try:
        yield bus
    finally:
        await bus.close()
        await delete_queue(call_queue_for(route).name)


@pytest.fixture
async def classic_bus(rabbitmq: None, route: str) -> AsyncIterator[AmqpBus]:
    bus = await open_bus(route, "classic")
    try:
        yield bus
    finally:
        await bus.close()
        await delete_queue(call_queue_for(route).name)


async def test_a_call_queue_is_a_quorum_queue_and_serves(bus: AmqpBus, route: str) -> None:
    await bus.serve(route, echo)
    assert await queue_type(call_queue_for(route).name) == "quorum"
    assert await bus.call(route, "echo", {"n": 1}, timeout=10) == {"n": 1}


async def test_an_empty_classic_call_queue_is_replaced(
    bus: AmqpBus, route: str, raw: AbstractChannel
) -> None:
    name = call_queue_for(route).name
    await raw.declare_queue(name, durable=True, arguments=CLASSIC_ARGS)
    assert await queue_type(name) == "classic"  # the premise: an older virtbus's queue
    await bus.serve(route, echo)
    assert await queue_type(name) == "quorum"
    assert await bus.call(route, "echo", {"n": 2}, timeout=10) == {"n": 2}


async def test_a_classic_call_queue_holding_a_call_is_kept_and_refused(
    bus: AmqpBus, route: str, raw: AbstractChannel
) -> None:
    name = call_queue_for(route).name
    queue = await raw.declare_queue(name, durable=True, arguments=CLASSIC_ARGS)
    await queue.bind(RPC_EXCHANGE, routing_key=route)
    await raw.default_exchange.publish(aio_pika.Message(b"an old call"), routing_key=name)
    with pytest.raises(OperationFailed, match="delete_queue") as err:
        await bus.serve(route, echo)
    assert "is a classic queue, bus.call_queue_type is 'quorum'" in err.value.message
    assert err.value.code == "OPERATION_FAILED"
    assert await queue_type(name) == "classic"
    again = await raw.declare_queue(name, durable=True, arguments=CLASSIC_ARGS, passive=True)
    assert again.declaration_result.message_count == 1  # the call is still there
    # the bus is not left half-done: another route still serves
    other = f"agent.qq-{uuid.uuid4().hex[:10]}"
    try:
        await bus.serve(other, echo)
        assert await bus.call(other, "echo", {"n": 3}, timeout=10) == {"n": 3}
    finally:
        await raw.queue_delete(call_queue_for(other).name)


async def test_classic_setting_declares_a_classic_call_queue(
    classic_bus: AmqpBus, route: str
) -> None:
    await classic_bus.serve(route, echo)
    assert await queue_type(call_queue_for(route).name) == "classic"
    assert await classic_bus.call(route, "echo", {"n": 4}, timeout=10) == {"n": 4}


async def test_switching_to_classic_replaces_an_empty_quorum_queue(
    classic_bus: AmqpBus, route: str, raw: AbstractChannel
) -> None:
    name = call_queue_for(route).name
    await raw.declare_queue(name, durable=True, arguments=QUORUM_ARGS)
    assert await queue_type(name) == "quorum"
    await classic_bus.serve(route, echo)
    assert await queue_type(name) == "classic"
    assert await classic_bus.call(route, "echo", {"n": 5}, timeout=10) == {"n": 5}


async def test_switching_to_classic_keeps_a_consumed_quorum_queue_and_refuses(
    classic_bus: AmqpBus, route: str, raw: AbstractChannel
) -> None:
    """The quorum queue is served by a running daemon of the old setting: kept, served."""
    old = await open_bus(route)  # a daemon still set to quorum
    try:
        await old.serve(route, echo)
        with pytest.raises(OperationFailed, match="delete_queue") as err:
            await classic_bus.serve(route, echo)
        assert err.value.code == "OPERATION_FAILED"
        assert "is a quorum queue, bus.call_queue_type is 'classic'" in err.value.message
        assert "1 consumers" in err.value.message
        assert await queue_type(call_queue_for(route).name) == "quorum"
        assert await classic_bus.call(route, "echo", {"n": 6}, timeout=10) == {"n": 6}
    finally:
        await old.close()


async def test_an_agent_started_with_classic_serves_from_a_classic_queue(
    rabbitmq: None, tmp_path: Path
) -> None:
    from virtbus.protocol import ops

    host = unique_host("qt")
    async with agent_process(host, tmp_path, "--call-queue-type", "classic"):
        assert await queue_type(call_queue_for(ops.agent_route(host)).name) == "classic"
        bus = await open_bus(ops.agent_route(host))
        try:
            listed = await bus.call(ops.agent_route(host), ops.DOMAIN_LIST, {}, timeout=10)
            assert listed == {"domains": []}
        finally:
            await bus.close()


async def test_switching_to_classic_keeps_a_quorum_queue_holding_a_call(
    classic_bus: AmqpBus, route: str, raw: AbstractChannel
) -> None:
    name = call_queue_for(route).name
    queue = await raw.declare_queue(name, durable=True, arguments=QUORUM_ARGS)
    await queue.bind(RPC_EXCHANGE, routing_key=route)
    await raw.default_exchange.publish(aio_pika.Message(b"a waiting call"), routing_key=name)
    with pytest.raises(OperationFailed, match="1 calls, 0 consumers"):
        await classic_bus.serve(route, echo)
    assert await queue_type(name) == "quorum"
    # still bound: a call sent now lands beside the first one (raw publishes are confirmed:
    # the broker has enqueued each before the count is read)
    rpc = await raw.get_exchange(RPC_EXCHANGE)
    await rpc.publish(aio_pika.Message(b"a second call"), routing_key=route, mandatory=True)
    again = await raw.declare_queue(name, passive=True)
    assert again.declaration_result.message_count == 2
