"""The cluster view keeps placement's figures up to date as the cluster changes, and a
decision over it chooses the host the old rebuild-everything pipeline chose.

The targeted tests each change one thing the view must notice (a heartbeat, a host going
silent, a domain defined, moved or gone, its anti-affinity metadata, claims, the drain
intent); the equivalence test drives the view and the old one
(:class:`tests.placement_reference.ReferenceView`) with the same random changes on random
fleets and compares every decision and every candidate."""

from __future__ import annotations

import random

import msgspec
import pytest

from scheduler.inventory import Claim, ClusterView, DomainMeta
from scheduler.placement import PlacementPolicy, PlacementRequest, place
from tests.placement_reference import ReferenceView
from virtbus.errors import NoHostError
from virtbus.protocol.domain import DomainInfo, StateName
from virtbus.protocol.host import HostInventory
from virtbus.protocol.network import NetworkSummary
from virtbus.protocol.storage import PoolSummary

GIB = 1 << 20
SPREAD = PlacementPolicy()


def beat(host: str, *, total: int = 64, allocated: int = 0, **kw: object) -> HostInventory:
    return HostInventory(
        host=host, driver="test", arch="x86_64", cpus=16, memory_total_kib=total * GIB,
        memory_free_kib=total * GIB, allocated_memory_kib=allocated * GIB, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def info(uuid: str, name: str | None = None) -> DomainInfo:
    return DomainInfo(name=name or uuid, uuid=uuid, state=StateName.SHUTOFF)


def req(name: str = "new", memory: int = 1, **kw: object) -> PlacementRequest:
    return PlacementRequest(
        name=name, memory_kib=memory * GIB, vcpus=1, drivers=frozenset({"test"}), **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def two_hosts(now: float = 0.0) -> ClusterView:
    """a has the more free memory (spread picks it), b the less."""
    view = ClusterView(host_down_after=5)
    view.observe_heartbeat(beat("a", total=64), now=now)
    view.observe_heartbeat(beat("b", total=32), now=now)
    return view


def chosen(view: ClusterView, request: PlacementRequest | None = None, now: float = 0.0) -> str:
    return view.place(request or req(), SPREAD, now=now).name


# --- what the view must notice ---------------------------------------------------------
def test_a_heartbeat_that_changes_a_hosts_figures_moves_the_choice() -> None:
    view = two_hosts()
    assert chosen(view) == "a"
    view.observe_heartbeat(beat("a", total=64, allocated=40), now=1.0)  # a filled up
    assert chosen(view, now=1.0) == "b"
    view.observe_heartbeat(beat("a", total=64, cpu_model="EPYC"), now=2.0)
    assert view.place(req(cpu_model="EPYC"), SPREAD, now=2.0).name == "a"


def test_a_silent_host_is_down_at_the_decisions_time() -> None:
    view = two_hosts()
    assert chosen(view) == "a"
    view.observe_heartbeat(beat("b", total=32), now=4.0)  # only b keeps beating
    assert chosen(view, now=5.0) == "a"  # a: 5 s, not yet down
    assert chosen(view, now=6.0) == "b"
    view.observe_heartbeat(beat("a", total=64), now=6.5)  # back
    assert chosen(view, now=7.0) == "a"


def test_a_defined_domain_brings_its_anti_affinity_group() -> None:
    view = two_hosts()
    web = req(groups=frozenset({"web"}))
    assert chosen(view, web) == "a"
    view.observe_meta(DomainMeta("web1", "u1", frozenset({"web"})))
    view.add_domain("a", info("u1", "web1"))  # as scheduler.define records it
    assert chosen(view, web) == "b"
    assert chosen(view) == "a"  # no group: a as before


def test_metadata_learnt_after_the_domain_list_counts() -> None:
    view = two_hosts()
    web = req(groups=frozenset({"web"}))
    assert view.observe_domains("a", [info("u1")]) == ["u1"]  # its XML not read yet
    assert chosen(view, web) == "a"
    view.observe_meta(DomainMeta("u1", "u1", frozenset({"web"})))
    assert chosen(view, web) == "b"


def test_an_undefined_domain_takes_its_group_away() -> None:
    view = two_hosts()
    web = req(groups=frozenset({"web"}))
    view.observe_meta(DomainMeta("u1", "u1", frozenset({"web"})))
    view.observe_domains("a", [info("u1"), info("u2")])
    assert chosen(view, web) == "b"
    view.observe_domains("a", [info("u2")])  # u1 undefined: gone from a's list
    assert chosen(view, web) == "a"


def test_a_moved_domain_takes_its_group_along() -> None:
    view = two_hosts()
    web = req(groups=frozenset({"web"}))
    view.observe_meta(DomainMeta("u1", "u1", frozenset({"web"})))
    view.observe_domains("a", [info("u1")])
    view.observe_domains("b", [])
    assert chosen(view, web) == "b"
    view.domain_moved("u1", "a", "b")
    assert chosen(view, web) == "a"
    view.domain_moved("u1", "b", "a", live=False)
    assert chosen(view, web) == "b"


def test_claims_count_until_released_or_expired() -> None:
    view = two_hosts()
    view.claim("a", Claim("u1", "big", 40 * GIB, 1, frozenset(), expires=10.0))
    assert chosen(view) == "b"
    view.release("a", "u1")
    assert chosen(view) == "a"
    view.claim("a", Claim("u2", "small", 1 * GIB, 1, frozenset({"web"}), expires=3.0))
    web = req(groups=frozenset({"web"}))
    assert chosen(view, web, now=3.0) == "b"  # its group; not expired at its own time
    assert chosen(view, web, now=3.5) == "a"  # expired
    view.claim("a", Claim("u3", "big", 40 * GIB, 1, frozenset(), expires=20.0))
    assert chosen(view, now=4.0) == "b"
    view.observe_heartbeat(beat("a", total=64, running=["big"]), now=4.0)  # it runs: no claim
    assert chosen(view, now=4.0) == "a"


def test_the_drain_intent_and_a_reported_drain_remove_a_host() -> None:
    view = two_hosts()
    view.set_draining("a", True)
    assert chosen(view) == "b"
    view.set_draining("a", False)
    assert chosen(view) == "a"
    view.draining |= {"a"}  # as the journal's load sets it
    assert chosen(view) == "b"
    view.draining = set()
    view.observe_heartbeat(beat("a", total=64, draining=True), now=1.0)
    assert chosen(view, now=1.0) == "b"
    view.reported_not_draining("a")  # an undrain: until its next heartbeat
    assert chosen(view, now=1.0) == "a"


ONE_FIELD: list[tuple[str, object]] = [
    ("memory_free_kib", 3 * GIB),
    ("allocated_memory_kib", 8 * GIB),
    ("allocated_vcpus", 12),
    ("memory_total_kib", 16 * GIB),
    ("cpus", 2),
    ("draining", True),
    ("driver", "qemu"),
    ("arch", "aarch64"),
    ("cpu_model", "EPYC"),
    ("cpu_models", ["EPYC"]),
    ("labels", {"rack": "r2"}),
    ("pools", [PoolSummary(name="fast", state="running", available=5)]),
    ("networks", [NetworkSummary(name="blue", active=True)]),
    ("last_event_seq", 7),  # no figure of placement's: the same candidate
]


@pytest.mark.parametrize(("key", "value"), ONE_FIELD, ids=[k for k, _ in ONE_FIELD])
def test_a_heartbeat_that_changes_one_field_shows_in_the_candidate(key: str, value: object) -> None:
    base = beat("a", total=64, pools=[PoolSummary(name="fast", state="running", available=9)],
                networks=[NetworkSummary(name="blue", active=False)], labels={"rack": "r1"},
                cpu_models=["Skylake"])  # fmt: skip
    new, old = ClusterView(host_down_after=5), ReferenceView(host_down_after=5)
    for v in (new, old):
        v.observe_heartbeat(base, now=0.0)
        v.claim("a", Claim("u1", "c1", GIB, 1, frozenset(), expires=9.0))
        v.observe_heartbeat(msgspec.structs.replace(base, **{key: value}), now=1.0)
    assert new.candidates(now=1.0) == old.candidates(now=1.0)
    assert new.candidates(now=1.0) != [] and new.candidate("a", now=1.0) is not None


def test_no_host_says_what_the_pipeline_says() -> None:
    view = two_hosts()
    view.set_draining("b", True)
    too_big = req(memory=100)
    with pytest.raises(NoHostError) as got:
        view.place(too_big, SPREAD, now=0.0)
    with pytest.raises(NoHostError) as want:
        place(too_big, view.candidates(now=0.0), SPREAD)
    assert got.value.message == want.value.message
    assert "not-draining removed 1, memory removed 1" in got.value.message


def test_ties_go_to_the_first_name_for_both_weighers() -> None:
    view = ClusterView(host_down_after=5)
    view.observe_heartbeat(beat("c", total=64), now=0.0)
    for policy in (SPREAD, PlacementPolicy(weigher="pack")):  # their orders exist: c first
        assert view.place(req(), policy, now=0.0).name == "c"
    for host in ("b", "a"):  # hosts heard later, with the same figures
        view.observe_heartbeat(beat(host, total=64), now=0.0)
    assert view.place(req(), SPREAD, now=0.0).name == "a"
    assert view.place(req(), PlacementPolicy(weigher="pack"), now=0.0).name == "a"
    assert [c.name for c in view.candidates(now=0.0)] == ["a", "b", "c"]


# --- the same choices as the old pipeline, on random fleets ----------------------------
DRIVERS = ("test", "qemu", "lxc")
MODELS = ("", "EPYC", "Skylake")
POOLS = ("fast", "slow")
NETS = ("blue", "red")
GROUPS = ("web", "db", "cache")


def _random_beat(rng: random.Random, host: str, claims: list[str]) -> HostInventory:
    total = rng.choice((16, 32, 64))
    return HostInventory(
        host=host,
        driver=rng.choice(DRIVERS),
        arch=rng.choice(("x86_64", "x86_64", "aarch64")),
        cpus=rng.choice((2, 4, 8)),
        memory_total_kib=total * GIB,
        memory_free_kib=rng.choice((0, 4, 8, total)) * GIB,
        allocated_memory_kib=rng.choice((0, 4, 8, 16)) * GIB,  # few values: many ties
        allocated_vcpus=rng.choice((0, 4, 16, 30)),
        running=rng.sample(claims, min(len(claims), rng.randint(0, 2))),
        draining=rng.random() < 0.1,
        cpu_model=rng.choice(MODELS),
        cpu_models=rng.sample(MODELS[1:], rng.randint(0, 2)),
        labels={"rack": rng.choice(("r1", "r2"))},
        pools=[
            PoolSummary(name=p, state=rng.choice(("running", "inactive")),
                        available=rng.choice((0, 10, 100)))
            for p in rng.sample(POOLS, rng.randint(0, 2))
        ],
        networks=[NetworkSummary(name=n, active=rng.random() < 0.8)
                  for n in rng.sample(NETS, rng.randint(0, 2))],
        domains=rng.randint(0, 3),
        started_at=1.0,
    )  # fmt: skip


def _random_request(rng: random.Random, hosts: list[str]) -> PlacementRequest:
    return PlacementRequest(
        name="r",
        memory_kib=rng.choice((1, 4, 8, 16, 40, 60)) * GIB,
        vcpus=rng.choice((1, 2, 8)),
        drivers=frozenset(rng.sample(DRIVERS, rng.randint(1, 2))),
        arch=rng.choice((None, "x86_64", "aarch64")),
        cpu_model=rng.choice((None, None, "EPYC", "Skylake")),
        same_cpu_as=rng.choice((None, None, None, "EPYC")),
        groups=frozenset(rng.sample(GROUPS, rng.randint(0, 1))),
        exclude=frozenset(rng.sample(hosts, rng.randint(0, 2))),
        storage={p: rng.choice((0, 10, 50)) for p in rng.sample(POOLS, rng.randint(0, 1))},
        networks=frozenset(rng.sample(NETS, rng.randint(0, 1))),
    )


def _decide(view: ClusterView | ReferenceView, r: PlacementRequest,
            policy: PlacementPolicy, now: float) -> str:  # fmt: skip
    try:
        return view.place(r, policy, now=now).name
    except NoHostError as exc:
        return f"NO_HOST {exc.message}"


@pytest.mark.parametrize("seed", range(12))
def test_the_view_chooses_as_the_old_pipeline_on_random_fleets(seed: int) -> None:
    rng = random.Random(seed)
    policy = PlacementPolicy(
        weigher=rng.choice(("spread", "pack")),
        memory_overcommit=rng.choice((1.0, 1.5)),
        cpu_overcommit=rng.choice((1.0, 4.0)),
    )
    new, old = ClusterView(host_down_after=5), ReferenceView(host_down_after=5)
    views = (new, old)
    hosts = [f"h{i:02d}" for i in range(rng.randint(3, 25))]
    uuids = [f"u{i}" for i in range(30)]
    claim_names: list[str] = []
    now = 0.0
    decisions = no_host = 0
    for step in range(400):
        op = rng.random()
        host = rng.choice(hosts)
        if op < 0.3:
            inv = _random_beat(rng, host, claim_names)
            for v in views:
                v.observe_heartbeat(inv, now=now)
        elif op < 0.4:
            domains = [info(u) for u in rng.sample(uuids, rng.randint(0, 4))]
            for v in views:
                v.observe_domains(host, domains)
        elif op < 0.5:
            u = rng.choice(uuids)
            meta = DomainMeta(u, u, frozenset(rng.sample(GROUPS, rng.randint(0, 2))))
            for v in views:
                v.observe_meta(meta)
        elif op < 0.6:
            name = f"c{step}"
            claim_names.append(name)
            c = Claim(rng.choice(uuids), name, rng.choice((1, 8, 16)) * GIB, rng.randint(1, 4),
                      frozenset(rng.sample(GROUPS, rng.randint(0, 1))),
                      expires=now + rng.choice((0.5, 2.0, 8.0)))  # fmt: skip
            for v in views:
                v.claim(host, c)
        elif op < 0.65:
            u = rng.choice(uuids)
            for v in views:
                v.release(host, u)
        elif op < 0.7:
            flag = rng.random() < 0.5
            for v in views:
                v.set_draining(host, flag)
        elif op < 0.73 and host in old.hosts:
            for v in views:
                v.reported_not_draining(host)
        elif op < 0.76 and host in old.hosts:
            d = info(rng.choice(uuids))
            for v in views:
                v.add_domain(host, d)
        elif op < 0.8:
            u, dst, live = rng.choice(uuids), rng.choice(hosts), rng.random() < 0.5
            for v in views:
                v.domain_moved(u, host, dst, live=live)
        elif op < 0.88:
            now += rng.choice((0.25, 1.0, 3.0))  # claims expire, silent hosts go down
        else:  # a decision and its claim, as scheduler.define
            r = _random_request(rng, hosts)
            got, want = _decide(new, r, policy, now), _decide(old, r, policy, now)
            assert got == want, (seed, step, r)
            if not got.startswith("NO_HOST"):
                c = Claim(f"p{step}", f"p{step}", r.memory_kib, r.vcpus, r.groups, now + 2.0)
                for v in views:
                    v.claim(got, c)
        for _ in range(2):
            r = _random_request(rng, hosts)
            got, want = _decide(new, r, policy, now), _decide(old, r, policy, now)
            assert got == want, (seed, step, r)
            decisions += 1
            no_host += got.startswith("NO_HOST")
        assert new.candidates(now=now) == old.candidates(now=now), (seed, step)
    assert 0 < no_host < decisions  # both outcomes were compared


def test_the_pipeline_runs_only_when_no_host_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk stops at the first host with too little room (the order's own figure), so
    a host with exactly the room asked for is taken by the walk, not by the fallback."""
    import scheduler.inventory

    calls: list[str] = []

    def counting(r: PlacementRequest, hosts: object, policy: PlacementPolicy) -> object:
        calls.append(r.name)
        return place(r, hosts, policy)  # type: ignore[arg-type]

    monkeypatch.setattr(scheduler.inventory, "place", counting)
    view = two_hosts()
    for policy in (SPREAD, PlacementPolicy(weigher="pack")):
        assert view.place(req("exact", memory=64), policy, now=0.0).name == "a"
        assert view.place(req("exact-b", memory=32, exclude=frozenset({"a"})), policy,
                          now=0.0).name == "b"  # fmt: skip
        assert calls == []
        with pytest.raises(NoHostError):
            view.place(req("too-big", memory=65), policy, now=0.0)
        assert calls == ["too-big"]
        calls.clear()
