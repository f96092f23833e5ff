"""Storage in placement: pools from heartbeats, and the storage filter that keeps a domain
off hosts that lack the pools its volumes are in, or the room for them."""

from __future__ import annotations

from dataclasses import replace

import pytest

from scheduler.inventory import ClusterView
from scheduler.placement import (
    HostCandidate,
    PlacementPolicy,
    filter_storage,
    place,
    request_for,
    storage_needs,
)
from virtbus.domain import parse_domain_xml
from virtbus.errors import InvalidArgument, NoHostError
from virtbus.protocol.base import decode
from virtbus.protocol.host import HostInventory
from virtbus.protocol.storage import PoolSummary

GIB = 1 << 30
POLICY = PlacementPolicy()
XML = """<domain type='kvm'><name>db</name><memory unit='MiB'>256</memory>
<os><type>hvm</type></os><devices>
<disk type='volume'><source pool='fast' volume='db.qcow2'/><target dev='vda'/></disk>
<disk type='volume'><source pool='fast' volume='logs.qcow2'/><target dev='vdb'/></disk>
<disk type='volume'><source pool='bulk' volume='archive.raw'/><target dev='vdc'/></disk>
</devices></domain>"""


def host(name: str, pools: dict[str, int]) -> HostCandidate:
    return HostCandidate(
        name=name,
        driver="qemu",
        arch="x86_64",
        cpus=4,
        memory_total_kib=8 << 20,
        memory_free_kib=8 << 20,
        pools=pools,
    )


def test_heartbeat_pools_are_parsed_and_checked() -> None:
    body = {"host": "h1", "pools": [
        {"name": "fast", "type": "dir", "state": "running", "capacity": 10, "allocation": 4,
         "available": 6, "volumes": 2},
        {"name": "off", "type": "fs", "state": "inactive"},
    ]}  # fmt: skip
    inv = decode(body, HostInventory)
    assert inv.pools == [
        PoolSummary(name="fast", type="dir", state="running", capacity=10, allocation=4,
                    available=6, volumes=2),
        PoolSummary(name="off", type="fs", state="inactive"),
    ]  # fmt: skip
    assert decode({"host": "h1"}, HostInventory).pools == []  # an older agent
    for bad, why in (
        ({"pools": "x"}, "pools"),
        ({"pools": [{"state": "running"}]}, "name"),
        ({"pools": [{"name": "p", "available": -1}]}, "available"),
        ({"pools": [{"name": "p", "available": True}]}, "available"),
    ):
        with pytest.raises(InvalidArgument, match=why):
            decode({"host": "h", **bad}, HostInventory)


def test_cluster_view_candidates_carry_active_pools() -> None:
    view = ClusterView(host_down_after=60)
    inv = decode({"host": "h", "driver": "qemu", "cpus": 2, "pools": [
        {"name": "fast", "state": "running", "available": 5 * GIB},
        {"name": "cold", "state": "inactive", "available": 9 * GIB}]}, HostInventory)  # fmt: skip
    view.observe_heartbeat(inv)
    assert view.candidates()[0].pools == {"fast": 5 * GIB}


def test_requests_name_the_pools_of_volume_disks() -> None:
    defn = parse_domain_xml(XML)
    assert storage_needs(defn) == {"fast": 0, "bulk": 0}
    sizes = {("fast", "db.qcow2"): 3 * GIB, ("fast", "logs.qcow2"): GIB}
    assert request_for(defn, volume_sizes=sizes).storage == {"fast": 4 * GIB, "bulk": 0}


def test_storage_filter_and_no_host_message() -> None:
    defn = parse_domain_xml(XML)
    hosts = [
        host("nopools", {}),
        host("fast-only", {"fast": 100 * GIB}),
        host("small", {"fast": 2 * GIB, "bulk": GIB}),
        host("big", {"fast": 10 * GIB, "bulk": 0}),
    ]
    req = request_for(defn)
    assert [h.name for h in filter_storage(req, hosts, POLICY)] == ["small", "big"]
    sized = request_for(defn, volume_sizes={("fast", "db.qcow2"): 3 * GIB})
    assert place(sized, hosts, POLICY).name == "big"
    with pytest.raises(NoHostError, match="storage removed 4"):
        place(request_for(defn, volume_sizes={("bulk", "archive.raw"): GIB * 1000}), hosts,
              POLICY)  # fmt: skip
    plain = replace(req, storage={})
    assert len(filter_storage(plain, hosts, POLICY)) == 4  # no volumes: no storage filter
