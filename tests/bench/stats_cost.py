"""Metrics benchmark: a real agent's CPU for its metrics passes over N running guests.

The shipped code end to end: a ``virtbus-agent`` process on the QEMU driver and the real
RabbitMQ, N firmware-only guests (no kernel: SeaBIOS idles; KVM when /dev/kvm opens, TCG
otherwise; each with a 1 MiB raw virtio disk and a virtio balloon) defined and started
through the bus, ``--metrics-interval`` passes as the agent runs them (all groups, one
``metrics`` message per guest and the host on ``virtbus.metrics``). A subscriber counts
every pass's messages and reads, per pass:

- the agent's own figures in ``metrics.host`` (``pass_cpu_ms``: CPU spent collecting);
- the agent process's whole CPU time (``/proc/PID/stat``) from one host message to the next:
  collection, publishing, and everything else the agent did in that interval.

    .venv/bin/python -m tests.bench.stats_cost [-n 50] [--passes 20] [--interval 2] [--force]

Target: agent CPU per pass <= 50 ms for 50 guests. ``--libvirt`` adds libvirtd's CPU per
``getAllDomainStats`` pass over the same guests (tests/bench/libvirt_stats.py), after ours.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.bench.common import add_force, check_load
from tests.procs import BUS_URL, agent_process, unique_host
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import METRICS_EXCHANGE
from virtbus.errors import VirtbusError
from virtbus.protocol import ops
from virtbus.protocol.events import routing_word

LIBVIRT_PYTHON = "/usr/bin/python3"  # Debian's, where python3-libvirt is installed
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class BenchSettings:
    spawn_parallel: int = 8  # guests started at once
    warmup_passes: int = 2
    call_timeout: float = 120.0


SETTINGS = BenchSettings()


def kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def process_cpu_ms(pid: int) -> float:
    """utime + stime of ``pid`` (clock ticks, usually 10 ms)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / TICK


def guest_xml(name: str, disk: Path, kvm: bool, memory_mib: int) -> str:
    return (
        f"<domain type='{'kvm' if kvm else 'qemu'}'><name>{name}</name>"
        f"<memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
        "<memballoon model='virtio'/></devices></domain>"
    )


def summary(label: str, values: list[float]) -> str:
    q = statistics.quantiles(values, n=10) if len(values) > 1 else [values[0]] * 9
    return (
        f"{label}: median {statistics.median(values):.1f} ms "
        f"(mean {statistics.mean(values):.1f}, p10 {q[0]:.1f}, p90 {q[-1]:.1f})"
    )


async def ours(args: argparse.Namespace, kvm: bool, workdir: Path) -> None:
    host = unique_host("stats")
    names = [f"bench-{i:03d}" for i in range(args.n)]
    async with agent_process(
        host, workdir, "--log-level", "WARNING", "--heartbeat-interval", "2",
        "--metrics-interval", str(args.interval), driver="qemu",
    ) as agent:  # fmt: skip
        bus = open_bus(BUS_URL, src="bench")
        await bus.connect()
        route, gate = ops.agent_route(host), asyncio.Semaphore(SETTINGS.spawn_parallel)

        async def one(name: str) -> None:
            disk = workdir / f"{name}.raw"
            with open(disk, "wb") as fh:  # a sparse 1 MiB file, before QEMU opens it
                fh.truncate(1024 * 1024)
            xml = guest_xml(name, disk, kvm, args.memory_mib)
            await bus.call(route, ops.DOMAIN_DEFINE, {"xml": xml}, timeout=SETTINGS.call_timeout)
            async with gate:
                await bus.call(
                    route, ops.DOMAIN_START, {"domain": name}, timeout=SETTINGS.call_timeout
                )

        try:
            await asyncio.gather(*(one(name) for name in names))
            print(f"{args.n} firmware guests ({'kvm' if kvm else 'tcg'}, {args.memory_mib} MiB) "
                  f"running on agent {host} (QEMU driver, RabbitMQ)")  # fmt: skip
            sub = await bus.subscribe(METRICS_EXCHANGE, [f"{routing_word(host)}.#"])
            collect, whole, fields = [], [], 0
            per_domain, last_cpu, seen = 0, None, 0
            async for env in sub:
                if env.op != "metrics.host":
                    per_domain += 1
                    fields = max(fields, len(env.body.get("stats", {})))
                    continue
                cpu = process_cpu_ms(agent.proc.pid)
                seen += 1
                if seen > SETTINGS.warmup_passes and last_cpu is not None:
                    if per_domain != args.n:
                        sys.exit(f"a pass published {per_domain} domain messages, not {args.n}")
                    collect.append(float(env.body["pass_cpu_ms"]))
                    whole.append(cpu - last_cpu)
                last_cpu, per_domain = cpu, 0
                if len(whole) >= args.passes:
                    break
            await sub.close()
            print(f"fields per guest: {fields}; passes measured: {len(whole)}")
            print(summary("agent CPU collecting (its pass_cpu_ms)", collect))
            label = (f"agent process CPU per {args.interval:g} s interval "
                     f"(collect + {args.n + 1} messages + idle work, 10 ms ticks)")  # fmt: skip
            print(summary(label, whole))
            verdict = "OK" if statistics.median(whole) <= 50.0 * args.n / 50 else "ABOVE TARGET"
            print(f"target <= 50 ms per pass for 50 guests: {verdict}")
        finally:
            for name in names:
                try:
                    await bus.call(route, ops.DOMAIN_DESTROY, {"domain": name}, timeout=30)
                except VirtbusError as exc:  # a guest that never started
                    print(f"destroy {name}: {exc}")
            await bus.close()


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
    kvm = args.accel == "kvm" or (args.accel == "auto" and kvm_usable())
    workdir = Path(tempfile.mkdtemp(prefix="vbstat-"))
    try:
        await ours(args, kvm, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.libvirt:
        await libvirt_baseline(args, kvm)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=50, help="running guests")
    p.add_argument("--passes", type=int, default=20)
    p.add_argument("--interval", type=float, default=2.0, help="the agent's --metrics-interval")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--memory-mib", type=int, default=32)
    p.add_argument(
        "--libvirt", action="store_true", help=f"then the same under libvirtd ({LIBVIRT_PYTHON})"
    )
    add_force(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    check_load(arguments.force)
    sys.exit(asyncio.run(main(arguments)))
