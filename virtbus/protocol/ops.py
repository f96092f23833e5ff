"""Every op, by name: the index of the op modules (``domain``, ``host``, ``migration``,
``scheduler``), and the routing key of an agent.

Each constant is an :class:`~virtbus.protocol.registry.Op`: a ``str`` (its name, as it
travels in the envelope's ``op``) that also carries its request and result types. New ops
are declared in their own module and imported here, so importing ``ops`` registers all.
"""

from __future__ import annotations

from virtbus.protocol.domain import (
    DOMAIN_DEFINE,
    DOMAIN_DESTROY,
    DOMAIN_INFO,
    DOMAIN_LIST,
    DOMAIN_REBOOT,
    DOMAIN_RESET,
    DOMAIN_RESUME,
    DOMAIN_SHUTDOWN,
    DOMAIN_START,
    DOMAIN_STATE,
    DOMAIN_STATS,
    DOMAIN_SUSPEND,
    DOMAIN_UNDEFINE,
    DOMAIN_XML,
)
from virtbus.protocol.host import HOST_INFO, HOST_PING, HOST_SET_DRAINING
from virtbus.protocol.messages import EVENT_DOMAIN, HEARTBEAT, METRICS_DOMAIN, METRICS_HOST
from virtbus.protocol.migration import (
    MIGRATION_BEGIN,
    MIGRATION_CANCEL,
    MIGRATION_CONFIRM,
    MIGRATION_FINISH,
    MIGRATION_PERFORM,
    MIGRATION_PREPARE,
    MIGRATION_STATUS,
)
from virtbus.protocol.registry import REGISTRY, Op, Service, lookup, ops_of
from virtbus.protocol.scheduler import (
    SCHEDULER_DEFINE,
    SCHEDULER_DOMAINS,
    SCHEDULER_DRAIN,
    SCHEDULER_DRAIN_STATUS,
    SCHEDULER_HOSTS,
    SCHEDULER_MIGRATE,
    SCHEDULER_MIGRATE_CANCEL,
    SCHEDULER_MIGRATION,
    SCHEDULER_MIGRATIONS,
    SCHEDULER_PING,
    SCHEDULER_PLACE,
    SCHEDULER_UNDRAIN,
)

__all__ = [
    "DOMAIN_DEFINE",
    "DOMAIN_DESTROY",
    "DOMAIN_INFO",
    "DOMAIN_LIST",
    "DOMAIN_REBOOT",
    "DOMAIN_RESET",
    "DOMAIN_RESUME",
    "DOMAIN_SHUTDOWN",
    "DOMAIN_START",
    "DOMAIN_STATE",
    "DOMAIN_STATS",
    "DOMAIN_SUSPEND",
    "DOMAIN_UNDEFINE",
    "DOMAIN_XML",
    "EVENT_DOMAIN",
    "HEARTBEAT",
    "HOST_INFO",
    "HOST_PING",
    "HOST_SET_DRAINING",
    "METRICS_DOMAIN",
    "METRICS_HOST",
    "MIGRATION_BEGIN",
    "MIGRATION_CANCEL",
    "MIGRATION_CONFIRM",
    "MIGRATION_FINISH",
    "MIGRATION_PERFORM",
    "MIGRATION_PREPARE",
    "MIGRATION_STATUS",
    "REGISTRY",
    "SCHEDULER_DEFINE",
    "SCHEDULER_DOMAINS",
    "SCHEDULER_DRAIN",
    "SCHEDULER_DRAIN_STATUS",
    "SCHEDULER_HOSTS",
    "SCHEDULER_MIGRATE",
    "SCHEDULER_MIGRATE_CANCEL",
    "SCHEDULER_MIGRATION",
    "SCHEDULER_MIGRATIONS",
    "SCHEDULER_PING",
    "SCHEDULER_PLACE",
    "SCHEDULER_UNDRAIN",
    "Op",
    "Service",
    "agent_route",
    "lookup",
    "ops_of",
]


def agent_route(host: str) -> str:
    """The routing key on ``virtbus.rpc`` for one host's agent."""
    return f"agent.{host}"
