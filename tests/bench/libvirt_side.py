"""The libvirt half of the side-by-side benchmark (run with Debian's python3 + python3-libvirt).

Prints one JSON object: medians over rounds of define, start, suspend+resume pair p50/p99,
dominfo, destroy (seconds), for a firmware-only guest on ``qemu:///system``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid

import libvirt  # type: ignore[import-not-found]


def xml(name: str, hv: str) -> str:
    return f"""<domain type='{hv}'><name>{name}</name><uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices><memballoon model='none'/></devices></domain>"""


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


def one_round(conn: libvirt.virConnect, hv: str, pairs: int) -> dict[str, float]:
    name = f"bench-lv-{uuid.uuid4().hex[:6]}"
    out: dict[str, float] = {}
    t = time.perf_counter()
    dom = conn.defineXML(xml(name, hv))
    out["define"] = time.perf_counter() - t
    try:
        t = time.perf_counter()
        dom.create()
        out["start"] = time.perf_counter() - t
        times = []
        for _ in range(pairs):
            t = time.perf_counter()
            dom.suspend()
            dom.resume()
            times.append(time.perf_counter() - t)
        out["pair_p50"], out["pair_p99"] = pct(times, 50), pct(times, 99)
        infos = []
        for _ in range(50):
            t = time.perf_counter()
            dom.info()
            infos.append(time.perf_counter() - t)
        out["dominfo"] = statistics.median(infos)
        t = time.perf_counter()
        dom.destroy()
        out["destroy"] = time.perf_counter() - t
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--type", default="kvm")
    args = p.parse_args()
    conn = libvirt.open("qemu:///system")
    rounds = [one_round(conn, args.type, args.pairs) for _ in range(args.rounds)]
    print(json.dumps({k: statistics.median(r[k] for r in rounds) for k in rounds[0]}))


if __name__ == "__main__":
    main()
