"""Virtual networks in placement: active networks from heartbeats, and the networks filter
that keeps a domain off hosts lacking a network its interfaces name ('default' excepted:
without a defined default network it is user-mode NAT)."""

from __future__ import annotations

import pytest

from scheduler.inventory import ClusterView
from scheduler.placement import (
    HostCandidate,
    PlacementPolicy,
    network_needs,
    place,
    request_for,
)
from virtbus.domain import parse_domain_xml
from virtbus.errors import NoHostError
from virtbus.protocol.base import decode
from virtbus.protocol.host import HostInventory

POLICY = PlacementPolicy()
XML = """<domain type='kvm'><name>web</name><memory unit='MiB'>256</memory>
<os><type>hvm</type></os><devices>
<interface type='network'><source network='lan'/></interface>
<interface type='network'><source network='default'/></interface>
<interface type='bridge'><source bridge='br0'/></interface>
</devices></domain>"""


def host(name: str, networks: set[str]) -> HostCandidate:
    return HostCandidate(name=name, driver="qemu", arch="x86_64", cpus=4,
                         memory_total_kib=8 << 20, memory_free_kib=8 << 20,
                         networks=frozenset(networks))  # fmt: skip


def test_heartbeat_networks_become_the_hosts_active_networks() -> None:
    body = {"host": "h1", "driver": "qemu", "cpus": 4, "memory_total_kib": 8 << 20,
            "memory_free_kib": 8 << 20, "arch": "x86_64",
            "networks": [{"name": "lan", "active": True, "bridge": "virbr0", "forward": "nat"},
                         {"name": "off", "active": False}]}  # fmt: skip
    view = ClusterView(host_down_after=60)
    view.observe_heartbeat(decode(body, HostInventory))
    (h1,) = view.candidates()
    assert h1.networks == frozenset({"lan"})


def test_domain_goes_only_where_its_networks_are_active() -> None:
    defn = parse_domain_xml(XML)
    assert network_needs(defn) == frozenset({"lan"})
    req = request_for(defn)
    chosen = place(req, [host("a", set()), host("b", {"lan", "x"})], POLICY)
    assert chosen.name == "b"
    with pytest.raises(NoHostError) as err:
        place(req, [host("a", set()), host("c", {"other"})], POLICY)
    assert "networks removed 2" in err.value.message
    plain = parse_domain_xml(XML.replace("network='lan'", "network='default'"))
    assert place(request_for(plain), [host("a", set())], POLICY).name == "a"
