"""The command path's cost in the agent, in figures a busy machine does not distort.

A real agent process (QEMU driver, the real RabbitMQ) runs the firmware-only guest of
vs_libvirt (``--driver test``: the test driver's guest, the bus path without QEMU); the
client sends ``--pairs`` suspend+resume pairs, then ``--infos`` dominfo
calls. For each window the agent's cost is reported as

- CPU time of the agent process per call (``/proc/PID/stat``, 10 ms ticks over the window);
- with ``--callgrind``: instructions the agent executed per call (valgrind's callgrind,
  collection switched on for the window only): load-independent, the figure to compare
  before/after a change;
- with ``--profile FILE``: the agent runs under cProfile, CPU time as its clock
  (tests/bench/cpu_profile.py; written at its exit), for where the time goes; print it
  with ``python -m pstats FILE``.

Wall-clock p50/p99 are printed too, for a quiet machine only.

    .venv/bin/python -m tests.bench.command_path [--pairs 200] [--infos 200] [--callgrind]
        [--driver qemu|test] [--call-queue-type quorum|classic] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.bench.common import add_force, check_load, firmware_guest_xml
from tests.procs import AGENT, BUS_URL, delete_queues, unique_host
from virtbus.bus.factory import open_bus
from virtbus.protocol import ops

TICK = os.sysconf("SC_CLK_TCK")
TEST_XML = (
    "<domain type='test'><name>{name}</name><memory>131072</memory>"
    "<os><type>hvm</type></os></domain>"
)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Callgrind:
    """callgrind_control on the agent: count instructions over a window only."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid, self.out = pid, out

    def _ctl(self, *args: str) -> str:
        done = subprocess.run(["callgrind_control", *args, str(self.pid)],
                              capture_output=True, text=True, check=True, timeout=300)  # fmt: skip
        return done.stdout

    def start(self) -> None:
        self._ctl("-z")
        self._ctl("-i", "on")

    def stop(self) -> int:
        """Instructions since start (the dump's ``totals``)."""
        self._ctl("-i", "off")
        before = set(self.out.parent.glob(self.out.name + "*"))
        self._ctl("-d")
        for _ in range(600):
            new = set(self.out.parent.glob(self.out.name + "*")) - before
            if new:
                break
            time.sleep(0.1)
        text = max(new, key=lambda p: p.stat().st_mtime).read_text()
        # "totals" is what ran since the zeroing; the "summary" line before it is 0 in a
        # dump taken with instrumentation switched off (it counted nothing: the old regex
        # took it, so every run printed 0 instructions/call).
        match = re.search(r"^totals: (\d+)", text, re.M) or re.search(
            r"^summary: (\d+)", text, re.M
        )
        assert match, "no totals in the callgrind dump"
        return int(match.group(1))


@contextlib.asynccontextmanager
async def agent(
    state: Path, command: list[str], driver: str, queue_type: str = "quorum", *extra: str
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    host = unique_host("cmdpath")
    log = open(state / "agent.log", "ab")  # noqa: SIM115 - closed below
    proc = await asyncio.create_subprocess_exec(
        *command, "--host", host, "--driver", driver, "--state-dir", str(state),
        "--bus", BUS_URL, "--log-level", "WARNING", "--heartbeat-interval", "5",
        "--metrics-interval", "3600", "--call-queue-type", queue_type, *extra,
        stdout=asyncio.subprocess.PIPE, stderr=log,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 600)
        assert b"ready" in line, f"agent did not start: {line!r}"
        yield host, proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 600)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()
        await delete_queues(f"virtbus.agent.{host}")


async def window(
    label: str,
    n: int,
    one: Callable[[], Awaitable[Any]],
    pid: int,
    grind: Callgrind | None,
    per: int,
) -> None:
    for _ in range(min(20, n)):  # warm the path
        await one()
    if grind is not None:
        grind.start()
    c0, times = cpu_seconds(pid), []
    for _ in range(n):
        t = time.perf_counter()
        await one()
        times.append(time.perf_counter() - t)
    cpu = (cpu_seconds(pid) - c0) / (n * per)
    instr = f", {grind.stop() / (n * per):,.0f} instructions/call" if grind is not None else ""
    q = statistics.quantiles(times, n=100)
    wall = f"wall p50 {q[49] * 1e3:.2f} ms p99 {q[98] * 1e3:.2f} ms"
    print(f"{label}: agent CPU {cpu * 1e3:.3f} ms/call{instr}; {wall} ({n} x {per} calls)",
          flush=True)  # fmt: skip


def agent_command(args: argparse.Namespace, grind_out: Path) -> list[str]:
    if args.callgrind:
        # Instrumentation off until callgrind_control -i on (with --collect-atstart=no
        # instead, -i on would count nothing: collection would stay off).
        return ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={grind_out}", *AGENT]  # fmt: skip
    if args.profile:
        out = str(Path(args.profile).resolve())
        return [sys.executable, "-m", "tests.bench.cpu_profile", out]
    return list(AGENT)


async def main(args: argparse.Namespace) -> int:
    hv = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"
    with tempfile.TemporaryDirectory(prefix="vbcp") as tmp:
        state = Path(tmp)
        grind_out = state / "callgrind.out"
        command = agent_command(args, grind_out)
        extra = ["--uvloop"] if args.uvloop else []
        async with agent(state, command, args.driver, args.call_queue_type, *extra) as (
            host,
            proc,
        ):
            bus = open_bus(BUS_URL, src="bench")
            await bus.connect()
            route, name = ops.agent_route(host), f"cmdpath-{uuid.uuid4().hex[:6]}"
            timeout = 600.0
            try:
                xml = (
                    firmware_guest_xml(name, hv, str(uuid.uuid4()))
                    if args.driver == "qemu"
                    else TEST_XML.format(name=name)
                )
                await bus.call(route, ops.DOMAIN_DEFINE, {"xml": xml}, timeout=timeout)
                await bus.call(route, ops.DOMAIN_START, {"domain": name}, timeout=timeout)
                grind = Callgrind(proc.pid, grind_out) if args.callgrind else None
                ref = {"domain": name}

                async def pair() -> None:
                    await bus.call(route, ops.DOMAIN_SUSPEND, ref, timeout=timeout)
                    await bus.call(route, ops.DOMAIN_RESUME, ref, timeout=timeout)

                async def info() -> None:
                    await bus.call(route, ops.DOMAIN_INFO, ref, timeout=timeout)

                await window("suspend/resume", args.pairs, pair, proc.pid, grind, 2)
                await window("dominfo", args.infos, info, proc.pid, grind, 1)
                await bus.call(route, ops.DOMAIN_DESTROY, ref, timeout=timeout)
                await bus.call(route, ops.DOMAIN_UNDEFINE, ref, timeout=timeout)
            finally:
                await bus.close()
    if args.profile:
        print(f"profile written to {args.profile}: python -m pstats {args.profile}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--infos", type=int, default=200)
    parser.add_argument("--driver", choices=("qemu", "test"), default="qemu")
    parser.add_argument("--callgrind", action="store_true", help="count the agent's instructions")
    parser.add_argument("--profile", metavar="FILE", help="run the agent under cProfile")
    parser.add_argument("--call-queue-type", choices=("quorum", "classic"), default="quorum")
    parser.add_argument("--uvloop", action="store_true", help="the agent runs on uvloop")
    add_force(parser)
    arguments = parser.parse_args()
    check_load(arguments.force)
    sys.exit(asyncio.run(main(arguments)))
