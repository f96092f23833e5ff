"""Cluster networks: one network definition kept defined and running on every host.

``net-define --cluster`` hands the scheduler a libvirt ``<network>``; it checks it against
what the hosts' heartbeats say (their networks' subnets and VXLAN identifiers), picks a
VNI when the definition names none (``<vb:cluster vni=.../>``, virtbus's namespace), and
defines and starts it on every host that is up and has an underlay address. The first of
them (by name) is the network's DHCP host: it alone carries the gateway address, the
firewall and dnsmasq; the others only bridge, so a guest keeps its lease on any host.

Afterwards heartbeats drive it (:meth:`ClusterNetworks.observe`): a host that lacks the
network (one that joined later, or lost it) gets it defined and started; a host whose
VXLAN peers (its head-end replication list, reported in its heartbeat) differ from the
underlay addresses of the other hosts that run it gets the new list. So peers follow
hosts as they come and go, and an agent restarted with an empty list is set again.

The records live in the scheduler's journal on the bus (``network`` entries, an undefine
a ``network-removed`` tombstone; scheduler/journal.py), so a standby that takes over
replays them with the migrations, and the compaction re-appends them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from scheduler.inventory import ClusterView
from virtbus.aio import TaskGroup
from virtbus.errors import NoHostError, NoNetwork, OperationFailed, VirtbusError
from virtbus.network import VNI_MAX, NetworkDefinition, overlaps, parse_network_xml
from virtbus.network.definition import IPNetwork
from virtbus.protocol import ops
from virtbus.protocol.host import HostInventory
from virtbus.protocol.messages import ClusterNetworkRecord as Record
from virtbus.protocol.network import (
    NetworkDestroy,
    NetworkPeers,
    NetworkSummary,
    NetworkTarget,
    NetworkXmlRequest,
)
from virtbus.protocol.scheduler import ClusterNetwork, ClusterNetworkHost

log = logging.getLogger(__name__)

AgentCall = Callable[..., Awaitable[Any]]
RETRY_AFTER = 10.0  # s: a host that refused a step is asked again after this


def for_host(record: Record, host: str) -> str:
    """The definition ``host`` runs: its DHCP role written in."""
    defn = parse_network_xml(record.xml)
    defn.set_cluster(record.vni, dhcp=host == record.dhcp_host)
    return defn.to_xml()


class NetworkJournal(Protocol):
    """Where the records are kept (scheduler/journal.py BusJournal)."""

    async def save_network(self, network: Record) -> None: ...
    async def remove_network(self, name: str) -> None: ...
    async def load_networks(self) -> list[Record]: ...


class ClusterNetworks:
    """The cluster networks and their reconciliation (see module docstring)."""

    def __init__(self, journal: NetworkJournal, view: ClusterView, agent_call: AgentCall,
                 tasks: TaskGroup, timeout: float) -> None:  # fmt: skip
        self.journal = journal
        self.view = view
        self._call = agent_call
        self._tasks = tasks
        self.timeout = timeout
        self.records: dict[str, Record] = {}
        self._busy: set[tuple[str, str]] = set()  # (host, network) with a step in flight
        self._failed: dict[tuple[str, str], float] = {}  # when a host last refused a step
        self._lock = asyncio.Lock()  # defines and undefines one at a time

    async def load(self) -> None:
        """The records as the journal has them (an active scheduler, once it has replayed)."""
        self.records = {r.name: r for r in await self.journal.load_networks()}

    # --- the view ------------------------------------------------------------------
    def _carriers(self) -> list[HostInventory]:
        """Hosts that are up and can carry a cluster network (an underlay address)."""
        out = []
        for name in sorted(self.view.hosts):
            inv = self.view.hosts[name].inventory
            if inv is not None and inv.underlay_address and self.view.is_up(name):
                out.append(inv)
        return out

    def _copy(self, inv: HostInventory, name: str) -> NetworkSummary | None:
        return next((n for n in inv.networks if n.name == name), None)

    def hosts_of(self, record: Record) -> list[ClusterNetworkHost]:
        out = []
        for inv in self._carriers():
            found = self._copy(inv, record.name)
            if found is not None:
                out.append(ClusterNetworkHost(host=inv.host, active=found.active,
                                              dhcp=inv.host == record.dhcp_host,
                                              peers=found.peers))  # fmt: skip
        return out

    def describe(self, record: Record) -> ClusterNetwork:
        return ClusterNetwork(name=record.name, uuid=record.uuid, vni=record.vni,
                              dhcp_host=record.dhcp_host, hosts=self.hosts_of(record))  # fmt: skip

    # --- define / undefine -----------------------------------------------------------
    async def define(self, xml: str) -> ClusterNetwork:
        async with self._lock:
            defn = parse_network_xml(xml)  # XML_ERROR
            if defn.name in self.records:
                raise OperationFailed(f"cluster network '{defn.name}' already exists")
            carriers = self._carriers()
            if not carriers:
                raise NoHostError("no host that is up has a network.underlay_address for"
                                  " cluster networks")  # fmt: skip
            self._check_against(defn, carriers)
            vni = defn.cluster.vni if defn.cluster is not None else self._free_vni(carriers)
            defn.set_cluster(vni, dhcp=True)  # XML_ERROR unless virtbus makes its bridge
            # No STP unless asked: the overlay is a full mesh (no loop: a frame from the
            # VXLAN port never goes back out of it), and STP's listening and learning
            # (2 s each at least) would hold a migrated guest's new tap for seconds.
            defn.default_stp(False)
            record = Record(name=defn.name, uuid=defn.uuid, vni=vni, dhcp_host=carriers[0].host,
                            xml=defn.to_xml())  # fmt: skip
            done: list[str] = []
            try:
                for inv in carriers:  # the DHCP host first: the others' guests lease from it
                    await self._bring_up(inv.host, record)
                    done.append(inv.host)
            except VirtbusError as exc:
                for host in done:
                    await self._tear_down(host, record.name, quiet=True)
                raise type(exc)(f"cluster network '{defn.name}' on host '{inv.host}':"
                                f" {exc.message}") from None  # fmt: skip
            await self.journal.save_network(record)
            self.records[record.name] = record
            return self.describe(record)

    def _check_against(self, defn: NetworkDefinition, carriers: list[HostInventory]) -> None:
        """Refuse a VNI another cluster network (or any host's network) uses, and a subnet
        overlapping one of a host's other networks, naming it."""
        vni = defn.cluster.vni if defn.cluster is not None else None
        if vni is not None:
            for other in self.records.values():
                if other.vni == vni:
                    raise OperationFailed(f"VNI {vni} of cluster network '{defn.name}' is already"
                                          f" used by cluster network '{other.name}'")  # fmt: skip
        for inv in carriers:
            for theirs in inv.networks:
                if theirs.name == defn.name:
                    raise OperationFailed(f"host '{inv.host}' already has a network named"
                                          f" '{defn.name}'")  # fmt: skip
                if vni is not None and theirs.vni == vni:
                    raise OperationFailed(f"VNI {vni} of cluster network '{defn.name}' is already"
                                          f" used by network '{theirs.name}' on host"
                                          f" '{inv.host}'")  # fmt: skip
                for ip in defn.ips:
                    for subnet in theirs.subnets:
                        net = _subnet(subnet)
                        if net is not None and overlaps(ip.network, net):
                            raise OperationFailed(
                                f"subnet {ip.network} of cluster network '{defn.name}' overlaps"
                                f" subnet {subnet} of network '{theirs.name}' on host"
                                f" '{inv.host}'"
                            )

    def _free_vni(self, carriers: list[HostInventory]) -> int:
        taken = {r.vni for r in self.records.values()}
        taken |= {n.vni for inv in carriers for n in inv.networks if n.vni is not None}
        return next(v for v in range(1, VNI_MAX + 1) if v not in taken)

    async def undefine(self, name: str) -> None:
        async with self._lock:
            record = self.records.get(name)
            if record is None:
                raise NoNetwork(f"Network not found: no cluster network named '{name}'")
            del self.records[name]  # first: no heartbeat brings it back meanwhile
            await self.journal.remove_network(name)
            for inv in self._carriers():
                if self._copy(inv, name) is not None:
                    await self._tear_down(inv.host, name, quiet=False)

    async def _bring_up(self, host: str, record: Record, *, defined: bool = False) -> None:
        """Define (unless ``defined``) and start ``record`` on ``host``."""
        if not defined:
            xml = for_host(record, host)
            await self._call(host, ops.NETWORK_DEFINE, NetworkXmlRequest(xml=xml), self.timeout)
        await self._call(host, ops.NETWORK_START, NetworkTarget(network=record.name), self.timeout)
        log.info("cluster network %s started on %s", record.name, host)

    async def _tear_down(self, host: str, name: str, *, quiet: bool) -> None:
        try:
            copy = await self._call(host, ops.NETWORK_INFO, NetworkTarget(network=name),
                                    self.timeout)  # fmt: skip
            if copy.active:
                await self._call(host, ops.NETWORK_DESTROY, NetworkDestroy(network=name),
                                 self.timeout)  # fmt: skip
            await self._call(host, ops.NETWORK_UNDEFINE, NetworkTarget(network=name),
                             self.timeout)  # fmt: skip
        except VirtbusError as exc:
            if not quiet:
                raise type(exc)(f"network '{name}' on host '{host}': {exc.message}") from None
            log.warning("could not remove network %s from %s: %s", name, host, exc)

    # --- reconciliation from heartbeats ----------------------------------------------
    def observe(self, inv: HostInventory) -> None:
        """A heartbeat of ``inv.host``: start what it lacks, correct its VXLAN peers."""
        if not inv.underlay_address or self._lock.locked():
            return  # no overlay there; or a define/undefine is under way
        carriers = self._carriers()
        for record in self.records.values():
            key = (inv.host, record.name)
            if key in self._busy or time.monotonic() - self._failed.get(key, -RETRY_AFTER) < (
                RETRY_AFTER
            ):
                continue
            copy = self._copy(inv, record.name)
            if copy is None or not copy.active:
                self._spawn(key, self._bring_up(inv.host, record, defined=copy is not None))
                continue
            wanted = sorted(
                str(other.underlay_address) for other in carriers
                if other.host != inv.host and (c := self._copy(other, record.name)) and c.active
            )  # fmt: skip
            if sorted(copy.peers) != wanted:
                self._spawn(key, self._set_peers(inv.host, record.name, wanted))

    def _spawn(self, key: tuple[str, str], coro: Awaitable[None]) -> None:
        self._busy.add(key)

        async def step() -> None:
            try:
                await coro
                self._failed.pop(key, None)
            except VirtbusError as exc:
                self._failed[key] = time.monotonic()
                log.warning("cluster network %s on %s: %s", key[1], key[0], exc)
            finally:
                self._busy.discard(key)

        self._tasks.spawn(step(), name=f"cluster-net:{key[0]}:{key[1]}")

    async def _set_peers(self, host: str, name: str, peers: list[str]) -> None:
        await self._call(host, ops.NETWORK_SET_PEERS, NetworkPeers(network=name, peers=peers),
                         self.timeout)  # fmt: skip
        log.info("cluster network %s on %s: VXLAN peers %s", name, host, peers)


def _subnet(text: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        return None  # a heartbeat's odd subnet is the host's business
