"""The ``scheduler.*`` ops (route ``scheduler``): the cluster view, placement, migrations."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta
from msgspec import field as default

from virtbus.protocol.base import (
    Accepted,
    Empty,
    HostName,
    Message,
    Name,
    NonNegInt,
    NonNegSeconds,
    Seconds,
    XmlText,
)
from virtbus.protocol.domain import DomainInfo
from virtbus.protocol.host import DrainFlag, HostInventory
from virtbus.protocol.migration import (
    MigrationParams,
    MigrationPhase,
    MigrationRecord,
    RecordState,
)
from virtbus.protocol.registry import Access, Service, Target, field, op


class SchedulerPingRequest(Message):
    probe: str | None = None  # a standby's own probe (it learns who is active)


class SchedulerPing(Message):
    scheduler: str
    active: bool
    ready: bool = False


class HostView(HostInventory):
    """One row of ``virtbus hosts``: the last heartbeat and what the scheduler adds."""

    up: bool = False
    last_seen_s: float | None = None
    claimed_memory_kib: NonNegInt = 0
    claimed_vcpus: NonNegInt = 0
    migrations_out: NonNegInt = 0
    migrations_in: NonNegInt = 0


class ClusterHosts(Message):
    scheduler: str
    hosts: list[HostView]


class ClusterDomainsRequest(Message):
    all: bool = False


class MigrationBrief(Message):
    id: str
    state: RecordState
    phase: MigrationPhase
    source: str
    destination: str


class ClusterDomain(DomainInfo):
    host: str = ""
    migration: MigrationBrief | None = None


class ClusterDomains(Message):
    domains: list[ClusterDomain]
    unreachable: list[str] = default(default_factory=list)


class PlaceRequest(Message):
    xml: XmlText


class Placement(Message):
    host: str


class PlacedDomain(Message):
    host: str
    name: str
    uuid: str


class MigrateRequest(Message):
    """``to``: the destination (placed by the filters when absent); ``xml``: the definition
    the destination starts (virsh migrate --xml), same name and uuid as the domain's."""

    domain: Name
    to: HostName | None = None
    params: MigrationParams = default(default_factory=MigrationParams)
    timeout: Seconds | None = None
    xml: XmlText | None = None


class MigrationQuery(Message):
    """``id`` or ``domain``; with ``wait`` a long poll answered when the record changes
    from ``seen`` (the record the follower last got), or after ``wait`` seconds."""

    id: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    domain: Name | None = None
    wait: NonNegSeconds | None = None
    seen: MigrationRecord | None = None


class MigrationList(Message):
    migrations: list[MigrationRecord]


class CancelRequest(Message):
    domain: Name


class OfflineMigrateRequest(Message):
    """A shut-off domain's definition, to ``to`` (placed by the filters when absent)."""

    domain: Name
    to: HostName | None = None


class OfflineMigration(Message):
    domain: str
    uuid: str
    source: str
    destination: str
    offline: bool = True


class DrainRequest(Message):
    """``stop_containers``: shut containers down, move them offline and start them on
    their new host (they cannot move live; without it they stay, running)."""

    host: HostName
    params: MigrationParams = default(default_factory=MigrationParams)
    timeout: Seconds | None = None
    stop_containers: bool = False


class HostRequest(Message):
    host: HostName


class DrainDomain(Message):
    state: str
    phase: str | None = None
    destination: str | None = None
    progress: dict[str, int | float | str | None] = default(default_factory=dict)
    error: str | None = None


class DrainStatus(Message):
    """``left``: containers that stay on the host, running (they cannot move live)."""

    host: str
    started: float
    done: bool
    ok: bool
    domains: dict[str, DrainDomain]
    left: list[str] = default(default_factory=list)


class ClusterNetworkHost(Message):
    """One host's copy of a cluster network, from its last heartbeat."""

    host: str
    active: bool = False
    dhcp: bool = False  # this host carries the gateway address and dnsmasq
    peers: list[str] = default(default_factory=list)


class ClusterNetwork(Message):
    """A network the scheduler keeps defined and running on every host (VXLAN ``vni``);
    ``dhcp_host`` serves its DHCP."""

    name: str
    uuid: str
    vni: NonNegInt
    dhcp_host: str
    hosts: list[ClusterNetworkHost] = default(default_factory=list)


class ClusterNetworks(Message):
    networks: list[ClusterNetwork]


class ClusterNetworkTarget(Message):
    network: Name


_S = Service.SCHEDULER

SCHEDULER_PING = op(
    "scheduler.ping", SchedulerPingRequest, SchedulerPing, _S,
    "which scheduler is active, and is it ready", access=Access.READ, target=Target.HOST,
)  # fmt: skip
SCHEDULER_HOSTS = op(
    "scheduler.hosts", Empty, ClusterHosts, _S, "the cluster view: hosts, up/down, draining",
    access=Access.READ, target=Target.HOST,
)  # fmt: skip
SCHEDULER_DOMAINS = op(
    "scheduler.domains", ClusterDomainsRequest, ClusterDomains, _S,
    "domains of every host that is up (migrating ones marked)",
    access=Access.READ, target=Target.DOMAIN,
)  # fmt: skip
SCHEDULER_PLACE = op(
    "scheduler.place", PlaceRequest, Placement, _S,
    "where would this domain go (no side effect; NO_HOST says why not)",
    access=Access.READ, target=Target.DOMAIN,
)  # fmt: skip
SCHEDULER_DEFINE = op(
    "scheduler.define", PlaceRequest, PlacedDomain, _S, "place, claim and define a domain",
    access=Access.CONFIG, target=Target.DOMAIN,
)  # fmt: skip
SCHEDULER_MIGRATE = op(
    "scheduler.migrate", MigrateRequest, MigrationRecord, _S, "live-migrate a domain",
    access=Access.LIFECYCLE, target=Target.DOMAIN, target_of=field("domain"),
)  # fmt: skip
SCHEDULER_MIGRATION = op(
    "scheduler.migration", MigrationQuery, MigrationRecord, _S,
    "one migration's record (optionally a long poll)",
    access=Access.READ, target=Target.DOMAIN, target_of=field("domain"),
)  # fmt: skip
SCHEDULER_MIGRATIONS = op(
    "scheduler.migrations", Empty, MigrationList, _S,
    "migrations in flight and recently finished", access=Access.READ, target=Target.MIGRATION,
)  # fmt: skip
SCHEDULER_MIGRATE_CANCEL = op(
    "scheduler.migrate_cancel", CancelRequest, MigrationRecord, _S,
    "cancel a migration: the guest stays on its source",
    access=Access.LIFECYCLE, target=Target.DOMAIN, target_of=field("domain"),
)  # fmt: skip
SCHEDULER_MIGRATE_OFFLINE = op(
    "scheduler.migrate_offline", OfflineMigrateRequest, OfflineMigration, _S,
    "move a shut-off domain's definition to another host (how containers move)",
    access=Access.CONFIG, target=Target.DOMAIN, target_of=field("domain"),
)  # fmt: skip
SCHEDULER_DRAIN = op(
    "scheduler.drain", DrainRequest, DrainStatus, _S,
    "mark a host draining and live-migrate every running domain off it",
    access=Access.ADMIN, target=Target.HOST, target_of=field("host"),
)  # fmt: skip
SCHEDULER_DRAIN_STATUS = op(
    "scheduler.drain_status", HostRequest, DrainStatus, _S, "progress of a drain",
    access=Access.READ, target=Target.HOST, target_of=field("host"),
)  # fmt: skip
SCHEDULER_NETWORK_DEFINE = op(
    "scheduler.network_define", PlaceRequest, ClusterNetwork, _S,
    "define a cluster network: on every host (and every host that joins), joined by VXLAN",
    access=Access.CONFIG, target=Target.NETWORK,
)  # fmt: skip
SCHEDULER_NETWORKS = op(
    "scheduler.networks", Empty, ClusterNetworks, _S,
    "the cluster networks and each host's copy", access=Access.READ, target=Target.NETWORK,
)  # fmt: skip
SCHEDULER_NETWORK_UNDEFINE = op(
    "scheduler.network_undefine", ClusterNetworkTarget, Accepted, _S,
    "stop and undefine a cluster network on every host that is up",
    access=Access.CONFIG, target=Target.NETWORK, target_of=field("network"),
)  # fmt: skip
SCHEDULER_UNDRAIN = op(
    "scheduler.undrain", HostRequest, DrainFlag, _S, "let the scheduler place on a host again",
    access=Access.ADMIN, target=Target.HOST, target_of=field("host"),
)  # fmt: skip
