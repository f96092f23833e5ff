"""memory:// — the bus protocol inside one process (demo, fast unit tests).

Every ``MemoryBus`` opened on the same URL (``memory://`` or ``memory://<name>``) in one
process shares one :class:`MemoryBroker`, so agents, CLI and scheduler talk to each other
as they would over RabbitMQ. Messages still go through the codec (with each bus's decode
limits), calls have the same deadline semantics, and topic bindings follow AMQP
(``*`` one word, ``#`` zero or more words).

Differences from AMQP, by design: a call to a route whose server stopped waits for its
deadline (like a queue without consumer) but is not kept for a later server; subscriber
buffers are bounded by dropping the *oldest* envelope (counted in ``Subscription.dropped``)
instead of broker-side backpressure. ``MemoryBroker.set_available`` simulates a broker
outage for tests of reconnect logic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from virtbus.aio import TaskGroup
from virtbus.bus.base import (
    BeforeAck,
    CallHandler,
    ConnectionListener,
    HistoryStart,
    bus_user,
    stream_offset,
)
from virtbus.bus.buffer import BoundedBuffer
from virtbus.bus.rpc import body_from_exception, no_route, outgoing_call, result_from_reply, settle
from virtbus.bus.topology import (
    AUDIT_EXCHANGE,
    EVENTS_EXCHANGE,
    EXCHANGES,
    JOURNAL_EXCHANGE,
    check_routing_key,
    history_of,
)
from virtbus.errors import BusUnavailable, InvalidArgument, NoReply, ProtocolError
from virtbus.protocol.codec import decode, encode
from virtbus.protocol.envelope import Envelope, Kind, error_body, reply_to
from virtbus.settings import BusSettings

log = logging.getLogger(__name__)

HISTORY_LENGTH = 100_000  # events the in-process history keeps (oldest dropped first)

_EXCHANGE_TYPES = {spec.name: spec.type for spec in EXCHANGES}


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more words."""
    words = key.split(".")
    positions = {0}
    for word in pattern.split("."):
        following: set[int] = set()
        for i in positions:
            if word == "#":
                following.update(range(i, len(words) + 1))
            elif i < len(words) and word in ("*", words[i]):
                following.add(i + 1)
        if not following:
            return False
        positions = following
    return len(words) in positions


def _check_exchange(exchange: str) -> None:
    """Same rule as AMQP: only the topology's exchanges exist."""
    if exchange not in _EXCHANGE_TYPES:
        raise InvalidArgument(f"unknown exchange {exchange!r}")


def _binding_matches(exchange: str, pattern: str, key: str) -> bool:
    kind = _EXCHANGE_TYPES.get(exchange, "topic")
    if kind == "fanout":
        return True
    if kind == "direct":
        return pattern == key
    return topic_matches(pattern, key)


class MemoryBroker:
    """The process-wide meeting point of the buses opened on one memory:// URL."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.available = True
        self.servers: dict[str, list[MemoryServer]] = {}
        self.subscriptions: list[MemorySubscription] = []
        self.buses: set[MemoryBus] = set()
        # The event history stream: (epoch s, routing key, encoded envelope, sender),
        # oldest first.
        self.history: deque[tuple[float, str, bytes, str]] = deque(maxlen=HISTORY_LENGTH)
        self.audit: deque[tuple[float, str, bytes, str]] = deque(maxlen=HISTORY_LENGTH)
        self.journal: deque[tuple[float, str, bytes, str]] = deque(maxlen=HISTORY_LENGTH)

    def kept(self, exchange: str) -> deque[tuple[float, str, bytes, str]] | None:
        """The history an exchange's messages are kept in (None: not kept)."""
        kept = {EVENTS_EXCHANGE: self.history, AUDIT_EXCHANGE: self.audit,
                JOURNAL_EXCHANGE: self.journal}  # fmt: skip
        return kept.get(exchange)

    def server_for(self, route: str) -> MemoryServer | None:
        """Single active consumer: the oldest running server of a route gets its calls."""
        servers = self.servers.get(route)
        return servers[0] if servers else None

    def set_available(self, available: bool) -> None:
        """Simulate the broker going away / coming back (fires connection listeners)."""
        if available == self.available:
            return
        self.available = available
        for bus in list(self.buses):
            bus._set_connected(available)


_BROKERS: dict[str, MemoryBroker] = {}


def _broker_name(url: str) -> str:
    if not url.startswith("memory://"):
        raise InvalidArgument(f"not a memory:// URL: {url!r}")
    return url.removeprefix("memory://").rpartition("@")[2].strip("/")


def memory_broker(url: str) -> MemoryBroker:
    """The broker behind a memory:// URL (created on first use)."""
    name = _broker_name(url)
    broker = _BROKERS.get(name)
    if broker is None:
        broker = _BROKERS[name] = MemoryBroker(name)
    return broker


class MemoryServer:
    def __init__(
        self, bus: MemoryBus, route: str, handler: CallHandler, before_ack: BeforeAck | None
    ) -> None:
        self._before_ack = before_ack
        self._bus = bus
        self._route = route
        self._handler = handler
        self._tasks = TaskGroup(f"memory-server:{route}")
        self._stopped = False

    def deliver(
        self, data: bytes, deadline: float, reply: asyncio.Future[bytes], user: str
    ) -> None:
        """Runs from the event loop in call order: the handler sees calls in that order;
        ``user`` is the caller's, as RabbitMQ's validated user_id."""
        if self._stopped:
            return  # like a queue with no consumer: the caller's deadline answers
        src = self._bus.src
        try:
            call = decode(data, self._bus.settings.limits, user)
            if call.kind is not Kind.CALL:
                raise ProtocolError(f"expected a call, got {call.kind}")
        except ProtocolError as exc:
            failed = Envelope(kind=Kind.REPLY, op="invalid", body=error_body(exc))
            _resolve(reply, encode(failed))
            return
        if time.time() > deadline:
            log.warning("dropping call %s %s: its deadline passed in the queue", call.op, call.id)
            return
        try:
            awaitable = self._handler(call)
        except Exception as exc:  # noqa: BLE001 - a handler bug is the caller's answer
            _resolve(reply, encode(reply_to(call, body_from_exception(exc, call.op), src)))
            return
        self._tasks.spawn(self._answer(call, awaitable, reply), name=f"reply:{call.id}")

    async def _answer(self, call: Envelope, awaitable: Any, reply: asyncio.Future[bytes]) -> None:
        body = await settle(awaitable, call.op)
        try:
            data = encode(reply_to(call, body, self._bus.src))
        except ProtocolError as exc:
            data = encode(reply_to(call, error_body(exc), self._bus.src))
        _resolve(reply, data)
        if self._before_ack is not None:
            await self._before_ack(call)  # nothing to ack in memory, but the same order

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        servers = self._bus.broker.servers.get(self._route, [])
        if self in servers:
            servers.remove(self)
        await self._tasks.stop(self._bus.settings.stop_grace)


def _resolve(fut: asyncio.Future[bytes], data: bytes) -> None:
    if not fut.done():
        fut.set_result(data)


class MemorySubscription:
    def __init__(self, bus: MemoryBus, exchange: str, binding_keys: list[str]) -> None:
        self._bus = bus
        self.exchange = exchange
        self.binding_keys = list(binding_keys)
        self._buffer: BoundedBuffer[Envelope] = BoundedBuffer(bus.settings.subscription_buffer)

    @property
    def dropped(self) -> int:
        """Envelopes discarded because the reader fell behind (oldest first)."""
        return self._buffer.dropped

    def offer(self, routing_key: str, data: bytes, user: str) -> None:
        if self._buffer.closed:
            return
        if not any(_binding_matches(self.exchange, k, routing_key) for k in self.binding_keys):
            return
        try:
            envelope = decode(data, self._bus.settings.limits, user)
        except ProtocolError as exc:
            log.warning(
                "skipping undecodable message on %s %s: %s", self.exchange, routing_key, exc
            )
            return
        if self._buffer.push(envelope) is not None:
            log.debug("subscription on %s full: dropped the oldest message", self.exchange)

    def __aiter__(self) -> MemorySubscription:
        return self

    async def __anext__(self) -> Envelope:
        return await self._buffer.get()

    async def close(self) -> None:
        self._buffer.close()
        for subs in (self._bus.broker.subscriptions, self._bus._subscriptions):
            if self in subs:
                subs.remove(self)


class MemoryBus:
    """The :class:`~virtbus.bus.base.Bus` protocol in one process."""

    def __init__(self, url: str, src: str, settings: BusSettings | None = None) -> None:
        self.url = url
        self.src = src
        self.user = bus_user(url)  # memory://USER@name: the sender its messages carry
        self.settings = settings or BusSettings(url=url)
        self.broker = memory_broker(url)
        self._connected = False
        self._listeners: list[ConnectionListener] = []
        self._pending: set[asyncio.Future[bytes]] = set()
        self._servers: list[MemoryServer] = []
        self._subscriptions: list[MemorySubscription] = []

    @property
    def connected(self) -> bool:
        return self._connected

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        self._listeners.append(listener)

    def _set_connected(self, connected: bool) -> None:
        self._connected = connected
        if not connected:
            for fut in list(self._pending):
                if not fut.done():
                    fut.set_exception(BusUnavailable("memory broker went away"))
        for listener in list(self._listeners):
            try:
                listener(connected)
            except Exception:  # a listener bug must not break the transport
                log.exception("connection listener failed")

    def _require_connected(self) -> None:
        if not self._connected or not self.broker.available:
            raise BusUnavailable(f"memory bus {self.url!r} is not connected")

    async def connect(self) -> None:
        # Re-resolve: the broker may have been dropped when its last bus closed.
        self.broker = memory_broker(self.url)
        self.broker.buses.add(self)
        self._connected = self.broker.available

    async def close(self) -> None:
        for server in list(self._servers):
            await server.stop()
        for sub in list(self._subscriptions):
            await sub.close()
        self._connected = False
        for fut in list(self._pending):
            if not fut.done():
                fut.set_exception(BusUnavailable("bus closed"))
        self.broker.buses.discard(self)
        if not self.broker.buses and _BROKERS.get(self.broker.name) is self.broker:
            del _BROKERS[self.broker.name]

    async def call(
        self,
        route: str,
        op: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,
        call_id: str | None = None,
    ) -> Any:
        self._require_connected()
        _envelope, data, timeout = outgoing_call(
            self.settings, self.src, route, op, body, timeout, call_id
        )
        server = self.broker.server_for(route)
        if server is None:
            raise no_route(route)
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[bytes] = loop.create_future()
        self._pending.add(reply)
        loop.call_soon(server.deliver, data, time.time() + timeout, reply, self.user)
        try:
            async with asyncio.timeout(timeout):
                raw = await reply
        except TimeoutError:
            raise NoReply(f"no reply to {op!r} on {route!r} within {timeout:g}s") from None
        finally:
            self._pending.discard(reply)
        return result_from_reply(decode(raw, self.settings.limits).body)

    async def serve(
        self, route: str, handler: CallHandler, *, before_ack: BeforeAck | None = None
    ) -> MemoryServer:
        self._require_connected()
        server = MemoryServer(self, route, handler, before_ack)
        self.broker.servers.setdefault(route, []).append(server)
        self._servers.append(server)
        return server

    async def publish(
        self, exchange: str, routing_key: str, envelope: Envelope, *, confirm: bool = False
    ) -> None:
        """Delivered synchronously to every matching subscription (so always "confirmed")."""
        _check_exchange(exchange)
        self._require_connected()
        check_routing_key(routing_key)  # as over AMQP: a fault of this one message
        data = encode(envelope)
        kept = self.broker.kept(exchange)
        if kept is not None:
            kept.append((time.time(), routing_key, data, self.user))
        for sub in list(self.broker.subscriptions):
            if sub.exchange == exchange:
                sub.offer(routing_key, data, self.user)

    async def history(
        self, start: HistoryStart, exchange: str = EVENTS_EXCHANGE
    ) -> MemorySubscription:
        """Kept messages from ``start``, then live ones; registered in one step: no seam."""
        offset = stream_offset(start)
        history_of(exchange)  # INVALID_ARG for an exchange without a history
        self._require_connected()
        sub = MemorySubscription(self, exchange, ["#"])
        kept = list(self.broker.kept(exchange) or ())
        if offset == "first":
            replay = kept
        elif offset == "last":
            replay = kept[-1:]
        elif offset == "next":
            replay = []
        else:
            since = offset.timestamp()  # type: ignore[union-attr]
            replay = [item for item in kept if item[0] >= since]
        for _, key, data, user in replay:
            sub.offer(key, data, user)
        self.broker.subscriptions.append(sub)
        self._subscriptions.append(sub)
        return sub

    async def subscribe(self, exchange: str, binding_keys: list[str]) -> MemorySubscription:
        _check_exchange(exchange)
        self._require_connected()
        sub = MemorySubscription(self, exchange, binding_keys)
        self.broker.subscriptions.append(sub)
        self._subscriptions.append(sub)
        return sub
