"""The bodies of the messages that are not calls: events, heartbeats, metrics.

They are published (``kind`` event, heartbeat, metrics) rather than answered; their
``op`` names the body type. Each is declared once with :func:`published` — its op, body
type, exchange and routing key — in :data:`MESSAGES`, which the README tables and the
AsyncAPI document read as they read the op registry. A subscriber decodes a body with
:func:`decode_message`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from msgspec import field as default

from virtbus.bus.topology import (
    AUDIT_EXCHANGE,
    EVENTS_EXCHANGE,
    HEARTBEAT_KEY_SUFFIX,
    HOST_METRICS_WORD,
    HOSTS_EXCHANGE,
    JOURNAL_EXCHANGE,
    METRICS_EXCHANGE,
)
from virtbus.protocol.base import HostName, Message, NonNegInt, decode
from virtbus.protocol.envelope import Kind
from virtbus.protocol.events import routing_word
from virtbus.protocol.host import HostInventory
from virtbus.protocol.migration import MigrationRecord
from virtbus.protocol.network import NetworkEvent
from virtbus.protocol.storage import JobEvent, PoolEvent

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


class AuditRecord(Message):
    """One call a daemon served (or refused): who, what, on what, the result, how long.

    Written as one JSON line to the daemon's audit log and published on
    ``virtbus.audit`` (kept in the stream ``virtbus.audit.history``)."""

    ts: float  # when the call arrived (epoch s)
    daemon: str  # the host name of the agent, or "scheduler"
    user: str | None  # the AMQP user_id of the call (None: it had none, and was refused)
    op: str
    target: str | None  # the object's name, None for host-wide ops
    code: str  # "OK", or the error code of the reply (AUTH_DENIED, NO_DOMAIN, ...)
    ms: float  # from arrival to the reply
    id: str  # the call's id
    src: str = ""  # what the caller says it is (the envelope's src)


class AuditBatch(Message):
    """Consecutive audit records of one daemon and one user, in call order: what a daemon
    publishes (``audit.calls``), one message and one stream entry for the calls of a flush
    instead of one each (a message per call cost the agent as much as the call's reply)."""

    records: list[AuditRecord]


class ClusterNetworkRecord(Message):
    """A cluster network as the scheduler keeps it (scheduler/networks.py): ``xml`` is the
    definition with its ``<vb:cluster vni>``, without a host's DHCP role."""

    name: str
    uuid: str
    vni: int
    dhcp_host: str
    xml: str


class JournalEntry(Message):
    """One entry of the scheduler's journal (the stream virtbus.scheduler.journal).

    ``migration``: the record as of now (the newest per id wins on replay); ``removed``:
    the migration is done with; ``draining``: the whole set of draining hosts; ``network``:
    a cluster network (``id`` its name; the newest wins); ``network-removed``: its
    tombstone (undefined); ``mark``: a replaying scheduler's own marker, the end of what
    it has to read.
    """

    entry: Literal["migration", "removed", "draining", "network", "network-removed", "mark"]
    id: str
    record: MigrationRecord | None = None
    hosts: list[str] = default(default_factory=list)
    network: ClusterNetworkRecord | None = None


@dataclass(frozen=True, slots=True)
class Published:
    """A message that is published, not answered: what it carries and where it goes.

    ``routing_key`` is a pattern of words, ``{host}.{domain}.{event}``: each ``{word}``
    is a name made safe by :func:`~virtbus.protocol.events.routing_word`.
    """

    op: str
    body: type[Message]
    kind: Kind
    exchange: str
    routing_key: str
    summary: str
    persistent: bool = False  # published persistent, with publisher confirms

    def key(self, **words: str) -> str:
        """The routing key of one message (``key(host="a", domain="web.1", ...)``)."""
        return self.routing_key.format_map({k: routing_word(v) for k, v in words.items()})


MESSAGES: Final[dict[str, Published]] = {}


def published(
    op: str,
    body: type[Message],
    kind: Kind,
    exchange: str,
    routing_key: str,
    summary: str,
    *,
    persistent: bool = False,
) -> str:
    """Declare and register a published message; an op is declared once."""
    if op in MESSAGES:
        raise ValueError(f"message {op!r} is declared twice")
    MESSAGES[op] = Published(op, body, kind, exchange, routing_key, summary, persistent)
    return op


EVENT_DOMAIN: Final = published(
    "domain.event", DomainEvent, Kind.EVENT, EVENTS_EXCHANGE, "{host}.{domain}.{event}",
    "a domain's libvirt event (kept in the history stream virtbus.events.history)",
    persistent=True,
)  # fmt: skip
EVENT_POOL: Final = published(
    "storage.pool.event", PoolEvent, Kind.EVENT, EVENTS_EXCHANGE, "{host}.pool.{pool}.{event}",
    "a storage pool's lifecycle event (four words: *.*.* domain bindings never see it)",
    persistent=True,
)  # fmt: skip
EVENT_NETWORK: Final = published(
    "network.event", NetworkEvent, Kind.EVENT, EVENTS_EXCHANGE, "{host}.network.{network}.{event}",
    "a virtual network's lifecycle event (four words: *.*.* domain bindings never see it)",
    persistent=True,
)  # fmt: skip
EVENT_JOB: Final = published(
    "job.event", JobEvent, Kind.EVENT, EVENTS_EXCHANGE, "{host}.job.{job}.{event}",
    "a job's start, progress (at most every 0.5 s), end or cancellation",
    persistent=True,
)  # fmt: skip
HEARTBEAT: Final = published(
    "host.heartbeat", HostInventory, Kind.HEARTBEAT,
    HOSTS_EXCHANGE, f"{{host}}.{HEARTBEAT_KEY_SUFFIX}",
    "an agent's inventory, every heartbeat interval (2 s by default)",
)  # fmt: skip
METRICS_DOMAIN: Final = published(
    "metrics.domain", DomainMetrics, Kind.METRICS, METRICS_EXCHANGE, "{host}.{domain}",
    "one domain's statistics of a collection pass (best effort)",
)  # fmt: skip
METRICS_HOST: Final = published(
    "metrics.host", HostMetrics, Kind.METRICS, METRICS_EXCHANGE, f"{{host}}.{HOST_METRICS_WORD}",
    "the host's figures of a collection pass (best effort)",
)  # fmt: skip

AUDIT_CALL: Final = published(
    "audit.call", AuditRecord, Kind.AUDIT, AUDIT_EXCHANGE, "{daemon}.{user}",
    "one call an agent or the scheduler served or refused (what daemons before audit.calls "
    "published; still read from the stream virtbus.audit.history)",
)  # fmt: skip
AUDIT_CALLS: Final = published(
    "audit.calls", AuditBatch, Kind.AUDIT, AUDIT_EXCHANGE, "{daemon}.{user}",
    "consecutive calls of one user an agent or the scheduler served or refused, and their "
    "results, in call order (kept in the stream virtbus.audit.history)",
)  # fmt: skip

JOURNAL_RECORD: Final = published(
    "scheduler.journal", JournalEntry, Kind.JOURNAL, JOURNAL_EXCHANGE, "{entry}.{id}",
    "the active scheduler's journal of migrations, drains and cluster networks, replayed by "
    "the next active one (kept in the stream virtbus.scheduler.journal)",
    persistent=True,
)  # fmt: skip


def decode_message(op: str, body: Any) -> Message:
    """A published body as its declared type (INVALID_ARG naming the field)."""
    declared = MESSAGES.get(op)
    if declared is None:
        raise ValueError(f"no message type for {op!r}")
    return decode(body, declared.body)


def audit_records(op: str, body: Any) -> list[AuditRecord]:
    """The audit records an ``audit.calls`` (or an older ``audit.call``) message carries;
    INVALID_ARG for a body that is neither (any bus client can publish)."""
    if op == AUDIT_CALLS:
        return decode(body, AuditBatch).records
    return [decode(body, AuditRecord)]
