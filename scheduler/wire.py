"""What the scheduler accepts from the bus: heartbeats and agent replies, checked at the edge.

Any bus client can publish a heartbeat and an agent may run another version, so nothing
from the bus is trusted to have the right shape. A heartbeat is parsed into a typed
:class:`HostInventory` (or an error message naming the field; the caller drops it), so
the cluster view and placement only ever see well-typed values. An agent reply with the
wrong shape raises :class:`ProtocolError` (``RPC_ERROR``), which the callers already
handle like any failed call, instead of a ``KeyError`` that would become INTERNAL_ERROR
or kill a background task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from virtbus.errors import ProtocolError

# Non-negative integer fields of a heartbeat (missing: 0, as before validation existed).
_COUNTS = (
    "cpus",
    "memory_total_kib",
    "memory_free_kib",
    "allocated_memory_kib",
    "allocated_vcpus",
    "domains",
)
_TEXTS = ("driver", "arch", "cpu_model", "migration_address")


@dataclass(frozen=True, slots=True)
class HostInventory:
    """A host's last heartbeat, validated. ``raw`` is the whole map, shown by ``hosts``."""

    host: str
    driver: str = ""
    arch: str = ""
    cpus: int = 0
    memory_total_kib: int = 0
    memory_free_kib: int = 0
    allocated_memory_kib: int = 0
    allocated_vcpus: int = 0
    domains: int = 0
    cpu_model: str = ""
    cpu_models: frozenset[str] = frozenset()
    labels: dict[str, str] = field(default_factory=dict)
    running: tuple[str, ...] = ()
    draining: bool = False
    migration_address: str = ""
    started_at: float | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _str_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)


def parse_heartbeat(body: Any) -> HostInventory | str:
    """The typed inventory of a heartbeat body, or why it is invalid (naming the field)."""
    if not isinstance(body, dict):
        return "the heartbeat body is not a map"
    host = body.get("host")
    if not isinstance(host, str) or not host:
        return "field 'host' must be a non-empty string"
    values: dict[str, Any] = {}
    for key in _COUNTS:
        value = body.get(key, 0)
        if not _is_int(value) or value < 0:
            return f"field '{key}' must be a non-negative integer, not {value!r:.40}"
        values[key] = value
    for key in _TEXTS:
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            return f"field '{key}' must be a string, not {value!r:.40}"
        values[key] = value or ""
    for key in ("running", "cpu_models"):
        value = body.get(key)
        if value is not None and not _str_list(value):
            return f"field '{key}' must be a list of strings, not {value!r:.40}"
    labels = body.get("labels")
    if labels is not None and not (
        isinstance(labels, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
    ):
        return f"field 'labels' must be a map of strings, not {labels!r:.40}"
    draining = body.get("draining", False)
    if not isinstance(draining, bool):
        return f"field 'draining' must be a boolean, not {draining!r:.40}"
    started_at = body.get("started_at")
    if started_at is not None and not _is_number(started_at):
        return f"field 'started_at' must be a number, not {started_at!r:.40}"
    return HostInventory(
        host=host,
        cpu_models=frozenset(body.get("cpu_models") or ()),
        labels=dict(labels or {}),
        running=tuple(body.get("running") or ()),
        draining=draining,
        started_at=None if started_at is None else float(started_at),
        raw=body,
        **values,
    )


# --- agent replies ----------------------------------------------------------------------
def _map(reply: Any, op: str) -> dict[str, Any]:
    if not isinstance(reply, dict):
        raise ProtocolError(f"{op}: the agent answered {type(reply).__name__}, not a map")
    return reply


def reply_str(reply: Any, op: str, key: str) -> str:
    """``reply[key]`` of an agent's answer to ``op``, which must be a non-empty string."""
    value = _map(reply, op).get(key)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{op}: the agent's answer has no string '{key}'")
    return value


def domain_info(reply: Any, op: str) -> dict[str, Any]:
    """A DomainInfo map: at least a string ``name`` and ``uuid`` (``state`` a string if set)."""
    info = _map(reply, op)
    for key in ("name", "uuid"):
        if not isinstance(info.get(key), str) or not info[key]:
            raise ProtocolError(f"{op}: a domain in the agent's answer has no string '{key}'")
    if not isinstance(info.get("state", ""), str):
        raise ProtocolError(f"{op}: the agent's domain state is not a string")
    return info


def domain_list(reply: Any, op: str) -> list[dict[str, Any]]:
    """The ``domains`` of a ``domain.list`` answer, each a valid DomainInfo map."""
    domains = _map(reply, op).get("domains")
    if not isinstance(domains, list):
        raise ProtocolError(f"{op}: the agent's answer has no 'domains' list")
    return [domain_info(d, op) for d in domains]


def status_map(reply: Any, op: str) -> dict[str, Any]:
    """A ``migration.status`` answer: a map whose ``status`` (if any) is a string."""
    status = _map(reply, op)
    if not isinstance(status.get("status", ""), str):
        raise ProtocolError(f"{op}: the agent's migration status is not a string")
    return status
