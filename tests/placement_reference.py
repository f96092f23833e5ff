"""The scheduler's cluster view as it was before placement kept its figures up to date:
every decision rebuilt every host's candidate (``candidates()``) and ran the whole filter
pipeline over it. The equivalence test drives it and :class:`scheduler.inventory.ClusterView`
with the same changes and compares their choices; ``tests/bench/placement.py --view``
times the two side by side."""

from __future__ import annotations

import time

import msgspec

from scheduler.inventory import Claim, DomainMeta, HostRecord
from scheduler.placement import HostCandidate, PlacementPolicy, PlacementRequest, place
from virtbus.protocol.domain import DomainInfo, StateName
from virtbus.protocol.host import HostInventory

__all__ = ["Claim", "DomainMeta", "ReferenceView"]


class ReferenceView:
    """The cluster view before incremental placement (commit f9a012a), verbatim but for
    the methods that replaced the scheduler's direct changes (add_domain, set_draining,
    reported_not_draining, domain_moved's ``live``) and :meth:`place`."""

    def __init__(self, host_down_after: float) -> None:
        self.host_down_after = host_down_after
        self.hosts: dict[str, HostRecord] = {}
        self.draining: set[str] = set()  # the scheduler's own drain intent
        self.meta: dict[str, DomainMeta] = {}  # by uuid

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
        for uuid, claim in list(record.claims.items()):
            if claim.name in running:  # the host's allocation now includes it
                del record.claims[uuid]
        changed = before is None or (before.domains, before.running, before.started_at) != (
            inv.domains,
            inv.running,
            inv.started_at,
        )
        return fresh or changed

    def observe_domains(self, host: str, domains: list[DomainInfo]) -> list[str]:
        """Replace a host's domain list; returns uuids whose metadata is still unknown."""
        record = self.hosts.setdefault(host, HostRecord(host))
        record.domains = {d.uuid: d for d in domains}
        return [u for u in record.domains if u not in self.meta]

    def observe_meta(self, meta: DomainMeta) -> None:
        self.meta[meta.uuid] = meta

    def domain_moved(self, uuid: str, source: str, destination: str, *, live: bool = True) -> None:
        """A migration finished: the domain is on ``destination`` now."""
        src, dst = self.hosts.get(source), self.hosts.get(destination)
        info = src.domains.pop(uuid, None) if src else None
        if dst is not None and info is not None:
            dst.domains[uuid] = (
                msgspec.structs.replace(
                    info, state=StateName.RUNNING, state_code=1, reason="migrated"
                )
                if live
                else info
            )

    # what the scheduler's code did to the view directly before
    def add_domain(self, host: str, info: DomainInfo) -> None:
        self.hosts[host].domains.setdefault(info.uuid, info)

    def set_draining(self, host: str, draining: bool) -> None:
        if draining:
            self.draining.add(host)
        else:
            self.draining.discard(host)

    def reported_not_draining(self, host: str) -> None:
        inv = self.hosts[host].inventory
        if inv is not None:
            self.hosts[host].inventory = msgspec.structs.replace(inv, draining=False)

    def place(
        self, req: PlacementRequest, policy: PlacementPolicy, now: float | None = None
    ) -> HostCandidate:
        """The old decision: every candidate built, then the filters and the weigher."""
        return place(req, self.candidates(now), policy)

    # --- queries --------------------------------------------------------------------
    def is_draining(self, host: str) -> bool:
        record = self.hosts.get(host)
        reported = bool(record and record.inventory and record.inventory.draining)
        return host in self.draining or reported

    def candidates(self, now: float | None = None) -> list[HostCandidate]:
        """Placement's input: every known host (down ones too, so NO_HOST can count them)."""
        now_m = time.monotonic() if now is None else now
        out = []
        for name in sorted(self.hosts):
            record = self.hosts[name]
            inv = record.inventory
            if inv is None:
                continue
            for uuid in [u for u, c in record.claims.items() if c.expires < now_m]:
                del record.claims[uuid]
            claims = record.claims.values()
            groups: set[str] = set()
            for uuid in record.domains:
                meta = self.meta.get(uuid)
                if meta is not None:
                    groups |= meta.groups
            for claim in claims:
                groups |= claim.groups
            out.append(
                HostCandidate(
                    name=name,
                    driver=inv.driver,
                    arch=inv.arch,
                    cpus=inv.cpus,
                    memory_total_kib=inv.memory_total_kib,
                    memory_free_kib=inv.memory_free_kib - sum(c.memory_kib for c in claims),
                    allocated_memory_kib=inv.allocated_memory_kib
                    + sum(c.memory_kib for c in claims),
                    allocated_vcpus=inv.allocated_vcpus + sum(c.vcpus for c in claims),
                    up=now_m - record.last_seen <= self.host_down_after,
                    draining=self.is_draining(name),
                    cpu_model=inv.cpu_model,
                    cpu_models=frozenset(inv.cpu_models),
                    groups=frozenset(groups),
                    labels=dict(inv.labels),
                    pools={p.name: p.available for p in inv.pools if p.state == "running"},
                    networks=frozenset(n.name for n in inv.networks if n.active),
                )
            )
        return out

    # --- claims ---------------------------------------------------------------------
    def claim(self, host: str, claim: Claim) -> None:
        self.hosts.setdefault(host, HostRecord(host)).claims[claim.uuid] = claim

    def release(self, host: str, uuid: str) -> None:
        record = self.hosts.get(host)
        if record is not None:
            record.claims.pop(uuid, None)
