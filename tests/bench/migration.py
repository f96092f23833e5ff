"""Orchestrated live migration through the CLI vs a bare QMP ``migrate``, in one run.

    .venv/bin/python -m tests.bench.migration [--runs 5] [--force]

Bare: two QEMU processes (TCG, 128 MiB, idle firmware-only guest); the clock starts before
the destination is spawned (the orchestrated side spawns its destination too), both sides
use the driver's migration parameters (no bandwidth cap: QEMU's default is 128 MiB/s;
downtime limit 300 ms), ``migrate-incoming`` on one, ``migrate`` on the other, timed to
``completed``; downtime from ``query-migrate``. Orchestrated: ``virtbus migrate DOM --to B
--wait`` end to end (CLI process, RabbitMQ, scheduler, two agents on the QEMU driver, the
same 128 MiB guest), back and forth, and ``scheduler.migrate`` from a connected client.
The sides alternate round by round. There is no fallback: without the QEMU driver's
migration steps the benchmark refuses to run. Target: client overhead <= bare + 30 ms.
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
from collections.abc import AsyncIterator
from pathlib import Path

from qemu.qmp import QMPClient

from tests.bench.common import add_force, check_load

BIN = Path(sys.executable).parent


def _require_qemu_migration() -> None:
    """No silent fallback to the test driver: its instant transfer measures nothing real."""
    from drivers.qemu import QemuDriver

    if not hasattr(QemuDriver, "migrate_begin"):
        sys.exit("the QEMU driver has no migration steps: nothing to measure")


VHOST = f"virtbus-bench-mig-{os.getpid()}"
URL = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
XML = """<domain type='qemu'><name>bench</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
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


# What drivers/qemu/migration.py sets on the source when no bandwidth is asked for.
PARAMETERS = {"max-bandwidth": 1 << 53, "downtime-limit": 300}


async def bare_once(tmp: Path) -> tuple[float, int]:
    src, sq = await qemu(tmp, "src")
    procs, clients = [src], [sq]
    try:
        await asyncio.sleep(0.5)  # let the firmware settle: an idle guest
        t0 = time.perf_counter()  # the orchestrated side spawns its destination too
        dst, dq = await qemu(tmp, "dst", "-incoming", "defer")
        procs.append(dst)
        clients.append(dq)
        port = free_port()
        await dq.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        await sq.execute("migrate-set-parameters", PARAMETERS)
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
        for q in clients:
            await q.disconnect()
        for p in procs:
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


async def in_process(to: str, phases: dict[str, list[float]]) -> float:
    """``scheduler.migrate`` + follow from a client already connected: no CLI start-up.

    Follows with the scheduler's long poll (``scheduler.migration`` with ``wait``), so the
    figure is the scheduler's own time plus one bus round trip; adds the time spent in
    each journaled phase to ``phases``.
    """
    from virtbus.bus.factory import open_bus
    from virtbus.bus.topology import SCHEDULER_ROUTE
    from virtbus.protocol import ops

    bus = open_bus(URL, src="bench")
    await bus.connect()
    try:
        t0, w0 = time.perf_counter(), time.time()
        rec = await bus.call(
            SCHEDULER_ROUTE, ops.SCHEDULER_MIGRATE, {"domain": "bench", "to": to}, timeout=60
        )
        while rec["state"] not in ("completed", "failed", "cancelled"):
            rec = await bus.call(
                SCHEDULER_ROUTE, ops.SCHEDULER_MIGRATION, {"id": rec["id"], "wait": 5.0}, timeout=60
            )
        elapsed = time.perf_counter() - t0
        w1 = time.time()
    finally:
        await bus.close()
    assert rec["state"] == "completed", rec
    hist = rec["history"]
    phases.setdefault("(locate+place)", []).append(rec["created"] - w0)
    phases.setdefault("(wait for a slot)", []).append(hist[0][1] - rec["created"])
    phases.setdefault("(end to client)", []).append(w1 - hist[-1][1])
    for (name, t), (_, t_next) in itertools.pairwise(hist):
        phases.setdefault(name, []).append(t_next - t)
    return elapsed


@contextlib.asynccontextmanager
async def cluster(tmp: Path) -> AsyncIterator[None]:
    """Two QEMU-driver agents and a scheduler on the bench's own vhost."""
    procs = []
    try:
        for host in ("bench-a", "bench-b"):
            d = tmp / host
            d.mkdir()
            procs.append(
                await asyncio.create_subprocess_exec(
                    str(BIN / "virtbus-agent"), "--host", host, "--driver", "qemu",
                    "--state-dir", str(d), "--bus", URL, "--heartbeat-interval", "0.5",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                )
            )  # fmt: skip
        procs.append(
            await asyncio.create_subprocess_exec(
                str(BIN / "virtbus-scheduler"), "--bus", URL, "--state-dir", str(tmp / "s"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            )
        )  # fmt: skip
        for p in procs:
            assert p.stdout is not None
            await asyncio.wait_for(p.stdout.readline(), 30)
        await asyncio.sleep(1.5)  # heartbeats reach the scheduler
        yield
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
            await p.wait()


async def amain(runs: int) -> None:
    bare: list[tuple[float, int]] = []
    orch: list[float] = []
    client: list[float] = []
    floor: list[float] = []
    phases: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="virtbus-bench-") as t:
        tmp = Path(t)
        async with cluster(tmp):
            xml = tmp / "bench.xml"
            xml.write_text(XML)
            await cli("define", str(xml), "--host", "bench-a")
            await cli("start", "bench", "--host", "bench-a")
            where = "bench-a"
            for _ in range(runs):  # round by round: bare, CLI, connected client, CLI floor
                bare.append(await bare_once(tmp))
                where = "bench-b" if where == "bench-a" else "bench-a"
                t0 = time.perf_counter()
                await cli("migrate", "bench", "--to", where, "--wait")
                orch.append(time.perf_counter() - t0)
                where = "bench-b" if where == "bench-a" else "bench-a"
                client.append(await in_process(where, phases))
                t0 = time.perf_counter()
                await cli("migrations")  # one CLI process, one scheduler call: the fixed cost
                floor.append(time.perf_counter() - t0)
            await cli("destroy", "bench", "--host", where)
    breakdown = ", ".join(f"{name} {statistics.median(v) * 1e3:.0f}" for name, v in phases.items())
    print(f"per phase p50 (ms): {breakdown}")
    print(f"CLI floor (`virtbus migrations`: process start + connect + 1 call): "
          f"p50 {statistics.median(floor) * 1e3:.0f} ms")  # fmt: skip
    bare_t = statistics.median(b[0] for b in bare)
    orch_t = statistics.median(orch)
    down = statistics.median(b[1] for b in bare)
    print(f"bare QMP migrate (128 MiB idle TCG guest, destination spawn included): "
          f"p50 {bare_t * 1e3:.0f} ms, downtime p50 {down} ms")  # fmt: skip
    client_t = statistics.median(client)
    print(f"scheduler op from a connected client (no CLI start-up): p50 {client_t * 1e3:.0f} ms,"
          f" overhead over bare {(client_t - bare_t) * 1e3:.0f} ms (target <= 30 ms)")  # fmt: skip
    print(f"orchestrated `virtbus migrate --wait` (QEMU driver): p50 {orch_t * 1e3:.0f} ms, "
          f"overhead over bare {(orch_t - bare_t) * 1e3:.0f} ms")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    add_force(p)
    args = p.parse_args()
    check_load(args.force)
    _require_qemu_migration()
    runs = args.runs
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
