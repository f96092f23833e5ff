"""The libvirt half of the side-by-side benchmark (run with Debian's python3 + python3-libvirt).

Prints one JSON object: medians over rounds of define, start, suspend+resume pair p50/p99,
dominfo, destroy (seconds), for a firmware-only guest on ``qemu:///system``, and the
``-device`` drivers of the QEMU libvirt started (the caller checks both sides run the same
device set). vs_libvirt.py runs it with ``--rounds 1`` once per round, alternating with
virtbus's round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

import libvirt  # type: ignore[import-not-found]

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # Debian's python: the repo's root
from tests.bench.common import device_drivers, firmware_guest_xml


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


def device_drivers_of(name: str) -> list[str]:
    """The ``-device`` drivers of the QEMU libvirt runs for ``name``."""
    with open(f"/run/libvirt/qemu/{name}.pid") as fh:
        pid = int(fh.read().strip())
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return device_drivers(fh.read().decode().split("\0"))


def one_round(
    conn: libvirt.virConnect, hv: str, pairs: int, devices: list[str]
) -> dict[str, float]:
    name = f"bench-lv-{uuid.uuid4().hex[:6]}"
    out: dict[str, float] = {}
    t = time.perf_counter()
    dom = conn.defineXML(firmware_guest_xml(name, hv, str(uuid.uuid4())))
    out["define"] = time.perf_counter() - t
    try:
        t = time.perf_counter()
        dom.create()
        out["start"] = time.perf_counter() - t
        devices[:] = device_drivers_of(name)
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
    devices: list[str] = []
    rounds = [one_round(conn, args.type, args.pairs, devices) for _ in range(args.rounds)]
    result: dict[str, object] = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    result["devices"] = devices
    print(json.dumps(result))


if __name__ == "__main__":
    main()
