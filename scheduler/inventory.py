"""The cluster view: hosts from their heartbeats, domains from the agents, claims.

A host is *up* while its heartbeats keep coming (``host_down_after``). Its capacity and
allocation come from the heartbeat; domains and their anti-affinity groups from
``domain.list``/``domain.xml`` answers. Between a placement and the heartbeat that shows
its effect, the scheduler holds a *claim* on the chosen host, so a burst of placements
(a drain, a batch of defines) does not pile onto the same host.

Placement's input is kept up to date as things change, not rebuilt per decision: each
host's :class:`HostCandidate` is rebuilt when its heartbeat, domains, their metadata, its
claims or its drain intent change, and the hosts are kept in weigher order (one sorted
list per weigher and memory ratio). A decision walks that order and takes the first host
that passes every filter: the host the filters-then-weigher pipeline of
:func:`scheduler.placement.place` would choose (ties: the first name), usually after a
handful of hosts. Only when none fits does it run that pipeline, for its NO_HOST message.
Whether a host is up is read at decision time; expired claims are dropped then (a heap).
Every change to the view goes through a method of :class:`ClusterView`.
"""

from __future__ import annotations

import heapq
import time
from bisect import bisect_left, insort
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import msgspec

from scheduler.placement import HostCandidate, PlacementPolicy, PlacementRequest, fits, place
from virtbus.protocol.domain import DomainInfo, StateName
from virtbus.protocol.host import HostInventory
from virtbus.protocol.scheduler import HostView


@dataclass(slots=True)
class Claim:
    uuid: str
    name: str
    memory_kib: int
    vcpus: int
    groups: frozenset[str]
    expires: float  # monotonic


@dataclass(slots=True)
class DomainMeta:
    """What placement needs of a domain, from its XML (fetched once per uuid)."""

    name: str
    uuid: str
    groups: frozenset[str]


@dataclass(slots=True)
class HostRecord:
    name: str
    inventory: HostInventory | None = None  # validated at the edge (a typed heartbeat)
    last_seen: float = 0.0  # monotonic time of the last heartbeat
    domains: dict[str, DomainInfo] = field(default_factory=dict)  # by uuid
    claims: dict[str, Claim] = field(default_factory=dict)  # by domain uuid
    # placement's figures of the host (None before a heartbeat); kept by ClusterView
    candidate: HostCandidate | None = None


def _same_figures(a: HostInventory, b: HostInventory) -> bool:
    """Whether two heartbeats give a host the same :class:`HostCandidate` but for its free
    memory (every inventory field a candidate is built from)."""
    return (
        a.allocated_memory_kib == b.allocated_memory_kib
        and a.allocated_vcpus == b.allocated_vcpus
        and a.memory_total_kib == b.memory_total_kib
        and a.cpus == b.cpus
        and a.draining == b.draining
        and a.driver == b.driver
        and a.arch == b.arch
        and a.cpu_model == b.cpu_model
        and a.cpu_models == b.cpu_models
        and a.labels == b.labels
        and a.pools == b.pools
        and a.networks == b.networks
    )


# The weighers whose order the view keeps (any other: the full pipeline per decision).
ORDERED_WEIGHERS = frozenset({"spread", "pack"})


class _Order:
    """The hosts in one weigher's order, best first: ``(key, name)`` sorted, where the key
    is the weigher's figure (free memory under ``ratio``; negated for spread) and the name
    breaks ties as the weigher does (the first host in name order)."""

    __slots__ = ("at", "keys", "ratio", "spread")

    def __init__(self, weigher: str, ratio: float) -> None:
        self.spread = weigher == "spread"
        self.ratio = ratio
        self.keys: list[tuple[float, str]] = []
        self.at: dict[str, tuple[float, str]] = {}  # host -> its entry in keys

    def update(self, c: HostCandidate) -> None:
        room = c.memory_total_kib * self.ratio - c.allocated_memory_kib  # as the weighers
        new = (-room if self.spread else room, c.name)
        old = self.at.get(c.name)
        if old == new:
            return
        if old is not None:
            del self.keys[bisect_left(self.keys, old)]
        insort(self.keys, new)
        self.at[c.name] = new


class ClusterView:
    """Everything the scheduler knows about the cluster (see module docstring).

    ``hosts`` and ``meta`` are for reading: change them through the methods, which keep
    placement's figures up to date."""

    def __init__(self, host_down_after: float) -> None:
        self.host_down_after = host_down_after
        self.hosts: dict[str, HostRecord] = {}
        self.meta: dict[str, DomainMeta] = {}  # by uuid
        self._draining: set[str] = set()  # the scheduler's own drain intent
        self._homes: dict[str, set[str]] = {}  # domain uuid -> hosts whose list has it
        self._expiries: list[tuple[float, str, str]] = []  # heap of (expires, host, uuid)
        self._orders: dict[tuple[str, float], _Order] = {}  # (weigher, memory ratio)
        self._names: list[str] = []  # hosts with a candidate, sorted

    # --- the scheduler's drain intent -----------------------------------------------
    @property
    def draining(self) -> frozenset[str]:
        return frozenset(self._draining)

    @draining.setter
    def draining(self, hosts: Iterable[str]) -> None:
        new = set(hosts)
        changed = new ^ self._draining
        self._draining = new
        for host in changed:
            self._update(host)

    def drain_intended(self, host: str) -> bool:
        return host in self._draining

    def set_draining(self, host: str, draining: bool) -> None:
        self.draining = self._draining | {host} if draining else self._draining - {host}

    # --- observations ---------------------------------------------------------------
    def observe_heartbeat(self, inv: HostInventory, now: float | None = None) -> bool:
        """Record a (validated) heartbeat; True when the host's domain set changed."""
        record = self.hosts.get(inv.host)
        fresh = record is None
        if record is None:
            record = self.hosts[inv.host] = HostRecord(inv.host)
        before = record.inventory
        record.inventory = inv
        record.last_seen = time.monotonic() if now is None else now
        running = set(inv.running)
        claimed = len(record.claims)
        for uuid, claim in list(record.claims.items()):
            if claim.name in running:  # the host's allocation now includes it
                del record.claims[uuid]
        c = record.candidate
        if (
            c is not None
            and before is not None
            and claimed == len(record.claims)
            and _same_figures(before, inv)
        ):  # most heartbeats: only the free memory moved (not a figure the order uses)
            c.memory_free_kib = inv.memory_free_kib - sum(
                cl.memory_kib for cl in record.claims.values()
            )
        else:
            self._update(inv.host)
        changed = before is None or (before.domains, before.running, before.started_at) != (
            inv.domains,
            inv.running,
            inv.started_at,
        )
        return fresh or changed

    def reported_not_draining(self, host: str) -> None:
        """An undrain told the host: it counts as not draining until its next heartbeat."""
        record = self.hosts[host]
        if record.inventory is not None:
            record.inventory = msgspec.structs.replace(record.inventory, draining=False)
            self._update(host)

    def observe_domains(self, host: str, domains: list[DomainInfo]) -> list[str]:
        """Replace a host's domain list; returns uuids whose metadata is still unknown."""
        record = self.hosts.setdefault(host, HostRecord(host))
        gone = record.domains.keys() - {d.uuid for d in domains}
        record.domains = {d.uuid: d for d in domains}
        for uuid in gone:
            self._unhome(uuid, host)
        for uuid in record.domains:
            self._homes.setdefault(uuid, set()).add(host)
        self._update(host)
        return [u for u in record.domains if u not in self.meta]

    def observe_meta(self, meta: DomainMeta) -> None:
        before = self.meta.get(meta.uuid)
        self.meta[meta.uuid] = meta
        if (before.groups if before is not None else frozenset()) != meta.groups:
            for host in self._homes.get(meta.uuid, ()):
                self._update(host)

    def add_domain(self, host: str, info: DomainInfo) -> None:
        """A domain the scheduler defined on ``host`` (until the host's list shows it)."""
        record = self.hosts[host]
        if info.uuid not in record.domains:
            record.domains[info.uuid] = info
            self._homes.setdefault(info.uuid, set()).add(host)
            self._update(host)

    def domain_moved(self, uuid: str, source: str, destination: str, *, live: bool = True) -> None:
        """A migration finished: the domain is on ``destination`` now (``live``: running
        there; otherwise an offline move, its row as it was)."""
        src, dst = self.hosts.get(source), self.hosts.get(destination)
        info = src.domains.pop(uuid, None) if src else None
        if info is None:
            return
        self._unhome(uuid, source)
        self._update(source)
        if dst is not None:
            dst.domains[uuid] = (
                msgspec.structs.replace(
                    info, state=StateName.RUNNING, state_code=1, reason="migrated"
                )
                if live
                else info
            )
            self._homes.setdefault(uuid, set()).add(destination)
            self._update(destination)

    # --- queries --------------------------------------------------------------------
    def is_up(self, host: str, now: float | None = None) -> bool:
        record = self.hosts.get(host)
        if record is None or record.inventory is None:
            return False
        now = time.monotonic() if now is None else now
        return now - record.last_seen <= self.host_down_after

    def is_draining(self, host: str) -> bool:
        record = self.hosts.get(host)
        reported = bool(record and record.inventory and record.inventory.draining)
        return host in self._draining or reported

    def hosts_with(self, ref: str) -> list[tuple[str, DomainInfo]]:
        """(host, DomainInfo) for every host that has a domain named or with uuid ``ref``."""
        found = []
        for name in sorted(self.hosts):
            for info in self.hosts[name].domains.values():
                if ref in (info.name, info.uuid):
                    found.append((name, info))
        return found

    def candidates(self, now: float | None = None) -> list[HostCandidate]:
        """Every known host in name order (down ones too, so NO_HOST can count them):
        copies, as placement sees them at ``now``."""
        now_m = time.monotonic() if now is None else now
        self._expire(now_m)
        out = []
        for name in self._names:
            c = self._copy(self.hosts[name], now_m)
            assert c is not None  # in _names: it has a candidate
            out.append(c)
        return out

    def candidate(self, host: str, now: float | None = None) -> HostCandidate | None:
        """One host as placement sees it (a copy); None before its first heartbeat."""
        now_m = time.monotonic() if now is None else now
        self._expire(now_m)
        record = self.hosts.get(host)
        return None if record is None else self._copy(record, now_m)

    def place(
        self, req: PlacementRequest, policy: PlacementPolicy, now: float | None = None
    ) -> HostCandidate:
        """:func:`scheduler.placement.place` over :meth:`candidates`, without building
        them: the hosts in the weigher's order, the first that passes every filter."""
        now_m = time.monotonic() if now is None else now
        self._expire(now_m)
        order = self._order(policy)
        if order is not None:
            keys, need, down, hosts = order.keys, req.memory_kib, self.host_down_after, self.hosts
            # The memory filter's figure is the order's key: past it, no host has room.
            start = 0 if order.spread else bisect_left(keys, (need, ""))
            for i in range(start, len(keys)):
                key, name = keys[i]
                if order.spread and -key < need:
                    break
                record = hosts[name]
                c = record.candidate
                assert c is not None
                c.up = now_m - record.last_seen <= down
                if fits(req, c, policy):
                    return replace(c)
        # None fits (or an unordered weigher): the pipeline, which says which filter removed
        # how many hosts.
        return place(req, self.candidates(now_m), policy)

    # --- claims ---------------------------------------------------------------------
    def claim(self, host: str, claim: Claim) -> None:
        self.hosts.setdefault(host, HostRecord(host)).claims[claim.uuid] = claim
        heapq.heappush(self._expiries, (claim.expires, host, claim.uuid))
        self._update(host)

    def release(self, host: str, uuid: str) -> None:
        record = self.hosts.get(host)
        if record is not None and record.claims.pop(uuid, None) is not None:
            self._update(host)

    def host_view(self, name: str, now: float | None = None) -> HostView | None:
        """One row of ``virtbus hosts`` (``scheduler.hosts``); None before a heartbeat."""
        record = self.hosts[name]
        inv = record.inventory
        if inv is None:
            return None
        now_m = time.monotonic() if now is None else now
        claims = record.claims.values()
        fields = msgspec.structs.asdict(inv)
        fields.update(
            running=[],
            draining=self.is_draining(name),
            up=self.is_up(name, now_m),
            last_seen_s=round(now_m - record.last_seen, 3),
            claimed_memory_kib=sum(c.memory_kib for c in claims),
            claimed_vcpus=sum(c.vcpus for c in claims),
        )
        return HostView(**fields)

    # --- placement's figures ------------------------------------------------------------
    def _copy(self, record: HostRecord, now: float) -> HostCandidate | None:
        c = record.candidate
        if c is None:
            return None
        return replace(c, up=now - record.last_seen <= self.host_down_after)

    def _unhome(self, uuid: str, host: str) -> None:
        homes = self._homes.get(uuid)
        if homes is not None:
            homes.discard(host)
            if not homes:
                del self._homes[uuid]

    def _expire(self, now: float) -> None:
        """Drop the claims that expired before ``now``."""
        heap = self._expiries
        while heap and heap[0][0] < now:
            _, host, uuid = heapq.heappop(heap)
            record = self.hosts.get(host)
            claim = record.claims.get(uuid) if record is not None else None
            if record is not None and claim is not None and claim.expires < now:
                del record.claims[uuid]
                self._update(host)

    def _order(self, policy: PlacementPolicy) -> _Order | None:
        if policy.weigher not in ORDERED_WEIGHERS:
            return None
        key = (policy.weigher, policy.memory_overcommit)
        order = self._orders.get(key)
        if order is None:
            order = self._orders[key] = _Order(*key)
            for name in self._names:
                c = self.hosts[name].candidate
                assert c is not None
                order.update(c)
        return order

    def _update(self, host: str) -> None:
        """Rebuild ``host``'s candidate from what the view has of it, and re-sort it."""
        record = self.hosts.get(host)
        if record is None or record.inventory is None:
            return
        if record.candidate is None:
            insort(self._names, host)
        c = record.candidate = self._build(record, record.inventory)
        for order in self._orders.values():
            order.update(c)

    def _build(self, record: HostRecord, inv: HostInventory) -> HostCandidate:
        claims = record.claims.values()
        groups: set[str] = set()
        for uuid in record.domains:
            meta = self.meta.get(uuid)
            if meta is not None:
                groups |= meta.groups
        for claim in claims:
            groups |= claim.groups
        claimed_memory = sum(c.memory_kib for c in claims)
        return HostCandidate(
            name=record.name,
            driver=inv.driver,
            arch=inv.arch,
            cpus=inv.cpus,
            memory_total_kib=inv.memory_total_kib,
            memory_free_kib=inv.memory_free_kib - claimed_memory,
            allocated_memory_kib=inv.allocated_memory_kib + claimed_memory,
            allocated_vcpus=inv.allocated_vcpus + sum(c.vcpus for c in claims),
            up=True,  # set at the decision's time
            draining=record.name in self._draining or inv.draining,
            cpu_model=inv.cpu_model,
            cpu_models=frozenset(inv.cpu_models),
            groups=frozenset(groups),
            labels=dict(inv.labels),
            pools={p.name: p.available for p in inv.pools if p.state == "running"},
            networks=frozenset(n.name for n in inv.networks if n.active),
        )
