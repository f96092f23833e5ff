"""Placement: every filter and weigher, the NO_HOST explanation, requests from XML, scale."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from scheduler.placement import (
    FILTERS,
    HostCandidate,
    PlacementPolicy,
    PlacementRequest,
    filter_anti_affinity,
    filter_arch,
    filter_cpu_model,
    filter_driver,
    filter_excluded,
    filter_memory,
    filter_not_draining,
    filter_up,
    filter_vcpus,
    place,
    request_for,
    request_from_xml,
    weigh_pack,
    weigh_spread,
)
from virtbus.domain import parse_domain_xml
from virtbus.errors import InvalidArgument, NoHostError

GIB = 1 << 20  # KiB
POLICY = PlacementPolicy()


def host(name: str, **kw: object) -> HostCandidate:
    base = HostCandidate(
        name=name, driver="qemu", arch="x86_64", cpus=4, memory_total_kib=8 * GIB,
        memory_free_kib=8 * GIB, cpu_model="Skylake",
    )  # fmt: skip
    return replace(base, **kw)  # type: ignore[arg-type]


def req(**kw: object) -> PlacementRequest:
    base = PlacementRequest(name="vm", memory_kib=GIB, vcpus=1, drivers=frozenset({"qemu"}))
    return replace(base, **kw)  # type: ignore[arg-type]


def names(hosts: list[HostCandidate]) -> list[str]:
    return [h.name for h in hosts]


def test_filter_excluded() -> None:
    hs = [host("a"), host("b")]
    assert names(filter_excluded(req(exclude=frozenset({"a"})), hs, POLICY)) == ["b"]
    assert names(filter_excluded(req(), hs, POLICY)) == ["a", "b"]


def test_filter_up_and_not_draining() -> None:
    hs = [host("a", up=False), host("b", draining=True), host("c")]
    assert names(filter_up(req(), hs, POLICY)) == ["b", "c"]
    assert names(filter_not_draining(req(), hs, POLICY)) == ["a", "c"]


def test_filter_driver_and_arch() -> None:
    hs = [host("a"), host("b", driver="xen"), host("c", arch="aarch64")]
    assert names(filter_driver(req(), hs, POLICY)) == ["a", "c"]
    assert names(filter_arch(req(arch="x86_64"), hs, POLICY)) == ["a", "b"]
    assert names(filter_arch(req(arch=None), hs, POLICY)) == ["a", "b", "c"]


def test_filter_memory_with_and_without_overcommit() -> None:
    hs = [
        host("a", allocated_memory_kib=7 * GIB, memory_free_kib=1 * GIB),
        host("b", allocated_memory_kib=7 * GIB + 1, memory_free_kib=GIB - 1),
        host("c", memory_free_kib=GIB // 2),  # allocation fits, but the host really lacks it
    ]
    assert names(filter_memory(req(), hs, POLICY)) == ["a"]
    over = PlacementPolicy(memory_overcommit=1.5)
    assert names(filter_memory(req(), hs, over)) == ["a", "b", "c"]


def test_filter_vcpus_with_overcommit_ratio() -> None:
    hs = [host("a", allocated_vcpus=15), host("b", allocated_vcpus=16)]
    assert names(filter_vcpus(req(), hs, POLICY)) == ["a"]  # 4 cpus x 4.0
    assert names(filter_vcpus(req(), hs, PlacementPolicy(cpu_overcommit=1.0))) == []


def test_filter_anti_affinity() -> None:
    hs = [host("a", groups=frozenset({"web"})), host("b", groups=frozenset({"db"})), host("c")]
    assert names(filter_anti_affinity(req(groups=frozenset({"web"})), hs, POLICY)) == ["b", "c"]
    assert names(filter_anti_affinity(req(), hs, POLICY)) == ["a", "b", "c"]


def test_filter_cpu_model() -> None:
    hs = [
        host("a"),
        host("b", cpu_model="EPYC", cpu_models=frozenset({"EPYC", "qemu64"})),
        host("c", cpu_model="EPYC"),
    ]
    # host CPU (passthrough) migration: identical model only
    assert names(filter_cpu_model(req(same_cpu_as="Skylake"), hs, POLICY)) == ["a"]
    # a named model: hosts that list it, or that list nothing (cannot tell)
    assert names(filter_cpu_model(req(cpu_model="qemu64"), hs, POLICY)) == ["a", "b", "c"]
    assert names(filter_cpu_model(req(cpu_model="Haswell"), hs, POLICY)) == ["a", "c"]


def test_weighers_spread_and_pack() -> None:
    hs = [
        host("a", allocated_memory_kib=2 * GIB),
        host("b"),
        host("c", allocated_memory_kib=6 * GIB),
    ]
    assert weigh_spread(hs, POLICY).name == "b"
    assert weigh_pack(hs, POLICY).name == "c"
    assert place(req(), hs, POLICY).name == "b"
    assert place(req(), hs, PlacementPolicy(weigher="pack")).name == "c"
    tie = [host("x"), host("y")]
    assert place(req(), tie, POLICY).name == "x"  # ties: the first in order


def test_no_host_says_which_filter_removed_how_many() -> None:
    hs = [
        host("a", up=False),
        host("b", draining=True),
        host("c", allocated_memory_kib=8 * GIB),
        host("d", driver="xen"),
    ]
    with pytest.raises(NoHostError) as err:
        place(req(), hs, POLICY)
    msg = err.value.message
    assert (
        "(4 hosts: up removed 1, not-draining removed 1, driver removed 1, memory removed 1)" in msg
    )
    with pytest.raises(NoHostError, match="no hosts known"):
        place(req(), [], POLICY)


def test_every_filter_is_named_once() -> None:
    assert len({n for n, _ in FILTERS}) == len(FILTERS) == 11


def test_policy_rejects_bad_values() -> None:
    with pytest.raises(InvalidArgument):
        PlacementPolicy(weigher="random")
    with pytest.raises(InvalidArgument):
        PlacementPolicy(cpu_overcommit=0)


XML = """<domain type='kvm'><name>web1</name><memory unit='GiB'>2</memory>
<currentMemory unit='GiB'>1</currentMemory><vcpu current='2'>4</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type></os>{cpu}
<metadata>
  <virtbus:placement xmlns:virtbus='https://virtbus.dev/xmlns/placement/1'
                     anti-affinity='web, front'/>
  <other xmlns='urn:x'/>
</metadata></domain>"""


def test_request_from_domain_xml() -> None:
    r = request_from_xml(XML.format(cpu="<cpu mode='custom'><model>Haswell</model></cpu>"))
    assert (r.name, r.memory_kib, r.vcpus, r.arch) == ("web1", GIB, 2, "x86_64")
    assert r.drivers == frozenset({"qemu", "test"}) and r.cpu_model == "Haswell"
    assert r.groups == frozenset({"web", "front"}) and r.same_cpu_as is None


def test_request_for_migration_pins_driver_arch_and_host_cpu() -> None:
    defn = parse_domain_xml(XML.format(cpu="<cpu mode='host-passthrough'/>"))
    src = host("src", driver="qemu", arch="x86_64", cpu_model="Skylake")
    r = request_for(defn, source=src)
    assert r.drivers == frozenset({"qemu"}) and r.exclude == frozenset({"src"})
    assert r.same_cpu_as == "Skylake"
    plain = "<domain type='test'><name>x</name><memory>1</memory><os><type>hvm</type></os></domain>"
    assert parse_domain_xml(plain).placement_groups == frozenset()


def test_scale_1000_hosts_10000_domains() -> None:
    """1,000 simulated hosts, 10,000 domains placed one after another with allocation."""
    rng = random.Random(5)
    hosts = [
        host(f"h{i:04d}", cpus=rng.choice((16, 32, 64)),
             memory_total_kib=rng.choice((64, 128, 256)) * GIB,
             memory_free_kib=256 * GIB, driver="test", labels={"rack": f"r{i % 20}"})
        for i in range(1000)
    ]  # fmt: skip
    for h in hosts[:30]:
        h.up = False
    for h in hosts[30:50]:
        h.draining = True
    by_name = {h.name: h for h in hosts}
    for n in range(10_000):
        r = PlacementRequest(
            name=f"d{n}", memory_kib=rng.choice((1, 2, 4, 8)) * GIB, vcpus=rng.choice((1, 2, 4)),
            drivers=frozenset({"test"}), arch="x86_64",
            groups=frozenset({f"g{n % 500}"}) if n % 10 == 0 else frozenset(),
        )  # fmt: skip
        chosen = by_name[place(r, hosts, POLICY).name]
        assert chosen.up and not chosen.draining and r.groups.isdisjoint(chosen.groups)
        chosen.allocated_memory_kib += r.memory_kib
        chosen.memory_free_kib -= r.memory_kib
        chosen.allocated_vcpus += r.vcpus
        chosen.groups = chosen.groups | r.groups
    for h in hosts:
        assert h.allocated_memory_kib <= h.memory_total_kib
        assert h.allocated_vcpus <= h.cpus * POLICY.cpu_overcommit
    # spread: every host that got a domain kept about as much free memory as the freest one
    cpu_bound = [h for h in hosts[50:] if h.allocated_vcpus > h.cpus * 4 - 4]
    free = [h.memory_total_kib - h.allocated_memory_kib for h in hosts[50:] if h not in cpu_bound]
    used_free = [
        h.memory_total_kib - h.allocated_memory_kib
        for h in hosts[50:]
        if h.allocated_memory_kib and h not in cpu_bound
    ]
    assert max(free) - min(used_free) <= 8 * GIB  # (its time: tests/bench/placement.py)
