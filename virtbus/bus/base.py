"""The transport interface shared by the AMQP and memory:// buses.

A bus carries :class:`Envelope` values. It offers four things:

- ``call``: an RPC with a deadline. The caller's deadline travels as the AMQP
  ``expiration`` (a call that waited in a queue past it is dropped by the broker) and as
  the ``x-deadline`` header (integer epoch milliseconds; a server drops a call it
  receives too late).
  A reply with ``ok: false`` is raised as the typed error of its code; no reply in time
  is :class:`OperationTimeout`.
- ``serve``: consume the RPC queue for a route. The handler is called *synchronously, in
  delivery order* and must not block: it returns an awaitable of the reply body. This is
  what lets a server keep per-object ordering without relying on task scheduling. The
  transport replies (when the call has a reply address) and acks after the awaitable is
  done. Undecodable messages get an error reply or are rejected without requeue (dead-
  lettered); they never stop the consumer.
- ``publish``: events, metrics, heartbeats; with ``confirm=True`` it returns only once the
  broker confirmed the message. A bus that is also a :class:`WindowPublisher` (AMQP)
  publishes a window of confirmed messages at once, one future per message.
- ``subscribe``: a bounded async iterator of envelopes bound to topic keys.
- ``history``: replay kept events from a start point, then follow live ones (a RabbitMQ
  stream; a bounded ring in memory://). Consumers dedup by ``(host, seq)``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from virtbus.errors import AuthFailed, InvalidArgument
from virtbus.protocol.envelope import Envelope
from virtbus.settings import BusSettings

# Where a history replay starts: "first" (all that is kept), "next" (only new events), or
# a point in time as epoch seconds.
HistoryStart = str | float
HISTORY_POSITIONS = ("first", "last", "next")


def stream_offset(start: HistoryStart) -> str | datetime:
    """The ``x-stream-offset`` consumer argument for a history start."""
    if isinstance(start, str):
        if start not in HISTORY_POSITIONS:
            raise InvalidArgument(f"history start must be one of {HISTORY_POSITIONS} or a time")
        return start
    return datetime.fromtimestamp(float(start), tz=UTC)


def bus_user(url: str) -> str:
    """The user a bus URL logs in as: the AMQP ``user_id`` of everything it sends, which
    RabbitMQ refuses unless it is the connection's own user (``memory://USER@name`` in
    process; AMQP's default user is ``guest``, as RabbitMQ's)."""
    parts = urlsplit(url)
    return unquote(parts.username) if parts.username else "guest"


def auth_failed(
    url: str, *, vhost_refused: bool, user: str | None = None, certificate: object = None
) -> AuthFailed:
    """AUTH_FAILED naming what to check: the user and password (or the certificate, under
    SASL EXTERNAL: ``user`` is then its CN), or the vhost's permissions (both transports;
    the broker says ACCESS_REFUSED, or NOT_ALLOWED for the vhost)."""
    parts = urlsplit(url)
    user = user or unquote(parts.username or "guest")
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    where = f"the broker at {parts.hostname or '127.0.0.1'}"
    check = (
        f"check that the broker has a user named as the certificate's CN ({certificate})"
        if certificate is not None
        else "check the user name and password in the bus URL (--bus or VIRTBUS_BUS_URL)"
    )
    if vhost_refused:
        return AuthFailed(
            f"{where} refused access to vhost '{vhost}' for user '{user}' (the vhost does not "
            f"exist or the user has no permission on it) — {check}, and the vhost's "
            "permissions (rabbitmqctl list_permissions -p VHOST)"
        )
    if certificate is not None:
        return AuthFailed(
            f"{where} refused the certificate login of user '{user}' (no such user) — {check}"
        )
    return AuthFailed(
        f"{where} refused the login of user '{user}' (wrong user name or password) — "
        f"{check}, and that the user may access vhost '{vhost}'"
    )


# Called in delivery order, returns an awaitable of the reply body ({"ok": ...}).
CallHandler = Callable[[Envelope], Awaitable[dict[str, Any]]]
# Awaited after the reply was sent and before the call is acked: what must be durable
# before the broker forgets the call (the agent's record of its reply).
BeforeAck = Callable[[Envelope], Awaitable[None]]
ConnectionListener = Callable[[bool], None]


class Server(Protocol):
    async def stop(self) -> None:
        """Stop consuming; calls in hand are finished and acked, the rest stay queued."""


class Subscription(Protocol):
    def __aiter__(self) -> AsyncIterator[Envelope]: ...
    async def __anext__(self) -> Envelope: ...
    async def close(self) -> None: ...


class Bus(Protocol):
    src: str
    user: str  # the login user: the user_id of everything this bus sends
    settings: BusSettings

    @property
    def connected(self) -> bool: ...

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """Called with True/False whenever the connection comes up or goes down."""

    async def connect(self) -> None: ...
    async def close(self) -> None: ...

    async def call(
        self,
        route: str,
        op: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,
        call_id: str | None = None,
    ) -> Any:
        """Send a call and wait for its reply. ``call_id``: the id of an earlier attempt
        that failed with a retryable error (BUS_UNAVAILABLE, OPERATION_TIMEOUT): a server
        that ran it answers again from its reply log instead of running it twice."""

    async def serve(
        self, route: str, handler: CallHandler, *, before_ack: BeforeAck | None = None
    ) -> Server: ...

    async def publish(
        self, exchange: str, routing_key: str, envelope: Envelope, *, confirm: bool = False
    ) -> None: ...

    async def subscribe(self, exchange: str, binding_keys: list[str]) -> Subscription: ...

    async def history(self, start: HistoryStart, exchange: str = ...) -> Subscription:
        """Every message of ``exchange`` (default: events) kept in its history stream from
        ``start`` (``topology.HISTORIES``), then live ones, in one stream."""


@runtime_checkable
class WindowPublisher(Protocol):
    """A bus that publishes many confirmed messages at once (the event outbox's window)."""

    async def publish_window(
        self, exchange: str, messages: Sequence[tuple[str, Envelope]]
    ) -> list[asyncio.Future[None]]:
        """Each ``(routing_key, envelope)`` as ``publish(..., confirm=True)`` would, in
        order; returns once all are on their way, one future per message, done when
        the broker confirmed it or failed with what ``publish`` would have raised."""
        ...
