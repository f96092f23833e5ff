"""AmqpBus against the real RabbitMQ on 127.0.0.1:5672 (fails, never skips, when absent)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq
import msgpack
import pytest
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)

from virtbus.bus.amqp import REPLY_TO, AmqpBus
from virtbus.bus.oneshot import OneShotBus
from virtbus.bus.topology import (
    DEAD_LETTER_EXCHANGE,
    EVENTS_EXCHANGE,
    RPC_EXCHANGE,
    call_queue_for,
)
from virtbus.errors import (
    BusUnavailable,
    NoConnect,
    NoDomainError,
    OperationTimeout,
    ProtocolError,
)
from virtbus.protocol.codec import DecodeLimits, decode, encode
from virtbus.protocol.envelope import Envelope, Kind, ok_body
from virtbus.settings import BusSettings

pytestmark = pytest.mark.rabbitmq

URL = "amqp://guest:guest@127.0.0.1:5672/"
SERVER_LIMIT = 64 * 1024


@dataclass
class Env:
    server: AmqpBus
    client: AmqpBus
    raw: AbstractConnection
    raw_channel: AbstractChannel
    queues: list[str] = field(default_factory=list)

    def route(self) -> str:
        route = f"agent.t-{uuid.uuid4().hex[:10]}"
        self.queues.append(call_queue_for(route).name)
        return route

    async def queue_depth(self, route: str) -> int:
        queue = await self.raw_channel.declare_queue(call_queue_for(route).name, passive=True)
        assert queue.declaration_result.message_count is not None
        return queue.declaration_result.message_count


@pytest.fixture
async def env(rabbitmq: None) -> AsyncIterator[Env]:
    server_settings = BusSettings(
        url=URL, stop_grace=1.0, limits=DecodeLimits(max_bytes=SERVER_LIMIT)
    )
    server = AmqpBus(URL, "test-agent", server_settings)
    client = AmqpBus(URL, "test-cli", BusSettings(url=URL, stop_grace=1.0))
    await server.connect()
    await client.connect()
    raw = await aio_pika.connect(URL)
    channel = await raw.channel()
    state = Env(server, client, raw, channel)
    try:
        yield state
    finally:
        await client.close()
        await server.close()
        cleanup = await raw.channel()
        for name in state.queues:
            await cleanup.queue_delete(name)
        await raw.close()


def echo(calls: list[Envelope] | None = None, delay: float = 0.0) -> Any:
    async def answer(call: Envelope) -> dict[str, Any]:
        if delay:
            await asyncio.sleep(delay)
        return ok_body({"op": call.op, "body": call.body})

    def handler(call: Envelope) -> Any:
        if calls is not None:
            calls.append(call)
        return answer(call)

    return handler


class RawCaller:
    """Publishes arbitrary bytes as calls and collects direct replies (no virtbus code)."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self.replies: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def start(self) -> RawCaller:
        queue = await self.channel.declare_queue(REPLY_TO, passive=True)
        await queue.consume(self.replies.put, no_ack=True)
        return self

    async def send(
        self, route: str, body: bytes, *, reply: bool = True, cid: str | None = None, **props: Any
    ) -> str:
        cid = cid or uuid.uuid4().hex
        await self.channel.get_exchange(RPC_EXCHANGE, ensure=False)
        exchange = await self.channel.get_exchange(RPC_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(
                body, correlation_id=cid, reply_to=REPLY_TO if reply else None, **props
            ),
            routing_key=route,
            mandatory=False,
        )
        return cid

    async def reply(self, timeout: float = 2.0) -> tuple[str | None, Envelope]:
        message = await asyncio.wait_for(self.replies.get(), timeout)
        return message.correlation_id, decode(message.body)


def call_bytes(body: dict[str, Any], op: str = "host.ping") -> bytes:
    return encode(Envelope(kind=Kind.CALL, op=op, body=body, src="raw"))


async def test_call_reply_round_trip(env: Env) -> None:
    route = env.route()
    await env.server.serve(route, echo())
    result = await env.client.call(route, "host.ping", {"x": [1, "a", b"\x00"]}, timeout=2)
    assert result == {"op": "host.ping", "body": {"x": [1, "a", b"\x00"]}}


async def test_error_reply_is_typed(env: Env) -> None:
    route = env.route()

    async def fail(call: Envelope) -> dict[str, Any]:
        raise NoDomainError("no domain 'd1'")

    await env.server.serve(route, fail)
    with pytest.raises(NoDomainError, match="no domain 'd1'"):
        await env.client.call(route, "domain.info", {"domain": "d1"}, timeout=2)


async def test_handler_crash_is_internal_error_and_consumer_lives(env: Env) -> None:
    route = env.route()
    state = {"n": 0}

    def handler(call: Envelope) -> Any:
        state["n"] += 1
        if state["n"] == 1:
            raise RuntimeError("sync boom")
        return echo()(call)

    await env.server.serve(route, handler)
    with pytest.raises(Exception, match="INTERNAL_ERROR: RuntimeError: sync boom"):
        await env.client.call(route, "host.ping", {}, timeout=2)
    assert (await env.client.call(route, "host.ping", {}, timeout=2))["op"] == "host.ping"


async def test_unroutable_is_no_host_fast(env: Env) -> None:
    route = f"agent.absent-{uuid.uuid4().hex[:10]}"
    start = time.monotonic()
    with pytest.raises(NoConnect, match="nothing serves route"):
        await env.client.call(route, "host.ping", {}, timeout=5)
    assert time.monotonic() - start < 0.5
    # The bus is still fine afterwards (the return did not break the RPC channel).
    route2 = env.route()
    await env.server.serve(route2, echo())
    assert (await env.client.call(route2, "host.ping", {}, timeout=2))["op"] == "host.ping"


async def test_queue_without_consumer_times_out_and_is_never_run_late(env: Env) -> None:
    route = env.route()
    server = await env.server.serve(route, echo())
    await server.stop()  # the durable queue stays, nobody consumes it
    start = time.monotonic()
    with pytest.raises(OperationTimeout):
        await env.client.call(route, "domain.start", {"domain": "late"}, timeout=0.5)
    assert time.monotonic() - start < 1.0
    calls: list[Envelope] = []
    await env.server.serve(route, echo(calls))
    await asyncio.sleep(0.5)
    assert calls == []
    assert await env.queue_depth(route) == 0


async def test_server_drops_call_past_its_deadline_header(env: Env) -> None:
    route = env.route()
    calls: list[Envelope] = []
    await env.server.serve(route, echo(calls))
    raw = await RawCaller(env.raw_channel).start()
    await raw.send(
        route, call_bytes({"n": 1}), headers={"x-deadline": int((time.time() - 1) * 1000)}
    )
    cid = await raw.send(
        route, call_bytes({"n": 2}), headers={"x-deadline": int((time.time() + 5) * 1000)}
    )
    got_cid, reply = await raw.reply()
    assert got_cid == cid and reply.body["ok"] is True
    assert [c.body["n"] for c in calls] == [2]


async def test_malformed_with_reply_to_gets_rpc_error_and_server_lives(env: Env) -> None:
    route = env.route()
    await env.server.serve(route, echo())
    raw = await RawCaller(env.raw_channel).start()
    cid = await raw.send(route, b"\xc1 this is not msgpack")
    got_cid, reply = await raw.reply()
    assert got_cid == cid and reply.id == cid
    assert reply.body == {"ok": False, "error": reply.body["error"]}
    assert reply.body["error"]["code"] == "RPC_ERROR"
    assert (await env.client.call(route, "host.ping", {}, timeout=2))["op"] == "host.ping"


async def _dead_letter_watch(channel: AbstractChannel) -> AbstractQueue:
    """A private queue on the dead-letter fanout: it gets a copy of every message
    dead-lettered from now on, whatever earlier runs left in virtbus.dead-letters."""
    queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
    await queue.bind(DEAD_LETTER_EXCHANGE)
    return queue


async def _dead_letter_of(queue: AbstractQueue, message_id: str, timeout: float = 10) -> Any:
    """The dead letter ``message_id`` once it arrived on ``queue`` (others are skipped)."""
    async with asyncio.timeout(timeout), queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            if message.message_id == message_id:
                return message
    raise AssertionError("the watch queue closed")


async def test_malformed_without_reply_to_is_dead_lettered(env: Env) -> None:
    route = env.route()
    calls: list[Envelope] = []
    await env.server.serve(route, echo(calls))
    watch = await _dead_letter_watch(await env.raw.channel())
    raw = await RawCaller(env.raw_channel).start()
    message_id = uuid.uuid4().hex
    await raw.send(route, b"\xc1 garbage", reply=False, message_id=message_id)
    dead = await _dead_letter_of(watch, message_id)
    assert dead.body == b"\xc1 garbage"
    [death] = dead.headers["x-death"]  # rejected once, from our call queue
    assert death["reason"] == "rejected" and death["count"] == 1, death
    assert death["queue"] == call_queue_for(route).name, death
    assert await env.queue_depth(route) == 0  # rejected without requeue, not redelivered
    assert (await env.client.call(route, "host.ping", {}, timeout=2))["op"] == "host.ping"
    assert len(calls) == 1


def _base_map() -> dict[str, Any]:
    return {
        "v": 1,
        "id": uuid.uuid4().hex,
        "kind": "call",
        "op": "host.ping",
        "ts": time.time(),
        "src": "raw",
        "body": {},
    }


def pack(obj: Any, **kwargs: Any) -> bytes:
    data: bytes = msgpack.packb(obj, **kwargs)
    return data


def _oversized() -> bytes:
    return pack({**_base_map(), "body": {"blob": b"x" * (SERVER_LIMIT + 1)}})


def _wrong_version() -> bytes:
    return pack({**_base_map(), "v": 2})


def _ext_type() -> bytes:
    return pack({**_base_map(), "body": {"x": msgpack.ExtType(7, b"abc")}})


def _int_keys() -> bytes:
    return pack({**_base_map(), "body": {1: "one"}}, strict_types=False)


def _not_a_call() -> bytes:
    return pack({**_base_map(), "kind": "event"})


@pytest.mark.parametrize(
    ("payload", "expect"),
    [
        (_oversized, "exceeds"),
        (_wrong_version, "version"),
        (_ext_type, "ext type"),
        (_int_keys, "keys must be strings"),
        (_not_a_call, "expected a call"),
    ],
)
async def test_refused_payloads(env: Env, payload: Any, expect: str) -> None:
    route = env.route()
    calls: list[Envelope] = []
    await env.server.serve(route, echo(calls))
    raw = await RawCaller(env.raw_channel).start()
    cid = await raw.send(route, payload())
    got_cid, reply = await raw.reply()
    assert got_cid == cid
    assert reply.body["error"]["code"] == "RPC_ERROR"
    assert expect in reply.body["error"]["message"]
    assert calls == []
    assert (await env.client.call(route, "host.ping", {}, timeout=2))["op"] == "host.ping"


async def test_publish_confirm_and_topic_subscribe(env: Env) -> None:
    h1, h2 = f"h{uuid.uuid4().hex[:8]}", f"h{uuid.uuid4().hex[:8]}"
    sub = await env.client.subscribe(EVENTS_EXCHANGE, [f"{h1}.*.started", f"{h2}.#"])

    def ev(n: int) -> Envelope:
        return Envelope(kind=Kind.EVENT, op="domain.event", body={"n": n}, src=h1)

    await env.server.publish(EVENTS_EXCHANGE, f"{h1}.d1.started", ev(1), confirm=True)
    await env.server.publish(EVENTS_EXCHANGE, f"{h1}.d1.stopped", ev(2), confirm=True)
    await env.server.publish(EVENTS_EXCHANGE, f"{h2}.d9.crashed", ev(3), confirm=True)
    await env.server.publish(EVENTS_EXCHANGE, f"{h2}", ev(4))  # '#' matches zero words
    got = [await asyncio.wait_for(sub.__anext__(), 2) for _ in range(3)]
    assert [e.body["n"] for e in got] == [1, 3, 4]
    await sub.close()


async def test_a_window_goes_as_one_write_confirmed_in_order_and_a_bad_message_fails_alone(
    env: Env,
) -> None:
    """publish_window (the outbox's): one write-queue item for the window, one future per
    message in order; a message that cannot go (its routing key is over AMQP's limit) fails
    alone and is not sent; and the channel's confirm numbering stays right for a plain
    confirmed publish after it (a tag off by one would leave that confirm unmatched)."""
    host = f"h{uuid.uuid4().hex[:8]}"
    sub = await env.client.subscribe(EVENTS_EXCHANGE, [f"{host}.#"])
    channel = env.server._confirm_underlay
    assert channel is not None
    queue = channel.write_queue
    puts: list[object] = []
    put = queue.put

    async def counted(item: object) -> None:
        puts.append(item)
        await put(item)

    def ev(n: int) -> Envelope:
        return Envelope(kind=Kind.EVENT, op="domain.event", body={"n": n}, src=host)

    messages = [(f"{host}.d.x", ev(n)) for n in range(30)]
    messages[10] = (f"{host}.{'y' * 300}", ev(10))
    queue.put = counted  # type: ignore[method-assign]
    try:
        futures = await env.server.publish_window(EVENTS_EXCHANGE, messages)
    finally:
        del queue.put  # type: ignore[method-assign]
    assert len(puts) == 1 and len(futures) == 30
    outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
    assert isinstance(outcomes[10], ProtocolError) and "255" in str(outcomes[10])
    assert [o for i, o in enumerate(outcomes) if i != 10] == [None] * 29
    await asyncio.wait_for(
        env.server.publish(EVENTS_EXCHANGE, f"{host}.d.x", ev(30), confirm=True), 10
    )
    got = [await asyncio.wait_for(sub.__anext__(), 5) for _ in range(30)]
    assert [e.body["n"] for e in got] == [n for n in range(31) if n != 10]
    await sub.close()


async def test_a_window_without_a_connection_or_past_its_confirm_timeout_fails_retryably(
    env: Env,
) -> None:
    """Every message of a window fails with BUS_UNAVAILABLE (retryable: the outbox holds
    them and tries again) when the bus is not connected, and when no confirm came within
    ``confirm_timeout`` of the write."""
    host = f"h{uuid.uuid4().hex[:8]}"
    messages = [
        (f"{host}.d.x", Envelope(kind=Kind.EVENT, op="domain.event", body={"n": n}))
        for n in range(3)
    ]
    closed = AmqpBus(URL, "test-closed", BusSettings(url=URL))
    await closed.connect()
    await closed.close()
    outcomes = await asyncio.gather(
        *await closed.publish_window(EVENTS_EXCHANGE, messages), return_exceptions=True
    )
    assert all(isinstance(o, BusUnavailable) and o.retryable for o in outcomes), outcomes
    # A timer that fires on the next turn of the loop: before any confirm can come back.
    hasty = AmqpBus(URL, "test-hasty", BusSettings(url=URL, confirm_timeout=1e-9))
    await hasty.connect()
    try:
        futures = await hasty.publish_window(EVENTS_EXCHANGE, messages)
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await hasty.close()
    assert all(isinstance(o, BusUnavailable) and "in time" in str(o) for o in outcomes), outcomes


async def test_a_window_that_cannot_be_queued_in_time_fails_retryably(env: Env) -> None:
    """A connection whose writer is gone with its write queue full (a broker that went
    away): the window fails BUS_UNAVAILABLE after ``confirm_timeout``, instead of holding
    the outbox for ever, and its numbers are given back to the channel."""
    bus = AmqpBus(URL, "test-stuck", BusSettings(url=URL, confirm_timeout=0.2))
    await bus.connect()
    try:
        channel = bus._confirm_underlay
        assert isinstance(channel, aiormq.Channel)
        tag = channel.delivery_tag
        full: asyncio.Queue[object] = asyncio.Queue(maxsize=1)
        full.put_nowait(object())  # nobody takes it
        channel.write_queue, live = full, channel.write_queue
        messages = [(f"h{uuid.uuid4().hex[:8]}.d.x", Envelope(Kind.EVENT, "domain.event", {}))]
        try:
            futures = await asyncio.wait_for(bus.publish_window(EVENTS_EXCHANGE, messages), 5)
        finally:
            channel.write_queue = live
        (outcome,) = await asyncio.gather(*futures, return_exceptions=True)
        assert isinstance(outcome, BusUnavailable) and "in time" in str(outcome), outcome
        assert channel.delivery_tag == tag
    finally:
        await bus.close()


async def test_a_window_whose_confirms_fail_fails_retryably_never_as_a_cancellation(
    env: Env,
) -> None:
    """aiormq fails a closing channel's confirms with its close reason: a channel error, or
    a cancellation (aio-pika closes with CancelledError). Either is BUS_UNAVAILABLE for
    the message (retryable), never a cancellation that would end the outbox's task."""
    host = f"h{uuid.uuid4().hex[:8]}"
    messages = [
        (f"{host}.d.x", Envelope(kind=Kind.EVENT, op="domain.event", body={"n": n}))
        for n in range(2)
    ]
    channel = env.server._confirm_underlay
    assert isinstance(channel, aiormq.Channel)
    futures = await env.server.publish_window(EVENTS_EXCHANGE, messages)
    # Before the loop turns: not even written yet, so no confirm can have come.
    first, second = list(channel.confirmations.values())[-2:]
    assert isinstance(first, asyncio.Future) and isinstance(second, asyncio.Future)
    first.set_exception(aiormq.exceptions.ChannelInvalidStateError("closed"))
    second.set_exception(asyncio.CancelledError())
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(o, BusUnavailable) and o.retryable for o in outcomes), outcomes


async def test_a_burst_past_the_prefetch_is_read_whole_with_batched_acks(env: Env) -> None:
    """Acks are batched (``multiple``): the broker must still see them in time, or it
    stops delivering at the prefetch count and the read stalls."""
    reader = AmqpBus(URL, "test-burst", BusSettings(url=URL, subscription_buffer=4))
    await reader.connect()
    try:
        host = f"h{uuid.uuid4().hex[:8]}"
        sub = await reader.subscribe(EVENTS_EXCHANGE, [f"{host}.#"])
        for rnd in range(2):  # the second burst after the reader had caught up and waited
            await asyncio.gather(*(
                env.server.publish(EVENTS_EXCHANGE, f"{host}.d.started",
                                   Envelope(kind=Kind.EVENT, op="domain.event",
                                            body={"n": rnd * 100 + n}, src=host),
                                   confirm=True)
                for n in range(40)
            ))  # fmt: skip
            got = [(await asyncio.wait_for(sub.__anext__(), 5)).body["n"] for _ in range(40)]
            assert got == [rnd * 100 + n for n in range(40)]
        await sub.close()
    finally:
        await reader.close()


async def test_handler_called_in_delivery_order(env: Env) -> None:
    route = env.route()
    calls: list[Envelope] = []
    await env.server.serve(route, echo(calls, delay=0.001))
    raw = await RawCaller(env.raw_channel).start()
    for i in range(100):
        await raw.send(route, call_bytes({"i": i}))
    for _ in range(100):
        await raw.reply()
    assert [c.body["i"] for c in calls] == list(range(100))
    results = await asyncio.gather(
        *(env.client.call(route, "host.ping", {"i": i}, timeout=5) for i in range(100))
    )
    assert [r["body"]["i"] for r in results] == list(range(100))


async def test_stop_leaves_unprocessed_calls_queued(env: Env) -> None:
    route = env.route()
    env.server.settings = BusSettings(url=URL, prefetch=1, stop_grace=2.0)
    calls: list[Envelope] = []
    started = asyncio.Event()
    inner = echo(calls, delay=0.3)

    def handler(call: Envelope) -> Any:
        started.set()
        return inner(call)

    server = await env.server.serve(route, handler)
    raw = await RawCaller(env.raw_channel).start()
    for i in range(3):
        await raw.send(route, call_bytes({"i": i}), expiration=30)
    await asyncio.wait_for(started.wait(), 2)
    await server.stop()
    _, reply = await raw.reply()  # the call in hand was finished and answered
    assert reply.body["ok"] is True
    assert [c.body["i"] for c in calls] == [0]
    assert await env.queue_depth(route) == 2


async def _call_until_served(env: Env, route: str, body: dict[str, Any]) -> Any:
    """Call until a server answers (bounded): NO_CONNECT while the route has no queue,
    a timeout while its queue has no consumer."""
    async with asyncio.timeout(20):
        while True:
            try:
                return await env.client.call(route, "host.ping", body, timeout=1)
            except (NoConnect, OperationTimeout):
                await asyncio.sleep(0.1)


async def test_a_server_whose_consumer_the_broker_cancelled_consumes_again(env: Env) -> None:
    """The broker cancels the consumer of a deleted call queue (an operator's delete, or
    a classic queue's node gone): the server declares and binds it again and consumes,
    once, as aio-pika's own consumer did, instead of going deaf on an open channel."""
    route = env.route()
    await env.server.serve(route, echo())
    assert (await env.client.call(route, "host.ping", {"i": 0}, timeout=3))["body"] == {"i": 0}
    await env.raw_channel.queue_delete(call_queue_for(route).name)
    assert (await _call_until_served(env, route, {"i": 1}))["body"] == {"i": 1}
    queue = await env.raw_channel.declare_queue(call_queue_for(route).name, passive=True)
    assert queue.declaration_result.consumer_count == 1


def _set_when_up(event: asyncio.Event) -> Callable[[bool], None]:
    def listener(up: bool) -> None:
        if up:
            event.set()

    return listener


async def _drop_connection(bus: AmqpBus) -> None:
    """Close the bus's socket under it, as a lost network does (it reconnects by itself)."""
    transport = bus._connection.transport  # type: ignore[union-attr]
    assert transport is not None
    await transport.connection.close(ConnectionError("test: drop the connection"))


async def _drop_and_wait_back(bus: AmqpBus) -> None:
    """Drop the bus's connection and wait until it says it is up again."""
    restored = asyncio.Event()
    bus.add_connection_listener(_set_when_up(restored))
    await _drop_connection(bus)
    await asyncio.wait_for(restored.wait(), 10)


async def test_reconnect_fails_pending_then_restores_everything(env: Env) -> None:
    route = env.route()
    await env.server.serve(route, echo(delay=0.5))
    seen: list[bool] = []
    env.client.add_connection_listener(seen.append)
    restored = {bus: asyncio.Event() for bus in (env.client, env.server)}
    for bus, event in restored.items():
        bus.add_connection_listener(_set_when_up(event))
    pending = asyncio.create_task(env.client.call(route, "host.ping", {}, timeout=5))
    await asyncio.sleep(0.1)
    for bus in (env.client, env.server):  # drop both sockets: client and server recover
        await _drop_connection(bus)
    with pytest.raises(BusUnavailable):
        await pending
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in restored.values())), 10)
    assert seen == [False, True]
    assert (await env.client.call(route, "host.ping", {"after": 1}, timeout=3))["body"] == {
        "after": 1
    }


async def test_an_unroutable_call_is_no_connect_after_a_reconnect(env: Env) -> None:
    """The broker's basic.return of an unroutable call reaches the caller on a reopened
    RPC channel too: NO_CONNECT, not the call's timeout (aio-pika hooks its return
    callback to the first aiormq channel of a robust channel only)."""
    await _drop_and_wait_back(env.client)
    route = f"agent.absent-{uuid.uuid4().hex[:10]}"
    with pytest.raises(NoConnect, match="nothing serves route"):
        await env.client.call(route, "host.ping", {}, timeout=30)


async def test_a_reply_consume_that_fails_on_a_reopened_channel_is_retried(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused or timed-out consume of direct reply-to on the reopened RPC channel (an
    open channel: no reopen will come) is retried, not left as BUS_UNAVAILABLE for ever."""
    route = env.route()
    await env.server.serve(route, echo())
    consume = env.client._consume_replies
    failed = asyncio.Event()
    restored = asyncio.Event()

    async def fails_during_the_reconnect(underlay: Any, timeout: float) -> None:
        if not restored.is_set():  # every consume of the reconnect: none of them is left
            failed.set()
            raise TimeoutError("test: the broker did not answer the consume")
        await consume(underlay, timeout)

    monkeypatch.setattr(env.client, "_consume_replies", fails_during_the_reconnect)
    env.client.add_connection_listener(_set_when_up(restored))
    await _drop_connection(env.client)
    await asyncio.wait_for(asyncio.gather(restored.wait(), failed.wait()), 10)
    async with asyncio.timeout(20):
        while True:
            try:
                reply = await env.client.call(route, "host.ping", {"i": 1}, timeout=2)
                break
            except BusUnavailable:
                await asyncio.sleep(0.1)
    assert reply["body"] == {"i": 1}


async def test_a_subscription_is_server_named_and_survives_a_reconnect(env: Env) -> None:
    """Clients may configure only server-named queues (amq.gen-*): aio-pika's robust queue
    would re-declare the old name (refused: amq.* is the broker's), so the subscription
    declares a new queue, bound to the same keys, when its channel reopens."""
    host = f"h{uuid.uuid4().hex[:8]}"
    sub = await env.client.subscribe(EVENTS_EXCHANGE, [f"{host}.#"])
    first = sub.queue_name  # type: ignore[attr-defined]
    assert first.startswith("amq.gen-"), first

    def ev(n: int) -> Envelope:
        return Envelope(kind=Kind.EVENT, op="domain.event", body={"n": n}, src=host)

    await env.server.publish(EVENTS_EXCHANGE, f"{host}.d.started", ev(1), confirm=True)
    assert (await asyncio.wait_for(sub.__anext__(), 5)).body == {"n": 1}
    await _drop_and_wait_back(env.client)
    async with asyncio.timeout(10):  # the new queue is bound once the channel reopened
        while sub.queue_name == first:  # type: ignore[attr-defined]
            await asyncio.sleep(0.05)
    assert sub.queue_name.startswith("amq.gen-")  # type: ignore[attr-defined]
    await env.server.publish(EVENTS_EXCHANGE, f"{host}.d.stopped", ev(2), confirm=True)
    assert (await asyncio.wait_for(sub.__anext__(), 5)).body == {"n": 2}
    await sub.close()


async def test_a_subscription_whose_declare_fails_on_its_reopened_channel_is_retried(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A timed-out declare of the new queue on the reopened channel (an open channel: no
    reopen will come) is retried with backoff, not left deaf for ever."""
    host = f"h{uuid.uuid4().hex[:8]}"
    sub = await env.client.subscribe(EVENTS_EXCHANGE, [f"{host}.#"])
    first = sub.queue_name  # type: ignore[attr-defined]
    declare = sub._declare  # type: ignore[attr-defined]
    failures = 0

    async def fails_once() -> None:
        nonlocal failures
        if not failures:
            failures += 1
            raise TimeoutError("test: the broker did not answer the declare")
        await declare()

    monkeypatch.setattr(sub, "_declare", fails_once)
    await _drop_and_wait_back(env.client)
    async with asyncio.timeout(10):  # a new queue, once the retry declared it
        while sub.queue_name == first:  # type: ignore[attr-defined]
            await asyncio.sleep(0.05)
    assert failures == 1  # premise: the reopen's declare failed
    event = Envelope(kind=Kind.EVENT, op="domain.event", body={"n": 1}, src=host)
    await env.server.publish(EVENTS_EXCHANGE, f"{host}.d.started", event, confirm=True)
    assert (await asyncio.wait_for(sub.__anext__(), 5)).body == {"n": 1}
    await sub.close()


async def test_a_subscription_whose_queue_is_deleted_subscribes_again(env: Env) -> None:
    """The broker cancels the consumer of a deleted queue (an operator's delete) on a
    channel that stays open, so no reopen comes: the subscription declares a new queue
    bound to the same keys and reads on, instead of waiting for ever."""
    host = f"h{uuid.uuid4().hex[:8]}"
    sub = await env.client.subscribe(EVENTS_EXCHANGE, [f"{host}.#"])
    first = sub.queue_name  # type: ignore[attr-defined]

    def ev(n: int) -> Envelope:
        return Envelope(kind=Kind.EVENT, op="domain.event", body={"n": n}, src=host)

    await env.server.publish(EVENTS_EXCHANGE, f"{host}.d.started", ev(1), confirm=True)
    assert (await asyncio.wait_for(sub.__anext__(), 5)).body == {"n": 1}
    # an exclusive queue: only its own connection or an operator may delete it
    deleted = await asyncio.to_thread(
        subprocess.run, ["rabbitmqctl", "-q", "delete_queue", first],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert deleted.returncode == 0, deleted.stderr
    async with asyncio.timeout(10):  # the new queue is bound once the cancel came
        while sub.queue_name == first:  # type: ignore[attr-defined]
            await asyncio.sleep(0.05)
    second = sub.queue_name  # type: ignore[attr-defined]
    assert second.startswith("amq.gen-"), second
    await env.server.publish(EVENTS_EXCHANGE, f"{host}.d.stopped", ev(2), confirm=True)
    assert (await asyncio.wait_for(sub.__anext__(), 5)).body == {"n": 2}
    listed = await asyncio.to_thread(
        subprocess.run, ["rabbitmqctl", "-q", "list_queues", "name", "consumers"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    counts = dict(line.split() for line in listed.stdout.splitlines()[1:])
    assert (first in counts, counts.get(second)) == (False, "1")  # one queue, one consumer
    await sub.close()


async def test_a_one_shot_subscription_whose_queue_is_deleted_fails_loudly(env: Env) -> None:
    """The one-shot transport (the CLI's short reads) does not resubscribe: a read the
    broker cut (its queue deleted) raises BusUnavailable once what it had is read, where
    it used to wait for ever, and the transport serves on."""
    host = f"h{uuid.uuid4().hex[:8]}"
    reader = OneShotBus(URL, "test-oneshot")
    await reader.connect()
    try:
        sub = await reader.subscribe(EVENTS_EXCHANGE, [f"{host}.#"])

        def ev(n: int) -> Envelope:
            return Envelope(kind=Kind.EVENT, op="domain.event", body={"n": n}, src=host)

        await env.server.publish(EVENTS_EXCHANGE, f"{host}.d.started", ev(1), confirm=True)
        assert (await asyncio.wait_for(sub.__anext__(), 5)).body == {"n": 1}
        await env.server.publish(EVENTS_EXCHANGE, f"{host}.d.paused", ev(2), confirm=True)
        assert sub.queue_name.startswith("amq.gen-"), sub.queue_name
        deleted = await asyncio.to_thread(  # exclusive: only an operator may delete it
            subprocess.run, ["rabbitmqctl", "-q", "delete_queue", sub.queue_name],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert deleted.returncode == 0, deleted.stderr
        with pytest.raises(BusUnavailable, match="cancelled this subscription"):
            async with asyncio.timeout(10):
                while True:
                    await sub.__anext__()
        again = await reader.subscribe(EVENTS_EXCHANGE, [f"{host}.#"])  # serves on
        await env.server.publish(EVENTS_EXCHANGE, f"{host}.d.stopped", ev(3), confirm=True)
        assert (await asyncio.wait_for(again.__anext__(), 5)).body == {"n": 3}
        await again.close()
    finally:
        await reader.close()


async def _publish_numbered(bus: AmqpBus, host: str, first: int, last: int) -> None:
    for start in range(first, last + 1, 250):
        await asyncio.gather(*(
            bus.publish(EVENTS_EXCHANGE, f"{host}.d.tick", Envelope(
                kind=Kind.EVENT, op="domain.event", body={"n": n}, src=host
            ), confirm=True)
            for n in range(start, min(start + 250, last + 1))
        ))  # fmt: skip


async def _read_numbered(sub: Any, host: str, count: int) -> list[int]:
    got: list[int] = []
    async with asyncio.timeout(60):
        while len(got) < count:
            env = await sub.__anext__()
            if env.src == host:
                got.append(env.body["n"])
    return got


@contextlib.asynccontextmanager
async def _history_reader(
    transport: type[AmqpBus | OneShotBus], since: float
) -> AsyncIterator[tuple[AmqpBus | OneShotBus, Any]]:
    """A bus of its own with a 50-message subscription buffer, reading history from
    ``since``: (the bus, its subscription)."""
    reader = transport(URL, "test-history", BusSettings(url=URL, subscription_buffer=50))
    await reader.connect()
    try:
        sub = await reader.history(since)
        yield reader, sub
        await sub.close()
    finally:
        await reader.close()


@pytest.mark.parametrize("transport", [AmqpBus, OneShotBus])
async def test_a_history_read_past_its_buffer_loses_and_repeats_nothing(
    env: Env, transport: type[AmqpBus | OneShotBus]
) -> None:
    """RabbitMQ delivers a stream in whole chunks, past the prefetch count: a reader with a
    50-message buffer, reading 3,000 events at once, used to drop the oldest (hundreds
    lost); it now pauses its consumer and resumes from the first offset it did not keep.
    Both transports: the client library's and the CLI's one-shot one."""
    host = f"h{uuid.uuid4().hex[:8]}"
    since = time.time() - 1
    await _publish_numbered(env.server, host, 1, 3000)
    async with _history_reader(transport, since) as (_, sub):
        assert await _read_numbered(sub, host, 3000) == list(range(1, 3001))
        await _publish_numbered(env.server, host, 3001, 3001)
        assert await _read_numbered(sub, host, 1) == [3001]  # nothing read twice before it


async def test_a_history_read_resumes_where_it_stood_after_a_reconnect(env: Env) -> None:
    """A reconnect consumes again from the first offset not kept, not from the read's
    original start (the robust queue did that: the whole stream again, into a full
    buffer)."""
    host = f"h{uuid.uuid4().hex[:8]}"
    since = time.time() - 1
    await _publish_numbered(env.server, host, 1, 600)
    async with _history_reader(AmqpBus, since) as (reader, sub):
        assert isinstance(reader, AmqpBus)
        first = await _read_numbered(sub, host, 300)
        await _drop_and_wait_back(reader)
        await _publish_numbered(env.server, host, 601, 700)
        rest = await _read_numbered(sub, host, 400)
        assert first + rest == list(range(1, 701))


async def test_a_history_reader_that_empties_its_buffer_during_a_pause_still_resumes(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consumer's cancel takes a round trip; a reader that takes every buffered event
    meanwhile must not be left waiting on a paused read (made certain here by a slow
    cancel; it stalled 1 run in 3 on a loaded broker)."""
    from virtbus.bus import amqp_consumers

    real_cancel = amqp_consumers._cancel

    async def slow_cancel(bus: AmqpBus, queue: AbstractQueue, tag: str) -> None:
        await asyncio.sleep(0.3)
        await real_cancel(bus, queue, tag)

    monkeypatch.setattr(amqp_consumers, "_cancel", slow_cancel)
    host = f"h{uuid.uuid4().hex[:8]}"
    since = time.time() - 1
    await _publish_numbered(env.server, host, 1, 500)
    async with _history_reader(AmqpBus, since) as (_, sub):
        assert await _read_numbered(sub, host, 500) == list(range(1, 501))
