"""virtbus (through the bus, QEMU driver) side by side with libvirt, in one run.

Same firmware-only guest (128 MiB, 1 vCPU, q35; KVM when /dev/kvm opens, else TCG) on both,
with every device spelled out (tests/bench/common.firmware_guest_xml); the two QEMUs'
``-device`` lists are compared and the run refuses to report when they differ. Figures:
define, start, suspend+resume pair p50/p99, dominfo, destroy, medians over rounds, plus
the floors: a bare qemu.qmp stop/cont pair and a bare aio-pika request/reply pair. The
sides alternate round by round (virtbus, libvirt, the two floors, then the next round), so
a change in the machine's load hits both alike.

    .venv/bin/python -m tests.bench.vs_libvirt [--rounds 3] [--pairs 200] [--force]

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
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from tests.bench.bare_amqp import bare_roundtrips
from tests.bench.common import (
    add_force,
    check_load,
    device_drivers,
    firmware_guest_xml,
    qemu_argv_of,
)
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


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


async def virtbus_round(host: str, hv: str, pairs: int, devices: list[str]) -> dict[str, float]:
    bus = open_bus(BUS_URL, src="bench")
    await bus.connect()
    route, name, out = ops.agent_route(host), f"bench-vb-{uuid.uuid4().hex[:6]}", {}
    try:
        t = time.perf_counter()
        xml = firmware_guest_xml(name, hv, str(uuid.uuid4()))
        await bus.call(route, ops.DOMAIN_DEFINE, {"xml": xml})
        out["define"] = time.perf_counter() - t
        t = time.perf_counter()
        await bus.call(route, ops.DOMAIN_START, {"domain": name})
        out["start"] = time.perf_counter() - t
        devices[:] = device_drivers(qemu_argv_of(name))
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


def libvirt_round(hv: str, pairs: int) -> dict[str, Any] | None:
    """One round of tests/bench/libvirt_side.py (its own process: Debian's python3-libvirt)."""
    try:
        done = subprocess.run(
            ["/usr/bin/python3", str(HERE / "libvirt_side.py"), "--rounds", "1",
             "--pairs", str(pairs), "--type", hv],
            check=True, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"libvirt not measured: {exc}")
        return None
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def libvirt_ready() -> bool:
    """tests/bench/libvirt_setup.sh: libvirt 9.0 installed and libvirtd answering."""
    try:
        subprocess.run([str(HERE / "libvirt_setup.sh")], check=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"libvirt not measured: {exc}")
        return False
    return True


async def main(
    rounds: int, pairs: int, warmup: int, with_libvirt: bool, queue_type: str = "quorum"
) -> int:
    hv = "kvm" if kvm_usable() else "qemu"
    ours: list[dict[str, float]] = []
    theirs: list[dict[str, Any]] = []
    qmp: list[tuple[float, float]] = []
    amqp: list[tuple[float, float]] = []
    our_devices: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vbb") as state:
        async with agent_process(
            unique_host("bench"), Path(state), "--log-level", "WARNING",
            "--call-queue-type", queue_type, driver="qemu",
        ) as agent:  # fmt: skip
            for _ in range(warmup):  # caches warm on both sides (capabilities, firmware)
                await virtbus_round(agent.host, hv, pairs, our_devices)
                if with_libvirt:
                    libvirt_round(hv, pairs)
            for r in range(rounds):
                ours.append(await virtbus_round(agent.host, hv, pairs, our_devices))
                lv = libvirt_round(hv, pairs) if with_libvirt else None
                if lv is not None:
                    theirs.append(lv)
                    if lv["devices"] != our_devices:
                        print(f"device sets differ: virtbus {our_devices}, libvirt {lv['devices']}")
                        return 1
                qmp.append(await bare_qmp_pairs(hv, pairs))
                singles = await bare_roundtrips(2 * pairs, 110)
                pair_times = [singles[i] + singles[i + 1] for i in range(0, len(singles), 2)]
                amqp.append((pct(pair_times, 50), pct(pair_times, 99)))
                print(f"round {r + 1}/{rounds} done", flush=True)
    mine = {k: statistics.median(r[k] for r in ours) for k in ours[0]}
    other = {k: statistics.median(r[k] for r in theirs) for k in mine} if theirs else {}
    print(f"guest: firmware-only, 128 MiB, 1 vCPU, q35, {hv}; medians of {rounds} rounds; "
          f"{queue_type} call queue")  # fmt: skip
    print(f"-device on both sides: {', '.join(our_devices) or '(none)'}")
    print(f"{'figure':<22}{'virtbus':>12}{'libvirt':>12}{'ratio':>8}")
    for key, label in (
        ("define", "define"),
        ("start", "start"),
        ("pair_p50", "suspend+resume p50"),
        ("pair_p99", "suspend+resume p99"),
        ("dominfo", "dominfo"),
        ("destroy", "destroy"),
    ):
        lv_value = other.get(key)
        ratio = f"{mine[key] / lv_value:.2f}x" if lv_value else "-"
        lv_text = f"{lv_value * 1000:.2f} ms" if lv_value else "-"
        print(f"{label:<22}{mine[key] * 1000:>9.2f} ms{lv_text:>12}{ratio:>8}")
    for label, floor in (("bare qemu.qmp stop/cont", qmp), ("bare aio-pika req/reply", amqp)):
        p50 = statistics.median(f[0] for f in floor) * 1000
        p99 = statistics.median(f[1] for f in floor) * 1000
        print(f"floor: {label} pair p50 {p50:.2f} ms p99 {p99:.2f} ms")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=1, help="unreported rounds of each side")
    parser.add_argument("--call-queue-type", choices=("quorum", "classic"), default="quorum",
                        help="the agent's bus.call_queue_type")  # fmt: skip
    add_force(parser)
    args = parser.parse_args()
    check_load(args.force)
    sys.exit(asyncio.run(main(
        args.rounds, args.pairs, args.warmup, libvirt_ready(), args.call_queue_type
    )))  # fmt: skip
