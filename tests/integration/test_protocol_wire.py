"""The typed protocol through a real agent on the real RabbitMQ.

Bad bodies generated from the declared types (tests/typegen.py: each field of each agent
op with a wrong type, missing, or out of range) get INVALID_ARG naming the field, nothing
is done, and the agent keeps serving; unknown fields are ignored. The routing keys the
message declarations document carry the bodies they document.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import aio_pika
import msgspec
import msgspec.inspect as mi
import pytest

from tests.procs import BUS_URL, agent_process, unique_host
from tests.typegen import minimal, out_of_range, place, spots, wrong_values
from virtbus.bus.factory import open_bus
from virtbus.errors import InvalidArgument
from virtbus.protocol import codec, ops
from virtbus.protocol.envelope import Envelope
from virtbus.protocol.messages import (
    EVENT_DOMAIN,
    HEARTBEAT,
    MESSAGES,
    METRICS_DOMAIN,
    METRICS_HOST,
    decode_message,
)
from virtbus.protocol.registry import Service, ops_of

pytestmark = pytest.mark.rabbitmq

XML = """<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type></os></domain>"""


def _fresh(t: mi.Type) -> Any:
    return [minimal(t.item_type)] if isinstance(t, mi.ListType) else minimal(t)


def bad_calls() -> list[tuple[str, dict[str, Any], str]]:
    """(op, body, the field the error must name): for every field of every agent op's
    request, its first wrong type, its absence when required, and each value just out of
    its range."""
    cases = []
    for op in sorted(ops_of(Service.AGENT), key=str):
        info = mi.type_info(op.request)
        assert isinstance(info, mi.StructType)
        base = minimal(info)
        for spot in spots(info):
            bad = wrong_values(spot.leaf)[:1]
            bad += out_of_range(spot.leaf, lambda t: minimal(t))
            for value in bad:
                body = copy.deepcopy(base)
                place(body, spot, _fresh)[spot.path[-1]] = value
                cases.append((op.name, body, spot.name))
            if spot.required and isinstance(spot.path[-1], str):
                body = copy.deepcopy(base)
                del place(body, spot, _fresh)[spot.path[-1]]
                cases.append((op.name, body, spot.name))
    return cases


async def test_bad_bodies_get_invalid_arg_naming_the_field_and_the_agent_serves_on(
    rabbitmq: None, tmp_path: Path
) -> None:
    host = unique_host("wire")
    route = ops.agent_route(host)
    cases = bad_calls()
    touched = {op for op, _, _ in cases}
    with_fields = {o.name for o in ops_of(Service.AGENT) if msgspec.structs.fields(o.request)}
    assert touched == with_fields
    assert len(cases) > 60 and any(name == "params.parallel" for _, _, name in cases)
    async with agent_process(host, tmp_path):
        bus = open_bus(BUS_URL, src="wire-test")
        await bus.connect()
        try:
            await bus.call(route, ops.DOMAIN_DEFINE, {"xml": XML.format(name="w1")})
            for op, body, name in cases:
                with pytest.raises(InvalidArgument) as caught:
                    await bus.call(route, op, body, timeout=10)
                assert f"'{name}'" in caught.value.message, (op, body, caught.value.message)
            # nothing was done, and the agent still serves, ignoring unknown fields
            listing = await bus.call(route, ops.DOMAIN_LIST, {"all": True, "zz_newer": [1]})
            assert [(d["name"], d["state"]) for d in listing["domains"]] == [("w1", "shutoff")]
            started = await bus.call(route, ops.DOMAIN_START, {"domain": "w1", "zz_newer": {}})
            assert started == {"state": "running", "reason": "booted"}
            assert (await bus.call(route, ops.HOST_PING, {}))["host"] == host
        finally:
            await bus.close()


async def _queue(channel: aio_pika.abc.AbstractChannel, exchange: str, key: str) -> Any:
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, routing_key=key)
    return queue


async def _first(queue: Any) -> Envelope:
    async with asyncio.timeout(20):
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                return codec.decode(message.body)
    raise AssertionError("no message")


async def test_the_documented_routing_keys_carry_the_documented_bodies(
    rabbitmq: None, tmp_path: Path
) -> None:
    """Queues bound to exactly the keys the declarations give (no wildcard) get the
    heartbeat, the event and both metrics; each body decodes as its declared type."""
    host = unique_host("keys.x")  # a dot: the routing word is sanitised
    domain = "web.1"
    keys = {
        HEARTBEAT: MESSAGES[HEARTBEAT].key(host=host),
        EVENT_DOMAIN: MESSAGES[EVENT_DOMAIN].key(host=host, domain=domain, event="defined"),
        METRICS_DOMAIN: MESSAGES[METRICS_DOMAIN].key(host=host, domain=domain),
        METRICS_HOST: MESSAGES[METRICS_HOST].key(host=host),
    }
    assert "." not in keys[HEARTBEAT].removesuffix(".heartbeat")  # premise: sanitised
    conn = await aio_pika.connect(BUS_URL)
    async with conn:
        channel = await conn.channel()
        queues = {op: await _queue(channel, MESSAGES[op].exchange, key) for op, key in keys.items()}
        async with agent_process(host, tmp_path, "--metrics-interval", "0.5"):
            bus = open_bus(BUS_URL, src="keys-test")
            await bus.connect()
            try:
                await bus.call(
                    ops.agent_route(host), ops.DOMAIN_DEFINE, {"xml": XML.format(name=domain)}
                )
            finally:
                await bus.close()
            for op, queue in queues.items():
                env = await _first(queue)
                assert env.op == op and env.kind == MESSAGES[op].kind
                body = decode_message(op, env.body)
                assert isinstance(body, MESSAGES[op].body)
                assert body.host == host  # type: ignore[attr-defined]
                if op in (EVENT_DOMAIN, METRICS_DOMAIN):
                    assert body.domain == domain  # type: ignore[attr-defined]
