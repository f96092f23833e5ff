"""A lean AMQP 0-9-1 transport for one-shot commands (the CLI's ``list``, ``start``, ...).

aio-pika and aiormq cost a one-shot process about 120 ms of imports before it sends a
byte; a daemon pays that once, a CLI command every time. This transport speaks the few
AMQP methods a short-lived caller needs — connect, a call over direct reply-to with
publisher confirms (so an unroutable call comes back as basic.return: ``NO_CONNECT``),
topic subscriptions and a history replay — on asyncio streams, with pamqp (aiormq's own
codec) for the frames. It does not reconnect and does not serve: long-lived programs
(the agent, the scheduler, ``virtbus event``) use :class:`virtbus.bus.amqp.AmqpBus`.
The same envelope, deadline header and errors as that transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote, urlsplit

from pamqp import commands as spec
from pamqp import frame as amqp_frame
from pamqp.base import Frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader, ProtocolHeader
from pamqp.heartbeat import Heartbeat

from virtbus.bus.base import (
    BeforeAck,
    CallHandler,
    ConnectionListener,
    HistoryStart,
    Server,
    auth_failed,
    bus_user,
    stream_offset,
)
from virtbus.bus.buffer import Admit, BoundedBuffer, StreamWindow, stream_offset_of
from virtbus.bus.nodes import bus_nodes
from virtbus.bus.rpc import no_route, outgoing_call, result_from_reply
from virtbus.bus.tls import TlsFiles, client_context, login_user, tls_files, tls_refusal
from virtbus.bus.topology import (
    DEADLINE_HEADER,
    EVENTS_EXCHANGE,
    EXCHANGES,
    RPC_EXCHANGE,
    check_routing_key,
    history_of,
)
from virtbus.errors import (
    AuthFailed,
    BusUnavailable,
    InvalidArgument,
    NoReply,
    NoSupport,
    ProtocolError,
)
from virtbus.protocol.codec import decode, encode
from virtbus.protocol.envelope import Envelope
from virtbus.settings import BusSettings

REPLY_TO = "amq.rabbitmq.reply-to"
CONTENT_TYPE = "application/msgpack"
_KNOWN_EXCHANGES = frozenset(spec.name for spec in EXCHANGES)
_FRAME_END = b"\xce"
_ACCESS_REFUSED, _NOT_ALLOWED = 403, 530
CLIENT_PROPERTIES: dict[str, Any] = {
    "product": "virtbus",
    "capabilities": {
        "publisher_confirms": True,
        "basic.nack": True,
        "consumer_cancel_notify": True,
        "authentication_failure_close": True,  # a refused login is a Connection.Close
    },
}


def _deadline_ms(epoch_seconds: float) -> int:
    return int(epoch_seconds * 1000)


class _Delivery:
    __slots__ = ("body", "properties", "tag")

    def __init__(self, tag: int, properties: spec.Basic.Properties, body: bytes) -> None:
        self.tag, self.properties, self.body = tag, properties, body


class _Subscription:
    """One consumer on a channel of its own; envelopes acked as they are read.

    A history read (``window``) pauses and resumes its consumer by stream offset instead
    of letting the buffer drop (a stream is delivered in whole chunks, past the prefetch):
    see :class:`~virtbus.bus.buffer.StreamWindow`. Consumer tags are ours, so a cancelled
    consumer's late deliveries are told apart; the broker's ConsumeOk/CancelOk need no
    waiting (frames on a channel are handled in order)."""

    def __init__(
        self, bus: OneShotBus, channel: int, limit: int, stream: tuple[str, StreamWindow] | None
    ) -> None:
        self._bus = bus
        self.channel = channel
        self.buffer: BoundedBuffer[_Delivery] = BoundedBuffer(limit)
        self._stream = stream
        self._consumers = 0
        self.tag: str | None = None
        self.error: BaseException | None = None  # why the broker or the link ended it
        self.queue_name = ""  # what it consumes (a server-named queue, or a stream)

    def consume_frame(self, queue: str, arguments: dict[str, Any] | None) -> spec.Basic.Consume:
        self._consumers += 1
        self.tag = f"vb-{self.channel}-{self._consumers}" if self._stream is not None else ""
        if self._stream is not None:
            arguments = {"x-stream-offset": self._stream[1].resume_from()}
        return spec.Basic.Consume(queue=queue, consumer_tag=self.tag, arguments=arguments or {})

    def deliver(self, method: spec.Basic.Deliver, delivery: _Delivery) -> None:
        if self.buffer.closed:
            return
        if self._stream is None:
            self.buffer.push(delivery)
            return
        verdict = Admit.SKIP
        if method.consumer_tag == self.tag:  # else: a cancelled consumer's late delivery
            offset = stream_offset_of(delivery.properties.headers)
            verdict = self._stream[1].admit(offset, len(self.buffer))
        if verdict is Admit.KEEP:
            self.buffer.push(delivery)
            return
        self._bus._send(self.channel, spec.Basic.Ack(delivery_tag=delivery.tag))
        if verdict is Admit.PAUSE and self.tag:
            self._bus._send(self.channel, spec.Basic.Cancel(consumer_tag=self.tag))
            self.tag = None

    def _maybe_resume(self) -> None:
        if self._stream is None or not self._stream[1].may_resume(len(self.buffer)):
            return
        if self.buffer.closed or not self._bus.connected:
            return
        self._stream[1].resume()
        self._bus._send(self.channel, self.consume_frame(self._stream[0], None))

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self

    def cancelled_by_broker(self, tag: str) -> bool:
        """The broker cancelled a consumer on our channel (its queue deleted, a stream
        member gone): True, and the read fails, when it is the live one. A one-shot read
        is short: it reports the cut rather than resubscribe as the daemons' bus does."""
        if self._stream is not None and tag != self.tag:
            return False  # a consumer this read had cancelled itself
        self.fail(BusUnavailable(
            f"the broker cancelled this subscription (consumer {tag or '?'}): its queue "
            "was deleted or the node serving it went away"
        ))  # fmt: skip
        return True

    def fail(self, exc: BaseException) -> None:
        """End the read with ``exc`` (raised once the buffer is drained), not as if the
        reader had closed it: a history read cut short must not look complete."""
        if not self.buffer.closed:
            self.error = exc
            self.buffer.close()

    async def __anext__(self) -> Envelope:
        while True:
            try:
                delivery = await self.buffer.get()
            except StopAsyncIteration:
                if self.error is not None:
                    raise self.error from None
                raise
            self._bus._send(self.channel, spec.Basic.Ack(delivery_tag=delivery.tag))
            self._maybe_resume()
            try:
                user = delivery.properties.user_id
                return decode(delivery.body, self._bus.settings.limits, user)
            except ProtocolError:
                continue  # a bad message from some other client: skipped, as AmqpBus does

    async def close(self) -> None:
        if not self.buffer.closed:
            self.buffer.close()
            self._bus._subscriptions.pop(self.channel, None)
            if self._bus.connected:
                self._bus._send(
                    self.channel,
                    spec.Channel.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0),
                )


class OneShotBus:
    """The call/subscribe/history half of :class:`~virtbus.bus.base.Bus` (see module)."""

    def __init__(self, url: str, src: str, settings: BusSettings | None = None) -> None:
        self.url = url
        self.src = src
        self.user = bus_user(url)  # the user_id of every message we send
        self.settings = settings or BusSettings(url=url)
        self._tls: TlsFiles | None = tls_files(url, self.settings)
        self.nodes = bus_nodes(url)
        self._node_url = self.nodes[0]
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._frame_max = 131072
        self._pump: asyncio.Task[None] | None = None
        self._waiting: dict[tuple[int, type[Frame]], asyncio.Future[Frame]] = {}
        self._calls: dict[str, asyncio.Future[bytes]] = {}
        self._confirms: dict[int, asyncio.Future[Frame]] = {}
        self._published = itertools.count(1)
        self._channels = itertools.count(2)
        self._subscriptions: dict[int, _Subscription] = {}
        self._closed: BaseException | None = None
        self._incoming: dict[int, list[Any]] = {}  # channel -> [method, header, parts]

    # --- connection -------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._writer is not None and self._closed is None

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """A one-shot connection is never restored: nothing to listen for."""

    async def connect(self) -> None:
        """Connect to the first node of the bus URL that answers (a cluster's nodes are
        alternatives); a refused login ends the search (the others would refuse it too)."""
        failures: list[str] = []
        for node in self.nodes:
            self._node_url = node
            self._closed = None  # a failed attempt on the previous node closed it
            try:
                await self._connect_node(node)
            except AuthFailed:
                raise
            except BusUnavailable as exc:
                failures.append(exc.message)
                continue
            return
        raise BusUnavailable("; ".join(failures))

    async def _connect_node(self, url: str) -> None:
        parts = urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        tls = parts.scheme == "amqps"
        port = parts.port or (5671 if tls else 5672)
        user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        context: ssl.SSLContext | None = None
        files = self._tls
        if files is not None:
            context = await asyncio.to_thread(client_context, files)
            self.user = await asyncio.to_thread(login_user, self.url, files)
        # SASL EXTERNAL: the certificate's CN is the user, the response is empty.
        mechanism, response = (
            ("EXTERNAL", "") if files and files.external else ("PLAIN", f"\0{user}\0{password}")
        )
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                self._reader, self._writer = await asyncio.open_connection(host, port, ssl=context)
                self._writer.write(amqp_frame.marshal(ProtocolHeader(), 0))
                await self._expect_frame(spec.Connection.Start)
                self._send(
                    0,
                    spec.Connection.StartOk(
                        client_properties={
                            **CLIENT_PROPERTIES,
                            "connection_name": f"virtbus:{self.src}",
                        },
                        mechanism=mechanism,
                        response=response,
                    ),
                )
                tune = await self._expect_frame(spec.Connection.Tune)
                assert isinstance(tune, spec.Connection.Tune)
                self._frame_max = tune.frame_max or self._frame_max
                self._send(
                    0,
                    spec.Connection.TuneOk(
                        channel_max=tune.channel_max, frame_max=self._frame_max, heartbeat=0
                    ),
                )
                self._send(0, spec.Connection.Open(virtual_host=vhost))
                await self._expect_frame(spec.Connection.OpenOk)
                self._pump = asyncio.create_task(self._read_frames(), name="oneshot:frames")
                await self._rpc(1, spec.Channel.Open(), spec.Channel.OpenOk)
                await self._rpc(1, spec.Confirm.Select(), spec.Confirm.SelectOk)
                consume = spec.Basic.Consume(queue=REPLY_TO, no_ack=True)
                await self._rpc(1, consume, spec.Basic.ConsumeOk)
        except TimeoutError:
            await self._drop()
            raise BusUnavailable(f"cannot connect to {host}:{port}: timed out") from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            await self._drop()
            timeout = self.settings.connect_timeout
            refused = await tls_refusal(url, files, exc, timeout) if files else None
            if refused is not None:
                raise refused from None
            raise BusUnavailable(f"cannot connect to {host}:{port}: {exc}") from None
        except (AuthFailed, BusUnavailable):
            await self._drop()
            raise

    async def close(self) -> None:
        for sub in list(self._subscriptions.values()):
            await sub.close()
        if self.connected:
            self._send(
                0, spec.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0)
            )
            try:
                async with asyncio.timeout(1.0):
                    await self._wait_for(0, spec.Connection.CloseOk)
            except (TimeoutError, BusUnavailable):
                pass
        await self._drop()

    async def _drop(self) -> None:
        self._fail_all(BusUnavailable("bus closed"))
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.wait([self._pump])
            self._pump = None
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    # --- frames -----------------------------------------------------------------------
    def _send(self, channel: int, *frames: Any) -> None:
        if self._writer is None:
            raise BusUnavailable("not connected")
        self._writer.write(b"".join(amqp_frame.marshal(f, channel) for f in frames))

    async def _read_one(self) -> tuple[int, Any]:
        assert self._reader is not None
        head = await self._reader.readexactly(7)
        size = int.from_bytes(head[3:7], "big")
        rest = await self._reader.readexactly(size + 1)
        _, channel, value = amqp_frame.unmarshal(head + rest)
        return channel, value

    async def _expect_frame(self, kind: type[Frame]) -> Frame:
        """During the handshake (before the pump runs): the next frame must be ``kind``."""
        _channel, value = await self._read_one()
        if isinstance(value, spec.Connection.Close):
            raise self._refusal(value)
        if not isinstance(value, kind):
            raise ProtocolError(f"broker sent {value.name} where {kind.name} was due")
        return value

    def _refusal(self, close: spec.Connection.Close) -> Exception:
        if close.reply_code in (_ACCESS_REFUSED, _NOT_ALLOWED):
            cert = self._tls.cert if self._tls is not None else None
            return auth_failed(
                self._node_url, vhost_refused=close.reply_code == _NOT_ALLOWED, user=self.user,
                certificate=cert,
            )  # fmt: skip
        return BusUnavailable(f"the broker closed the connection: {close.reply_code} "
                              f"{close.reply_text}")  # fmt: skip

    async def _read_frames(self) -> None:
        try:
            while True:
                channel, value = await self._read_one()
                self._dispatch(channel, value)
        except (asyncio.IncompleteReadError, OSError) as exc:
            self._fail_all(BusUnavailable(f"connection to the broker lost: {exc}"))
        except ProtocolError as exc:
            self._fail_all(exc)

    def _dispatch(self, channel: int, value: Any) -> None:
        if isinstance(value, Heartbeat):
            return
        if isinstance(value, (spec.Basic.Deliver, spec.Basic.Return)):
            self._incoming[channel] = [value, None, []]
            return
        if isinstance(value, ContentHeader):
            pending = self._incoming.get(channel)
            if pending is not None:
                pending[1] = value
                if value.body_size == 0:
                    self._content_done(channel)
            return
        if isinstance(value, ContentBody):
            pending = self._incoming.get(channel)
            if pending is not None and pending[1] is not None:
                pending[2].append(value.value)
                if sum(len(p) for p in pending[2]) >= pending[1].body_size:
                    self._content_done(channel)
            return
        if isinstance(value, (spec.Basic.Ack, spec.Basic.Nack)) and channel == 1:
            self._confirmed(value)
            return
        if isinstance(value, spec.Connection.Close):
            self._send(0, spec.Connection.CloseOk())
            self._fail_all(self._refusal(value))
            return
        if isinstance(value, spec.Channel.Close):
            self._send(channel, spec.Channel.CloseOk())
            error = BusUnavailable(f"channel {channel} closed: {value.reply_code} "
                                   f"{value.reply_text}")  # fmt: skip
            for key, fut in list(self._waiting.items()):
                if key[0] == channel and not fut.done():
                    fut.set_exception(error)
            sub = self._subscriptions.pop(channel, None)
            if sub is not None:
                sub.fail(error)
            return
        if isinstance(value, spec.Basic.Cancel):  # the broker's (consumer_cancel_notify)
            sub = self._subscriptions.get(channel)
            if sub is not None and sub.cancelled_by_broker(value.consumer_tag or ""):
                self._subscriptions.pop(channel, None)
                self._send(channel, spec.Channel.Close(reply_code=200, reply_text="cancelled",
                                                       class_id=0, method_id=0))  # fmt: skip
            return
        waiter = self._waiting.pop((channel, type(value)), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(value)

    def _content_done(self, channel: int) -> None:
        method, header, parts = self._incoming.pop(channel)
        body = b"".join(parts)
        properties = header.properties
        if isinstance(method, spec.Basic.Return):
            call_id = properties.correlation_id or properties.message_id
            call = self._calls.pop(call_id, None) if call_id else None
            if call is not None and not call.done():
                route = method.routing_key or "?"
                call.set_exception(no_route(route))
            return
        if channel == 1:  # a reply on direct reply-to
            call = self._calls.pop(properties.correlation_id or "", None)
            if call is not None and not call.done():
                call.set_result(body)
            return
        sub = self._subscriptions.get(channel)
        if sub is not None and isinstance(method, spec.Basic.Deliver):
            sub.deliver(method, _Delivery(method.delivery_tag or 0, properties, body))

    def _confirmed(self, frame: spec.Basic.Ack | spec.Basic.Nack) -> None:
        tags = (
            [t for t in self._confirms if t <= frame.delivery_tag]
            if frame.multiple
            else [frame.delivery_tag]
        )
        for tag in tags:
            fut = self._confirms.pop(tag, None)
            if fut is not None and not fut.done():
                fut.set_result(frame)

    def _fail_all(self, exc: BaseException) -> None:
        if self._closed is None:
            self._closed = exc
        futures: list[asyncio.Future[Any]] = [
            *self._waiting.values(),
            *self._calls.values(),
            *self._confirms.values(),
        ]
        for fut in futures:
            if not fut.done():
                fut.set_exception(exc)
        self._waiting.clear()
        self._calls.clear()
        self._confirms.clear()
        for sub in self._subscriptions.values():
            sub.fail(exc)

    async def _wait_for(self, channel: int, kind: type[Frame]) -> Frame:
        if self._closed is not None:
            raise self._closed
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._waiting[(channel, kind)] = fut
        return await fut

    async def _rpc(self, channel: int, method: Frame, reply: type[Frame]) -> Frame:
        if self._closed is not None:
            raise self._closed
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._waiting[(channel, reply)] = fut
        self._send(channel, method)
        async with asyncio.timeout(self.settings.connect_timeout):
            return await fut

    def _publish_frames(
        self,
        channel: int,
        exchange: str,
        routing_key: str,
        data: bytes,
        properties: spec.Basic.Properties,
        *,
        mandatory: bool = False,
    ) -> None:
        chunk = self._frame_max - 8
        bodies = [ContentBody(data[i : i + chunk]) for i in range(0, len(data), chunk)]
        self._send(
            channel,
            spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
            ContentHeader(body_size=len(data), properties=properties),
            *bodies,
        )

    # --- RPC ----------------------------------------------------------------------------
    async def call(
        self,
        route: str,
        op: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,
        call_id: str | None = None,
    ) -> Any:
        if not self.connected:
            raise self._closed or BusUnavailable("not connected")
        envelope, data, timeout = outgoing_call(
            self.settings, self.src, route, op, body, timeout, call_id
        )
        properties = spec.Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=1,
            correlation_id=envelope.id,
            message_id=envelope.id,
            reply_to=REPLY_TO,
            expiration=str(max(1, int(timeout * 1000))),
            headers={DEADLINE_HEADER: _deadline_ms(envelope.ts + timeout)},
            message_type=op,
            user_id=self.user,
        )
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[bytes] = loop.create_future()
        confirm: asyncio.Future[Frame] = loop.create_future()
        self._calls[envelope.id] = reply
        self._confirms[next(self._published)] = confirm
        try:
            self._publish_frames(1, RPC_EXCHANGE, route, data, properties, mandatory=True)
            async with asyncio.timeout(timeout):
                if isinstance(await confirm, spec.Basic.Nack):
                    raise BusUnavailable(f"the broker refused the call {op!r} to {route!r}")
                raw = await reply
        except TimeoutError:
            raise NoReply(f"no reply to {op!r} on {route!r} within {timeout:g}s") from None
        finally:
            self._calls.pop(envelope.id, None)
        return result_from_reply(decode(raw, self.settings.limits).body)

    async def serve(
        self, route: str, handler: CallHandler, *, before_ack: BeforeAck | None = None
    ) -> Server:
        raise NoSupport("the one-shot transport does not serve calls; use AmqpBus")

    # --- events, metrics, heartbeats --------------------------------------------------
    async def publish(
        self, exchange: str, routing_key: str, envelope: Envelope, *, confirm: bool = False
    ) -> None:
        if exchange not in _KNOWN_EXCHANGES:
            raise InvalidArgument(f"unknown exchange {exchange!r}")
        if not self.connected:
            raise self._closed or BusUnavailable("not connected")
        check_routing_key(routing_key)
        properties = spec.Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=2 if confirm else 1,
            message_id=envelope.id,
            message_type=envelope.op,
            user_id=self.user,
        )
        done: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._confirms[next(self._published)] = done  # channel 1 confirms every publish
        self._publish_frames(1, exchange, routing_key, encode(envelope), properties)
        if confirm:
            async with asyncio.timeout(self.settings.confirm_timeout):
                if isinstance(await done, spec.Basic.Nack):
                    raise BusUnavailable(f"broker did not confirm {envelope.op!r}")

    async def _open_channel(self) -> int:
        channel = next(self._channels)
        await self._rpc(channel, spec.Channel.Open(), spec.Channel.OpenOk)
        limit = self.settings.subscription_buffer
        await self._rpc(channel, spec.Basic.Qos(prefetch_count=limit), spec.Basic.QosOk)
        return channel

    async def subscribe(self, exchange: str, binding_keys: list[str]) -> _Subscription:
        if exchange not in _KNOWN_EXCHANGES:
            raise InvalidArgument(f"unknown exchange {exchange!r}")
        channel = await self._open_channel()
        declared = await self._rpc(
            channel,
            spec.Queue.Declare(queue="", exclusive=True, auto_delete=True),
            spec.Queue.DeclareOk,
        )
        assert isinstance(declared, spec.Queue.DeclareOk) and declared.queue
        for key in binding_keys:
            bind = spec.Queue.Bind(queue=declared.queue, exchange=exchange, routing_key=key)
            await self._rpc(channel, bind, spec.Queue.BindOk)
        return await self._consume(channel, declared.queue, None)

    async def history(self, start: HistoryStart, exchange: str = EVENTS_EXCHANGE) -> _Subscription:
        stream = history_of(exchange)
        channel = await self._open_channel()
        offset = stream_offset(start)  # a name, or a datetime (an AMQP timestamp field)
        window = StreamWindow(offset, self.settings.subscription_buffer)
        return await self._consume(channel, stream.name, None, window)

    async def _consume(
        self,
        channel: int,
        queue: str,
        arguments: dict[str, Any] | None,
        window: StreamWindow | None = None,
    ) -> _Subscription:
        stream = (queue, window) if window is not None else None
        sub = _Subscription(self, channel, self.settings.subscription_buffer, stream)
        sub.queue_name = queue
        self._subscriptions[channel] = sub
        await self._rpc(channel, sub.consume_frame(queue, arguments), spec.Basic.ConsumeOk)
        return sub
