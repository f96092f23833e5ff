"""The RabbitMQ transport (aio-pika robust connection).

Channels: ``rpc`` declares the topology, publishes calls and consumes direct reply-to;
``confirm`` (persistent messages) carries events; ``fire`` (no confirms) carries metrics
and heartbeats; every server and subscription has a channel of its own so its prefetch
bounds only its own work. The robust connection re-declares what each channel declared,
and re-consumes, after a reconnect.

The call path is one publish and one future: no per-call declaration. Calls are
published ``mandatory`` on a channel with publisher confirms, because RabbitMQ hands an
unroutable message back (basic.return) before it confirms it, and aiormq passes returns
to a channel's ``on_return_callbacks`` only on such a channel: the callback fails the call
at once with ``NO_CONNECT``. The confirm arrives before any reply could, so waiting for it
costs the call no time.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from pamqp.commands import Basic
from yarl import URL

from virtbus.aio import TaskGroup, backoff_delays
from virtbus.bus.amqp_consumers import (
    AMQP_FAILURES,
    CONTENT_TYPE,
    AmqpServer,
    AmqpSubscription,
    deadline_header,
    message_frames,
    publish_confirmed_window,
    publish_queued,
)
from virtbus.bus.base import (
    BeforeAck,
    CallHandler,
    ConnectionListener,
    HistoryStart,
    auth_failed,
    bus_user,
    stream_offset,
)
from virtbus.bus.nodes import bus_nodes, redacted
from virtbus.bus.reconnect import connection_class
from virtbus.bus.rpc import no_route, outgoing_call, result_from_reply
from virtbus.bus.tls import TlsFiles, client_context, login_user, tls_files, tls_refusal
from virtbus.bus.topology import (
    DEAD_LETTER,
    DEAD_LETTER_EXCHANGE,
    DEADLINE_HEADER,
    DIRECT_REPLY_TO,
    EVENTS_EXCHANGE,
    EXCHANGES,
    HISTORIES,
    RPC_EXCHANGE,
    ExchangeSpec,
    QueueSpec,
    check_routing_key,
    history_of,
)
from virtbus.errors import (
    AuthFailed,
    BusUnavailable,
    InvalidArgument,
    NoReply,
    ProtocolError,
)
from virtbus.protocol.codec import decode, encode
from virtbus.protocol.envelope import Envelope
from virtbus.settings import BusSettings

log = logging.getLogger(__name__)

REPLY_TO = DIRECT_REPLY_TO
_KNOWN_EXCHANGES = frozenset(spec.name for spec in EXCHANGES)


def login_refused(
    url: str, exc: BaseException, user: str | None = None, certificate: object = None
) -> AuthFailed | None:
    """AUTH_FAILED for a connect failure that is the broker refusing us, else None.

    RabbitMQ answers bad credentials with ACCESS_REFUSED (aiormq's
    ProbableAuthenticationError) and a vhost that does not exist or that the user may not
    use by closing the connection instead of Connection.OpenOk, which aiormq reports only
    as an InvalidFrameError naming that Connection.Close frame. ``user``/``certificate``:
    a certificate login (SASL EXTERNAL), whose user is the certificate's CN.
    """
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return auth_failed(url, vhost_refused=False, user=user, certificate=certificate)
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        return auth_failed(url, vhost_refused=True, user=user, certificate=certificate)
    return None


class TopologyUnavailable(BusUnavailable):
    """A queue of the shared topology exists but does not work yet: its home node "is
    down or inaccessible" (RabbitMQ's NOT_FOUND for a declare), as a history stream is
    for a few hundred ms after the broker's listener opened (see _on_reconnected)."""


def _home_node_down(exc: aiormq.exceptions.ChannelNotFoundEntity) -> bool:
    return "down or inaccessible" in str(exc)


async def _passive_exchange(channel: aiormq.abc.AbstractChannel, name: str, t: float) -> None:
    await channel.exchange_declare(name, passive=True, timeout=t)


async def _passive_queue(channel: aiormq.abc.AbstractChannel, name: str, t: float) -> None:
    await channel.queue_declare(name, passive=True, timeout=t)


async def _declare_exchange(
    channel: aiormq.abc.AbstractChannel, spec: ExchangeSpec, t: float
) -> None:
    await channel.exchange_declare(
        spec.name, exchange_type=spec.type, durable=spec.durable, timeout=t
    )


async def _declare_queue(
    channel: aiormq.abc.AbstractChannel, what: tuple[QueueSpec, str, str], t: float
) -> None:
    """A shared queue and its one binding (the dead-letter queue, a history stream)."""
    queue, source, key = what
    await channel.queue_declare(queue.name, durable=queue.durable, arguments=queue.arguments,
                                timeout=t)  # fmt: skip
    await channel.queue_bind(queue.name, source, routing_key=key, timeout=t)


async def _open_underlay(
    channel: AbstractRobustChannel | None,
) -> aiormq.abc.AbstractChannel | None:
    """The aiormq channel under a robust one if it is open, else None, at once: the base
    class's accessor, not the robust one, which first waits for the connection."""
    if channel is None:
        return None
    assert isinstance(channel, aio_pika.Channel)  # aio-pika's RobustChannel
    try:
        return await aio_pika.Channel.get_underlay_channel(channel)
    except aiormq.exceptions.ChannelInvalidStateError:
        return None


def _confirms_overdue(sent: list[tuple[str, asyncio.Future[None]]]) -> None:
    """A window's confirm timeout: what is still unconfirmed fails, as publish's would."""
    for op, result in sent:
        if not result.done():
            result.set_exception(BusUnavailable(f"no publisher confirm for {op!r} in time"))


class _Pending:
    """One call in flight: the caller's future and its deadline."""

    __slots__ = ("future", "route", "timer")

    def __init__(self, future: asyncio.Future[bytes], route: str) -> None:
        self.future = future
        self.route = route
        self.timer: asyncio.TimerHandle | None = None


class AmqpBus:
    """The :class:`~virtbus.bus.base.Bus` protocol over RabbitMQ."""

    def __init__(self, url: str, src: str, settings: BusSettings | None = None) -> None:
        self.url = url
        self.src = src
        self.user = bus_user(url)  # the user_id of every message we send (CN under TLS)
        self.settings = settings or BusSettings(url=url)
        self._tls: TlsFiles | None = tls_files(url, self.settings)
        self.nodes = bus_nodes(url)  # a cluster's nodes, tried in this order
        self._connection: AbstractRobustConnection | None = None
        self._rpc: AbstractRobustChannel | None = None
        self._confirm: AbstractRobustChannel | None = None
        self._fire: AbstractRobustChannel | None = None
        self._rpc_underlay: aiormq.abc.AbstractChannel | None = None
        self._replies_on: aiormq.abc.AbstractChannel | None = None  # consumes direct reply-to
        self._refreshing = asyncio.Lock()
        self._tasks = TaskGroup(f"amqp-bus:{src}")  # the replies' consume retried, see below
        self._reconsuming: asyncio.Task[None] | None = None
        self._restoring: asyncio.Task[None] | None = None  # waits for the topology, see below
        self._confirm_underlay: aiormq.abc.AbstractChannel | None = None
        self._fire_underlay: aiormq.abc.AbstractChannel | None = None
        self._pending: dict[str, _Pending] = {}
        self._connected = False
        self._closing = False
        self._listeners: list[ConnectionListener] = []
        self._servers: set[AmqpServer] = set()
        self._subscriptions: set[AmqpSubscription] = set()

    # --- connection ---------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """Fired on loss/restore of an established connection (not by connect/close)."""
        self._listeners.append(listener)

    async def connect(self) -> None:
        """Connect to the first node of the bus URL that answers; the connection then
        moves from node to node on its own when one is lost (virtbus.bus.reconnect)."""
        if self._connection is not None:
            return
        self._closing = False
        context = None
        nodes = self.nodes
        if self._tls is not None:
            files = self._tls
            context = await asyncio.to_thread(client_context, files)
            self.user = await asyncio.to_thread(login_user, self.url, files)
            if files.external:
                nodes = tuple(str(URL(n).update_query(auth="external")) for n in nodes)
        failures: list[str] = []
        for start in range(len(nodes)):
            order = nodes[start:] + nodes[:start]
            try:
                connection = await aio_pika.connect_robust(
                    order[0],
                    timeout=self.settings.connect_timeout,
                    client_properties={"connection_name": f"virtbus:{self.src}"},
                    connection_class=connection_class(self.settings.reconnect, order),
                    ssl_context=context,
                )
            except AMQP_FAILURES as exc:
                node = self.nodes[start]
                cert = self._tls.cert if self._tls is not None else None
                refused = login_refused(node, exc, self.user, cert)
                if refused is None and self._tls is not None:
                    timeout = self.settings.connect_timeout
                    refused = await tls_refusal(node, self._tls, exc, timeout)
                if refused is not None:
                    raise refused from exc
                why = str(exc) or (
                    f"timed out after {self.settings.connect_timeout:g} s"
                    if isinstance(exc, TimeoutError)
                    else type(exc).__name__
                )
                failures.append(f"{redacted(node)}: {why}")
                continue
            break
        else:
            raise BusUnavailable(f"cannot connect to {'; '.join(failures)}")
        self._connection = connection
        try:
            await self._open_channels(connection)
        except AMQP_FAILURES as exc:
            await self._abandon()
            raise BusUnavailable(f"cannot set up the bus topology: {exc}") from exc
        except BusUnavailable:
            await self._abandon()
            raise
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        self._connected = True

    async def _open_channels(self, connection: AbstractRobustConnection) -> None:
        timeout = self.settings.connect_timeout
        await self._topology_ready(connection, timeout)
        self._rpc = await connection.channel(publisher_confirms=True)
        self._confirm = await connection.channel(publisher_confirms=True)
        self._fire = await connection.channel(publisher_confirms=False)
        # Direct reply-to: consumed (no-ack) on the channel that publishes the calls,
        # before the first call is published on it (RabbitMQ requires that order).
        underlay = await _open_underlay(self._rpc)
        if underlay is None:
            raise BusUnavailable("the RPC channel closed while it was set up")
        await self._consume_replies(underlay, timeout)
        for channel in (self._rpc, self._confirm, self._fire):
            channel.reopen_callbacks.add(self._refresh_underlays)
        await self._refresh_underlays(None)

    async def _consume_replies(self, underlay: aiormq.abc.AbstractChannel, timeout: float) -> None:
        """Consume direct reply-to on the aiormq channel itself, not through an aio-pika
        queue: a reply needs only its correlation id and body, and aio-pika built an
        IncomingMessage (28 attribute sets) and a second task for each, about a tenth of
        a caller's CPU per call. aio-pika does not restore this consumer, so a reopened
        RPC channel consumes again (_refresh_underlays) before calls use it. The returns
        of unroutable calls are hooked here too, on each new aiormq channel: aio-pika's
        ``return_callbacks`` hear only the robust channel's first one, and after a
        reconnect a call to a route nothing serves waited for its timeout."""
        underlay.on_return_callbacks.add(self._on_returned)  # a set: once per channel
        await underlay.basic_consume(REPLY_TO, self._on_reply, no_ack=True, timeout=timeout)
        self._replies_on = underlay

    async def _ensure_topology(self, connection: AbstractRobustConnection) -> None:
        """Check the shared topology with passive declares, and declare only what is missing.

        In a deployment an admin declared it (definitions import) and no daemon or client
        may configure it (ACCESS_REFUSED): passive declares need no permission. On a dev
        broker without definitions (guest may configure everything) the first daemon or
        client declares what is missing. Checked again after every reconnect (a reset
        broker), on short-lived channels: a failed passive declare closes its channel.
        """
        transport = connection.transport
        if transport is None:
            raise BusUnavailable("the broker connection closed while it was set up")
        amqp = transport.connection
        timeout, user = self.settings.connect_timeout, self.user
        for exchange in EXCHANGES:
            if await self._on_short_channel(amqp, _passive_exchange, exchange.name, timeout, user):
                continue
            await self._on_short_channel(amqp, _declare_exchange, exchange, timeout, user)
        queues = [(DEAD_LETTER, DEAD_LETTER_EXCHANGE, "")]
        queues += [(stream, exchange_name, "#") for exchange_name, stream in HISTORIES.items()]
        for queue, source, key in queues:
            if await self._on_short_channel(amqp, _passive_queue, queue.name, timeout, user):
                continue
            await self._on_short_channel(
                amqp, _declare_queue, (queue, source, key), timeout, self.user
            )

    @staticmethod
    async def _on_short_channel(
        amqp: aiormq.abc.AbstractConnection,
        action: Callable[[aiormq.abc.AbstractChannel, Any, float], Awaitable[None]],
        what: Any,
        timeout: float,
        user: str | None = None,
    ) -> bool:
        """Run one declare on a channel of its own: True when it succeeded, False when
        the entity is missing (passive declare); ``user``: a refused active declare is
        the admin's topology missing (BUS_UNAVAILABLE saying so)."""
        channel = await amqp.channel(timeout=timeout)
        try:
            await action(channel, what, timeout)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            if _home_node_down(exc):
                name = getattr(what, "name", None) or getattr(what[0], "name", what)
                raise TopologyUnavailable(f"{name} is not available yet: {exc}") from exc
            return False
        except aiormq.exceptions.ChannelAccessRefused as exc:
            name = getattr(what, "name", None) or getattr(what[0], "name", what)
            raise BusUnavailable(
                f"the bus topology is incomplete ({name} is missing) and user {user!r} may "
                "not declare it: import the definitions (python -m virtbus.bus.definitions "
                "> definitions.json; rabbitmqctl import_definitions definitions.json)"
            ) from exc
        finally:
            if not channel.is_closed:
                await channel.close()
        return True

    async def _refresh_underlays(self, _sender: object) -> None:
        """Cache the live aiormq channels: the call path must not await to find them.

        Never waits for the connection: this runs in aio-pika's reconnect task (reopen
        and reconnect callbacks), and a connection that closed meanwhile is made ready
        again only by that very task (issue 18: an agent that never came back). A
        channel not open now is None (the call path says BUS_UNAVAILABLE) until its
        reopen calls this again. A reopened RPC channel consumes direct reply-to first:
        one broker round trip on that open channel, bounded by the connect timeout, and a
        failure leaves it None like a closed one."""
        # One at a time (each channel's reopen calls this): a second consume on the same
        # channel would close it, and no call may use a channel before its consume is done.
        async with self._refreshing:
            rpc = await _open_underlay(self._rpc)
            if rpc is not None and rpc is not self._replies_on:  # a reopened RPC channel
                try:
                    await self._consume_replies(rpc, self.settings.connect_timeout)
                except AMQP_FAILURES as exc:  # e.g. a timeout on a channel that stays open
                    log.warning("cannot consume the replies on the reopened RPC channel: %s", exc)
                    rpc = None
                    self._reconsume_later()
            self._rpc_underlay = rpc
        self._confirm_underlay = await _open_underlay(self._confirm)
        self._fire_underlay = await _open_underlay(self._fire)

    def _reconsume_later(self) -> None:
        """A failed consume of the replies on an RPC channel that stays open: no reopen
        would try again, and every call would be BUS_UNAVAILABLE for ever."""
        if self._closing or (self._reconsuming is not None and not self._reconsuming.done()):
            return
        self._reconsuming = self._tasks.spawn(self._reconsume(), "consume replies again")

    async def _reconsume(self) -> None:
        """Retry with the reconnect backoff, in a task of its own (it may wait for the
        connection, which the reconnect task must never do)."""
        delays = backoff_delays(self.settings.reconnect)
        while not self._closing and self._rpc is not None:
            await asyncio.sleep(next(delays))
            await self._rpc.ready()
            await self._refresh_underlays(None)  # its failure does not spawn another
            if self._rpc_underlay is not None:
                return

    def _on_connection_lost(self, _sender: object, exc: BaseException | None = None) -> None:
        if self._closing:
            return
        self._fail_pending(BusUnavailable(f"connection to the broker lost: {exc}"))
        if self._connected:
            log.warning("bus connection lost (%s); reconnecting", exc)
            self._set_connected(False)

    async def _topology_ready(self, connection: AbstractRobustConnection, patience: float) -> None:
        """:meth:`_ensure_topology`, tried again with the reconnect backoff for up to
        ``patience`` seconds while a queue of it is unavailable (a broker starting)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        delays = backoff_delays(self.settings.reconnect)
        while True:
            try:
                await self._ensure_topology(connection)
                return
            except TopologyUnavailable:
                delay = next(delays)
                if loop.time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)

    async def _on_reconnected(self, _sender: object) -> None:
        """The connection is said restored (publishing and calls resume) only once the
        topology answers. RabbitMQ (3.10) opens its listener a few hundred ms before the
        stream coordinator has started the history streams' writers, and a publish routed
        to a stream meanwhile is confirmed and dropped: the outbox, which reconnects at
        once after a broker restart, lost the events it replayed then (the broker-restart
        e2e test, tests/integration/test_stream_restart.py). A declare of such a stream
        answers that its home node is down (TopologyUnavailable): the restore then waits
        for it in a task of its own, not in aio-pika's reconnect task."""
        if self._restoring is not None:
            self._restoring.cancel()  # a restore of the connection before this one
            self._restoring = None
        if self._connection is not None:
            try:
                await self._ensure_topology(self._connection)
            except TopologyUnavailable as exc:
                log.warning("bus connection back, not restored until the topology is: %s", exc)
                self._restoring = self._tasks.spawn(self._restore_later(), "restore when ready")
                return
            except (*AMQP_FAILURES, BusUnavailable) as exc:
                log.warning("checking the bus topology after a reconnect: %s", exc)
        await self._restored()

    async def _restore_later(self) -> None:
        """Check the topology again with the reconnect backoff until it answers, then say
        the connection is restored; given up when the connection is lost meanwhile (its
        next reconnect checks again) or the bus closes."""
        delays = backoff_delays(self.settings.reconnect)
        while not self._closing and self._connection is not None:
            await asyncio.sleep(next(delays))
            transport = self._connection.transport
            if transport is None or transport.connection.is_closed:
                return
            try:
                await self._ensure_topology(self._connection)
            except TopologyUnavailable:
                continue
            except (*AMQP_FAILURES, BusUnavailable) as exc:
                log.warning("checking the bus topology after a reconnect: %s", exc)
            await self._restored()
            return

    async def _restored(self) -> None:
        await self._refresh_underlays(None)
        transport = self._connection.transport if self._connection is not None else None
        if transport is None or transport.connection.is_closed:
            return  # lost again meanwhile: the next reconnect says it is restored
        log.info("bus connection restored")
        self._set_connected(True)

    def _set_connected(self, connected: bool) -> None:
        self._connected = connected
        for listener in list(self._listeners):
            try:
                listener(connected)
            except Exception:  # a listener bug must not break the transport
                log.exception("connection listener failed")

    def _fail_pending(self, exc: Exception) -> None:
        for call_id in list(self._pending):
            self._settle(call_id, exc=exc)

    async def close(self) -> None:
        self._closing = True
        for server in list(self._servers):
            await server.stop()
        for sub in list(self._subscriptions):
            await sub.close()
        self._fail_pending(BusUnavailable("bus closed"))
        self._connected = False
        await self._abandon()

    async def _abandon(self) -> None:
        await self._tasks.cancel_all()
        connection, self._connection = self._connection, None
        self._rpc = self._confirm = self._fire = None
        self._rpc_underlay = self._confirm_underlay = self._fire_underlay = None
        self._replies_on = None
        if connection is not None:
            try:
                await connection.close()
            except AMQP_FAILURES as exc:
                log.debug("closing the bus connection: %s", exc)

    def _require_connection(self) -> AbstractRobustConnection:
        if not self._connected or self._connection is None:
            raise BusUnavailable(f"not connected to {redacted(self.url)}")
        return self._connection

    # --- RPC ----------------------------------------------------------------------

    async def call(
        self,
        route: str,
        op: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,
        call_id: str | None = None,
    ) -> Any:
        self._require_connection()
        channel = self._rpc_underlay
        if channel is None or channel.is_closed:
            raise BusUnavailable("the RPC channel is being restored")
        envelope, data, timeout = outgoing_call(
            self.settings, self.src, route, op, body, timeout, call_id
        )
        properties = Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=1,
            correlation_id=envelope.id,
            message_id=envelope.id,
            reply_to=REPLY_TO,
            expiration=str(max(1, int(timeout * 1000))),
            headers={DEADLINE_HEADER: deadline_header(envelope.ts + timeout)},
            message_type=op,
            user_id=self.user,
        )
        call_id = envelope.id
        loop = asyncio.get_running_loop()
        pending = _Pending(loop.create_future(), route)
        self._pending[call_id] = pending
        pending.timer = loop.call_later(timeout, self._expire, call_id, op, route, timeout)
        try:
            try:
                confirmation = await publish_queued(
                    channel,
                    data,
                    exchange=RPC_EXCHANGE,
                    routing_key=route,
                    properties=properties,
                    mandatory=True,
                )
            except AMQP_FAILURES as exc:
                raise BusUnavailable(f"cannot publish {op!r} to {route!r}: {exc}") from exc
            if isinstance(confirmation, Basic.Nack):
                raise BusUnavailable(f"the broker refused the call {op!r} to {route!r}")
            raw = await pending.future
        finally:
            self._settle(call_id)
        reply = decode(raw, self.settings.limits)
        return result_from_reply(reply.body)

    def _settle(
        self, call_id: str, result: bytes | None = None, exc: BaseException | None = None
    ) -> None:
        """Complete (or just forget) a call."""
        pending = self._pending.pop(call_id, None)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        if pending.future.done():
            return
        if exc is not None:
            pending.future.set_exception(exc)
        elif result is not None:
            pending.future.set_result(result)

    def _on_returned(self, message: aiormq.abc.DeliveredMessage) -> None:
        """The RPC channel's return callback: the broker had no queue for a call's route."""
        props = message.header.properties
        call_id = props.correlation_id or props.message_id
        pending = self._pending.get(call_id) if call_id else None
        if pending is not None:
            self._settle(call_id, exc=no_route(pending.route))  # type: ignore[arg-type]

    def _expire(self, call_id: str, op: str, route: str, timeout: float) -> None:
        self._settle(call_id, exc=NoReply(f"no reply to {op!r} on {route!r} within {timeout:g}s"))

    async def _on_reply(self, message: aiormq.abc.DeliveredMessage) -> None:
        call_id = message.header.properties.correlation_id
        if call_id is None or call_id not in self._pending:
            log.debug("reply %s arrived after its call was given up", call_id)
            return
        self._settle(call_id, result=message.body)

    async def serve(
        self, route: str, handler: CallHandler, *, before_ack: BeforeAck | None = None
    ) -> AmqpServer:
        connection = self._require_connection()
        server = await AmqpServer.start(self, connection, route, handler, before_ack)
        self._servers.add(server)
        server.on_stopped = self._servers.discard
        return server

    # --- events, metrics, heartbeats --------------------------------------------

    async def publish(
        self, exchange: str, routing_key: str, envelope: Envelope, *, confirm: bool = False
    ) -> None:
        """``confirm=True``: persistent, returns once the broker has it (else BusUnavailable)."""
        if exchange not in _KNOWN_EXCHANGES:
            raise InvalidArgument(f"unknown exchange {exchange!r}")
        self._require_connection()
        channel = self._confirm_underlay if confirm else self._fire_underlay
        if channel is None or channel.is_closed:
            raise BusUnavailable("the publishing channel is being restored")
        # Faults of this one message (ProtocolError, not retryable), before any I/O.
        check_routing_key(routing_key)
        data = encode(envelope)
        if len(data) > self.settings.limits.max_bytes:
            raise ProtocolError(
                f"{envelope.op!r} of {len(data)} bytes exceeds the message limit "
                f"({self.settings.limits.max_bytes}): no subscriber could decode it"
            )
        properties = Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=2 if confirm else 1,
            message_id=envelope.id,
            message_type=envelope.op,
            user_id=self.user,
        )
        try:
            async with asyncio.timeout(self.settings.confirm_timeout):
                result = await publish_queued(
                    channel, data, exchange=exchange, routing_key=routing_key, properties=properties
                )
        except TimeoutError as exc:
            raise BusUnavailable(f"no publisher confirm for {envelope.op!r} in time") from exc
        except AMQP_FAILURES as exc:
            raise BusUnavailable(f"cannot publish {envelope.op!r} to {exchange!r}: {exc}") from exc
        if confirm and not isinstance(result, Basic.Ack):
            raise BusUnavailable(f"broker did not confirm {envelope.op!r}: {result!r}")

    async def publish_window(
        self, exchange: str, messages: Sequence[tuple[str, Envelope]]
    ) -> list[asyncio.Future[None]]:
        """``publish(exchange, key, envelope, confirm=True)`` of each ``(key, envelope)``, in
        order, all written at once (ONE WRITE PER WINDOW, amqp_consumers.py); returns once
        they are queued, one future per message: done when the broker confirmed it, else
        failed with what ``publish`` raises (BusUnavailable; ProtocolError for a message
        that cannot go, which is not sent, the others are). Each has
        ``confirm_timeout`` from the write. When none can be sent (not connected, the
        channel closed) every future fails with BusUnavailable."""
        if exchange not in _KNOWN_EXCHANGES:
            raise InvalidArgument(f"unknown exchange {exchange!r}")
        loop = asyncio.get_running_loop()
        results: list[asyncio.Future[None]] = [loop.create_future() for _ in messages]
        try:
            self._require_connection()
            channel = self._confirm_underlay
            if channel is None or channel.is_closed:
                raise BusUnavailable("the publishing channel is being restored")
        except BusUnavailable as exc:
            for result in results:
                result.set_exception(exc)
            return results
        frames: list[bytes] = []
        sent: list[tuple[str, asyncio.Future[None]]] = []
        limit = self.settings.limits.max_bytes
        for (routing_key, envelope), result in zip(messages, results, strict=True):
            try:  # faults of this one message (ProtocolError, not retryable), before any I/O
                check_routing_key(routing_key)
                data = encode(envelope)
                if len(data) > limit:
                    raise ProtocolError(
                        f"{envelope.op!r} of {len(data)} bytes exceeds the message limit "
                        f"({limit}): no subscriber could decode it"
                    )
            except ProtocolError as exc:
                result.set_exception(exc)
                continue
            properties = Basic.Properties(
                content_type=CONTENT_TYPE, delivery_mode=2, message_id=envelope.id,
                message_type=envelope.op, user_id=self.user,
            )  # fmt: skip
            assert isinstance(channel, aiormq.Channel)
            frames.append(
                message_frames(
                    channel, data, exchange=exchange, routing_key=routing_key, properties=properties
                )
            )
            sent.append((envelope.op, result))
        if not sent:
            return results
        try:
            # Bounded as publish is: a connection that died with its write queue full (its
            # writer gone) would hold the window, and the outbox, for ever.
            async with asyncio.timeout(self.settings.confirm_timeout):
                confirms = await publish_confirmed_window(channel, frames)
        except TimeoutError:
            failure = BusUnavailable(f"could not queue a window for {exchange!r} in time")
            for _, result in sent:
                result.set_exception(failure)
            return results
        except AMQP_FAILURES as exc:
            failure = BusUnavailable(f"cannot publish to {exchange!r}: {exc}")
            for _, result in sent:
                result.set_exception(failure)
            return results
        timer = loop.call_later(self.settings.confirm_timeout, _confirms_overdue, sent)
        pending = len(sent)

        def settle(op: str, result: asyncio.Future[None], confirm: asyncio.Future[Any]) -> None:
            nonlocal pending
            pending -= 1
            if not pending:
                timer.cancel()
            if result.done():  # overdue, or the caller gave up on it
                return
            # aiormq fails a closing channel's confirms with its reason, which can be a
            # cancellation (aio-pika closes with CancelledError): the message is not lost
            # for that, only unconfirmed, and the outbox must not end with it.
            if confirm.cancelled() or isinstance(confirm.exception(), asyncio.CancelledError):
                result.set_exception(BusUnavailable(f"the publish of {op!r} was abandoned"))
            elif (exc := confirm.exception()) is not None:
                if isinstance(exc, AMQP_FAILURES):
                    exc = BusUnavailable(f"cannot publish {op!r} to {exchange!r}: {exc}")
                result.set_exception(exc)
            elif not isinstance(frame := confirm.result(), Basic.Ack):
                result.set_exception(BusUnavailable(f"broker did not confirm {op!r}: {frame!r}"))
            else:
                result.set_result(None)

        for (op, result), confirm in zip(sent, confirms, strict=True):
            confirm.add_done_callback(functools.partial(settle, op, result))
        return results

    async def history(
        self, start: HistoryStart, exchange: str = EVENTS_EXCHANGE
    ) -> AmqpSubscription:
        """Messages of ``exchange`` (events, audit) from its history stream from ``start``
        on, then live ones as they come."""
        connection = self._require_connection()
        sub = await AmqpSubscription.start_stream(
            self, connection, stream_offset(start), history_of(exchange)
        )
        self._subscriptions.add(sub)
        sub.on_closed = self._subscriptions.discard
        return sub

    async def subscribe(self, exchange: str, binding_keys: list[str]) -> AmqpSubscription:
        if exchange not in _KNOWN_EXCHANGES:
            raise InvalidArgument(f"unknown exchange {exchange!r}")
        connection = self._require_connection()
        sub = await AmqpSubscription.start(self, connection, exchange, binding_keys)
        self._subscriptions.add(sub)
        sub.on_closed = self._subscriptions.discard
        return sub
