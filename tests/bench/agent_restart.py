"""Agent restart with N running guests: time until every one is reattached (issue 4).

Starts N firmware-only guests (64 MiB, KVM when /dev/kvm is usable, else TCG), then, 3
times: the driver lets go of them (``close``: QEMU keeps running) and a fresh driver
``open``s the same state/run dirs — reload definitions, read status files, reconnect QMP,
``query-status`` each, scan /proc for unknown QEMUs. With ``--agent`` it also restarts a
real ``virtbus-agent`` process (SIGKILL, then spawn) and times spawn -> "ready", which
adds Python start-up and the bus connection. Prints the median of 3. Target: <= 1 s.

With ``--agent`` it also measures the agent's footprint (issue 19): the RSS of an idle
agent with no guest, and the RSS and CPU share of an agent holding the N guests (QMP
connections open, stats every 10 s) over ``--idle`` seconds after it is ready.

Timing starts only once the guests have settled (their firmware's boot is over: their CPU
use stops falling), since N guests booting at once on 2 cores saturate the machine; the
guests' own CPU use at that point is printed.

    .venv/bin/python -m tests.bench.agent_restart [--guests 50] [--agent] [--idle 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

from drivers.base import DriverEvent
from drivers.qemu import QemuDriver
from tests.bench.common import add_force, check_load, compile_tree
from virtbus.errors import VirtbusError

ROUNDS = 3


def kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def guest_xml(name: str, hv_type: str) -> str:
    return f"""<domain type='{hv_type}'>
  <name>{name}</name><uuid>{uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices/>
</domain>"""


async def time_driver_reopen(base: Path, count: int) -> list[float]:
    events: list[DriverEvent] = []
    times = []
    for _ in range(ROUNDS):
        driver = QemuDriver(base / "state", base / "run")
        start = time.perf_counter()
        await driver.open(events.append)
        times.append(time.perf_counter() - start)
        active = await driver.list_domains(include_inactive=False)
        assert len(active) == count, f"{len(active)} of {count} reattached"
        await driver.close()
    assert not any(e.reconciled for e in events), events  # nothing changed while away
    return times


async def time_agent_restart(base: Path) -> list[float]:
    from tests.procs import AGENT, BUS_URL, delete_queues, unique_host

    host = unique_host("bench")
    times = []
    log = open(base / "agent.log", "ab")  # noqa: SIM115  # closed below
    try:
        for _ in range(ROUNDS):
            start = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                *AGENT, "--host", host, "--driver", "qemu", "--state-dir", str(base / "state"),
                "--run-dir", str(base / "run"), "--bus", BUS_URL,
                stdout=asyncio.subprocess.PIPE, stderr=log,
            )  # fmt: skip
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            times.append(time.perf_counter() - start)
            assert b"ready" in line, line
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
    finally:
        log.close()
        await delete_queues(f"virtbus.agent.{host}")
    return times


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def footprint(base: Path, state: str, idle: float) -> tuple[int, int, float]:
    """An agent on ``state``: (RSS once ready, RSS after ``idle`` s, CPU share meanwhile)."""
    from tests.procs import AGENT, BUS_URL, delete_queues, terminate, unique_host

    host = unique_host("foot")
    log = open(base / "agent-footprint.log", "ab")  # noqa: SIM115  # closed below
    proc = await asyncio.create_subprocess_exec(
        *AGENT, "--host", host, "--driver", "qemu", "--state-dir", str(base / state),
        "--run-dir", str(base / "run"), "--bus", BUS_URL, "--metrics-interval", "10",
        stdout=asyncio.subprocess.PIPE, stderr=log,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"ready" in line, line
        ready_rss, cpu0, t0 = rss_kib(proc.pid), cpu_seconds(proc.pid), time.monotonic()
        await asyncio.sleep(idle)  # the idle window itself is what is measured
        share = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
        return ready_rss, rss_kib(proc.pid), share
    finally:
        await terminate(proc)
        log.close()
        await delete_queues(f"virtbus.agent.{host}")


def guest_pids(base: Path) -> list[int]:
    """The bench's QEMUs: every process whose command line names the bench's run dir."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(base).encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:  # gone meanwhile
                continue
    return pids


async def guests_share(pids: list[int], window: float = 2.0) -> float:
    """The guests' CPU use over ``window`` seconds, in cores."""

    def total() -> float:
        seconds = 0.0
        for pid in pids:
            with contextlib.suppress(OSError):
                seconds += cpu_seconds(pid)
        return seconds

    before, t0 = total(), time.monotonic()
    await asyncio.sleep(window)  # the sampling window itself
    return (total() - before) / (time.monotonic() - t0)


async def settle(base: Path, limit: float = 180.0) -> float:
    """Wait until the guests are past their firmware's boot (their CPU use stops falling).

    Booting N guests at once on 2 cores saturates the machine for a while; timing a
    reattach then measures the boot, not the reattach. Returns the settled share.
    """
    pids = guest_pids(base)
    deadline = time.monotonic() + limit
    share = await guests_share(pids)
    while time.monotonic() < deadline:
        later = await guests_share(pids)
        if later > share * 0.9 and later < 0.5 * len(os.sched_getaffinity(0)):
            return later
        share = later
    return share


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=20)
    parser.add_argument("--agent", action="store_true", help="also time a real agent process")
    parser.add_argument("--idle", type=float, default=30.0, help="footprint window (s)")
    add_force(parser)
    args = parser.parse_args()
    check_load(args.force)
    hv_type = "kvm" if kvm_usable() else "qemu"
    base = Path(tempfile.mkdtemp(prefix="virtbus-bench-restart-"))
    driver = QemuDriver(base / "state", base / "run")
    await driver.open(lambda _e: None)
    names = [f"bench-{i:02d}" for i in range(args.guests)]
    try:
        t0 = time.perf_counter()
        for name in names:
            await driver.define(guest_xml(name, hv_type))
            await driver.start(name)
        print(f"started {args.guests} firmware-only guests ({hv_type}, 64 MiB) "
              f"in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        await driver.close()
        t1 = time.perf_counter()
        share = await settle(base)
        print(f"guests settled after {time.perf_counter() - t1:.1f} s: they use "
              f"{share * 100:.0f}% of one core together")  # fmt: skip
        reopen = await time_driver_reopen(base, args.guests)
        print(f"driver reattach of {args.guests} guests: median "
              f"{statistics.median(reopen) * 1000:.0f} ms "
              f"(runs: {', '.join(f'{t * 1000:.0f}' for t in reopen)} ms; "
              "target <= 1000)")  # fmt: skip
        if args.agent:
            compile_tree()  # start-up as installed, not recompiling every module
            agent = await time_agent_restart(base)
            print(f"agent process restart -> ready with {args.guests} guests: median "
                  f"{statistics.median(agent) * 1000:.0f} ms "
                  f"(runs: {', '.join(f'{t * 1000:.0f}' for t in agent)} ms)")  # fmt: skip
            (base / "empty").mkdir()
            ready, _, _ = await footprint(base, "empty", 1.0)
            print(f"idle agent, no guests: RSS {ready / 1024:.1f} MiB")
            ready, after, share = await footprint(base, "state", args.idle)
            print(f"agent holding {args.guests} guests: RSS {ready / 1024:.1f} MiB when ready,"
                  f" {after / 1024:.1f} MiB after {args.idle:g} s; CPU {share * 100:.2f}% of"
                  " one core while idle (stats every 10 s)")  # fmt: skip
    finally:
        driver = QemuDriver(base / "state", base / "run")
        await driver.open(lambda _e: None)
        for name in names:
            with contextlib.suppress(VirtbusError):
                await driver.destroy(name)
        await driver.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
