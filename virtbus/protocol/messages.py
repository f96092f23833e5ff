"""The bodies of the messages that are not calls: events, heartbeats, metrics.

They are published (``kind`` event, heartbeat, metrics) rather than answered; their
``op`` names the body type below. A subscriber decodes them with :func:`decode_message`.
"""

from __future__ import annotations

from typing import Any, Final

from msgspec import field as default

from virtbus.protocol.base import HostName, Message, NonNegInt, decode
from virtbus.protocol.host import HostInventory

StatValue = int | float | str


class DomainEvent(Message):
    """One libvirt event of one domain (see :mod:`virtbus.protocol.events`)."""

    host: HostName
    seq: NonNegInt  # per host, consecutive: a subscriber sees a gap
    domain: str
    uuid: str
    event: str
    detail: str | None = None
    data: dict[str, Any] = default(default_factory=dict)
    reconciled: bool = False  # found by a resync rather than seen happen
    ts: float | None = None  # when the agent saw it (epoch s); older agents: the envelope's


class DomainMetrics(Message):
    """One domain's domstats fields of one collection pass."""

    host: HostName
    domain: str
    uuid: str = ""
    ts: float = 0.0
    interval: float = 0.0
    stats: dict[str, StatValue] = default(default_factory=dict)


class HostMetrics(Message):
    """The host's own figures of one collection pass."""

    host: HostName
    ts: float = 0.0
    interval: float = 0.0
    domains: NonNegInt = 0
    pass_ms: float = 0.0
    pass_cpu_ms: float = 0.0
    stats: dict[str, StatValue] = default(default_factory=dict)


EVENT_DOMAIN: Final = "domain.event"
HEARTBEAT: Final = "host.heartbeat"
METRICS_DOMAIN: Final = "metrics.domain"
METRICS_HOST: Final = "metrics.host"

MESSAGES: Final[dict[str, type[Message]]] = {
    EVENT_DOMAIN: DomainEvent,
    HEARTBEAT: HostInventory,
    METRICS_DOMAIN: DomainMetrics,
    METRICS_HOST: HostMetrics,
}


def decode_message(op: str, body: Any) -> Message:
    """A published body as its declared type (INVALID_ARG naming the field)."""
    kind = MESSAGES.get(op)
    if kind is None:
        raise ValueError(f"no message type for {op!r}")
    return decode(body, kind)
