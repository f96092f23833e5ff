"""Issue 11, poison input: each case sends exactly the bad input a user or any AMQP client
could send to a real ``virtbus-agent`` (test driver) over the real RabbitMQ, and then
proves the agent still serves (``host.ping`` answers)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import urllib.request
import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import msgpack
import pytest

from tests.procs import BUS_URL, AgentProc, agent_process, delete_queues, unique_host
from tests.rawamqp import RawCaller, envelope, error_code, new_call_id, raw_caller
from virtbus.bus.base import Bus
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import (
    DEAD_LETTER_EXCHANGE,
    EVENTS_EXCHANGE,
    RPC_EXCHANGE,
    call_queue_for,
)
from virtbus.domain import MAX_NAME_BYTES
from virtbus.errors import OperationFailed, XMLError
from virtbus.protocol import ops
from virtbus.protocol.codec import encode
from virtbus.protocol.envelope import Envelope, Kind
from virtbus.protocol.events import event_body, routing_word
from virtbus.store import encode_record

pytestmark = pytest.mark.rabbitmq

XML = """<domain type='test'><name>{name}</name><memory unit='{unit}'>{mem}</memory>
<vcpu>{vcpus}</vcpu><os><type arch='x86_64'>hvm</type></os></domain>"""
PING_DEADLINE = 1.0  # s: the requirement for host.ping after a poison flood


def xml(name: str, mem: int | str = 64, unit: str = "MiB", vcpus: int = 1) -> str:
    return XML.format(name=name, mem=mem, unit=unit, vcpus=vcpus)


@pytest.fixture
async def client(rabbitmq: None) -> AsyncIterator[Bus]:
    bus = open_bus(BUS_URL, src="poison-test")
    await bus.connect()
    yield bus
    await bus.close()


async def ping(bus: Bus, host: str) -> None:
    """The agent still serves: host.ping answers within the issue's 1 s."""
    assert await bus.call(ops.agent_route(host), ops.HOST_PING, {}, timeout=PING_DEADLINE) == {
        "host": host
    }


async def names(bus: Bus, host: str) -> list[str]:
    listing = await bus.call(ops.agent_route(host), ops.DOMAIN_LIST, {"all": True})
    return [d["name"] for d in listing["domains"]]


# ------------------------------------------------------------------ 1: long names, outbox


async def test_names_are_bounded_and_long_ones_travel_with_hashed_keys(
    client: Bus, tmp_path: Path
) -> None:
    host = unique_host("names")
    route = ops.agent_route(host)
    longest = "é" * (MAX_NAME_BYTES // 2)  # 200 bytes of UTF-8: the longest name allowed
    sub = await client.subscribe(
        EVENTS_EXCHANGE, [f"{routing_word(host)}.{routing_word(longest)}.*"]
    )
    try:
        async with agent_process(host, tmp_path) as agent:
            with pytest.raises(XMLError, match=f"at most {MAX_NAME_BYTES} bytes"):
                await client.call(route, ops.DOMAIN_DEFINE, {"xml": xml("n" * 250)})
            await ping(client, host)
            await client.call(route, ops.DOMAIN_DEFINE, {"xml": xml(longest)})
            await client.call(route, ops.DOMAIN_START, {"domain": longest})
            got = [await asyncio.wait_for(sub.__anext__(), 10) for _ in range(2)]
            assert [(e.body["domain"], e.body["event"]) for e in got] == [
                (longest, "defined"),
                (longest, "started"),
            ]
            await ping(client, host)
            assert agent.proc.returncode is None
    finally:
        await sub.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{")]  # fmt: skip
    assert values, f"{name} not on the metrics page"
    return values[0]


async def test_a_poisoned_outbox_from_an_older_version_does_not_wedge_the_restart(
    client: Bus, tmp_path: Path
) -> None:
    """What an agent before this fix left behind when a ~250-character name killed it:
    that event is unconfirmed in the outbox log, next to records it cannot read back."""
    host = unique_host("oldbox")
    long_name = "x" * 250
    outbox = tmp_path / "outbox"
    outbox.mkdir()

    def event(seq: int, domain: str, name: str) -> bytes:
        body = event_body(host=host, seq=seq, domain=domain, uuid=str(uuidlib.uuid4()), event=name)
        return encode(Envelope(kind=Kind.EVENT, op=ops.EVENT_DOMAIN, body=body, src=host))

    no_domain = Envelope(Kind.EVENT, ops.EVENT_DOMAIN, {"seq": 2, "event": "started"}, src=host)
    records = [
        {"event": event(1, long_name, "defined")},  # the event that killed the old agent
        {"event": encode(no_domain)},  # unreadable: no domain
        {"event": "not bytes"},  # unreadable: not an event record
        {"event": event(3, "fine", "defined")},
    ]
    (outbox / "events.log").write_bytes(b"".join(encode_record(r) for r in records))
    sub = await client.subscribe(EVENTS_EXCHANGE, [f"{routing_word(host)}.#"])
    port = _free_port()
    try:
        async with agent_process(host, tmp_path, "--metrics-listen", f"127.0.0.1:{port}"):
            await ping(client, host)
            got = [await asyncio.wait_for(sub.__anext__(), 10) for _ in range(2)]
            assert [(e.body["seq"], e.body["domain"]) for e in got] == [(1, long_name), (3, "fine")]
            rejected = [
                json.loads(line) for line in (outbox / "rejected.log").read_text().splitlines()
            ]
            assert len(rejected) == 2 and all(r["error"] for r in rejected), rejected
            assert _metric(port, "virtbus_agent_events_rejected_total") == 2
            # the sequence goes on after the highest number used
            await client.call(ops.agent_route(host), ops.DOMAIN_DEFINE, {"xml": xml("after")})
            after = await asyncio.wait_for(sub.__anext__(), 10)
            assert (after.body["seq"], after.body["domain"]) == (4, "after")
            await ping(client, host)
    finally:
        await sub.close()


async def test_an_event_the_broker_cannot_take_is_set_aside_and_the_next_one_goes(
    client: Bus, tmp_path: Path
) -> None:
    """The outbox over the real broker: a routing key over AMQP's limit is this event's own
    fault (rejected.log), not an outage that holds every later event."""
    from agent.outbox import EventOutbox
    from virtbus.settings import Backoff

    host = unique_host("reject")
    sub = await client.subscribe(EVENTS_EXCHANGE, [f"{host}.#"])

    async def publish(env: Envelope) -> None:  # the agent's publisher, with a raw key
        await client.publish(EVENTS_EXCHANGE, f"{host}.{env.body['domain']}.x", env, confirm=True)

    box = EventOutbox(publish, path=tmp_path / "events.log", capacity=10, retry=Backoff())
    await box.load()
    runner = asyncio.create_task(box.run())
    try:
        for seq, domain in ((1, "y" * 300), (2, "ok")):
            body = {"seq": seq, "domain": domain, "event": "x", "host": host}
            box.put(Envelope(Kind.EVENT, ops.EVENT_DOMAIN, body))
        assert await box.flush(10)
        got = await asyncio.wait_for(sub.__anext__(), 10)
        assert got.body["seq"] == 2 and box.rejected == 1 and box.published == 1
        line = json.loads((tmp_path / "rejected.log").read_text())
        assert line["seq"] == 1 and "RPC_ERROR" in line["error"] and "255" in line["error"]
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await sub.close()


# ------------------------------------------------------------------ 2: wedges


POISON = xml("poison", mem="9" * 5000)  # Python's int() refuses over 4,300 digits


async def _flood(raw: RawCaller, route: str, n: int) -> list[str]:
    """``n`` poison calls, each published twice with the same id (a redelivery)."""
    ids = []
    for _ in range(n):
        call_id = new_call_id()
        for _copy in range(2):
            await raw.send(route, ops.DOMAIN_DEFINE, {"xml": POISON}, call_id=call_id)
        ids.append(call_id)
    return ids


def _check_answers(raw: RawCaller, ids: list[str]) -> None:
    for call_id in ids:
        replies = raw.replies[call_id]
        assert len(replies) == 2 and replies[0]["body"] == replies[1]["body"], replies
        assert error_code(replies[0]) == "XML_ERROR", replies[0]
        assert "at most 20 digits" in replies[0]["body"]["error"]["message"]


async def test_a_flood_of_poison_calls_sent_twice_leaves_the_agent_serving(
    client: Bus, tmp_path: Path
) -> None:
    host = unique_host("flood")
    async with agent_process(host, tmp_path), raw_caller() as raw:
        ids = await _flood(raw, ops.agent_route(host), 200)
        await raw.wait_count(400)  # every copy answered: no future left waiting
        _check_answers(raw, ids)
        await ping(client, host)


async def test_poison_queued_before_the_agent_starts_does_not_wedge_its_start(
    client: Bus, tmp_path: Path
) -> None:
    host = unique_host("queued")
    route = ops.agent_route(host)
    spec = call_queue_for(route)
    connection = await aio_pika.connect(BUS_URL)
    try:
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
            await queue.bind(RPC_EXCHANGE, routing_key=route)
        async with raw_caller() as raw:
            ids = await _flood(raw, route, 200)
            async with agent_process(host, tmp_path):
                await raw.wait_count(400)
                _check_answers(raw, ids)
                await ping(client, host)
    finally:
        await delete_queues(spec.name)


# ------------------------------------------------------------------ 3: beyond the host


async def test_a_start_beyond_the_host_is_refused(client: Bus, tmp_path: Path) -> None:
    host = unique_host("big")
    route = ops.agent_route(host)
    too_many = (os.cpu_count() or 1) * 4 + 1  # the default cpu_overcommit is 4
    async with agent_process(host, tmp_path):
        await client.call(route, ops.DOMAIN_DEFINE, {"xml": xml("eib", mem=1, unit="EiB")})
        with pytest.raises(OperationFailed, match="memory_overcommit 1"):
            await client.call(route, ops.DOMAIN_START, {"domain": "eib"})
        with pytest.raises(XMLError, match="at most 4096"):
            await client.call(route, ops.DOMAIN_DEFINE, {"xml": xml("wide", vcpus=100_000)})
        await client.call(route, ops.DOMAIN_DEFINE, {"xml": xml("cpus", vcpus=too_many)})
        with pytest.raises(OperationFailed, match="cpu_overcommit 4"):
            await client.call(route, ops.DOMAIN_START, {"domain": "cpus"})
        state = await client.call(route, ops.DOMAIN_STATE, {"domain": "cpus"})
        assert state["state"] == "shutoff"
        # the guests that fit still start: 4 x 1 vCPU + the rest
        for i in range(4):
            await client.call(route, ops.DOMAIN_DEFINE, {"xml": xml(f"s{i}")})
            await client.call(route, ops.DOMAIN_START, {"domain": f"s{i}"})
        await ping(client, host)
    # the ratio is the agent's setting
    (tmp_path / "again").mkdir()
    async with agent_process(host, tmp_path / "again", "--cpu-overcommit", "64"):
        await client.call(route, ops.DOMAIN_DEFINE, {"xml": xml("cpus", vcpus=too_many)})
        await client.call(route, ops.DOMAIN_START, {"domain": "cpus"})
        await ping(client, host)


# ------------------------------------------------------------------ 8-11: the wire


@pytest.fixture
async def agent(client: Bus, tmp_path: Path) -> AsyncIterator[AgentProc]:
    async with agent_process(unique_host("wire"), tmp_path) as proc:
        yield proc


async def test_a_msgpack_timestamp_is_refused_like_any_ext_type(
    client: Bus, agent: AgentProc
) -> None:
    async with raw_caller() as raw:
        call_id = new_call_id()
        body = {"xml": xml("ts"), "when": msgpack.Timestamp(1_700_000_000)}
        data = msgpack.packb(envelope(ops.DOMAIN_DEFINE, body, call_id))
        await raw.send(ops.agent_route(agent.host), "", None, call_id=call_id, data=data)
        reply = await raw.reply(call_id)
        assert error_code(reply) == "RPC_ERROR" and "timestamp" in reply["body"]["error"]["message"]
    assert "ts" not in await names(client, agent.host)
    await ping(client, agent.host)


async def test_a_reply_to_other_than_direct_reply_to_is_dead_lettered(
    client: Bus, agent: AgentProc
) -> None:
    connection = await aio_pika.connect(BUS_URL)
    async with connection:
        channel = await connection.channel()
        victim = await channel.declare_queue(exclusive=True, auto_delete=True)
        dead = await channel.declare_queue(exclusive=True, auto_delete=True)
        await dead.bind(DEAD_LETTER_EXCHANGE)  # a fanout: a copy of every dead letter
        async with raw_caller() as raw:
            call_id = await raw.send(
                ops.agent_route(agent.host), ops.DOMAIN_DEFINE, {"xml": xml("dl")},
                reply_to=victim.name,
            )  # fmt: skip
        async with asyncio.timeout(10), dead.iterator(no_ack=True) as letters:
            async for letter in letters:
                if letter.message_id == call_id:
                    break
        assert await victim.get(no_ack=True, fail=False) is None  # nothing published to it
    assert "dl" not in await names(client, agent.host)  # and nothing run
    log = (agent.state_dir / f"agent-{agent.host}.log").read_text()
    assert "RPC_ERROR" in log and "direct reply-to" in log
    await ping(client, agent.host)


async def test_an_x_deadline_of_the_wrong_type_is_rpc_error(client: Bus, agent: AgentProc) -> None:
    async with raw_caller() as raw:
        for bad in ("soon", True, [1], -5):  # inf is not sent: RabbitMQ closes the connection
            call_id = await raw.send(
                ops.agent_route(agent.host), ops.DOMAIN_DEFINE, {"xml": xml("late")},
                headers={"x-deadline": bad},
            )  # fmt: skip
            reply = await raw.reply(call_id)
            assert error_code(reply) == "RPC_ERROR" and "x-deadline" in str(reply), (bad, reply)
    assert "late" not in await names(client, agent.host)
    await ping(client, agent.host)


async def test_a_call_id_reused_for_another_call_is_rpc_error(client: Bus, tmp_path: Path) -> None:
    host = unique_host("reuse")
    route = ops.agent_route(host)
    call_id = new_call_id()

    async def call(raw: RawCaller, op: str, body: dict[str, str]) -> dict[str, object]:
        raw.replies.pop(call_id, None)
        return await raw.reply(await raw.send(route, op, body, call_id=call_id))

    async with raw_caller() as raw:
        async with agent_process(host, tmp_path, keep_queue=True):
            first = await call(raw, ops.DOMAIN_DEFINE, {"xml": xml("r1")})
            assert first["body"] == {"ok": True, "result": {"name": "r1", "uuid": ANY_UUID}}
            for op, body in (
                (ops.DOMAIN_UNDEFINE, {"domain": "r1"}),
                (ops.DOMAIN_DEFINE, {"xml": xml("r2")}),
            ):
                reply = await call(raw, op, body)
                assert error_code(reply) == "RPC_ERROR" and "already used" in str(reply)
            assert await names(client, host) == ["r1"]  # neither the undefine nor r2 ran
            await ping(client, host)
        # after a restart the call log still knows the id, its op and its body
        try:
            async with agent_process(host, tmp_path):
                reply = await call(raw, ops.DOMAIN_UNDEFINE, {"domain": "r1"})
                assert error_code(reply) == "RPC_ERROR"
                again = await call(raw, ops.DOMAIN_DEFINE, {"xml": xml("r1")})
                assert again["body"] == first["body"]  # answered from the log, not run again
                assert await names(client, host) == []  # (the test driver forgot r1)
                await ping(client, host)
        finally:
            await delete_queues(f"virtbus.agent.{host}")


class _AnyUuid:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and len(other) == 36

    def __hash__(self) -> int:
        return 0


ANY_UUID = _AnyUuid()
