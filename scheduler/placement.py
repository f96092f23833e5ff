"""Placement: which host should run a domain. A pure function of a request and host facts.

Filters remove hosts that cannot run the domain; a weigher picks among the rest, as
OpenStack Nova's filter scheduler does. Every filter works on the whole candidate list
at once (one list comprehension each). When nothing is left, :class:`NoHostError` says
which filter removed how many hosts, so an operator sees *why* ("memory removed 3").
:func:`fits` is the same filters for one host: the scheduler's cluster view keeps its
hosts in the weigher's order and takes the first that fits (the same host), without
building the candidate list per decision.

Anti-affinity groups are declared in the domain's ``<metadata>``::

    <metadata>
      <virtbus:placement xmlns:virtbus="https://virtbus.dev/xmlns/placement/1"
                         anti-affinity="web,db"/>
    </metadata>

Two domains sharing a group never land on the same host.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from virtbus.config import setting
from virtbus.domain import DomainDefinition, parse_domain_xml
from virtbus.domain.devices import volume_sources
from virtbus.errors import InvalidArgument, NoHostError

# Domain type -> host drivers that can run it (the test driver accepts every type).
DRIVERS_FOR_TYPE: dict[str, frozenset[str]] = {
    "kvm": frozenset({"qemu", "test"}),
    "qemu": frozenset({"qemu", "test"}),
    "xen": frozenset({"xen", "test"}),
    "lxc": frozenset({"lxc"}),  # containers only on container hosts
    "test": frozenset({"test"}),
}
# CPU modes that expose the host's own CPU: migration needs an identical CPU model.
HOST_CPU_MODES = frozenset({"host-passthrough", "host-model", "maximum"})
WEIGHERS = ("spread", "pack")


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    """What a domain needs from a host."""

    name: str
    memory_kib: int
    vcpus: int
    drivers: frozenset[str]  # acceptable host drivers
    arch: str | None = None  # None: any
    cpu_model: str | None = None  # a named model (cpu mode='custom') the host must offer
    same_cpu_as: str | None = None  # migration with a host CPU: the source's model
    groups: frozenset[str] = frozenset()  # anti-affinity groups
    exclude: frozenset[str] = frozenset()  # hosts never chosen (a migration's source)
    #: storage pools the domain's volume disks name -> bytes it needs there (0: the pool
    #: must only be there and active, e.g. the volumes exist or the pool is shared)
    storage: Mapping[str, int] = field(default_factory=dict)
    #: virtual networks the domain's <interface type='network'> name (but 'default', which
    #: without a defined default network is user-mode NAT): active on the chosen host
    networks: frozenset[str] = frozenset()


@dataclass(slots=True)
class HostCandidate:
    """What placement knows of a host (from its heartbeat, plus the scheduler's claims)."""

    name: str
    driver: str
    arch: str
    cpus: int
    memory_total_kib: int
    memory_free_kib: int
    allocated_memory_kib: int = 0
    allocated_vcpus: int = 0
    up: bool = True
    draining: bool = False
    cpu_model: str = ""
    cpu_models: frozenset[str] = frozenset()  # named models it offers; empty: not reported
    groups: frozenset[str] = frozenset()  # anti-affinity groups of the domains it has
    labels: dict[str, str] = field(default_factory=dict)
    pools: Mapping[str, int] = field(default_factory=dict)  # active pool -> available bytes
    networks: frozenset[str] = frozenset()  # its active virtual networks


@dataclass(frozen=True, slots=True)
class PlacementPolicy:
    cpu_overcommit: float = field(
        default=4.0, metadata=setting("vCPUs per host CPU", flag=True, positive=True)
    )
    memory_overcommit: float = field(
        default=1.0, metadata=setting("guest memory per host memory", flag=True, positive=True)
    )
    weigher: str = field(
        default="spread",
        metadata=setting("spread: most free memory first; pack: fill hosts up", flag=True,
                         choices=WEIGHERS),
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.weigher not in WEIGHERS:
            raise InvalidArgument(f"unknown weigher {self.weigher!r} (use {', '.join(WEIGHERS)})")
        if self.cpu_overcommit <= 0 or self.memory_overcommit <= 0:
            raise InvalidArgument("overcommit ratios must be positive")


Hosts = list[HostCandidate]
Filter = Callable[[PlacementRequest, Hosts, PlacementPolicy], Hosts]


def free_memory_kib(host: HostCandidate, policy: PlacementPolicy) -> float:
    """Memory still allocatable on ``host`` under the overcommit ratio."""
    return host.memory_total_kib * policy.memory_overcommit - host.allocated_memory_kib


# --- filters: each takes the survivors and returns the hosts that pass ------------------
def filter_excluded(req: PlacementRequest, hosts: Hosts, _p: PlacementPolicy) -> Hosts:
    return [h for h in hosts if h.name not in req.exclude] if req.exclude else hosts


def filter_up(_r: PlacementRequest, hosts: Hosts, _p: PlacementPolicy) -> Hosts:
    return [h for h in hosts if h.up]


def filter_not_draining(_r: PlacementRequest, hosts: Hosts, _p: PlacementPolicy) -> Hosts:
    return [h for h in hosts if not h.draining]


def filter_driver(req: PlacementRequest, hosts: Hosts, _p: PlacementPolicy) -> Hosts:
    drivers = req.drivers
    return [h for h in hosts if h.driver in drivers]


def filter_arch(req: PlacementRequest, hosts: Hosts, _p: PlacementPolicy) -> Hosts:
    arch = req.arch
    return hosts if arch is None else [h for h in hosts if h.arch == arch]


def filter_memory(req: PlacementRequest, hosts: Hosts, policy: PlacementPolicy) -> Hosts:
    need, ratio = req.memory_kib, policy.memory_overcommit
    if ratio <= 1.0:  # no overcommit: what the host really has free must cover it too
        return [
            h
            for h in hosts
            if h.memory_total_kib * ratio - h.allocated_memory_kib >= need
            and h.memory_free_kib >= need
        ]
    return [h for h in hosts if h.memory_total_kib * ratio - h.allocated_memory_kib >= need]


def filter_vcpus(req: PlacementRequest, hosts: Hosts, policy: PlacementPolicy) -> Hosts:
    need, ratio = req.vcpus, policy.cpu_overcommit
    return [h for h in hosts if h.cpus * ratio - h.allocated_vcpus >= need]


def filter_anti_affinity(req: PlacementRequest, hosts: Hosts, _p: PlacementPolicy) -> Hosts:
    groups = req.groups
    return [h for h in hosts if groups.isdisjoint(h.groups)] if groups else hosts


def filter_cpu_model(req: PlacementRequest, hosts: Hosts, _p: PlacementPolicy) -> Hosts:
    if req.same_cpu_as is not None:
        same = req.same_cpu_as
        hosts = [h for h in hosts if h.cpu_model == same]
    model = req.cpu_model
    if model is None:
        return hosts
    return [h for h in hosts if h.cpu_model == model or not h.cpu_models or model in h.cpu_models]


def filter_storage(req: PlacementRequest, hosts: Hosts, _p: PlacementPolicy) -> Hosts:
    """Every pool the domain's volumes name is active on the host, with room for them."""
    need = req.storage
    if not need:
        return hosts
    return [
        h
        for h in hosts
        if all(pool in h.pools and h.pools[pool] >= size for pool, size in need.items())
    ]


def filter_networks(req: PlacementRequest, hosts: Hosts, _p: PlacementPolicy) -> Hosts:
    """Every virtual network the domain's interfaces name is active on the host."""
    if not req.networks:
        return hosts
    return [h for h in hosts if req.networks <= h.networks]


FILTERS: tuple[tuple[str, Filter], ...] = (
    ("excluded", filter_excluded),
    ("up", filter_up),
    ("not-draining", filter_not_draining),
    ("driver", filter_driver),
    ("arch", filter_arch),
    ("memory", filter_memory),
    ("vcpus", filter_vcpus),
    ("anti-affinity", filter_anti_affinity),
    ("cpu-model", filter_cpu_model),
    ("storage", filter_storage),
    ("networks", filter_networks),
)


def fits(req: PlacementRequest, h: HostCandidate, policy: PlacementPolicy) -> bool:
    """Whether one host passes every filter of :data:`FILTERS` (for a walk over hosts in
    the weigher's order: :meth:`scheduler.inventory.ClusterView.place`). The filters
    themselves decide, so the walk and the pipeline can never disagree."""
    one = [h]
    return all(keep(req, one, policy) for _name, keep in FILTERS)


# --- weighers: pick one of the survivors (ties: the first, i.e. input order) ------------
def weigh_spread(hosts: Hosts, policy: PlacementPolicy) -> HostCandidate:
    ratio = policy.memory_overcommit
    return max(hosts, key=lambda h: h.memory_total_kib * ratio - h.allocated_memory_kib)


def weigh_pack(hosts: Hosts, policy: PlacementPolicy) -> HostCandidate:
    ratio = policy.memory_overcommit
    return min(hosts, key=lambda h: h.memory_total_kib * ratio - h.allocated_memory_kib)


WEIGHER_FUNCS: dict[str, Callable[[Hosts, PlacementPolicy], HostCandidate]] = {
    "spread": weigh_spread,
    "pack": weigh_pack,
}


def place(
    req: PlacementRequest, hosts: Sequence[HostCandidate], policy: PlacementPolicy
) -> HostCandidate:
    """The host for ``req``, or :class:`NoHostError` naming what removed the candidates."""
    survivors = list(hosts)
    removed: list[tuple[str, int]] = []
    for name, keep in FILTERS:
        before = len(survivors)
        survivors = keep(req, survivors, policy)
        if len(survivors) != before:
            removed.append((name, before - len(survivors)))
        if not survivors:
            break
    if not survivors:
        why = ", ".join(f"{name} removed {count}" for name, count in removed) or "no hosts known"
        raise NoHostError(f"no host can run '{req.name}' ({len(hosts)} hosts: {why})")
    return WEIGHER_FUNCS[policy.weigher](survivors, policy)


# --- requests from domain XML -------------------------------------------------------------
def storage_needs(
    defn: DomainDefinition, sizes: Mapping[tuple[str, str], int] | None = None
) -> dict[str, int]:
    """Pool -> bytes for the domain's ``<disk type='volume'>`` disks; ``sizes`` gives the
    bytes of (pool, volume) pairs that must still be made on the chosen host."""
    need: dict[str, int] = {}
    for _index, pool, volume in volume_sources(defn):
        need[pool] = need.get(pool, 0) + (sizes or {}).get((pool, volume), 0)
    return need


def network_needs(defn: DomainDefinition) -> frozenset[str]:
    """The networks of the domain's ``<interface type='network'>`` other than ``default``
    (which, where no default network is defined, is QEMU's user-mode NAT)."""
    return frozenset(
        i.source_network for i in defn.interfaces
        if i.type == "network" and i.source_network and i.source_network != "default"
    )  # fmt: skip


def request_for(
    defn: DomainDefinition,
    *,
    exclude: frozenset[str] = frozenset(),
    source: HostCandidate | None = None,
    volume_sizes: Mapping[tuple[str, str], int] | None = None,
) -> PlacementRequest:
    """A placement request for a new domain, or (with ``source``) for its migration."""
    storage = storage_needs(defn, volume_sizes)
    cpu = defn.cpu
    custom_model = cpu.model if cpu is not None and cpu.mode == "custom" else None
    host_cpu = cpu is not None and cpu.mode in HOST_CPU_MODES
    if source is not None:
        return PlacementRequest(
            name=defn.name,
            memory_kib=defn.current_memory_kib,
            vcpus=defn.current_vcpus,
            drivers=frozenset({source.driver}),
            arch=source.arch,
            cpu_model=custom_model,
            same_cpu_as=source.cpu_model if host_cpu else None,
            groups=defn.placement_groups,
            exclude=exclude | {source.name},
            storage=storage,
            networks=network_needs(defn),
        )
    return PlacementRequest(
        name=defn.name,
        memory_kib=defn.current_memory_kib,
        vcpus=defn.current_vcpus,
        drivers=DRIVERS_FOR_TYPE.get(defn.hv_type, frozenset({defn.hv_type})),
        arch=defn.os.arch,
        cpu_model=custom_model,
        groups=defn.placement_groups,
        exclude=exclude,
        storage=storage,
        networks=network_needs(defn),
    )


def request_from_xml(xml: str, **kwargs: object) -> PlacementRequest:
    return request_for(parse_domain_xml(xml), **kwargs)  # type: ignore[arg-type]
