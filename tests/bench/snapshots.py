"""Internal snapshot and revert of a running 256 MiB TCG guest: virtbus vs the same QMP
commands issued bare (issue 16's benchmark; target: virtbus <= 1.1x bare).

The same test guest (kernel + busybox initramfs, ticking on its serial console) with one
64 MiB qcow2 disk runs twice, from the same command line (the QEMU driver's
``build_command`` of the same definition):

- **bare**: a QEMU of our own and qemu.qmp: ``snapshot-save`` as a job (wait for its
  ``JOB_STATUS_CHANGE`` to ``concluded``, read ``query-jobs`` for an error,
  ``job-dismiss``); revert: ``stop`` (wait for ``STOP``), ``snapshot-load`` as a job,
  ``cont`` (wait for ``RESUME``): what the driver sends;
- **virtbus**: a real ``virtbus-agent --driver qemu`` and the Python client over the real
  RabbitMQ: ``snapshot_create`` and ``snapshot_revert`` (a call each, answered when done).

Rounds alternate which side goes first; each round takes snapshot ``sN`` and reverts to
it. Medians of ``--rounds``. The agent's domain is destroyed and undefined and the bare
QEMU quit (then killed by PID) at the end.

    .venv/bin/python -m tests.bench.snapshots [--rounds 7] [--force]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.bench.common import add_force, check_load, compile_tree, device_drivers, qemu_argv_of
from tests.bench.migration_qemu import STARTED, BareQemu
from tests.e2e.test_qemu_snapshots import disk_xml, image
from tests.e2e.test_qemu_snapshots import guest_xml as snapshot_guest_xml
from tests.guests import build_test_guest
from tests.procs import BUS_URL, agent_process, unique_host
from virtbus.client import Client
from virtbus.guests.build import TestGuest

WAIT = 120.0  # s for one step (a bound: TCG on a loaded machine)


def guest_xml(guest: TestGuest, name: str, disk: Path, serial: Path) -> str:
    """The snapshot tests' guest (256 MiB, ticking) with one qcow2 disk."""
    return snapshot_guest_xml(guest, name, serial, disk_xml(disk))


async def ticking(serial: Path) -> None:
    """The guest's kernel and init are up: its console printed a tick."""
    async with asyncio.timeout(WAIT):
        while b"VIRTBUS-TICK" not in (serial.read_bytes() if serial.exists() else b""):
            await asyncio.sleep(0.2)


class BareSide:
    """One QEMU and the QMP sequence the driver sends, issued by hand."""

    def __init__(self, qemu: BareQemu) -> None:
        self.qemu = qemu
        self.waiters: list[tuple[Callable[[dict[str, Any]], bool], asyncio.Future[None]]] = []
        self.node = ""
        self.jobs = 0
        self.listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.qemu.start()
        self.listener = asyncio.create_task(self._listen(), name="bench-bare-events")
        await self.qemu.qmp.execute("cont")
        block: Any = await self.qemu.qmp.execute("query-block")
        self.node = next(b["inserted"]["node-name"] for b in block if "inserted" in b)

    async def _listen(self) -> None:
        async for msg in self.qemu.qmp.events:
            event: dict[str, Any] = dict(msg)
            for match, fut in list(self.waiters):
                if not fut.done() and match(event):
                    fut.set_result(None)

    def expect(self, match: Callable[[dict[str, Any]], bool]) -> asyncio.Future[None]:
        """Armed before the command that causes the event, so it cannot be missed."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append((match, fut))
        fut.add_done_callback(lambda f: self.waiters.remove((match, fut)))
        return fut

    async def job(self, cmd: str, tag: str) -> None:
        self.jobs += 1
        job_id = f"bench-{cmd}-{self.jobs}"
        ended = self.expect(
            lambda e: (
                e["event"] == "JOB_STATUS_CHANGE"
                and e["data"].get("id") == job_id
                and e["data"].get("status") == "concluded"
            )
        )
        await self.qemu.qmp.execute(cmd, {"job-id": job_id, "tag": tag, "vmstate": self.node,
                                          "devices": [self.node]})  # fmt: skip
        await asyncio.wait_for(ended, WAIT)
        jobs: Any = await self.qemu.qmp.execute("query-jobs")
        errors = [j.get("error") for j in jobs if j.get("id") == job_id and j.get("error")]
        await self.qemu.qmp.execute("job-dismiss", {"id": job_id})
        assert not errors, errors

    async def snapshot(self, tag: str) -> None:
        await self.job("snapshot-save", tag)

    async def revert(self, tag: str) -> None:
        stopped = self.expect(lambda e: e["event"] == "STOP")
        await self.qemu.qmp.execute("stop")
        await asyncio.wait_for(stopped, WAIT)
        await self.job("snapshot-load", tag)
        resumed = self.expect(lambda e: e["event"] == "RESUME")
        await self.qemu.qmp.execute("cont")
        await asyncio.wait_for(resumed, WAIT)

    async def close(self) -> None:
        if self.listener is not None:
            self.listener.cancel()
            await asyncio.gather(self.listener, return_exceptions=True)
        await self.qemu.quit()


async def timed(step: Awaitable[Any]) -> float:
    t0 = time.perf_counter()
    await step
    return time.perf_counter() - t0


def line(label: str, samples: list[float]) -> float:
    ms = [s * 1000 for s in samples]
    med = statistics.median(ms)
    print(f"  {label:18s} median {med:8.1f} ms   min {min(ms):8.1f}   max {max(ms):8.1f}")
    return med


async def run(rounds: int, base: Path) -> None:
    guest = build_test_guest()
    bare = BareSide(BareQemu(guest_xml(guest, "bench-snap-bare", image(base / "bare.qcow2"),
                                       base / "bare.serial"), base / "bare-run", False,
                             incoming=False))  # fmt: skip
    host = unique_host("snapbench")
    state = base / "agent"
    state.mkdir()
    times: dict[str, list[float]] = {k: [] for k in ("bare create", "virtbus create",
                                                      "bare revert", "virtbus revert")}  # fmt: skip
    async with agent_process(host, state, driver="qemu"):
        client = await Client.connect(BUS_URL, timeout=WAIT)
        dom = None
        try:
            xml = guest_xml(guest, "bench-snap", image(base / "vb.qcow2"), base / "vb.serial")
            dom = await client.host(host).define(xml)
            await dom.start()
            await bare.start()
            await asyncio.gather(ticking(base / "vb.serial"), ticking(base / "bare.serial"))
            same = device_drivers(qemu_argv_of("bench-snap")) == device_drivers(
                bare.qemu.launch.argv
            )
            assert same, "the two QEMUs run different devices"
            vb = dom

            async def vb_snapshot(tag: str) -> None:
                await vb.snapshot_create(f"<domainsnapshot><name>{tag}</name></domainsnapshot>")

            async def vb_revert(tag: str) -> None:
                await vb.snapshot_revert(tag)

            Step = Callable[[str], Awaitable[None]]
            sides: list[tuple[str, Step, Step]] = [
                ("bare", bare.snapshot, bare.revert),
                ("virtbus", vb_snapshot, vb_revert),
            ]
            for i in range(rounds):
                tag = f"s{i}"
                for label, create, revert in sides if i % 2 == 0 else sides[::-1]:
                    times[f"{label} create"].append(await timed(create(tag)))
                    times[f"{label} revert"].append(await timed(revert(tag)))
        finally:
            if dom is not None:
                with contextlib.suppress(Exception):
                    await dom.destroy()
                with contextlib.suppress(Exception):
                    await dom.undefine()
            await client.close()
            await bare.close()
            for qemu in STARTED:
                await qemu.quit()
    print(f"# internal snapshot + revert, running 256 MiB TCG guest, qcow2, {rounds} rounds")
    med = {k: line(k, v) for k, v in times.items()}
    for what in ("create", "revert"):
        ratio = med[f"virtbus {what}"] / med[f"bare {what}"]
        print(f"  virtbus / bare {what}: {ratio:.3f} (target <= 1.1)")


async def bench_main(
    argv: list[str] | None,
    doc: str,
    rounds: int,
    run: Callable[[int, Path], Awaitable[None]],
    before: Callable[[], None] = lambda: None,
) -> int:
    """What both guest-state benches do around their rounds: options, the load check,
    compiled bytecode, a temp dir removed afterwards, the load at the end."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    add_force(parser)
    args = parser.parse_args(argv)
    check_load(args.force)
    before()
    compile_tree()
    base = Path(tempfile.mkdtemp(prefix="virtbus-bench-"))
    try:
        await run(args.rounds, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    one, five, _ = os.getloadavg()
    print(f"load average at the end: {one:.2f} {five:.2f}")
    return 0


async def main(argv: list[str] | None = None) -> int:
    return await bench_main(argv, __doc__ or "", 7, run)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
