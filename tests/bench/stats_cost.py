"""Metrics benchmark: the agent's CPU time for one collection pass over N running guests.

Starts N firmware-only QEMU guests (no kernel: SeaBIOS idles; KVM when /dev/kvm opens,
TCG otherwise), each with a 1 MiB raw virtio disk and a virtio balloon, connects one QMP
monitor per guest exactly as the QEMU driver does (:class:`drivers.qemu.monitor.Monitor`),
then times passes of :class:`drivers.qemu.stats.QemuStats` (all groups, all guests
concurrently) and of the whole publishing pass (collection + one ``metrics`` message per
guest and the host over memory://). Every QEMU is killed by PID at the end.

    .venv/bin/python -m tests.bench.stats_cost [-n 50] [--passes 30] [--accel auto|kvm|tcg]

Target: agent CPU per pass <= 50 ms for 50 guests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.metrics import MetricsPublisher
from drivers.base import DomainRef
from drivers.qemu.monitor import EventQueue, Monitor
from drivers.qemu.settings import QemuSettings
from drivers.qemu.stats import QemuStats, StatsTarget, host_stats
from virtbus.bus.factory import open_bus
from virtbus.domain import parse_domain_xml
from virtbus.protocol.events import DomainState


@dataclass(frozen=True)
class BenchSettings:
    spawn_parallel: int = 8  # QEMUs started at once
    connect_timeout: float = 30.0
    warmup_passes: int = 3
    kill_wait: float = 5.0


SETTINGS = BenchSettings()
LIBVIRT_PYTHON = "/usr/bin/python3"  # Debian's, where python3-libvirt is installed


def kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


@dataclass
class Guest:
    name: str
    proc: asyncio.subprocess.Process
    qmp: Path
    disk: Path
    monitor: Monitor | None = None


async def spawn(workdir: Path, index: int, accel: str, memory_mib: int) -> Guest:
    name = f"bench-{index:03d}"
    disk, qmp = workdir / f"{name}.raw", workdir / f"{name}.qmp"
    with open(disk, "wb") as fh:  # a sparse 1 MiB file, before QEMU opens it
        fh.truncate(1024 * 1024)
    argv = [
        "qemu-system-x86_64", "-name", name, "-accel", accel, "-machine", "q35",
        "-nodefaults", "-no-user-config", "-display", "none", "-m", str(memory_mib),
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-blockdev", f"driver=file,filename={disk},node-name=storage{index}",
        "-blockdev", f"driver=raw,file=storage{index},node-name=format{index}",
        "-device", f"virtio-blk-pci,drive=format{index},id=virtio-disk0",
        "-device", "virtio-balloon-pci,id=balloon0",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    guest = Guest(name, proc, qmp, disk)
    monitor = Monitor(name, qmp, QemuSettings(), EventQueue(1024))
    await monitor.connect(SETTINGS.connect_timeout, lambda: proc.returncode is None, 0.02)
    guest.monitor = monitor
    return guest


def target_of(guest: Guest, kvm: bool, memory_mib: int) -> StatsTarget:
    defn = parse_domain_xml(
        f"<domain type='{'kvm' if kvm else 'qemu'}'><name>{guest.name}</name>"
        f"<memory unit='MiB'>{memory_mib}</memory><os><type>hvm</type></os><devices>"
        f"<disk type='file' device='disk'><source file='{guest.disk}'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>"
    )
    assert guest.monitor is not None
    return StatsTarget(guest.name, DomainState.RUNNING, "booted", defn, guest.proc.pid,
                       guest.monitor.execute, kvm=kvm)  # fmt: skip


class _Driver:
    """Just what MetricsPublisher asks of a driver, over the benchmark's targets."""

    name = "qemu"

    def __init__(self, stats: QemuStats, targets: list[StatsTarget]) -> None:
        self._stats, self._targets = stats, targets

    async def stats(self, refs: Any = None, groups: Any = None) -> dict[str, dict[str, Any]]:
        return await self._stats.collect(self._targets, groups)

    async def host_stats(self) -> dict[str, Any]:
        return host_stats()

    def lookup(self, ref: str) -> DomainRef:
        return DomainRef(ref, "00000000-0000-0000-0000-000000000000")


async def time_passes(coro_factory: Any, passes: int) -> tuple[list[float], list[float]]:
    for _ in range(SETTINGS.warmup_passes):
        await coro_factory()
    cpu, wall = [], []
    for _ in range(passes):
        c0, w0 = time.process_time(), time.perf_counter()
        await coro_factory()
        cpu.append((time.process_time() - c0) * 1e3)
        wall.append((time.perf_counter() - w0) * 1e3)
    return cpu, wall


def summary(label: str, cpu: list[float], wall: list[float]) -> str:
    q = statistics.quantiles(cpu, n=10)
    return (
        f"{label}: agent CPU per pass median {statistics.median(cpu):.1f} ms "
        f"(mean {statistics.mean(cpu):.1f}, p10 {q[0]:.1f}, p90 {q[-1]:.1f}); "
        f"wall median {statistics.median(wall):.1f} ms"
    )


async def kill_all(guests: list[Guest]) -> None:
    for g in guests:
        if g.monitor is not None:
            await g.monitor.close()
        if g.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(g.proc.pid, signal.SIGKILL)
    for g in guests:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(g.proc.wait(), SETTINGS.kill_wait)


def lazy_qmp_log() -> None:
    """qemu.qmp's message hooks run ``str(msg)`` (indented JSON) for a debug log line even
    when debug logging is off; format only when it is on. Bench-only experiment."""
    from drivers.qemu import monitor

    def hook(direction: str) -> Any:
        def cb(self: Any, msg: Any) -> Any:
            if self.logger.isEnabledFor(logging.DEBUG):
                self.logger.debug("%s %s", direction, msg)
            return msg

        return cb

    monitor._Client._cb_outbound = hook("-->")  # type: ignore[method-assign]
    monitor._Client._cb_inbound = hook("<--")  # type: ignore[method-assign]


async def report(driver: Any, n: int, passes: int) -> None:
    """Time collection and publishing passes of ``driver`` (QemuDriver or the bare collector)."""
    sample = next(iter((await driver.stats()).values()))
    print(f"fields per guest: {len(sample)} ({', '.join(sorted(sample)[:6])}, ...)")
    cpu, wall = await time_passes(driver.stats, passes)
    print(summary("virtbus collection (all groups, all guests)", cpu, wall))
    bus = open_bus(f"memory://stats-bench-{os.getpid()}", src="bench")
    await bus.connect()
    publisher = MetricsPublisher(host="bench", driver=driver, bus=bus, interval=10.0)
    cpu2, wall2 = await time_passes(publisher.one_pass, passes)
    print(summary(f"publishing pass (collect + {n + 1} messages, memory://)", cpu2, wall2))
    await bus.close()
    verdict = "OK" if statistics.median(cpu2) <= 50.0 * n / 50 else "ABOVE TARGET"
    print(f"target <= 50 ms per pass for 50 guests: {verdict}")


async def via_driver(args: argparse.Namespace, kvm: bool) -> None:
    """The same guests defined and started through the QEMU driver, as the agent runs them."""
    from drivers.qemu import QemuDriver

    base = Path(tempfile.mkdtemp(prefix="vbdrv-"))
    driver = QemuDriver(base / "state", base / "run")
    await driver.open(lambda _event: None)
    gate = asyncio.Semaphore(SETTINGS.spawn_parallel)
    names = [f"bench-{i:03d}" for i in range(args.n)]

    async def one(name: str) -> None:
        disk = base / f"{name}.raw"
        with open(disk, "wb") as fh:
            fh.truncate(1024 * 1024)
        await driver.define(
            f"<domain type='{'kvm' if kvm else 'qemu'}'><name>{name}</name>"
            f"<memory unit='MiB'>{args.memory_mib}</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>"
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"
        )
        async with gate:
            await driver.start(name)

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(name) for name in names))
        print(f"{args.n} firmware guests via QemuDriver ({'kvm' if kvm else 'tcg'}, "
              f"{args.memory_mib} MiB) up in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        await asyncio.sleep(1.0)
        await report(driver, args.n, args.passes)
    finally:
        for name in names:
            with contextlib.suppress(Exception):
                await driver.destroy(name)
        await driver.close()
        shutil.rmtree(base, ignore_errors=True)


async def libvirt_baseline(args: argparse.Namespace, kvm: bool) -> None:
    """The same guests under the running libvirtd (Debian's python3-libvirt, see
    tests/bench/libvirt_stats.py): libvirtd's CPU per getAllDomainStats pass."""
    script = Path(__file__).with_name("libvirt_stats.py")
    workdir = Path(tempfile.mkdtemp(prefix="vblv-"))
    workdir.chmod(0o755)  # libvirt's QEMU may run as another user
    argv = [LIBVIRT_PYTHON, str(script), "-n", str(args.n), "--passes", str(args.passes),
            "--workdir", str(workdir), "--memory-mib", str(args.memory_mib)]  # fmt: skip
    if kvm:
        argv.append("--kvm")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if proc.returncode != 0:
        print(f"libvirt baseline failed: {err.decode().strip()[-500:]}")
        return
    got = json.loads(out.decode().strip().splitlines()[-1])
    daemon, client, wall = got["libvirtd_ms"], got["client_ms"], got["wall_ms"]
    print(f"libvirt: {args.n} guests up in {got['up_s']:.1f} s; {got['fields']} fields per guest")
    print(
        f"libvirt getAllDomainStats (same 6 groups): libvirtd CPU per pass mean "
        f"{statistics.mean(daemon):.1f} ms (10 ms ticks), client CPU median "
        f"{statistics.median(client):.1f} ms; wall median {statistics.median(wall):.1f} ms"
    )


async def main(args: argparse.Namespace) -> int:
    if args.lazy_qmp_log:
        lazy_qmp_log()
    kvm = args.accel == "kvm" or (args.accel == "auto" and kvm_usable())
    if args.via_driver:
        await via_driver(args, kvm)
    else:
        await bare(args, kvm)
    if args.libvirt:
        await libvirt_baseline(args, kvm)
    return 0


async def bare(args: argparse.Namespace, kvm: bool) -> None:
    accel = "kvm" if kvm else "tcg"
    workdir = Path(tempfile.mkdtemp(prefix="vbstat-"))
    guests: list[Guest] = []
    gate = asyncio.Semaphore(SETTINGS.spawn_parallel)

    async def one(i: int) -> None:
        async with gate:
            guests.append(await spawn(workdir, i, accel, args.memory_mib))

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(args.n)))
        print(f"{args.n} firmware guests ({accel}, {args.memory_mib} MiB) up in "
              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
        await asyncio.sleep(1.0)  # let SeaBIOS settle into its idle loop
        targets = [target_of(g, kvm, args.memory_mib) for g in guests]
        await report(_Driver(QemuStats(), targets), args.n, args.passes)
    finally:
        await kill_all(guests)
        shutil.rmtree(workdir, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=50, help="running guests")
    p.add_argument("--passes", type=int, default=30)
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--memory-mib", type=int, default=32)
    p.add_argument(
        "--libvirt", action="store_true", help=f"then the same under libvirtd ({LIBVIRT_PYTHON})"
    )
    p.add_argument(
        "--via-driver", action="store_true", help="define and start the guests with QemuDriver"
    )
    p.add_argument(
        "--lazy-qmp-log",
        action="store_true",
        help="experiment: stop qemu.qmp formatting every message for a disabled debug log",
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
