"""Placement decisions per second with 1,000 simulated hosts (target >= 1,000/s).

    .venv/bin/python -m tests.bench.placement [--hosts 1000] [--decisions 10000]

Each decision runs every filter and the spread weigher over all hosts, then books the
domain on the chosen host (as the scheduler's claims do), so the view keeps changing.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from scheduler.placement import HostCandidate, PlacementPolicy, PlacementRequest, place
from tests.bench.common import add_force, check_load

GIB = 1 << 20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hosts", type=int, default=1000)
    p.add_argument("--decisions", type=int, default=10_000)
    add_force(p)
    args = p.parse_args()
    check_load(args.force)
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


if __name__ == "__main__":
    main()
