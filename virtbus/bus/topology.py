"""The whole RabbitMQ topology, declared in one place (and replayed on reconnect).

Exchanges::

    virtbus.rpc      direct  agent.<host> -> virtbus.agent.<host>, scheduler -> virtbus.scheduler
    virtbus.events   topic   <host>.<domain>.<event>
    virtbus.metrics  topic   <host>.<domain>  (host-wide metrics: <host>._host)
    virtbus.hosts    topic   <host>.heartbeat
    virtbus.audit    topic   <daemon>.<user>  (every call served, and its result)
    virtbus.dlx      fanout  rejected (undecodable) messages -> virtbus.dead-letters
    virtbus.journal  topic   <entry>.<id>  (the scheduler's journal of migrations and drains)

Event history: the stream queue ``virtbus.events.history`` is bound to ``virtbus.events``
with ``#``; it keeps events by size and age so a subscriber that was away can replay them
(``x-stream-offset``) and then keep following, with no seam between old and new. The
stream ``virtbus.audit.history`` keeps the audit records of ``virtbus.audit`` the same way,
and the stream ``virtbus.scheduler.journal`` the scheduler's journal (scheduler/journal.py):
replicated by a RabbitMQ cluster, so a standby on any machine can take over.

Call queues (``virtbus.agent.<host>``, ``virtbus.scheduler``) are quorum queues by default
(``bus.call_queue_type``): replicated over the nodes of a RabbitMQ cluster (Raft), they
outlive the node their leader is on, and a consumer on any node keeps its deliveries when
the leader moves. On a single broker, classic call queues save the quorum log's write per
call (about 1 ms a call on the bench machine); calls being transient messages, a classic
queue loses the calls waiting in it when the broker restarts. Both dead-letter to
``virtbus.dlx``; call messages themselves expire at their caller's deadline. Replies use
direct reply-to. The scheduler's queue has a single active consumer: one scheduler acts,
the others stand by. Streams replicate over the cluster as quorum queues do.

RabbitMQ refuses to redeclare a queue with another type (PRECONDITION_FAILED): a classic
queue of an older virtbus (before quorum queues), or one left by a change of
``bus.call_queue_type``. A server that meets its route's queue with the other type
replaces it when it is empty and unused (nothing is lost), and otherwise stops with an
error that says what to do (:data:`QUEUE_TYPE_HELP`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from virtbus.errors import ProtocolError, VirtbusError
from virtbus.protocol.events import MAX_ROUTING_KEY_BYTES

RPC_EXCHANGE: Final = "virtbus.rpc"
EVENTS_EXCHANGE: Final = "virtbus.events"
METRICS_EXCHANGE: Final = "virtbus.metrics"
HOSTS_EXCHANGE: Final = "virtbus.hosts"
AUDIT_EXCHANGE: Final = "virtbus.audit"
DEAD_LETTER_EXCHANGE: Final = "virtbus.dlx"
# A quorum queue, as the call queues are (a classic queue would be unreachable, and every
# connection's declaration of it refused, while its one node is down). It is not named
# "virtbus.dead", the classic queue of older virtbus versions: RabbitMQ cannot change a
# queue's type, and that one may hold messages for a human. Delete it once read.
DEAD_LETTER_QUEUE: Final = "virtbus.dead-letters"
SCHEDULER_ROUTE: Final = "scheduler"
SCHEDULER_QUEUE: Final = "virtbus.scheduler"
JOURNAL_EXCHANGE: Final = "virtbus.journal"
DEADLINE_HEADER: Final = "x-deadline"
# RabbitMQ's direct reply-to: the only reply address an RPC server answers to (the broker
# rewrites it to "amq.rabbitmq.reply-to.<token>" on the way to the server).
DIRECT_REPLY_TO: Final = "amq.rabbitmq.reply-to"


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    name: str
    type: str  # direct | topic | fanout
    durable: bool = True


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    durable: bool = True
    arguments: dict[str, Any] = field(default_factory=dict)


EXCHANGES: Final = (
    ExchangeSpec(RPC_EXCHANGE, "direct"),
    ExchangeSpec(EVENTS_EXCHANGE, "topic"),
    ExchangeSpec(METRICS_EXCHANGE, "topic"),
    ExchangeSpec(HOSTS_EXCHANGE, "topic"),
    ExchangeSpec(AUDIT_EXCHANGE, "topic"),
    ExchangeSpec(DEAD_LETTER_EXCHANGE, "fanout"),
    ExchangeSpec(JOURNAL_EXCHANGE, "topic"),
)

DEAD_LETTER = QueueSpec(
    DEAD_LETTER_QUEUE,
    arguments={"x-queue-type": "quorum", "x-max-length": 10_000, "x-overflow": "drop-head"},
)

EVENT_HISTORY_QUEUE: Final = "virtbus.events.history"
# Queue arguments must be identical wherever the queue is declared: constants, not settings.
EVENT_HISTORY = QueueSpec(
    EVENT_HISTORY_QUEUE,
    arguments={
        "x-queue-type": "stream",
        "x-max-length-bytes": 1 << 30,  # 1 GiB
        "x-max-age": "7D",
        "x-stream-max-segment-size-bytes": 16 << 20,  # retention works segment by segment
    },
)

AUDIT_HISTORY_QUEUE: Final = "virtbus.audit.history"
AUDIT_HISTORY = QueueSpec(
    AUDIT_HISTORY_QUEUE,
    arguments={
        "x-queue-type": "stream",
        "x-max-length-bytes": 1 << 30,  # 1 GiB
        "x-max-age": "30D",
        "x-stream-max-segment-size-bytes": 16 << 20,
    },
)
JOURNAL_QUEUE: Final = "virtbus.scheduler.journal"
# The newest entry per migration wins on replay; an active scheduler appends every live
# record again when it takes over, so retention drops only what finished long ago.
JOURNAL = QueueSpec(
    JOURNAL_QUEUE,
    arguments={
        "x-queue-type": "stream",
        "x-max-length-bytes": 256 << 20,  # 256 MiB
        "x-max-age": "7D",  # the history limit of finished records
        "x-stream-max-segment-size-bytes": 1 << 20,  # small segments: retention bites early
    },
)
# The streams a subscriber can replay, by the exchange whose messages they keep.
HISTORIES: Final = {
    EVENTS_EXCHANGE: EVENT_HISTORY,
    AUDIT_EXCHANGE: AUDIT_HISTORY,
    JOURNAL_EXCHANGE: JOURNAL,
}


def history_of(exchange: str) -> QueueSpec:
    """The stream that keeps ``exchange``'s messages (INVALID_ARG when none does)."""
    spec = HISTORIES.get(exchange)
    if spec is None:
        from virtbus.errors import InvalidArgument

        raise InvalidArgument(f"{exchange!r} keeps no history (only {', '.join(HISTORIES)})")
    return spec


CALL_QUEUE_TYPES: Final = ("quorum", "classic")  # bus.call_queue_type; quorum first: the default
# What an operator does about a call queue of the other type that holds calls or has a
# consumer (a daemon of an older virtbus, or one still set to the other type, running).
QUEUE_TYPE_HELP: Final = (
    "stop the daemon that consumes it, let it drain (or accept losing the calls in it), "
    "then delete it once: rabbitmqctl delete_queue -p VHOST {queue}"
)
CLASSIC_QUEUE_HELP: Final = QUEUE_TYPE_HELP  # its name before bus.call_queue_type


def call_queue_for(route: str, queue_type: str = "quorum") -> QueueSpec:
    """The durable queue that serves an RPC route (``agent.<host>`` or ``scheduler``),
    of ``queue_type`` (``bus.call_queue_type``: quorum or classic)."""
    if queue_type not in CALL_QUEUE_TYPES:
        from virtbus.errors import InvalidArgument

        raise InvalidArgument(
            f"call queue type must be one of {', '.join(CALL_QUEUE_TYPES)}, got {queue_type!r}"
        )
    # x-queue-type is sent for classic queues too: the broker then refuses a queue of the
    # other type (PRECONDITION_FAILED) instead of silently serving from it.
    args: dict[str, Any] = {
        "x-queue-type": queue_type,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    }
    if route == SCHEDULER_ROUTE:
        return QueueSpec(SCHEDULER_QUEUE, arguments={**args, "x-single-active-consumer": True})
    return QueueSpec(f"virtbus.{route}", arguments=args)


HEARTBEAT_KEY_SUFFIX: Final = "heartbeat"
HOST_METRICS_WORD: Final = "_host"


def check_routing_key(key: str, error: type[VirtbusError] = ProtocolError) -> None:
    """AMQP routing keys are short strings: at most 255 bytes of UTF-8."""
    size = len(key.encode("utf-8", errors="surrogatepass"))
    if size > MAX_ROUTING_KEY_BYTES:
        raise error(
            f"routing key {key[:40]!r}... is {size} bytes: AMQP allows {MAX_ROUTING_KEY_BYTES}"
        )
