"""Agents killed (SIGKILL) mid-migration and restarted: the guest ends up in one place.

Real QEMU TCG guests (the test kernel), two real agents and a real scheduler on a private
vhost; the migration is slowed with ``--bandwidth`` so that it lasts seconds.

- Destination killed: the source finishes streaming into the orphaned incoming QEMU, the
  scheduler cannot finish there and rolls back (the source stays paused: the destination
  might have resumed it); the restarted destination agent keeps that QEMU transient and
  paused, the scheduler's pending cleanup kills it and only then resumes the source.
- Source killed: QEMU keeps migrating without its agent; the restarted agent reattaches
  the outgoing job from ``query-migrate`` and the scheduler resolves the migration.

Afterwards the guest runs on exactly one host, still ticking, and the other host has
neither a QEMU nor a definition of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.e2e.conftest import qemu_pids_under
from tests.e2e.test_migration_qemu import kernel_xml, wait_tick
from tests.guests import ensure_test_guest
from tests.integration.test_scheduler_cluster import (  # noqa: F401 - the vhost fixture
    URL,
    placed,
    scheduler_process,
    vcli,
    vhost,
    wait_hosts,
    wait_migration,
)
from tests.procs import AgentProc, agent_process, unique_host

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]
BANDWIDTH = "4"  # MiB/s: a few seconds for the test guest's memory


@asynccontextmanager
async def qemu_agent(base: Path, host: str) -> AsyncIterator[AgentProc]:
    d = base / host
    d.mkdir(exist_ok=True)
    async with agent_process(host, d, driver="qemu", bus=URL, keep_queue=True) as agent:
        yield agent


async def kill(agent: AgentProc) -> None:
    agent.proc.kill()
    await agent.proc.wait()


async def wait_one_place(domain: str, hosts: dict[str, Path], timeout: float = 60) -> str:
    """Wait until ``domain`` runs on exactly one host and no other host has a QEMU or any
    definition of it; returns that host."""
    deadline = time.monotonic() + timeout
    seen: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        seen = await placed(domain)
        if len(seen) == 1 and seen[0][1] == "running":
            where = seen[0][0]
            others = [h for h in hosts if h != where]
            if not any(qemu_pids_under(hosts[h]) for h in others):
                return where
        await asyncio.sleep(0.5)
    raise AssertionError(
        f"{domain} is not in exactly one place: {seen}; "
        f"QEMUs: { {h: qemu_pids_under(d) for h, d in hosts.items()} }"
    )


async def boot(base: Path, host: str) -> Path:
    guest = await ensure_test_guest()
    serial = base / "mig1.serial"
    xml = base / "mig1.xml"
    xml.write_text(kernel_xml(guest.kernel, guest.initramfs, guest.cmdline, serial))
    await vcli("define", str(xml), "--host", host)
    await vcli("start", "mig1", "--host", host)
    await wait_tick(serial, 2)
    return serial


async def test_destination_agent_killed_and_restarted(
    vhost: str,  # noqa: F811
    e2e_root: Path,
) -> None:
    base = e2e_root / f"dkill-{time.monotonic_ns()}"
    base.mkdir()
    a_host, b_host = unique_host("src"), unique_host("dst")
    dirs = {a_host: base / a_host, b_host: base / b_host}
    async with qemu_agent(base, a_host) as a, scheduler_process(base / "sched"):
        async with qemu_agent(base, b_host) as b:  # its exit is a no-op once killed
            await wait_hosts(2)
            serial = await boot(base, a.host)
            await vcli("migrate", "mig1", "--to", b_host, "--bandwidth", BANDWIDTH)
            await asyncio.sleep(1.5)
            assert qemu_pids_under(dirs[b_host]), "no incoming QEMU on the destination"
            await kill(b)
        rec = await wait_migration("mig1", timeout=90)
        assert rec["state"] == "failed", rec
        assert qemu_pids_under(dirs[b_host]), "the orphaned incoming QEMU should still run"
        # the destination agent comes back: the pending cleanup kills the orphan, then
        # (only then) the source is resumed
        async with qemu_agent(base, b_host):
            where = await wait_one_place("mig1", dirs)
            assert where == a_host
            before = await wait_tick(serial, -1)
            await wait_tick(serial, before + 2)  # the source really runs the guest again
            listing = await vcli("list", "--host", b_host, "--all")
            assert [d for d in listing if d["name"] == "mig1"] == []
            await vcli("destroy", "mig1", "--host", a_host)
    assert not qemu_pids_under(base)


async def test_source_agent_killed_and_restarted(
    vhost: str,  # noqa: F811
    e2e_root: Path,
) -> None:
    base = e2e_root / f"skill-{time.monotonic_ns()}"
    base.mkdir()
    a_host, b_host = unique_host("src"), unique_host("dst")
    dirs = {a_host: base / a_host, b_host: base / b_host}
    async with qemu_agent(base, b_host) as b, scheduler_process(base / "sched"):
        async with qemu_agent(base, a_host) as a:  # its exit is a no-op once killed
            await wait_hosts(2)
            serial = await boot(base, a.host)
            await vcli("migrate", "mig1", "--to", b.host, "--bandwidth", BANDWIDTH)
            await asyncio.sleep(1.5)
            await kill(a)
        await asyncio.sleep(1.0)
        async with qemu_agent(base, a_host):
            rec = await wait_migration("mig1", timeout=90)
            assert rec["state"] in ("completed", "failed"), rec
            where = await wait_one_place("mig1", dirs)
            assert where == (b_host if rec["state"] == "completed" else a_host), rec
            before = await wait_tick(serial, -1)
            await wait_tick(serial, before + 2)
            await vcli("destroy", "mig1", "--host", where)
    assert not qemu_pids_under(base)
