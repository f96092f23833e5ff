"""libvirt's lifecycle vocabulary: domain states, state reasons, event names and details.

Names are libvirt's ``virDomainState`` / ``virDomainEventType`` enums in lower case, so
a libvirt user reads them without a table. Numeric values match libvirt's, for tools
that want to map to its integers (``state.state`` in domstats is the number).
"""

from __future__ import annotations

import re
from enum import IntEnum, StrEnum
from typing import Any


class DomainState(IntEnum):
    NOSTATE = 0
    RUNNING = 1
    BLOCKED = 2
    PAUSED = 3
    SHUTDOWN = 4
    SHUTOFF = 5
    CRASHED = 6
    PMSUSPENDED = 7

    @property
    def label(self) -> str:
        return self.name.lower()


# State reasons per state, libvirt's names (virDomain<State>Reason).
STATE_REASONS: dict[DomainState, tuple[str, ...]] = {
    DomainState.NOSTATE: ("unknown",),
    DomainState.RUNNING: (
        "unknown",
        "booted",
        "migrated",
        "restored",
        "from_snapshot",
        "unpaused",
        "migration_canceled",
        "save_canceled",
        "wakeup",
        "crashed",
        "postcopy",
        "postcopy_failed",
    ),
    DomainState.BLOCKED: ("unknown",),
    DomainState.PAUSED: (
        "unknown",
        "user",
        "migration",
        "save",
        "dump",
        "ioerror",
        "watchdog",
        "from_snapshot",
        "shutting_down",
        "snapshot",
        "crashed",
        "starting_up",
        "postcopy",
        "postcopy_failed",
        "api_error",
    ),
    DomainState.SHUTDOWN: ("unknown", "user"),
    DomainState.SHUTOFF: (
        "unknown",
        "shutdown",
        "destroyed",
        "crashed",
        "migrated",
        "saved",
        "failed",
        "from_snapshot",
        "daemon",
    ),
    DomainState.CRASHED: ("unknown", "panicked"),
    DomainState.PMSUSPENDED: ("unknown",),
}


def reason_code(state: DomainState, reason: str) -> int:
    """libvirt's integer for a state reason (0, 'unknown', when not in the table)."""
    try:
        return STATE_REASONS[state].index(reason)
    except ValueError:
        return 0


class LifecycleEvent(StrEnum):
    DEFINED = "defined"
    UNDEFINED = "undefined"
    STARTED = "started"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    STOPPED = "stopped"
    SHUTDOWN = "shutdown"
    PMSUSPENDED = "pmsuspended"
    CRASHED = "crashed"


LIFECYCLE_DETAILS: dict[LifecycleEvent, tuple[str, ...]] = {
    LifecycleEvent.DEFINED: ("added", "updated", "renamed", "from_snapshot"),
    LifecycleEvent.UNDEFINED: ("removed", "renamed"),
    LifecycleEvent.STARTED: ("booted", "migrated", "restored", "from_snapshot", "wakeup"),
    LifecycleEvent.SUSPENDED: (
        "paused",
        "migrated",
        "ioerror",
        "watchdog",
        "restored",
        "from_snapshot",
        "api_error",
        "postcopy",
        "postcopy_failed",
    ),
    LifecycleEvent.RESUMED: (
        "unpaused",
        "migrated",
        "from_snapshot",
        "postcopy",
        "postcopy_failed",
    ),
    LifecycleEvent.STOPPED: (
        "shutdown",
        "destroyed",
        "crashed",
        "migrated",
        "saved",
        "failed",
        "from_snapshot",
    ),
    LifecycleEvent.SHUTDOWN: ("finished", "guest", "host"),
    LifecycleEvent.PMSUSPENDED: ("memory", "disk"),
    LifecycleEvent.CRASHED: ("panicked", "crashloaded"),
}

# Non-lifecycle event kinds (payload in ``data``).
OTHER_EVENTS: frozenset[str] = frozenset(
    {
        "reboot",
        "rtc_change",
        "watchdog",
        "io_error",
        "block_job",
        "device_added",
        "device_removed",
        "balloon_change",
        "migration",
        "job_completed",
        "control_error",
        "tray_change",
        "disk_change",
        "pmwakeup",
        "pmsuspend",
        "oom_kill",  # virtbus: the OOM killer ended a process in a container (no libvirt event)
    }
)
EVENT_NAMES: frozenset[str] = frozenset(e.value for e in LifecycleEvent) | OTHER_EVENTS

_UNSAFE_KEY = re.compile(r"[.*#\s]")
#: bytes of UTF-8 one routing-key word may take; three words and two dots stay far below
#: AMQP's 255-byte limit for a routing key (a short string)
MAX_WORD_BYTES = 64
MAX_ROUTING_KEY_BYTES = 255
_HASH_CHARS = 10  # hex digits of the digest that stands for a cut-off tail


def routing_word(text: str) -> str:
    """A name made safe as one word of a topic routing key ('.', '*', '#' → '_').

    A word longer than ``MAX_WORD_BYTES`` keeps its start and ends in ``~`` and a digest
    of the whole name, so long names stay distinct and every key stays under AMQP's limit.
    Publishers and subscribers both derive words with this function; the exact names
    travel in the message body.
    """
    word = _UNSAFE_KEY.sub("_", text) or "_"
    data = word.encode("utf-8", errors="surrogatepass")
    if len(data) <= MAX_WORD_BYTES:
        return word
    import hashlib  # rarely needed (long names): a one-shot client's start-up does without

    digest = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()
    head = data[: MAX_WORD_BYTES - _HASH_CHARS - 1].decode("utf-8", errors="ignore")
    return f"{head}~{digest[:_HASH_CHARS]}"


def routing_key(*words: str) -> str:
    """Words joined with '.' (each already a routing word or a binding wildcard)."""
    key = ".".join(words)
    if len(key.encode("utf-8", errors="surrogatepass")) > MAX_ROUTING_KEY_BYTES:
        raise ValueError(f"routing key of {len(key)} characters is over the AMQP limit")
    return key


def event_routing_key(host: str, domain: str, event: str) -> str:
    """``<host>.<domain>.<event>`` on ``virtbus.events``; the exact names are in the body."""
    return routing_key(routing_word(host), routing_word(domain), routing_word(event))


def event_body(
    *,
    host: str,
    seq: int,
    domain: str,
    uuid: str,
    event: str,
    detail: str | None = None,
    data: dict[str, Any] | None = None,
    reconciled: bool = False,
) -> dict[str, Any]:
    """The body of an ``event`` message: exact names, the per-host sequence number."""
    return {
        "host": host,
        "seq": seq,
        "domain": domain,
        "uuid": uuid,
        "event": event,
        "detail": detail,
        "data": data or {},
        "reconciled": reconciled,
    }


# --- storage pool and job events ------------------------------------------------------
# libvirt's storage pool lifecycle (virStoragePoolEventLifecycleType) and refresh events.
POOL_EVENTS: frozenset[str] = frozenset(
    {"defined", "undefined", "started", "stopped", "created", "deleted", "refreshed"}
)
#: a job's events; ``data`` is the job's map (id, kind, target, state, processed, total ...)
JOB_EVENTS: frozenset[str] = frozenset({"started", "progress", "completed", "failed", "cancelled"})


def pool_routing_key(host: str, pool: str, event: str) -> str:
    """``<host>.pool.<pool>.<event>``: four words, so ``*.*.*`` domain bindings never see it."""
    return routing_key(routing_word(host), "pool", routing_word(pool), routing_word(event))


def job_routing_key(host: str, job: str, event: str) -> str:
    """``<host>.job.<id>.<event>``."""
    return routing_key(routing_word(host), "job", routing_word(job), routing_word(event))


# --- network events -------------------------------------------------------------------
#: libvirt's virNetworkEventLifecycleType, plus virtbus's ``dhcp-restarted`` and
#: ``updated`` (a net-update; detail: the section)
NETWORK_EVENTS: frozenset[str] = frozenset(
    {"defined", "undefined", "started", "stopped", "dhcp-restarted", "updated"}
)


def network_routing_key(host: str, network: str, event: str) -> str:
    """``<host>.network.<network>.<event>``: four words, as pool events."""
    return routing_key(routing_word(host), "network", routing_word(network), routing_word(event))
