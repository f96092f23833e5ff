"""Container start and destroy through virtbus next to bare lxc, in one run.

A real ``virtbus-agent --driver lxc`` on RabbitMQ starts and destroys a busybox container
(``domain.start`` / ``domain.destroy`` over the bus, each returning once lxc's monitor
reported RUNNING / STOPPED); the bare side runs ``lxc-start -d`` / ``lxc-stop -k`` on the
very config the agent generated (copied to an LXCPATH of its own), same argv. Rounds
alternate which side goes first; medians and p90 of each, their differences and the
load average are printed. Targets: start <= bare + 30 ms, destroy <= bare + 30 ms.

    .venv/bin/python -m tests.bench.lxc_lifecycle [--rounds 20] [--libvirt] [--force]

``--libvirt`` also tries libvirt's own LXC driver (``virsh -c lxc:///system``) on the
same XML: it installs libvirt-daemon-driver-lxc and starts libvirtd through
tests/bench/libvirt_setup.sh when they are absent, and stops the libvirtd it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from drivers.lxc.driver import wait_exit
from tests.bench.common import add_force, check_load
from tests.e2e.lxc_support import clean_up_containers, container_xml
from tests.guests.lxc import build_lxc_rootfs
from tests.procs import BUS_URL, agent_process, delete_queues, unique_host
from virtbus.bus.factory import open_bus
from virtbus.protocol import ops

HERE = Path(__file__).parent


def lxc(*args: str) -> float:
    t = time.perf_counter()
    subprocess.run(list(args), check=True, capture_output=True, timeout=60)
    return time.perf_counter() - t


def summary(label: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p90 = ms[max(0, int(len(ms) * 0.9) - 1)]
    return f"{label:<28} median {statistics.median(ms):7.1f} ms   p90 {p90:7.1f} ms"


def bare_config(text: str, src_dir: Path, dst_dir: Path) -> str:
    """The agent's config with its log paths moved to the bare container's directory."""
    return text.replace(f"{src_dir}/", f"{dst_dir}/")


async def bench(rounds: int) -> dict[str, list[float]]:
    rootfs = build_lxc_rootfs()
    base = Path(tempfile.mkdtemp(prefix="vb-lxc-bench-"))
    host, name = unique_host("bench-lxc"), f"bvb{uuid.uuid4().hex[:6]}"
    bare_name, bare_path = f"{name}-bare", base / "bare"
    labels = ("virtbus start", "bare lxc-start -d", "virtbus destroy", "bare lxc-stop -k",
              "virtbus domain.state (floor)")  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in labels}
    options = [f"allowed_roots={rootfs.cache_dir}", "reconcile_interval=2"]
    flags = [x for o in options for x in ("--driver-option", o)]
    bus = open_bus(BUS_URL, src="bench")
    await bus.connect()
    try:
        async with agent_process(host, base, *flags, driver="lxc", keep_queue=True):
            route = ops.agent_route(host)
            await bus.call(route, ops.DOMAIN_DEFINE, {"xml": container_xml(name, rootfs)})
            await bus.call(route, ops.DOMAIN_START, {"domain": name})  # writes the config
            await bus.call(route, ops.DOMAIN_DESTROY, {"domain": name})
            src_dir = base / "lxc" / name
            (bare_path / bare_name).mkdir(parents=True)
            (bare_path / bare_name / "config").write_text(
                bare_config((src_dir / "config").read_text(), src_dir, bare_path / bare_name)
            )
            pidfile = bare_path / bare_name / "monitor.pid"

            async def virtbus_round() -> None:
                t = time.perf_counter()
                await bus.call(route, ops.DOMAIN_START, {"domain": name})
                times["virtbus start"].append(time.perf_counter() - t)
                t = time.perf_counter()
                await bus.call(route, ops.DOMAIN_DESTROY, {"domain": name})
                times["virtbus destroy"].append(time.perf_counter() - t)

            async def bare_round() -> None:
                times["bare lxc-start -d"].append(await asyncio.to_thread(
                    lxc, "lxc-start", "-P", str(bare_path), "-n", bare_name, "-d", "-p",
                    str(pidfile), "--", "/init"))  # fmt: skip
                monitor = int(pidfile.read_text())
                times["bare lxc-stop -k"].append(await asyncio.to_thread(
                    lxc, "lxc-stop", "-P", str(bare_path), "-n", bare_name, "-k"))  # fmt: skip
                await wait_exit(monitor, 30)  # untimed: before the next start may run

            for _ in range(rounds):  # the floor: a call that touches no container
                t = time.perf_counter()
                await bus.call(route, ops.DOMAIN_STATE, {"domain": name})
                times["virtbus domain.state (floor)"].append(time.perf_counter() - t)
            for i in range(rounds):
                pair = (virtbus_round, bare_round)
                first, second = pair if i % 2 else pair[::-1]
                await first()
                await second()
            await bus.call(route, ops.DOMAIN_UNDEFINE, {"domain": name})
    finally:
        await bus.close()
        await delete_queues(f"virtbus.agent.{host}")
        clean_up_containers(base)
        for hierarchy in Path("/sys/fs/cgroup").glob("*"):
            for d in hierarchy.glob(f"lxc.*.{name}*"):
                with contextlib.suppress(OSError):
                    d.rmdir()
        shutil.rmtree(base, ignore_errors=True)
    return times


def _pids(daemon: str) -> list[str]:
    found = subprocess.run(["pgrep", "-x", daemon], capture_output=True, text=True, check=False)
    return found.stdout.split()


def libvirt_side(rounds: int) -> tuple[dict[str, list[float]], str]:
    """libvirt's LXC driver on the same XML, or why it cannot run here."""
    started: list[str] = []
    if subprocess.run(["virsh", "-c", "lxc:///system", "version"], capture_output=True,
                      check=False).returncode != 0:  # fmt: skip
        if not Path("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/"
                    "libvirt_driver_lxc.so").exists():  # fmt: skip
            subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                            "libvirt-daemon", "libvirt-daemon-driver-lxc"], check=True,
                           capture_output=True, timeout=600)  # fmt: skip
        running = {d: _pids(d) for d in ("libvirtd", "virtlogd")}
        subprocess.run(["bash", str(HERE / "libvirt_setup.sh")], check=True, timeout=120)
        started = [p for d, before in running.items() for p in _pids(d) if p not in before]
    rootfs = build_lxc_rootfs()
    work = Path(tempfile.mkdtemp(prefix="vb-lxc-libvirt-"))
    root = work / "rootfs"
    shutil.copytree(rootfs.path, root, symlinks=True)  # libvirt writes into the root
    name = f"blv{uuid.uuid4().hex[:6]}"
    xml = container_xml(name, rootfs).replace(str(rootfs.path), str(root))
    (work / "d.xml").write_text(xml.replace("<readonly/>", ""))
    virsh = ["virsh", "-c", "lxc:///system"]
    times: dict[str, list[float]] = {"libvirt start": [], "libvirt destroy": []}
    why = ""
    try:
        subprocess.run([*virsh, "define", str(work / "d.xml")], check=True, capture_output=True)
        for _ in range(rounds):
            t = time.perf_counter()
            r = subprocess.run([*virsh, "start", name], capture_output=True, text=True,
                               check=False)  # fmt: skip
            if r.returncode != 0:
                why = r.stderr.strip().splitlines()[-1]
                break
            times["libvirt start"].append(time.perf_counter() - t)
            times["libvirt destroy"].append(lxc(*virsh, "destroy", name))
    finally:
        subprocess.run([*virsh, "undefine", name], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
        for pid in started:  # only the daemons this run started
            os.kill(int(pid), 15)
    return times, why


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--libvirt", action="store_true", help="also libvirt's LXC driver")
    add_force(p)
    args = p.parse_args()
    check_load(args.force)
    load_before = os.getloadavg()
    times = asyncio.run(bench(args.rounds))
    load_after = os.getloadavg()
    print(f"{args.rounds} alternating rounds, busybox container, 64 MiB, read-only root")
    for label, values in times.items():
        print(summary(label, values))
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    for op, bare in (("start", "bare lxc-start -d"), ("destroy", "bare lxc-stop -k")):
        delta = med[f"virtbus {op}"] - med[bare]
        verdict = "met" if delta <= 30 else "MISSED"
        print(f"virtbus {op} - bare: {delta:+.1f} ms (target <= +30 ms: {verdict})")
    print("load average before {:.2f} {:.2f} {:.2f}, after {:.2f} {:.2f} {:.2f}".format(
        *load_before, *load_after))  # fmt: skip
    if args.libvirt:
        lv, why = libvirt_side(min(args.rounds, 10))
        for label, values in lv.items():
            if values:
                print(summary(label, values))
        if why:
            print(f"libvirt's LXC driver could not start the container: {why}")


if __name__ == "__main__":
    main()
