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
# {domains?: [ref], groups?: [libvirt group]} -> {domains: {name: {libvirt field: value}}}
DOMAIN_STATS: Final = "domain.stats"  # host-level: never queued behind lifecycle commands
HOST_SET_DRAINING: Final = "host.set_draining"  # {draining: bool} -> {draining}

# --- agent migration ops: libvirt's v3 steps, one per call (README "Migration") -----
MIGRATION_BEGIN: Final = "migration.begin"  # source {domain} -> {xml, name, uuid}
MIGRATION_PREPARE: Final = "migration.prepare"  # dest {xml, params} -> {uri, name, uuid}
MIGRATION_PERFORM: Final = "migration.perform"  # source {domain, uri, params} -> {}
MIGRATION_STATUS: Final = "migration.status"  # source {domain} -> MigrationStatus map
MIGRATION_CANCEL: Final = "migration.cancel"  # source {domain} -> {}
MIGRATION_FINISH: Final = "migration.finish"  # dest {domain, success} -> {state, reason}
MIGRATION_CONFIRM: Final = "migration.confirm"  # source {domain, success} -> {state?}
# Migration steps serialised per domain (status and cancel must overtake a busy chain).
MIGRATION_DOMAIN_OPS: Final = frozenset(
    {MIGRATION_BEGIN, MIGRATION_PREPARE, MIGRATION_PERFORM, MIGRATION_FINISH, MIGRATION_CONFIRM}
)
MIGRATION_OPS: Final = MIGRATION_DOMAIN_OPS | {MIGRATION_STATUS, MIGRATION_CANCEL}

# --- scheduler ops (route ``scheduler``) ------------------------------------------
SCHEDULER_PING: Final = "scheduler.ping"  # -> {scheduler, active}
SCHEDULER_HOSTS: Final = "scheduler.hosts"  # -> {hosts: [host view map]}
SCHEDULER_DOMAINS: Final = "scheduler.domains"  # {all?} -> {domains: [DomainInfo + host]}
SCHEDULER_PLACE: Final = "scheduler.place"  # {xml} -> {host}
SCHEDULER_DEFINE: Final = "scheduler.define"  # {xml} -> {host, name, uuid}
SCHEDULER_MIGRATE: Final = "scheduler.migrate"  # {domain, to?, params, timeout?} -> migration
SCHEDULER_MIGRATION: Final = "scheduler.migration"  # {id | domain} -> migration map
SCHEDULER_MIGRATIONS: Final = "scheduler.migrations"  # -> {migrations: [migration map]}
SCHEDULER_MIGRATE_CANCEL: Final = "scheduler.migrate_cancel"  # {domain} -> migration map
SCHEDULER_DRAIN: Final = "scheduler.drain"  # {host} -> drain map
SCHEDULER_DRAIN_STATUS: Final = "scheduler.drain_status"  # {host} -> drain map
SCHEDULER_UNDRAIN: Final = "scheduler.undrain"  # {host} -> {host, draining}
SCHEDULER_OPS: Final = frozenset(
    {
        SCHEDULER_PING,
        SCHEDULER_HOSTS,
        SCHEDULER_DOMAINS,
        SCHEDULER_PLACE,
        SCHEDULER_DEFINE,
        SCHEDULER_MIGRATE,
        SCHEDULER_MIGRATION,
        SCHEDULER_MIGRATIONS,
        SCHEDULER_MIGRATE_CANCEL,
        SCHEDULER_DRAIN,
        SCHEDULER_DRAIN_STATUS,
        SCHEDULER_UNDRAIN,
    }
)

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
HOST_OPS: Final = frozenset({DOMAIN_LIST, DOMAIN_STATS, HOST_INFO, HOST_PING, HOST_SET_DRAINING})
AGENT_OPS: Final = DOMAIN_OPS | HOST_OPS | MIGRATION_OPS

# --- heartbeats / metrics ops ----------------------------------------------------
HEARTBEAT: Final = "host.heartbeat"
METRICS_DOMAIN: Final = "metrics.domain"
METRICS_HOST: Final = "metrics.host"
EVENT_DOMAIN: Final = "domain.event"


def agent_route(host: str) -> str:
    """The routing key on ``virtbus.rpc`` for one host's agent."""
    return f"agent.{host}"
