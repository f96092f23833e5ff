"""virtbus (through the bus, QEMU driver) side by side with libvirt, in one run.

Same firmware-only guest (128 MiB, 1 vCPU, q35; KVM when /dev/kvm opens, else TCG) on both:
define, start, suspend+resume pair p50/p99, dominfo, destroy — medians over rounds — plus
the floors: a bare qemu.qmp stop/cont pair and a bare aio-pika request/reply pair.

    .venv/bin/python -m tests.bench.vs_libvirt [--rounds 3] [--pairs 200]

libvirt runs through Debian's python3 with python3-libvirt (tests/bench/libvirt_side.py);
tests/bench/libvirt_setup.sh installs and starts it when absent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from qemu.qmp import QMPClient

from tests.bench.bare_amqp import bare_roundtrips
from tests.procs import BUS_URL, agent_process, unique_host
from virtbus.bus.factory import open_bus
from virtbus.protocol import ops

HERE = Path(__file__).parent


def kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return False
    return True


def guest_xml(name: str, hv: str) -> str:
    return f"""<domain type='{hv}'><name>{name}</name><uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices><memballoon model='none'/></devices></domain>"""


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


async def virtbus_round(host: str, hv: str, pairs: int) -> dict[str, float]:
    bus = open_bus(BUS_URL, src="bench")
    await bus.connect()
    route, name, out = ops.agent_route(host), f"bench-vb-{uuid.uuid4().hex[:6]}", {}
    try:
        t = time.perf_counter()
        await bus.call(route, ops.DOMAIN_DEFINE, {"xml": guest_xml(name, hv)})
        out["define"] = time.perf_counter() - t
        t = time.perf_counter()
        await bus.call(route, ops.DOMAIN_START, {"domain": name})
        out["start"] = time.perf_counter() - t
        times = []
        for _ in range(pairs):
            t = time.perf_counter()
            await bus.call(route, ops.DOMAIN_SUSPEND, {"domain": name})
            await bus.call(route, ops.DOMAIN_RESUME, {"domain": name})
            times.append(time.perf_counter() - t)
        out["pair_p50"], out["pair_p99"] = pct(times, 50), pct(times, 99)
        infos = []
        for _ in range(50):
            t = time.perf_counter()
            await bus.call(route, ops.DOMAIN_INFO, {"domain": name})
            infos.append(time.perf_counter() - t)
        out["dominfo"] = statistics.median(infos)
        t = time.perf_counter()
        await bus.call(route, ops.DOMAIN_DESTROY, {"domain": name})
        out["destroy"] = time.perf_counter() - t
        await bus.call(route, ops.DOMAIN_UNDEFINE, {"domain": name})
    finally:
        await bus.close()
    return out


async def bare_qmp_pairs(hv: str, pairs: int) -> tuple[float, float]:
    """stop/cont pairs over one qemu.qmp connection to a QEMU started by hand."""
    with tempfile.TemporaryDirectory(prefix="vbq") as tmp:
        sock = Path(tmp) / "qmp.sock"
        proc = await asyncio.create_subprocess_exec(
            "qemu-system-x86_64",
            "-accel",
            "kvm" if hv == "kvm" else "tcg",
            "-machine",
            "q35",
            "-m",
            "128",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-S",
            "-qmp",
            f"unix:{sock},server=on,wait=off",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                if sock.exists():
                    break
                await asyncio.sleep(0.05)
            qmp = QMPClient("bench")
            await qmp.connect(str(sock))
            await qmp.execute("cont")
            times = []
            for _ in range(pairs):
                t = time.perf_counter()
                await qmp.execute("stop")
                await qmp.execute("cont")
                times.append(time.perf_counter() - t)
            await qmp.disconnect()
            return pct(times, 50), pct(times, 99)
        finally:
            proc.kill()
            await proc.wait()


def libvirt_figures(hv: str, rounds: int, pairs: int) -> dict[str, float] | None:
    try:
        subprocess.run([str(HERE / "libvirt_setup.sh")], check=True, timeout=600)
        done = subprocess.run(
            [
                "/usr/bin/python3",
                str(HERE / "libvirt_side.py"),
                "--rounds",
                str(rounds),
                "--pairs",
                str(pairs),
                "--type",
                hv,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=900,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"libvirt not measured: {exc}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


async def main(rounds: int, pairs: int) -> None:
    hv = "kvm" if kvm_usable() else "qemu"
    with tempfile.TemporaryDirectory(prefix="vbb") as state:
        async with agent_process(
            unique_host("bench"), Path(state), "--log-level", "WARNING", driver="qemu"
        ) as agent:
            results = [await virtbus_round(agent.host, hv, pairs) for _ in range(rounds)]
    ours = {k: statistics.median(r[k] for r in results) for k in results[0]}
    qmp = [await bare_qmp_pairs(hv, pairs) for _ in range(rounds)]
    amqp = []
    for _ in range(rounds):
        singles = await bare_roundtrips(2 * pairs, 110)
        pair_times = [singles[i] + singles[i + 1] for i in range(0, len(singles), 2)]
        amqp.append((pct(pair_times, 50), pct(pair_times, 99)))
    theirs = libvirt_figures(hv, rounds, pairs)
    print(f"guest: firmware-only, 128 MiB, 1 vCPU, q35, {hv}; medians of {rounds} rounds")
    print(f"{'figure':<22}{'virtbus':>12}{'libvirt':>12}{'ratio':>8}")
    for key, label in (
        ("define", "define"),
        ("start", "start"),
        ("pair_p50", "suspend+resume p50"),
        ("pair_p99", "suspend+resume p99"),
        ("dominfo", "dominfo"),
        ("destroy", "destroy"),
    ):
        lv = theirs.get(key) if theirs else None
        ratio = f"{ours[key] / lv:.2f}x" if lv else "-"
        lv_text = f"{lv * 1000:.2f} ms" if lv else "-"
        print(f"{label:<22}{ours[key] * 1000:>9.2f} ms{lv_text:>12}{ratio:>8}")
    for label, floor in (("bare qemu.qmp stop/cont", qmp), ("bare aio-pika req/reply", amqp)):
        p50 = statistics.median(f[0] for f in floor) * 1000
        p99 = statistics.median(f[1] for f in floor) * 1000
        print(f"floor: {label} pair p50 {p50:.2f} ms p99 {p99:.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.pairs))
