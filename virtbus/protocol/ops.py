"""Op names of calls, and the routing keys and exchanges they travel on.

An agent serves the ``domain.*`` and ``host.*`` ops on ``agent.<host>``. Every op's
body and result are documented in the README's protocol section.
"""

from __future__ import annotations

from typing import Final

# --- agent ops -------------------------------------------------------------------
DOMAIN_DEFINE: Final = "domain.define"  # {xml} -> {name, uuid}
DOMAIN_UNDEFINE: Final = "domain.undefine"  # {domain}
DOMAIN_START: Final = "domain.start"
DOMAIN_SHUTDOWN: Final = "domain.shutdown"
DOMAIN_DESTROY: Final = "domain.destroy"
DOMAIN_REBOOT: Final = "domain.reboot"
DOMAIN_RESET: Final = "domain.reset"
DOMAIN_SUSPEND: Final = "domain.suspend"
DOMAIN_RESUME: Final = "domain.resume"
DOMAIN_INFO: Final = "domain.info"  # -> DomainInfo map
DOMAIN_STATE: Final = "domain.state"  # -> {state, reason}
DOMAIN_XML: Final = "domain.xml"  # -> {xml}
DOMAIN_LIST: Final = "domain.list"  # {all?} -> {domains: [DomainInfo map]}
HOST_INFO: Final = "host.info"  # -> inventory map
HOST_PING: Final = "host.ping"  # -> {}

# Ops that act on one domain: serialised per domain by the agent's dispatcher.
DOMAIN_OPS: Final = frozenset(
    {
        DOMAIN_DEFINE,
        DOMAIN_UNDEFINE,
        DOMAIN_START,
        DOMAIN_SHUTDOWN,
        DOMAIN_DESTROY,
        DOMAIN_REBOOT,
        DOMAIN_RESET,
        DOMAIN_SUSPEND,
        DOMAIN_RESUME,
        DOMAIN_INFO,
        DOMAIN_STATE,
        DOMAIN_XML,
    }
)
HOST_OPS: Final = frozenset({DOMAIN_LIST, HOST_INFO, HOST_PING})
AGENT_OPS: Final = DOMAIN_OPS | HOST_OPS

# --- heartbeats / metrics ops ----------------------------------------------------
HEARTBEAT: Final = "host.heartbeat"
METRICS_DOMAIN: Final = "metrics.domain"
METRICS_HOST: Final = "metrics.host"
EVENT_DOMAIN: Final = "domain.event"


def agent_route(host: str) -> str:
    """The routing key on ``virtbus.rpc`` for one host's agent."""
    return f"agent.{host}"
