"""Following events: live, or replayed from the history and then live, with no gap and
no duplicate at the seam."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from virtbus.bus.base import Bus, Subscription
from virtbus.bus.topology import EVENTS_EXCHANGE
from virtbus.errors import InvalidArgument
from virtbus.protocol.base import decode
from virtbus.protocol.envelope import Kind
from virtbus.protocol.events import routing_key, routing_word
from virtbus.protocol.messages import DomainEvent
from virtbus.security.trust import publisher_trusted

Since = int | float | datetime | str


def binding_key(host: str | None, domain: str | None, event: str | None) -> str:
    """The topic binding of a live subscription (routing words are sanitised names)."""
    return routing_key(*(routing_word(v) if v else "*" for v in (host, domain, event)))


def parse_since(text: str) -> Since:
    """A CLI ``--since``: a sequence number (an integer), or a time (ISO 8601 / epoch s)."""
    if text.isdigit() and len(text) < 10:
        return int(text)
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(f"--since wants a sequence number or a time, not {text!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


class Dedup:
    """Drops what a host already sent (its sequence numbers only grow): no duplicates at the
    seam between replay and live events, nor after a reconnect re-reads the stream."""

    def __init__(self, after_seq: int = 0) -> None:
        self._floor = after_seq
        self._last: dict[str, int] = {}

    def fresh(self, event: DomainEvent) -> bool:
        if event.seq <= max(self._last.get(event.host, 0), self._floor):
            return False
        self._last[event.host] = event.seq
        return True


@dataclass(frozen=True, slots=True)
class EventFilter:
    host: str | None = None
    domain: str | None = None
    event: str | None = None

    def matches(self, ev: DomainEvent) -> bool:
        return (
            (self.host is None or ev.host == self.host)
            and (self.domain is None or ev.domain == self.domain)
            and (self.event is None or ev.event == self.event)
        )


async def open_events(bus: Bus, wanted: EventFilter, since: Since | None) -> Subscription:
    """The subscription behind :func:`event_stream` (history when ``since`` is given)."""
    if since is None:
        return await bus.subscribe(
            EVENTS_EXCHANGE, [binding_key(wanted.host, wanted.domain, wanted.event)]
        )
    if isinstance(since, int) and not isinstance(since, bool):
        return await bus.history("first")
    if isinstance(since, datetime):
        return await bus.history(since.timestamp())
    return await bus.history(since)


class EventStream:
    """Typed events of a subscription that match a filter, each host's once and in order;
    a malformed one is skipped (any bus client can publish), and so is one whose verified
    sender (AMQP user_id) is neither its host nor a ``trusted`` user. Subscribed when created, so
    nothing published after :meth:`Client.subscribe` returns is missed."""

    def __init__(
        self,
        sub: Subscription,
        wanted: EventFilter,
        since: Since | None,
        trusted: tuple[str, ...] = (),
    ) -> None:
        self._sub = sub
        self._trusted = trusted
        self._wanted = wanted
        self.forged = 0  # events dropped because their sender was not their host
        self._dedup = Dedup(since if isinstance(since, int) and not isinstance(since, bool) else 0)
        # A stream replays from the chunk that holds a timestamp, so earlier events come too.
        self._from_ts = (
            since.timestamp()
            if isinstance(since, datetime)
            else float(since)
            if isinstance(since, float)
            else None
        )

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> DomainEvent:
        async for env in self._sub:
            if env.kind != Kind.EVENT:
                continue
            try:
                ev = decode(env.body, DomainEvent)
            except InvalidArgument:
                continue
            if not publisher_trusted(env.user, ev.host, *self._trusted):
                self.forged += 1  # another user speaking for this host: never believed
                continue
            if ev.ts is None:
                ev.ts = env.ts
            if self._from_ts is not None and ev.ts is not None and ev.ts < self._from_ts:
                continue  # replayed from before --since TIME
            # Routing words are sanitised and the history has every host: filter exactly.
            if self._wanted.matches(ev) and self._dedup.fresh(ev):
                return ev
        raise StopAsyncIteration

    async def aclose(self) -> None:
        await self._sub.close()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
