"""Orchestrated live migration through the CLI vs a bare QMP ``migrate``, in one run.

    .venv/bin/python -m tests.bench.migration [--runs 5]

Bare: two QEMU processes (TCG, 128 MiB, idle firmware-only guest), ``migrate-incoming``
on one, ``migrate`` on the other, timed to ``completed``; downtime from ``query-migrate``.
Orchestrated: ``virtbus migrate DOM --to B --wait`` end to end (CLI process, RabbitMQ,
scheduler, two agents), back and forth. With ``drivers/qemu/migration.py`` present the
agents use the QEMU driver and the same 128 MiB guest; without it they use the test driver
(``migration_time=0``), whose transfer is instant, so that figure *is* the orchestration
overhead to add to the bare migration. Target: overhead <= 150 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qemu.qmp import QMPClient

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _qemu_migrates() -> bool:
    """The QEMU driver implements the migration steps (drivers/qemu/migration.py landed)."""
    if not (ROOT / "drivers" / "qemu" / "migration.py").exists():
        return False
    from drivers.qemu import QemuDriver

    return hasattr(QemuDriver, "migrate_begin")


QEMU_MIGRATION = _qemu_migrates()
VHOST = f"virtbus-bench-mig-{os.getpid()}"
URL = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
XML = """<domain type='{type}'><name>bench</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices/></domain>"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def qemu(tmp: Path, name: str, *extra: str) -> tuple[asyncio.subprocess.Process, QMPClient]:
    sock = tmp / f"{name}-{time.monotonic_ns()}.qmp"
    proc = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", "pc,accel=tcg", "-m", "128", "-qmp", f"unix:{sock},server=on,wait=off",
        *extra, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    qmp = QMPClient(name)
    for attempt in range(200):
        try:
            await qmp.connect(str(sock))
            break
        except Exception:  # not listening yet
            if attempt == 199:
                proc.kill()
                await proc.wait()
                raise
            await asyncio.sleep(0.025)
    return proc, qmp


async def bare_once(tmp: Path) -> tuple[float, int]:
    src, sq = await qemu(tmp, "src")
    dst, dq = await qemu(tmp, "dst", "-incoming", "defer")
    try:
        await asyncio.sleep(0.5)  # let the firmware settle: an idle guest
        port = free_port()
        await dq.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        t0 = time.perf_counter()
        await sq.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        while True:
            info = await sq.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.002)
        elapsed = time.perf_counter() - t0
        assert info["status"] == "completed", info  # type: ignore[index]
        return elapsed, int(info.get("downtime", 0))  # type: ignore[union-attr]
    finally:
        for q in (sq, dq):
            await q.disconnect()
        for p in (src, dst):
            p.kill()
            await p.wait()


async def cli(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "virtbus"), "--bus", URL, *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"virtbus {' '.join(args)}: {err.decode()}")
    return out.decode()


async def in_process(runs: int, where: list[str]) -> list[float]:
    """``scheduler.migrate`` + follow from a client already connected: no CLI start-up.

    Follows with the scheduler's long poll (``scheduler.migration`` with ``wait``), so the
    figure is the scheduler's own time plus one bus round trip. Prints the median time
    spent in each journaled phase.
    """
    from virtbus.bus.factory import open_bus
    from virtbus.bus.topology import SCHEDULER_ROUTE
    from virtbus.protocol import ops

    bus = open_bus(URL, src="bench")
    await bus.connect()
    times: list[float] = []
    phases: dict[str, list[float]] = {}
    try:
        for i in range(runs):
            to = where[(runs + i) % 2]
            t0, w0 = time.perf_counter(), time.time()
            rec = await bus.call(
                SCHEDULER_ROUTE, ops.SCHEDULER_MIGRATE, {"domain": "bench", "to": to}, timeout=60
            )
            while rec["state"] not in ("completed", "failed", "cancelled"):
                rec = await bus.call(
                    SCHEDULER_ROUTE,
                    ops.SCHEDULER_MIGRATION,
                    {"id": rec["id"], "wait": 5.0},
                    timeout=60,
                )
            times.append(time.perf_counter() - t0)
            w1 = time.time()
            assert rec["state"] == "completed", rec
            hist = rec["history"]
            phases.setdefault("(locate+place)", []).append(rec["created"] - w0)
            phases.setdefault("(wait for a slot)", []).append(hist[0][1] - rec["created"])
            phases.setdefault("(end to client)", []).append(w1 - hist[-1][1])
            for (name, t), (_, t_next) in itertools.pairwise(hist):
                phases.setdefault(name, []).append(t_next - t)
    finally:
        await bus.close()
    breakdown = ", ".join(f"{name} {statistics.median(v) * 1e3:.0f}" for name, v in phases.items())
    print(f"per phase p50 (ms): {breakdown}")
    return times


async def orchestrated(tmp: Path, runs: int) -> tuple[list[float], list[float]]:
    driver = "qemu" if QEMU_MIGRATION else "test"
    procs = []
    try:
        for host in ("bench-a", "bench-b"):
            d = tmp / host
            d.mkdir()
            procs.append(
                await asyncio.create_subprocess_exec(
                    str(BIN / "virtbus-agent"),
                    "--host",
                    host,
                    "--driver",
                    driver,
                    "--state-dir",
                    str(d),
                    "--bus",
                    URL,
                    "--heartbeat-interval",
                    "0.5",
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            )
        procs.append(
            await asyncio.create_subprocess_exec(
                str(BIN / "virtbus-scheduler"),
                "--bus",
                URL,
                "--state-dir",
                str(tmp / "s"),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
        )
        for p in procs:
            assert p.stdout is not None
            await asyncio.wait_for(p.stdout.readline(), 30)
        await asyncio.sleep(1.5)  # heartbeats reach the scheduler
        xml = tmp / "bench.xml"
        xml.write_text(XML.format(type="qemu" if QEMU_MIGRATION else "test"))
        await cli("define", str(xml), "--host", "bench-a")
        await cli("start", "bench", "--host", "bench-a")
        times, where = [], ["bench-b", "bench-a"]
        for i in range(runs):
            t0 = time.perf_counter()
            await cli("migrate", "bench", "--to", where[i % 2], "--wait")
            times.append(time.perf_counter() - t0)
        client = await in_process(runs, where)
        floor = []
        for _ in range(runs):
            t0 = time.perf_counter()
            await cli("migrations")  # one CLI process, one scheduler call: the fixed cost
            floor.append(time.perf_counter() - t0)
        print(f"CLI floor (`virtbus migrations`: process start + connect + 1 call): "
              f"p50 {statistics.median(floor) * 1e3:.0f} ms")  # fmt: skip
        await cli("destroy", "bench", "--host", where[(2 * runs - 1) % 2])
        return times, client
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
            await p.wait()


async def amain(runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="virtbus-bench-") as t:
        tmp = Path(t)
        bare = [await bare_once(tmp) for _ in range(runs)]
        orch, client = await orchestrated(tmp, runs)
    bare_t = statistics.median(b[0] for b in bare)
    orch_t = statistics.median(orch)
    print(f"bare QMP migrate (128 MiB idle TCG guest): p50 {bare_t * 1e3:.0f} ms, "
          f"downtime p50 {statistics.median(b[1] for b in bare)} ms")  # fmt: skip
    client_t = statistics.median(client)
    print(f"scheduler op from a connected client (no CLI start-up): p50 {client_t * 1e3:.0f} ms,"
          f" overhead over bare {(client_t - bare_t) * 1e3:.0f} ms")  # fmt: skip
    kind = "QEMU driver" if QEMU_MIGRATION else "test driver, instant transfer"
    print(f"orchestrated `virtbus migrate --wait` ({kind}): p50 {orch_t * 1e3:.0f} ms")
    if QEMU_MIGRATION:
        print(f"overhead over bare: {(orch_t - bare_t) * 1e3:.0f} ms (target <= 150 ms)")
    else:
        print(f"orchestration overhead (CLI process + bus + 7 agent steps): {orch_t * 1e3:.0f} ms"
              " (target <= 150 ms); QEMU migration driver not present yet")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    runs = p.parse_args().runs
    ctl = ["rabbitmqctl"]
    subprocess.run([*ctl, "add_vhost", VHOST], check=True, capture_output=True)
    perms = ["set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*"]
    subprocess.run([*ctl, *perms], check=True, capture_output=True)
    try:
        asyncio.run(amain(runs))
    finally:
        subprocess.run([*ctl, "delete_vhost", VHOST], capture_output=True)


if __name__ == "__main__":
    main()
