"""Placement decisions with 1,000 simulated hosts (target >= 1,000/s).

    .venv/bin/python -m tests.bench.placement [--hosts 1000] [--decisions 10000]
    .venv/bin/python -m tests.bench.placement --view [--hosts 1000] [--domains 10]
        [--decisions 2000] [--beats 10] [--rounds 3]

Without ``--view``: each decision runs every filter and the spread weigher over a list of
all hosts (:func:`scheduler.placement.place`), then books the domain on the chosen host
(as the scheduler's claims do), so the hosts keep changing.

With ``--view``: the scheduler's own path, a :class:`scheduler.inventory.ClusterView` fed
with heartbeats (each host with ``--domains`` domains, their anti-affinity metadata
known), against the view as it was before incremental placement
(:class:`tests.placement_reference.ReferenceView`: every decision rebuilds every host's
candidate). Between two decisions ``--beats`` heartbeats arrive (at 1,000 hosts every
2 s, 10 beats per decision is 50 decisions/s), and each decision's host gets a claim (the
scheduler's ``claim_ttl``). The two run in alternate rounds, the order swapped each round;
it prints, for each, the decision's latency (p50/p99) and CPU per decision, and the CPU a
heartbeat costs (the new view rebuilds a host's figures there).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

from scheduler.inventory import Claim, ClusterView, DomainMeta
from scheduler.placement import HostCandidate, PlacementPolicy, PlacementRequest, place
from tests.bench.common import add_force, check_load
from tests.placement_reference import ReferenceView
from virtbus.protocol.domain import DomainInfo, StateName
from virtbus.protocol.host import HostInventory
from virtbus.protocol.network import NetworkSummary
from virtbus.protocol.storage import PoolSummary

GIB = 1 << 20
CLAIM_TTL = 120.0  # SchedulerSettings.claim_ttl's default


def bench_pipeline(args: argparse.Namespace) -> None:
    rng = random.Random(1)
    hosts = [
        HostCandidate(
            name=f"h{i:05d}", driver="test", arch="x86_64", cpus=rng.choice((32, 64)),
            memory_total_kib=rng.choice((128, 256, 512)) * GIB, memory_free_kib=512 * GIB,
            up=i % 50 != 0, draining=i % 97 == 0,
        )
        for i in range(args.hosts)
    ]  # fmt: skip
    by_name = {h.name: h for h in hosts}
    policy = PlacementPolicy()
    lat = []
    t0 = time.perf_counter()
    for n in range(args.decisions):
        req = PlacementRequest(
            name=f"d{n}", memory_kib=rng.choice((1, 2, 4)) * GIB, vcpus=rng.choice((1, 2)),
            drivers=frozenset({"test"}), arch="x86_64",
            groups=frozenset({f"g{n % 100}"}) if n % 5 == 0 else frozenset(),
        )  # fmt: skip
        s = time.perf_counter()
        chosen = by_name[place(req, hosts, policy).name]
        lat.append(time.perf_counter() - s)
        chosen.allocated_memory_kib += req.memory_kib
        chosen.memory_free_kib -= req.memory_kib
        chosen.allocated_vcpus += req.vcpus
        chosen.groups |= req.groups
    total = time.perf_counter() - t0
    lat.sort()
    print(f"hosts={args.hosts} decisions={args.decisions}")
    print(f"decisions/s: {args.decisions / total:,.0f}  (target >= 1,000)")
    print(
        f"latency p50 {statistics.median(lat) * 1e3:.3f} ms  "
        f"p99 {lat[int(len(lat) * 0.99)] * 1e3:.3f} ms"
    )


# --- the scheduler's view, new against old ------------------------------------------------
View = ClusterView | ReferenceView


def _fleet(args: argparse.Namespace) -> tuple[list[list[HostInventory]], list[list[DomainInfo]]]:
    """Per host: two heartbeats (their free memory differs) and its domains."""
    rng = random.Random(2)
    beats, domains = [], []
    for i in range(args.hosts):
        host = f"h{i:05d}"
        total, cpus = rng.choice((128, 256, 512)) * GIB, rng.choice((32, 64))
        names = [f"{host}-d{j}" for j in range(args.domains)]
        pools = [PoolSummary(name="default", state="running", available=1 << 40)]
        nets = [NetworkSummary(name="default", active=True)]
        beats.append([
            HostInventory(
                host=host, driver="test", arch="x86_64", cpus=cpus,
                memory_total_kib=total, memory_free_kib=total // 2 - k * 1024,
                allocated_memory_kib=args.domains * GIB, allocated_vcpus=args.domains,
                domains=args.domains, active_domains=args.domains, running=names,
                labels={"rack": f"r{i % 20}"}, cpu_model="qemu64", cpu_models=["qemu64"],
                pools=pools, networks=nets, started_at=1.0, now=float(k),
            )
            for k in range(2)
        ])  # fmt: skip
        domains.append([
            DomainInfo(name=n, uuid=f"{n}-uuid", state=StateName.RUNNING, memory_kib=GIB, vcpus=1)
            for n in names
        ])  # fmt: skip
    return beats, domains


def _load(view: View, beats: list[list[HostInventory]], domains: list[list[DomainInfo]]) -> None:
    """Every host's first heartbeat, its domains and their metadata (one in five in an
    anti-affinity group of 100)."""
    for i, (pair, infos) in enumerate(zip(beats, domains, strict=True)):
        view.observe_heartbeat(pair[0])
        view.observe_domains(pair[0].host, infos)
        for j, d in enumerate(infos):
            k = i * len(infos) + j
            view.observe_meta(DomainMeta(d.name, d.uuid, frozenset({f"g{k % 100}"})
                                         if k % 5 == 0 else frozenset()))  # fmt: skip


def _round(
    view: View, decide: Callable[[PlacementRequest], HostCandidate],
    beats: list[list[HostInventory]], args: argparse.Namespace, rng: random.Random, tick: list[int],
) -> tuple[list[float], float, float, int]:  # fmt: skip
    """Decision latencies, CPU per decision, CPU per heartbeat, heartbeats observed."""
    lat: list[float] = []
    place_cpu = beat_cpu = 0.0
    observed = 0
    for n in range(args.decisions):
        b0 = time.process_time()
        for _ in range(args.beats):
            k = tick[0] = tick[0] + 1
            view.observe_heartbeat(beats[k % len(beats)][(k // len(beats)) % 2])
        beat_cpu += time.process_time() - b0
        observed += args.beats
        req = PlacementRequest(
            name=f"d{n}", memory_kib=rng.choice((1, 2, 4)) * GIB, vcpus=rng.choice((1, 2)),
            drivers=frozenset({"test"}), arch="x86_64",
            groups=frozenset({f"g{n % 100}"}) if n % 5 == 0 else frozenset(),
        )  # fmt: skip
        c0, s = time.process_time(), time.perf_counter()
        chosen = decide(req)
        lat.append(time.perf_counter() - s)
        place_cpu += time.process_time() - c0
        claim = Claim(f"{req.name}-{tick[0]}", req.name, req.memory_kib, req.vcpus, req.groups,
                      time.monotonic() + CLAIM_TTL)  # fmt: skip
        view.claim(chosen.name, claim)
    return lat, place_cpu / args.decisions, beat_cpu / max(observed, 1), observed


def bench_view(args: argparse.Namespace) -> None:
    beats, domains = _fleet(args)
    policy = PlacementPolicy()
    new, old = ClusterView(host_down_after=6.0), ReferenceView(host_down_after=6.0)
    for view in (new, old):
        _load(view, beats, domains)
    sides: dict[str, tuple[View, Callable[[PlacementRequest], HostCandidate]]] = {
        "old (rebuild + pipeline)": (old, lambda r: old.place(r, policy)),
        "new (incremental view)": (new, lambda r: new.place(r, policy)),
    }
    results: dict[str, tuple[list[float], list[float], list[float]]] = {
        k: ([], [], []) for k in sides
    }
    rngs = {k: random.Random(3) for k in sides}  # the same requests on both sides
    ticks = {k: [0] for k in sides}
    print(f"hosts={args.hosts} domains/host={args.domains} decisions/round={args.decisions}"
          f" heartbeats/decision={args.beats} rounds={args.rounds}")  # fmt: skip
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            view, decide = sides[name]
            lat, cpu, beat, _ = _round(view, decide, beats, args, rngs[name], ticks[name])
            results[name][0].extend(lat)
            results[name][1].append(cpu)
            results[name][2].append(beat)
            lat.sort()
            print(f"  round {r + 1} {name}: p50 {statistics.median(lat) * 1e3:.3f} ms"
                  f"  p99 {lat[int(len(lat) * 0.99)] * 1e3:.3f} ms"
                  f"  CPU/decision {cpu * 1e3:.3f} ms"
                  f"  CPU/heartbeat {beat * 1e6:.1f} us")  # fmt: skip
    print("all rounds:")
    for name, (lats, cpus, beat_cpus) in results.items():
        lats.sort()
        print(f"  {name}: p50 {statistics.median(lats) * 1e3:.3f} ms"
              f"  p99 {lats[int(len(lats) * 0.99)] * 1e3:.3f} ms"
              f"  CPU/decision {statistics.median(cpus) * 1e3:.3f} ms (median of rounds)"
              f"  CPU/heartbeat {statistics.median(beat_cpus) * 1e6:.1f} us")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hosts", type=int, default=1000)
    p.add_argument("--decisions", type=int, default=None,
                   help="per run (10,000) or, with --view, per round (2,000)")  # fmt: skip
    p.add_argument("--view", action="store_true",
                   help="the scheduler's view, incremental against the old rebuild")  # fmt: skip
    p.add_argument("--domains", type=int, default=10, help="per host (--view)")
    p.add_argument("--beats", type=int, default=10, help="heartbeats per decision (--view)")
    p.add_argument("--rounds", type=int, default=3, help="of each side, alternated (--view)")
    add_force(p)
    args = p.parse_args()
    check_load(args.force)
    if args.view:
        args.decisions = args.decisions or 2000
        bench_view(args)
    else:
        args.decisions = args.decisions or 10_000
        bench_pipeline(args)


if __name__ == "__main__":
    main()
