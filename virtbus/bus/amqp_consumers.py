"""The consuming side of the RabbitMQ transport: RPC servers and topic subscriptions.

Each runs on a channel of its own, so its prefetch (basic.qos) is its own bound: a server
holds at most ``settings.prefetch`` unacked calls, a subscription at most
``settings.subscription_buffer`` unread envelopes (acked when read, so a slow reader
stops the broker from sending rather than growing a local queue).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import aio_pika
import aiormq
import pamqp.frame
from aio_pika import Queue
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
)
from aiormq.abc import ChannelFrame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from virtbus.aio import TaskGroup, backoff_delays
from virtbus.bus.base import BeforeAck, CallHandler
from virtbus.bus.buffer import Admit, BoundedBuffer, StreamWindow, stream_offset_of
from virtbus.bus.rpc import body_from_exception, settle
from virtbus.bus.topology import (
    DEADLINE_HEADER,
    DIRECT_REPLY_TO,
    EVENT_HISTORY,
    QUEUE_TYPE_HELP,
    RPC_EXCHANGE,
    QueueSpec,
    call_queue_for,
)
from virtbus.errors import OperationFailed, ProtocolError, VirtbusError
from virtbus.protocol.codec import decode, encode
from virtbus.protocol.envelope import Envelope, Kind, error_body, new_id, reply_to
from virtbus.settings import Backoff

if TYPE_CHECKING:
    from virtbus.bus.amqp import AmqpBus

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = "application/msgpack"
# What aio-pika/aiormq raise when the broker or the socket fails (TimeoutError is an OSError).
AMQP_FAILURES: Final = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    OSError,
)


# POISONED REPLIES. RabbitMQ 3.10 and 3.11 (Debian bookworm ships 3.10.8) crash the
# channel, and so close the whole connection with 541 INTERNAL_ERROR, when a reply is
# published to the direct reply-to address of a caller whose node is not running:
# rabbit_direct_reply_to:decode_reply_to_v2 returns a bare ``error`` there, which
# rabbit_channel:deliver_reply does not match (a case_clause; 3.12 returns
# ``{error, target_node_not_found}``, rabbitmq-server commit 87017827e0). A server that
# replies before it acks then loses the ack with the connection, the call comes back,
# its reply (from the call memory) kills the next connection too, and so on for ever: a
# node stopped under a caller kept an agent off the bus (issue 18). So a *redelivered*
# call is acked before its reply goes: a poisoned reply costs one more reconnect, never
# a loop. A first delivery keeps reply-then-ack (its reply does not wait for the reply
# log's write) and comes back at most once for this. A reply lost so is the caller's
# timeout, a retryable error: a retry under the same call id is answered from memory.


# NO_DRAIN_WAIT. aiormq's basic_publish(wait=True), its default, hands the frames to the
# connection's writer task and then waits until that task has written them and drained the
# socket: two more turns of the event loop and a future per message, ~40% of a publish's CPU
# (about 65 of 160 us measured on the 2-core machine). virtbus publishes, and acks calls
# and read events (ack_queued), with wait=False:
# the frames still go out in the order they were queued (one bounded write queue per
# connection, one writer), so reply-then-ack and the outbox's in-order window are kept,
# and what bounds the data in flight is what bounded it before: confirms (calls, events),
# the prefetch (replies), a flush's batch (audit records) and a pass (metrics). A socket
# that fails after the frames were queued fails the confirm (calls, events) or loses a
# message that was best effort anyway (replies: the caller's timeout, then a retry answered
# from the reply log; heartbeats, metrics and audit records: the next one).


async def restore_with_backoff(
    channel: AbstractRobustChannel,
    step: Callable[[], Awaitable[None]],
    *,
    policy: Backoff,
    what: str,
    stopped: Callable[[], bool],
    delay_first: bool = False,
) -> bool:
    """Run ``step`` (declare, bind, consume again) once ``channel`` is ready, retrying with
    the reconnect ``policy`` while the broker refuses: the one loop the consumers that the
    broker can cancel under an open channel share (a server, a subscription, a history
    read). Always in a task of its own, never in the reconnect task (it waits for the
    channel). False when it gave up: ``stopped()``, or a refusal that closed the channel,
    whose restore by aio-pika consumes again instead."""
    delays = backoff_delays(policy)
    if delay_first:
        await asyncio.sleep(next(delays))
    while not stopped():
        await channel.ready()
        try:
            await step()
            return True
        except AMQP_FAILURES as exc:
            log.warning("cannot %s: %s", what, exc)
            if channel.is_closed:
                return False
        await asyncio.sleep(next(delays))
    return False


async def publish_queued(
    channel: aiormq.abc.AbstractChannel,
    body: bytes,
    *,
    exchange: str,
    routing_key: str,
    properties: Basic.Properties,
    mandatory: bool = False,
) -> Basic.Ack | Basic.Nack | Basic.Reject | None:
    """``basic_publish`` that returns once the frames are queued (NO_DRAIN_WAIT), or with
    the broker's confirm on a channel with publisher confirms."""
    assert isinstance(channel, aiormq.Channel)  # what aio-pika's channels are made of
    return await channel.basic_publish(
        body, exchange=exchange, routing_key=routing_key, properties=properties,
        mandatory=mandatory, wait=False,
    )  # fmt: skip


# ONE WRITE PER WINDOW. aiormq's basic_publish is a coroutine per message that takes the
# channel's lock, queues its frames as one item on the connection's write queue (at most 10
# items: the 11th publisher waits holding the lock) and awaits its confirm. An outbox window
# of 256 events so went out one message per turn of the event loop, each its own socket
# send: in an outbox replay the sends alone were over a third of the agent's CPU, a task,
# two timeouts and a lock handoff per event most of the rest (tests/bench/outbox_replay.py).
# publish_confirmed_window does what basic_publish does for each message of a window, under
# the lock once: it numbers them (the channel's delivery_tag, as the broker numbers a
# confirm channel's publishes), registers a confirm future for each in the channel's
# ``confirmations`` (aiormq settles them as the broker's acks come, one by one or
# ``multiple``, and fails them when the channel closes), and queues all their frames as one
# write-queue item, written with one send. Not ``mandatory``: no message is ever returned,
# so aiormq's message-id-to-tag map (used only for returns) is not needed.


# A window's method frames differ only by routing key: marshalled once per (channel
# number, exchange, key), as pamqp validates and packs each field of every frame it builds.
_PUBLISH_FRAMES: dict[tuple[int, str, str], bytes] = {}
_PUBLISH_FRAMES_MAX = 4096


def message_frames(
    channel: aiormq.Channel,
    body: bytes,
    *,
    exchange: str,
    routing_key: str,
    properties: Basic.Properties,
) -> bytes:
    """basic.publish's method, header and body frames, marshalled (the body cut at the
    channel's frame size, as aiormq cuts it)."""
    number = channel.number
    method = _PUBLISH_FRAMES.get((number, exchange, routing_key))
    if method is None:
        if len(_PUBLISH_FRAMES) >= _PUBLISH_FRAMES_MAX:
            _PUBLISH_FRAMES.clear()
        method = pamqp.frame.marshal(
            Basic.Publish(exchange=exchange, routing_key=routing_key), number
        )
        _PUBLISH_FRAMES[(number, exchange, routing_key)] = method
    header = ContentHeader(properties=properties, body_size=len(body))
    parts = [method, pamqp.frame.marshal(header, number)]
    size = channel.max_content_size
    parts += (pamqp.frame.marshal(ContentBody(body[i : i + size]), number)
              for i in range(0, len(body), size))  # fmt: skip
    return b"".join(parts)


async def publish_confirmed_window(
    channel: aiormq.abc.AbstractChannel, messages: Sequence[bytes]
) -> list[asyncio.Future[Basic.Ack | Basic.Nack | Basic.Reject]]:
    """Queue the messages' frames (:func:`message_frames`) in order as one write on a
    channel with publisher confirms (ONE WRITE PER WINDOW); returns their confirm futures
    once queued. Raises what the channel's lock raises when it is closed (nothing sent)."""
    assert isinstance(channel, aiormq.Channel)  # what aio-pika's channels are made of
    assert channel.publisher_confirms, "a window needs a channel with publisher confirms"
    payload = ChannelFrame(payload=b"".join(messages), should_close=False)
    async with channel.lock:
        first = channel.delivery_tag + 1
        tags = range(first, first + len(messages))
        futures = []
        for tag in tags:
            future = channel.create_future()
            channel.confirmations[tag] = future
            futures.append(future)
        channel.delivery_tag = tags.stop - 1
        try:
            await channel.write_queue.put(payload)
        except BaseException:
            # Not queued, so never seen by the broker: its numbers are free again.
            channel.delivery_tag = first - 1
            for tag, future in zip(tags, futures, strict=True):
                channel.confirmations.pop(tag, None)
                future.cancel()
            raise
    return futures


async def ack_queued(message: AbstractIncomingMessage, *, multiple: bool = False) -> None:
    """``basic.ack`` that returns once its frame is queued (NO_DRAIN_WAIT), not once the
    socket drained: aio-pika's ``message.ack()`` waits for the writer, two loop turns and a
    future per call. The frame still leaves after the reply queued before it on the same
    connection; an ack a failing socket loses is a redelivery, answered from the call
    memory or the reply log, as an ack lost with the connection always was."""
    tag = message.delivery_tag
    if tag is None:  # a no-ack delivery: nothing to acknowledge
        return
    await message.channel.basic_ack(tag, multiple=multiple, wait=False)


def deadline_header(epoch_seconds: float) -> int:
    """``x-deadline`` travels as integer epoch *milliseconds*: AMQP field tables encode a
    Python float as a 32-bit float (pamqp), far too coarse for an epoch."""
    return int(epoch_seconds * 1000)


def deadline_from_header(value: Any) -> float | None:
    """Epoch seconds from ``x-deadline`` (None when absent); also accepts seconds from
    other clients. A header of another type is a malformed call (ProtocolError): ignoring
    it would run a call whose caller may have given up long ago."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ProtocolError(
            f"header {DEADLINE_HEADER} must be a number (epoch milliseconds), "
            f"not {type(value).__name__}"
        )
    if not math.isfinite(value):
        raise ProtocolError(f"header {DEADLINE_HEADER} must be finite")
    return value / 1000 if value > 1e11 else float(value)


def direct_reply_address(address: str | None) -> str | None:
    """A call's reply address (its ``reply_to``): None when absent, ProtocolError unless
    direct reply-to.

    A server publishes replies to the default exchange, so any other ``reply_to`` would let
    a caller make the agent publish into a queue of the caller's choosing.
    """
    if not address:
        return None
    if not address.startswith(DIRECT_REPLY_TO):
        raise ProtocolError(
            f"reply_to {address[:64]!r} is not RabbitMQ's direct reply-to ({DIRECT_REPLY_TO})"
        )
    return address


async def _quietly(action: Awaitable[Any], what: str) -> None:
    """Acks/rejects on a channel that died with its connection: the broker requeues anyway."""
    try:
        await action
    except AMQP_FAILURES as exc:
        log.debug("%s failed: %s", what, exc)


async def _bounded(action: Awaitable[Any], bus: AmqpBus) -> Any:
    """A broker round trip of a stop or close: bounded by the connect timeout (a timeout
    is an OSError, quiet in :func:`_quietly`), since a robust channel's operations wait
    for the connection to come back, and a stopping daemon must not wait for that."""
    return await asyncio.wait_for(action, bus.settings.connect_timeout)


async def _cancel(bus: AmqpBus, queue: AbstractQueue, tag: str) -> None:
    """Cancel a consumer, unless the bus is down: then the consumer went with the
    connection, and the robust queue would wait for a reconnect to cancel it."""
    if not bus.connected:
        return
    await _bounded(queue.cancel(tag), bus)


async def _open_call_queue(
    bus: AmqpBus, connection: AbstractRobustConnection, spec: QueueSpec
) -> tuple[AbstractRobustChannel, AbstractRobustQueue]:
    """A channel of its own (its prefetch bounds the server's work) and the call queue."""
    timeout = bus.settings.connect_timeout
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.set_qos(prefetch_count=bus.settings.prefetch, timeout=timeout)
        queue = await channel.declare_queue(
            spec.name, durable=spec.durable, arguments=spec.arguments, timeout=timeout
        )
    except BaseException:
        await _quietly(channel.close(), "closing a server channel")
        raise
    return channel, queue


async def _replace_other_type_queue(
    connection: AbstractRobustConnection, spec: QueueSpec, route: str, timeout: float, current: str
) -> None:
    """Delete a route's call queue of the other type (``current``: a classic queue of an
    older virtbus, or one left by a change of ``bus.call_queue_type``) if it is empty and
    unused, so that the queue of the wanted type can be declared; else OPERATION_FAILED
    saying what the operator has to do.

    A classic queue is deleted with if-empty and if-unused: the broker checks both
    atomically, no call can be lost. Quorum queues refuse both flags (NOT_IMPLEMENTED,
    which closes the whole connection), so a quorum queue is first unbound from
    ``virtbus.rpc`` (a call sent meanwhile comes back at once as NO_CONNECT instead of
    landing in it), then counted (messages, consumers) and deleted only when both are 0;
    otherwise it is bound again and kept.
    """
    wanted = spec.arguments["x-queue-type"]
    refused = (
        f"the call queue {spec.name} is a {current} queue, bus.call_queue_type is {wanted!r}, "
        "and it is not empty or still consumed"
    )
    channel = await connection.channel(publisher_confirms=False)
    try:
        if current == "classic":
            try:
                await channel.queue_delete(
                    spec.name, if_unused=True, if_empty=True, timeout=timeout
                )
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise OperationFailed(
                    f"{refused} ({exc}): " + QUEUE_TYPE_HELP.format(queue=spec.name)
                ) from exc
        else:
            queue = await channel.declare_queue(spec.name, passive=True, timeout=timeout)
            await queue.unbind(RPC_EXCHANGE, routing_key=route, timeout=timeout)
            counted = await channel.declare_queue(spec.name, passive=True, timeout=timeout)
            result = counted.declaration_result
            if result.message_count or result.consumer_count:
                await queue.bind(RPC_EXCHANGE, routing_key=route, timeout=timeout)
                raise OperationFailed(
                    f"{refused} ({result.message_count} calls, {result.consumer_count} "
                    "consumers): " + QUEUE_TYPE_HELP.format(queue=spec.name)
                )
            await channel.queue_delete(spec.name, timeout=timeout)
    finally:
        await _quietly(channel.close(), "closing a queue replacement channel")
    log.warning("replaced the empty %s call queue %s by a %s queue", current, spec.name, wanted)


def _current_type(exc: Exception) -> str:
    """The queue type the broker's refusal names ("current is 'quorum'"; a classic queue
    declared without the argument, as older virtbus did: "current is none")."""
    match = re.search(r"current is (?:the value )?'([\w-]+)'", str(exc))
    return match.group(1) if match else "classic"


class Delivery:
    """A call as the server reads it: the fields of aiormq's delivered message it uses.

    The server consumes on the aiormq channel itself: aio-pika's consumer built an
    IncomingMessage (28 attribute sets) and a second task for every call.
    """

    __slots__ = (
        "body", "channel", "correlation_id", "delivery_tag", "headers", "message_id",
        "redelivered", "reply_to", "user_id",
    )  # fmt: skip

    def __init__(self, message: aiormq.abc.DeliveredMessage) -> None:
        frame = message.delivery
        assert isinstance(frame, Basic.Deliver) and frame.delivery_tag is not None
        props = message.header.properties
        self.body = message.body
        self.channel = message.channel
        self.delivery_tag: int = frame.delivery_tag
        self.redelivered = bool(frame.redelivered)
        self.reply_to = props.reply_to
        self.correlation_id = props.correlation_id
        self.message_id = props.message_id
        self.headers = props.headers
        self.user_id = props.user_id

    async def ack(self) -> None:
        """Queued, not drained (NO_DRAIN_WAIT), like :func:`ack_queued`."""
        await self.channel.basic_ack(self.delivery_tag, wait=False)

    async def reject(self, *, requeue: bool) -> None:
        await self.channel.basic_reject(self.delivery_tag, requeue=requeue)


class AmqpServer:
    """Consumes one call queue; see :class:`virtbus.bus.base.Server`.

    Its channel and queue are aio-pika's robust ones (a reopen restores the qos, the queue
    and its binding); the consumer is on the aiormq channel under it (:class:`Delivery`),
    consumed again by this server when the channel reopens, and when the broker cancels
    it (its queue deleted, a classic queue's node gone): aio-pika restores only its own
    consumers, so without that the server went deaf on an open channel."""

    def __init__(
        self,
        bus: AmqpBus,
        route: str,
        handler: CallHandler,
        channel: AbstractRobustChannel,
        queue: AbstractRobustQueue,
        before_ack: BeforeAck | None = None,
    ) -> None:
        self.route = route
        self._bus = bus
        self._handler = handler
        self._before_ack = before_ack
        self._channel = channel
        self._queue = queue
        self._tag: str | None = None
        self._consuming_on: aiormq.abc.AbstractChannel | None = None  # the consumer's channel
        self._tasks = TaskGroup(f"amqp-server:{route}")
        self._restores = TaskGroup(f"amqp-server-restore:{route}")  # at most one, see _restore
        self._restoring: asyncio.Task[None] | None = None
        self._consume_lock = asyncio.Lock()  # one consume per channel: reopen and restore race
        self._stopping = False
        self.on_stopped: Callable[[AmqpServer], None] | None = None

    @classmethod
    async def start(
        cls,
        bus: AmqpBus,
        connection: AbstractRobustConnection,
        route: str,
        handler: CallHandler,
        before_ack: BeforeAck | None = None,
    ) -> AmqpServer:
        spec = call_queue_for(route, bus.settings.call_queue_type)
        timeout = bus.settings.connect_timeout
        try:
            channel, queue = await _open_call_queue(bus, connection, spec)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            if "x-queue-type" not in str(exc):
                raise
            await _replace_other_type_queue(connection, spec, route, timeout, _current_type(exc))
            channel, queue = await _open_call_queue(bus, connection, spec)
        try:
            await queue.bind(RPC_EXCHANGE, routing_key=route, timeout=timeout)
            server = cls(bus, route, handler, channel, queue, before_ack)
            await server._consume(await channel.get_underlay_channel())
            channel.reopen_callbacks.add(server._on_reopened)
        except BaseException:
            await _quietly(channel.close(), "closing a server channel")
            raise
        return server

    @property
    def queue_name(self) -> str:
        return self._queue.name

    async def _consume(self, underlay: aiormq.abc.AbstractChannel) -> None:
        """Consume on ``underlay`` unless this server already does (a reopen and a restore
        may both get here for one channel: a second consumer would double the prefetch)."""
        async with self._consume_lock:
            if underlay is self._consuming_on or self._stopping:
                return
            timeout = self._bus.settings.connect_timeout
            underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)  # a set: once
            ok = await underlay.basic_consume(self._queue.name, self._on_delivery, timeout=timeout)
            self._tag, self._consuming_on = ok.consumer_tag, underlay

    def _on_broker_cancel(self, frame: Basic.Cancel) -> None:
        """The broker cancelled our consumer (its queue was deleted, or a classic queue's
        node went away) on a channel that stays open: no reopen will consume again."""
        if frame.consumer_tag != self._tag or self._stopping:
            return
        log.warning("the broker cancelled the consumer of %s: consuming again", self.route)
        self._tag = self._consuming_on = None
        self._spawn_restore()

    def _spawn_restore(self) -> None:
        if self._restoring is None or self._restoring.done():
            self._restoring = self._restores.spawn(self._restore(), "restore consumer")

    async def _restore(self) -> None:
        """Declare and bind the call queue again (it may be gone) and consume, with the
        bus's reconnect backoff while the broker refuses. A channel that closes meanwhile
        is restored by aio-pika, and its reopen consumes."""
        timeout = self._bus.settings.connect_timeout

        async def step() -> None:
            assert isinstance(self._channel, aio_pika.Channel)
            underlay = await aio_pika.Channel.get_underlay_channel(self._channel)
            if underlay is self._consuming_on:
                return  # the channel's reopen consumed meanwhile
            await self._queue.declare(timeout=timeout)
            await self._queue.bind(RPC_EXCHANGE, routing_key=self.route, timeout=timeout)
            await self._consume(underlay)

        await restore_with_backoff(self._channel, step, policy=self._bus.settings.reconnect,
                                   what=f"consume {self.route} again",
                                   stopped=lambda: self._stopping)  # fmt: skip

    async def _on_reopened(self, _sender: object) -> None:
        """aio-pika restored the channel (qos, the queue and its binding) but not this
        consumer, which is not its own: consume again (once per new channel)."""
        if self._stopping:
            return
        try:
            # the base accessor: the robust one would wait for the connection, in the
            # reconnect task that makes it ready (see AmqpBus._refresh_underlays)
            assert isinstance(self._channel, aio_pika.Channel)
            underlay = await aio_pika.Channel.get_underlay_channel(self._channel)
            await self._consume(underlay)
        except AMQP_FAILURES as exc:  # e.g. a timeout: not left deaf, retried with backoff
            log.warning("cannot consume %s again on its reopened channel: %s", self.route, exc)
            self._spawn_restore()

    async def _on_delivery(self, message: aiormq.abc.DeliveredMessage) -> None:
        await self._on_message(Delivery(message))

    async def _on_message(self, message: Delivery) -> None:
        # Everything up to the handler call is synchronous: handlers see delivery order.
        if self._stopping:
            return  # left unacked: requeued when the channel closes
        try:
            address = direct_reply_address(message.reply_to)
        except ProtocolError as exc:
            await self._dead_letter(message, exc)
            return
        try:
            call = decode(message.body, self._bus.settings.limits, message.user_id)
            if call.kind is not Kind.CALL:
                raise ProtocolError(f"expected a call, got a {call.kind}")
            deadline = deadline_from_header((message.headers or {}).get(DEADLINE_HEADER))
        except ProtocolError as exc:
            await self._refuse(message, address, exc)
            return
        if deadline is not None and time.time() > deadline:
            log.warning(
                "dropping call %s %s from %s: its deadline passed", call.op, call.id, call.src
            )
            await _quietly(message.ack(), "ack of an expired call")
            return
        try:
            awaitable: Awaitable[dict[str, Any]] | None = self._handler(call)
        except Exception as exc:  # noqa: BLE001 - a handler bug is the caller's answer
            awaitable, body = None, body_from_exception(exc, call.op)
        else:
            body = {}
        self._tasks.spawn(
            self._answer(message, address, call, awaitable, body), name=f"call:{call.id}"
        )

    async def _answer(
        self,
        message: Delivery,
        address: str | None,
        call: Envelope,
        awaitable: Awaitable[dict[str, Any]] | None,
        body: dict[str, Any],
    ) -> None:
        if awaitable is not None:
            body = await settle(awaitable, call.op)
        if message.redelivered:
            # Acked before the reply goes (POISONED REPLIES, above).
            await self._settle(message, call, awaitable)
            if address is not None:
                await self._reply(address, message, call, body)
            return
        if address is not None:
            await self._reply(address, message, call, body)
        await self._settle(message, call, awaitable)

    async def _reply(
        self,
        address: str,
        message: Delivery,
        call: Envelope,
        body: dict[str, Any],
    ) -> None:
        reply = reply_to(call, body, self._bus.src)
        try:
            data = encode(reply)
        except ProtocolError as exc:
            data = encode(reply_to(call, error_body(exc), self._bus.src))
        # Echo the AMQP correlation id (ours equals the envelope id; other clients may differ).
        await self._send_reply(address, message.correlation_id or call.id, data)

    async def _settle(
        self,
        message: Delivery,
        call: Envelope,
        awaitable: Awaitable[dict[str, Any]] | None,
    ) -> None:
        if self._before_ack is not None and awaitable is not None:
            await self._before_ack(call)  # e.g. the reply is on disk: a redelivery is answered
        await _quietly(message.ack(), f"ack of call {call.id}")

    async def _dead_letter(self, message: Delivery, exc: VirtbusError) -> None:
        """Reject without requeue: the queue's dead-letter exchange keeps it for a human."""
        log.warning(
            "dead-lettering a message on %s (id %s): %s", self.route, message.message_id, exc
        )
        await _quietly(message.reject(requeue=False), "reject of a bad message")

    async def _refuse(self, message: Delivery, address: str | None, exc: ProtocolError) -> None:
        """A bad message gets an RPC_ERROR reply if it can be answered, else dead-lettering."""
        if address is None:
            await self._dead_letter(message, exc)
            return
        log.warning("answering a bad message on %s with %s: %s", self.route, exc.code, exc)
        call_id = message.correlation_id or message.message_id or new_id()
        reply = Envelope(
            kind=Kind.REPLY,
            op="invalid",
            body=error_body(exc),
            src=self._bus.src,
            id=call_id,
        )
        await self._send_reply(address, call_id, encode(reply))
        await _quietly(message.ack(), "ack of a bad message")

    async def _send_reply(self, reply_address: str, call_id: str, data: bytes) -> None:
        properties = Basic.Properties(
            content_type=CONTENT_TYPE, delivery_mode=1, correlation_id=call_id
        )
        try:
            channel = await self._channel.get_underlay_channel()
            # Never mandatory: RabbitMQ may "return" a delivered direct reply-to message.
            await publish_queued(
                channel, data, exchange="", routing_key=reply_address, properties=properties
            )
        except AMQP_FAILURES as exc:
            log.warning("cannot send the reply to %s: %s", call_id, exc)

    async def stop(self) -> None:
        """Cancel the consumer, let calls in hand finish (bounded), then close the channel
        so that whatever was delivered but not started goes back to the queue."""
        if self._stopping:
            return
        self._stopping = True
        await self._restores.cancel_all()
        underlay = self._consuming_on
        # unless the bus is down: then the consumer went with the connection
        if self._tag is not None and underlay is not None and self._bus.connected:
            await _quietly(
                _bounded(underlay.basic_cancel(self._tag), self._bus),
                f"cancel of {self.route} consumer",
            )
        await self._tasks.stop(self._bus.settings.stop_grace)
        await _quietly(_bounded(self._channel.close(), self._bus), f"close of {self.route} channel")
        if self.on_stopped is not None:
            self.on_stopped(self)


class AmqpSubscription:
    """An exclusive auto-delete queue bound with topic keys, read as an async iterator.

    The queue is server-named (``amq.gen-*``): the only queues a client may configure
    (see :mod:`virtbus.bus.definitions`). It is not an aio-pika robust queue, which would
    be re-declared by its old name after a reconnect (names under ``amq.`` are the
    broker's to give); instead the channel's reopen declares, binds and consumes a new
    one. A history subscription reads the admin's stream, declared passively.

    When the broker cancels the consumer on a channel that stays open (the queue was
    deleted: an operator's delete, a policy), a new queue is declared the same way, with
    the reconnect backoff while the broker refuses: events published meanwhile are not
    seen (a live subscription has no history; ``history`` has). Without it the
    subscription waited for ever.
    """

    def __init__(
        self,
        bus: AmqpBus,
        exchange: str,
        binding_keys: list[str],
        channel: AbstractRobustChannel,
        queue: AbstractQueue | None,
    ) -> None:
        self.exchange = exchange
        self.binding_keys = list(binding_keys)
        self._bus = bus
        self._channel = channel
        self._queue = queue
        self._tag: str | None = None
        self._buffer: BoundedBuffer[tuple[AbstractIncomingMessage, Envelope]] = BoundedBuffer(
            bus.settings.subscription_buffer
        )
        self.on_closed: Callable[[AmqpSubscription], None] | None = None
        self._read_unacked = 0  # messages read since the last ack (see __anext__)
        self._ack_every = max(1, bus.settings.subscription_buffer // 2)
        self._consuming_on: aiormq.abc.AbstractChannel | None = None  # the consumer's channel
        self._declare_lock = asyncio.Lock()  # a reopen and a restore may race: one queue
        self._restores = TaskGroup(f"subscription:{exchange}")  # at most one, see _restore
        self._restoring: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        bus: AmqpBus,
        connection: AbstractRobustConnection,
        exchange: str,
        binding_keys: list[str],
    ) -> AmqpSubscription:
        timeout = bus.settings.connect_timeout
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.set_qos(prefetch_count=bus.settings.subscription_buffer, timeout=timeout)
            sub = cls(bus, exchange, binding_keys, channel, None)
            await sub._declare()
        except BaseException:
            await _quietly(channel.close(), "closing a subscription channel")
            raise
        channel.reopen_callbacks.add(sub._on_reopened)
        return sub

    async def _declare(self) -> None:
        """A new server-named queue, bound to our keys and consumed, unless the channel
        has a live consumer of ours already (a reopen and a restore both got here)."""
        async with self._declare_lock:
            underlay = await self._channel.get_underlay_channel()
            if self._buffer.closed or (underlay is self._consuming_on and self._tag):
                return
            timeout = self._bus.settings.connect_timeout
            queue = Queue(self._channel, None, False, True, True, None)  # exclusive, auto-del
            await queue.declare(timeout=timeout)
            for key in self.binding_keys:
                await queue.bind(self.exchange, routing_key=key, timeout=timeout)
            underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)  # a set: once
            self._queue = queue
            self._tag = await queue.consume(self._on_message, timeout=timeout)
            self._consuming_on = underlay

    async def _on_reopened(self, _sender: object) -> None:
        """The old queue went with the old connection: declare a new one."""
        if self._buffer.closed:
            return
        try:
            await self._declare()
        except AMQP_FAILURES as exc:  # e.g. a timeout: not left deaf, retried with backoff
            log.warning("cannot restore the subscription to %s: %s", self.exchange, exc)
            self._spawn_restore()

    def _on_broker_cancel(self, frame: Basic.Cancel) -> None:
        """The broker cancelled our consumer (its queue was deleted) on a channel that
        stays open, so no reopen will declare a new one: restore it here."""
        if frame.consumer_tag != self._tag or self._buffer.closed:
            return
        log.warning("the broker cancelled the subscription to %s: subscribing again",
                    self.exchange)  # fmt: skip
        self._tag = None
        self._spawn_restore()

    def _spawn_restore(self) -> None:
        if self._restoring is None or self._restoring.done():
            self._restoring = self._restores.spawn(self._restore(), "restore subscription")

    async def _restore(self) -> None:
        """Declare a new queue, with the bus's reconnect backoff while the broker refuses
        (a refusal that closes the channel: its reopen declares one)."""
        await restore_with_backoff(self._channel, self._declare,
                                   policy=self._bus.settings.reconnect,
                                   what=f"restore the subscription to {self.exchange}",
                                   stopped=lambda: self._buffer.closed)  # fmt: skip

    @classmethod
    async def start_stream(
        cls,
        bus: AmqpBus,
        connection: AbstractRobustConnection,
        offset: str | datetime,
        stream: QueueSpec = EVENT_HISTORY,
    ) -> HistorySubscription:
        """Consume a history stream from ``offset`` (streams need qos and acks)."""
        timeout = bus.settings.connect_timeout
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.set_qos(prefetch_count=bus.settings.subscription_buffer, timeout=timeout)
            # a plain queue object: a robust one would re-consume from ``offset`` itself
            # after a reconnect; the subscription resumes from where it stands instead
            queue = Queue(channel, stream.name, True, False, False, None, passive=True)
            await queue.declare(timeout=timeout)
            sub = HistorySubscription(bus, stream.name, channel, queue, offset)
            await sub._consume()
        except BaseException:
            await _quietly(channel.close(), "closing a history channel")
            raise
        channel.reopen_callbacks.add(sub._on_reopened)
        return sub

    @property
    def queue_name(self) -> str:
        return self._queue.name if self._queue is not None else ""

    @property
    def dropped(self) -> int:
        """Envelopes discarded locally (only possible around a reconnect)."""
        return self._buffer.dropped

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            envelope = decode(message.body, self._bus.settings.limits, message.user_id)
        except ProtocolError as exc:
            log.warning(
                "skipping a bad message on %s %s: %s", self.exchange, message.routing_key, exc
            )
            await _quietly(message.ack(), "ack of a skipped message")
            return
        if self._buffer.closed:
            return
        dropped = self._buffer.push((message, envelope))
        if dropped is not None:  # an unread message of a channel that died before
            await _quietly(dropped[0].ack(), "ack of a dropped message")

    def __aiter__(self) -> AmqpSubscription:
        return self

    async def __anext__(self) -> Envelope:
        """The next envelope. Its message is acked at once when nothing else is waiting
        (the reader has caught up); in a burst one ``multiple`` ack covers what was read,
        at most half the prefetch count apart, so the broker never stalls for want of
        acks and the reader never waits holding an unacked message. One ack frame (a
        socket write) per message was a third of a subscriber's CPU per event."""
        message, envelope = await self._buffer.get()
        self._read_unacked += 1
        if not len(self._buffer) or self._read_unacked >= self._ack_every:
            self._read_unacked = 0
            # every message read before it is on the same channel, older, and read
            await _quietly(ack_queued(message, multiple=True), "ack of read messages")
        return envelope

    async def close(self) -> None:
        if self._buffer.closed:
            return
        self._buffer.close()
        await self._restores.cancel_all()
        if self._tag is not None and self._queue is not None:
            await _quietly(_cancel(self._bus, self._queue, self._tag), "cancel of a subscription")
        await _quietly(
            _bounded(self._channel.close(), self._bus), "close of a subscription channel"
        )
        if self.on_closed is not None:
            self.on_closed(self)


class HistorySubscription(AmqpSubscription):
    """A history stream read without a loss or a repeat (:class:`StreamWindow`).

    RabbitMQ delivers a stream in whole chunks, past the channel's prefetch count; a
    buffer that dropped its oldest entry lost hundreds of events in a fast read from the
    start, and a reconnect re-consumed from the original start (the whole stream again).
    Here a full buffer cancels the consumer and a half-read one starts a new consumer at
    the first offset not kept; a reconnect resumes there as well.
    """

    def __init__(
        self,
        bus: AmqpBus,
        stream: str,
        channel: AbstractRobustChannel,
        queue: AbstractQueue,
        offset: str | datetime,
    ) -> None:
        super().__init__(bus, stream, ["#"], channel, queue)
        self._window = StreamWindow(offset, bus.settings.subscription_buffer)
        self._steps = TaskGroup(f"history:{stream}")  # consumer changes, supervised
        self._flow: asyncio.Task[None] | None = None  # the last of them, still under way
        self._consumers = 0  # consumers started so far (each tag is new)
        self._restore_failures = 0  # consumes refused in a row (backoff)

    async def _consume(self) -> None:
        """A consumer with a tag of ours, known before its first delivery: deliveries of
        a consumer already cancelled (or not yet confirmed cancelled) are told apart."""
        assert self._queue is not None
        self._consumers += 1
        self._tag = tag = f"vb-history-{id(self):x}-{self._consumers}"
        underlay = await self._channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)  # a set: once
        await self._queue.consume(
            self._on_message,
            arguments={"x-stream-offset": self._window.resume_from()},
            consumer_tag=tag,
            timeout=self._bus.settings.connect_timeout,
        )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._buffer.closed:
            return
        if message.consumer_tag != self._tag:  # a cancelled consumer's late delivery
            await _quietly(message.ack(), "ack of a cancelled consumer's message")
            return
        verdict = self._window.admit(stream_offset_of(message.headers), len(self._buffer))
        if verdict is Admit.PAUSE:
            self._switch(self._pause(), "pause")
        if verdict is not Admit.KEEP:  # read again from its offset (PAUSE) or already kept
            await _quietly(message.ack(), "ack of a message read again later")
            return
        await super()._on_message(message)

    async def __anext__(self) -> Envelope:
        envelope = await super().__anext__()
        if self._window.may_resume(len(self._buffer)) and self._flow is None:
            self._switch(self._resume(), "resume")
        return envelope

    def _switch(self, step: Coroutine[Any, Any, None], what: str) -> None:
        """Consumer changes one at a time, in order: a pause must not run before the
        consume it cancels has its tag, nor a resume before the pause."""
        previous = self._flow

        async def run() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            try:
                await step
            except AMQP_FAILURES as exc:  # the channel went: its reopen resumes the read
                log.warning("history %s of %s: %s", what, self.exchange, exc)
            finally:
                if self._flow is task:
                    self._flow = None

        task = self._steps.spawn(run(), what)
        self._flow = task

    async def _pause(self) -> None:
        if self._tag is not None and self._queue is not None:
            tag, self._tag = self._tag, None
            await _cancel(self._bus, self._queue, tag)
        # the reader may have emptied the buffer while the cancel was under way (it does
        # not resume while a step runs): then nobody else would
        if self._window.may_resume(len(self._buffer)):
            await self._resume()

    async def _resume(self) -> None:
        if self._buffer.closed:
            return
        self._window.resume()  # before consuming: its first deliveries are kept
        await self._consume()

    async def _on_reopened(self, _sender: object) -> None:
        """The consumer went with the old channel: consume again from where the read is,
        once the channel's restore is over (a consume refused during the restore, e.g. a
        node whose stream replica is not back yet, closes the channel where aio-pika does
        not restore it again)."""
        if self._buffer.closed:
            return
        if self._flow is not None:  # steps of the old channel: moot
            self._flow.cancel()
        self._tag = None
        self._flow = None
        self._switch(self._restore_read(), "restore")

    def _on_broker_cancel(self, frame: Basic.Cancel) -> None:
        """The broker cancelled our consumer (the stream member it read from went away):
        read on from where we are."""
        if frame.consumer_tag == self._tag and not self._buffer.closed:
            self._tag = None
            self._switch(self._restore_read(), "restore")

    async def _restore_read(self) -> None:
        """Consume again from the first offset not kept, retrying with the bus's reconnect
        backoff while the broker refuses (a refusal that closes the channel comes back
        here through its restore)."""

        async def step() -> None:
            if self._window.paused and not self._window.may_resume(len(self._buffer)):
                return  # the reader's next take resumes it
            try:
                await self._resume()
            except AMQP_FAILURES:
                self._restore_failures += 1
                raise

        if await restore_with_backoff(
            self._channel, step, policy=self._bus.settings.reconnect,
            what=f"restore the history read of {self.exchange}",
            stopped=lambda: self._buffer.closed, delay_first=self._restore_failures > 0,
        ):  # fmt: skip
            self._restore_failures = 0

    async def close(self) -> None:
        self._flow = None
        await self._steps.cancel_all()
        await super().close()
