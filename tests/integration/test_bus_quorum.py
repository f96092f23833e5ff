"""Call queues are quorum queues, and a classic call queue left by an older virtbus is
replaced when that loses nothing (empty, unconsumed) and refused with what to do when it
would not. Against the real RabbitMQ on 127.0.0.1:5672 (random queue names)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from virtbus.bus.amqp import AmqpBus
from virtbus.bus.topology import DEAD_LETTER_EXCHANGE, RPC_EXCHANGE, call_queue_for
from virtbus.errors import OperationFailed
from virtbus.protocol.envelope import Envelope
from virtbus.settings import BusSettings

pytestmark = pytest.mark.rabbitmq

URL = "amqp://guest:guest@127.0.0.1:5672/"
CLASSIC_ARGS = {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE}  # what virtbus declared before


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


@pytest.fixture
async def bus(rabbitmq: None, route: str) -> AsyncIterator[AmqpBus]:
    bus = AmqpBus(URL, "test-quorum", BusSettings(url=URL, stop_grace=1.0))
    await bus.connect()
    try:
        yield bus
    finally:
        await bus.close()
        conn = await aio_pika.connect(URL)
        async with conn:
            await (await conn.channel()).queue_delete(call_queue_for(route).name)


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
