"""Migration benchmark at the driver level: bare QMP vs the QEMU driver's v3 steps.

An idle firmware-only guest (128 MiB, q35; KVM when /dev/kvm opens, TCG otherwise) is
migrated back and forth on 127.0.0.1, in the same run:

- **bare**: what any tool would do with two QEMU processes and qemu.qmp: spawn the
  destination (``-incoming defer``, same argv the driver builds), ``events`` capability on
  both, ``migrate-incoming``, ``migrate``, wait for the MIGRATION ``completed`` event,
  ``cont`` on the destination, ``quit`` the source;
- **driver**: :class:`drivers.qemu.QemuDriver` ``migrate_begin`` / ``migrate_prepare`` /
  ``migrate_perform`` / (wait for the ``migration`` completed event) / ``migrate_finish``
  / ``migrate_confirm``, between two driver instances (two "hosts").

Total = from the first step (the destination's spawn included) until the guest runs at
the destination and the source QEMU is gone; downtime is query-migrate's ``downtime``.
Medians of ``--rounds`` (5). Every QEMU is killed by PID at the end.

    .venv/bin/python -m tests.bench.migration_qemu [--rounds 5] [--accel auto|kvm|tcg]
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
import uuid as uuidlib
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from drivers.base import DriverEvent, MigrationParams
from drivers.qemu import QemuDriver
from drivers.qemu.argv import QemuPaths, build_command
from drivers.qemu.migration import tcp_uri
from drivers.qemu.process import QemuProcess, spawn
from drivers.qemu.settings import QemuSettings
from tests.bench.common import add_force, check_load
from tests.procs import qemu_test_settings
from virtbus.domain import parse_domain_xml

STARTED: list[BareQemu] = []
CONNECT_TIMEOUT = 10.0  # s, QMP socket of a fresh QEMU
STEP_TIMEOUT = 60.0  # s, one migration


def guest_xml(hv_type: str) -> str:
    return f"""<domain type='{hv_type}'>
  <name>bench-mig</name><uuid>{uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices/>
</domain>"""


def kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


# --- bare QMP ----------------------------------------------------------------------------
class BareQemu:
    def __init__(self, xml: str, run_dir: Path, kvm: bool, incoming: bool) -> None:
        defn = parse_domain_xml(xml)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.launch = build_command(defn, QemuPaths(run_dir), kvm_available=kvm,
                                    incoming="defer" if incoming else None)  # fmt: skip
        self.uuid = defn.uuid
        self.qmp = QMPClient("bench")
        self.process: QemuProcess | None = None
        STARTED.append(self)  # every one is quit (then killed by PID) at the end

    async def start(self) -> None:
        sock = Path(self.launch.qmp_socket)
        sock.unlink(missing_ok=True)
        self.process = await spawn(list(self.launch.argv), uuid=self.uuid,
                                   logfile=Path(self.launch.logfile))  # fmt: skip
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            try:
                await self.qmp.connect(str(sock))
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.005)

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            await self.qmp.execute("quit")
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()  # EOFError after quit is expected
        if self.process is not None:
            await self.process.kill(QemuSettings())


async def bare_round(
    xml: str, src: BareQemu, run_dir: Path, kvm: bool
) -> tuple[float, int, BareQemu]:
    caps = {"capabilities": [{"capability": "events", "state": True}]}
    t0 = time.perf_counter()
    dst = BareQemu(xml, run_dir, kvm, incoming=True)
    await dst.start()
    await dst.qmp.execute("migrate-set-capabilities", caps)
    await src.qmp.execute("migrate-set-capabilities", caps)
    await src.qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 53})
    uri = tcp_uri("127.0.0.1", _free_port())
    await dst.qmp.execute("migrate-incoming", {"uri": uri})
    loop = asyncio.get_running_loop()
    done: dict[BareQemu, asyncio.Future[str]] = {
        src: loop.create_future(),
        dst: loop.create_future(),
    }

    async def listen(side: BareQemu) -> None:
        async for msg in side.qmp.events:
            event: dict[str, Any] = dict(msg)
            status = str(event.get("data", {}).get("status", ""))
            if event["event"] == "MIGRATION" and status in ("completed", "failed"):
                done[side].set_result(status)
                return

    listeners = [asyncio.create_task(listen(side), name="bench-bare-listen") for side in done]
    await src.qmp.execute("migrate", {"uri": uri})
    # the destination must have loaded everything before the source goes away
    statuses = await asyncio.wait_for(asyncio.gather(*done.values()), STEP_TIMEOUT)
    assert statuses == ["completed", "completed"], statuses
    info: dict[str, Any] = dict(await src.qmp.execute("query-migrate"))  # type: ignore[call-overload]
    await dst.qmp.execute("cont")
    await src.quit()
    total = time.perf_counter() - t0
    for listener in listeners:
        listener.cancel()
    await asyncio.gather(*listeners, return_exceptions=True)
    return total, int(info.get("downtime", -1)), dst


def _free_port() -> int:
    from drivers.qemu.migration import free_port

    return free_port("127.0.0.1")


async def bench_bare(xml: str, base: Path, kvm: bool, rounds: int) -> list[tuple[float, int]]:
    src = BareQemu(xml, base / "bare-0", kvm, incoming=False)
    await src.start()
    await src.qmp.execute("cont")
    out = []
    try:
        for i in range(rounds):
            total, downtime, src = await bare_round(xml, src, base / f"bare-{i + 1}", kvm)
            out.append((total, downtime))
    finally:
        for qemu in STARTED:
            await qemu.quit()
    return out


# --- the driver ----------------------------------------------------------------------------
async def bench_driver(xml: str, base: Path, rounds: int) -> list[tuple[float, int]]:
    drivers = [QemuDriver(base / f"drv-{h}" / "state", base / f"drv-{h}" / "run",
                          qemu_test_settings(base / h)) for h in "ab"]  # fmt: skip
    completed: list[asyncio.Future[dict[str, Any]]] = []

    def sink(event: DriverEvent) -> None:
        ended = event.event == "migration" and event.data.get("status") in ("completed", "failed")
        if ended and completed and not completed[-1].done():
            completed[-1].set_result(event.data)

    for drv in drivers:
        await drv.open(sink)
    ref = await drivers[0].define(xml)
    await drivers[0].start(ref.name)
    params = MigrationParams()
    out = []
    try:
        for i in range(rounds):
            src, dst = drivers[i % 2], drivers[(i + 1) % 2]
            completed.append(asyncio.get_running_loop().create_future())
            t0 = time.perf_counter()
            begun = await src.migrate_begin(ref.name)
            uri = await dst.migrate_prepare(begun, params)
            await src.migrate_perform(ref.name, uri, params)
            status = await asyncio.wait_for(completed[-1], STEP_TIMEOUT)
            assert status["status"] == "completed", status
            await dst.migrate_finish(ref.name, True)
            await src.migrate_confirm(ref.name, True)
            out.append((time.perf_counter() - t0, int(status.get("downtime_ms") or -1)))
    finally:
        for drv in drivers:
            if drv.lookup(ref.name) is not None:
                with contextlib.suppress(Exception):
                    await drv.destroy(ref.name)
            await drv.close()
    return out


def summary(label: str, samples: list[tuple[float, int]]) -> tuple[float, float]:
    totals = [t * 1000 for t, _ in samples]
    downs = [float(d) for _, d in samples]
    med_t, med_d = statistics.median(totals), statistics.median(downs)
    print(f"{label:7s} total median {med_t:7.1f} ms (min {min(totals):.1f}, max {max(totals):.1f})"
          f"   downtime median {med_d:5.1f} ms   rounds {len(samples)}")  # fmt: skip
    return med_t, med_d


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    add_force(parser)
    args = parser.parse_args(argv)
    check_load(args.force)
    kvm = kvm_usable() if args.accel == "auto" else args.accel == "kvm"
    xml = guest_xml("kvm" if kvm else "qemu")
    base = Path(tempfile.mkdtemp(prefix="virtbus-bench-mig-"))
    try:
        print(f"# idle firmware-only guest, 128 MiB, {'KVM' if kvm else 'TCG'}, 127.0.0.1")
        bare = await bench_bare(xml, base, kvm, args.rounds)
        driver = await bench_driver(xml, base, args.rounds)
        bt, bd = summary("bare", bare)
        dt, dd = summary("driver", driver)
        print(f"driver overhead over bare: {dt - bt:+.1f} ms total, {dd - bd:+.1f} ms downtime")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
