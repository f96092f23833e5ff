"""The scheduler's cluster networks against a fake cluster: what it refuses before any
host is touched, what it asks each host, and how heartbeats drive hosts that join and
VXLAN peers that change. The agents are fakes recording calls (real ones:
tests/network/test_cluster_networks.py)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from scheduler.inventory import ClusterView
from scheduler.journal import BusJournal, Journal
from scheduler.networks import ClusterNetworks
from virtbus.aio import TaskGroup
from virtbus.bus.factory import open_bus
from virtbus.errors import NoHostError, OperationFailed, XMLError
from virtbus.network import CLUSTER_NS, parse_network_xml
from virtbus.protocol import ops
from virtbus.protocol.host import HostInventory
from virtbus.protocol.network import NetworkInfo, NetworkPeerList, NetworkRef, NetworkSummary


def xml(name: str, subnet: str, vni: int | None = None) -> str:
    cluster = f"<vb:cluster vni='{vni}'/>" if vni else ""
    return (f"<network xmlns:vb='{CLUSTER_NS}'><name>{name}</name>"
            f"<ip address='{subnet}.1' prefix='24'/>{cluster}</network>")  # fmt: skip


async def journal(tmp: Path, name: str) -> BusJournal:
    """A journal on a memory bus of the test's own (``name``: another scheduler's cache)."""
    bus = open_bus(f"memory://nets-{tmp.name}", src=name)
    await bus.connect()
    found = BusJournal(bus, Journal(tmp / name))
    await found.open()
    return found


class Cluster:
    def __init__(self, journal: BusJournal) -> None:
        self.view = ClusterView(60.0)
        self.calls: list[tuple[str, str, Any]] = []
        self.nets = ClusterNetworks(journal, self.view, self.call, TaskGroup("t"), 5.0)

    async def call(self, host: str, op: Any, req: Any, timeout: float) -> Any:
        self.calls.append((host, str(op), req))
        if op is ops.NETWORK_DEFINE:
            defn = parse_network_xml(req.xml)
            return NetworkRef(name=defn.name, uuid=defn.uuid)
        if op is ops.NETWORK_SET_PEERS:
            return NetworkPeerList(peers=req.peers)
        return NetworkInfo(name=req.network, uuid="u", active=True, persistent=True,
                           autostart=False)  # fmt: skip

    def beat(self, host: str, underlay: str | None, *nets: NetworkSummary) -> HostInventory:
        inv = HostInventory(host=host, underlay_address=underlay, networks=list(nets))
        self.view.observe_heartbeat(inv)
        return inv


async def test_define_checks_then_defines_on_every_carrier(tmp_path: Path) -> None:
    cl = Cluster(await journal(tmp_path, "s1"))
    with pytest.raises(NoHostError):
        await cl.nets.define(xml("cn", "10.1.0", 9))
    cl.beat("b", "192.0.2.2", NetworkSummary(name="local", subnets=["10.2.0.0/16"]))
    cl.beat("a", "192.0.2.1")
    cl.beat("c", None)  # no underlay: never a carrier
    words = "overlaps subnet 10.2.0.0/16 of network 'local' on host 'b'"
    with pytest.raises(OperationFailed, match=re.escape(words)):
        await cl.nets.define(xml("cx", "10.2.3", 9))
    with pytest.raises(XMLError):
        await cl.nets.define("<network><name>x</name><forward mode='bridge'/>"
                             "<bridge name='br9'/></network>")  # fmt: skip
    assert cl.calls == []  # refused before any host was touched
    found = await cl.nets.define(xml("cn", "10.1.0", 9))
    assert (found.vni, found.dhcp_host) == (9, "a")
    assert [(h, op) for h, op, _ in cl.calls] == [
        ("a", "network.define"), ("a", "network.start"),
        ("b", "network.define"), ("b", "network.start"),
    ]  # fmt: skip
    roles = [parse_network_xml(r.xml).cluster for _, op, r in cl.calls if op == "network.define"]
    assert [(c.vni, c.dhcp) for c in roles if c] == [(9, True), (9, False)]
    assert not parse_network_xml(cl.calls[0][2].xml).stp  # STP off unless asked
    with pytest.raises(OperationFailed, match="VNI 9 of cluster network 'c2' is already used"
                       " by cluster network 'cn'"):  # fmt: skip
        await cl.nets.define(xml("c2", "10.3.0", 9))
    again = ClusterNetworks(await journal(tmp_path, "s2"), cl.view, cl.call, TaskGroup("t"), 5.0)
    await again.load()  # kept in the journal on the bus, not in the state dir
    assert list(again.records) == ["cn"]


async def test_heartbeats_bring_joining_hosts_and_peers(tmp_path: Path) -> None:
    cl = Cluster(await journal(tmp_path, "s1"))
    cl.beat("a", "192.0.2.1")
    await cl.nets.define(xml("cn", "10.1.0"))  # VNI allocated: the first free one
    vni = cl.nets.records["cn"].vni
    assert vni == 1
    cl.calls.clear()
    running = NetworkSummary(name="cn", active=True, vni=vni)
    cl.nets.observe(cl.beat("a", "192.0.2.1", running))
    inv_b = cl.beat("b", "192.0.2.2")  # joins later
    cl.nets.observe(inv_b)
    await asyncio.sleep(0.01)
    assert [(h, op) for h, op, _ in cl.calls] == [("b", "network.define"),
                                                   ("b", "network.start")]  # fmt: skip
    cl.calls.clear()
    cl.beat("b", "192.0.2.2", running)
    cl.nets.observe(cl.beat("a", "192.0.2.1", running))  # a floods to no one yet
    await asyncio.sleep(0.01)
    assert [(h, op, r.peers) for h, op, r in cl.calls] == [("a", "network.set_peers",
                                                            ["192.0.2.2"])]  # fmt: skip
    cl.calls.clear()
    cl.view.hosts["b"].last_seen -= 120  # b is down: a's list drops it
    cl.nets.observe(cl.beat("a", "192.0.2.1", NetworkSummary(
        name="cn", active=True, vni=vni, peers=["192.0.2.2"])))  # fmt: skip
    await asyncio.sleep(0.01)
    assert [(h, op, r.peers) for h, op, r in cl.calls] == [("a", "network.set_peers", [])]
