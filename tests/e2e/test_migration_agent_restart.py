"""Agents killed (SIGKILL) mid-migration and restarted: the guest ends up in one place.

Real QEMU TCG guests (the test kernel), two real agents and a real scheduler on a private
vhost; the migration is slowed with ``--bandwidth`` so that it lasts seconds (~90 MiB
are sent), and the agent is killed as soon as the scheduler says the source streams.

- Destination killed: the source finishes streaming into the orphaned incoming QEMU, the
  scheduler cannot finish there and rolls back (the source stays paused: the destination
  might have resumed it); the restarted destination agent keeps that QEMU transient and
  paused, the scheduler's pending cleanup kills it and only then resumes the source.
- Source killed: QEMU keeps migrating without its agent; the restarted agent reattaches
  the outgoing job from ``query-migrate`` and follows it, and the scheduler completes the
  migration.

Afterwards the guest runs on exactly one host, still ticking, and the other host has
neither a QEMU nor a definition of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from tests.e2e.conftest import enter_together, qemu_pids_under
from tests.e2e.test_migration_qemu import kernel_xml, wait_tick
from tests.guests import ensure_test_guest
from tests.integration.test_scheduler_cluster import (  # noqa: F401 - the vhost fixture
    STREAMING,
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
# MiB/s. The destination's agent is killed right after streaming starts: ~6 s of stream
# are plenty (a stream over before the kill completes the migration: the test fails).
DST_KILL_BANDWIDTH = "16"
# The source's agent is killed, seen gone (its QEMU migrating on) and restarted while the
# stream lasts (~11 s): the restarted agent must reattach an *active* job (checked).
SRC_KILL_BANDWIDTH = "8"
# The destination's agent is dead: finish, then the rollback's finish(success=false),
# each waits out the step timeout. The calls to the live agents answer in well under it.
SHORT_STEPS = ("--step-timeout", "3", "--cleanup-timeout", "3")


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


@dataclass(frozen=True)
class Guest:
    """The test guest booted on the source; each side writes its own serial file (the
    destination's definition goes with ``migrate --xml``), so a tick seen in a host's file
    was printed by that host's QEMU."""

    serials: dict[str, Path]
    dst_xml: Path
    uuid: str

    async def ticks_on(self, host: str, base: Path) -> None:
        """The guest runs on ``host``: its console there counts on by two more ticks."""
        serial = self.serials[host]
        before = await wait_tick(serial, -1)
        cpu = qemu_cpu_seconds(base)
        try:
            await wait_tick(serial, before + 2)
        except AssertionError as exc:  # say whether QEMU computes (a hung guest) or idles
            raise AssertionError(
                f"{exc}; QEMU CPU seconds before/after the wait: {cpu} / {qemu_cpu_seconds(base)}"
            ) from None


def qemu_cpu_seconds(base: Path) -> dict[int, float]:
    """user+system CPU seconds of each QEMU under ``base`` (a diagnostic for failures)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for pid in qemu_pids_under(base):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


async def boot(base: Path, src: str, dst: str) -> Guest:
    guest = await ensure_test_guest()
    serials = {src: base / "mig1-src.serial", dst: base / "mig1-dst.serial"}
    xml, dst_xml = base / "mig1.xml", base / "mig1-dst.xml"
    xml.write_text(kernel_xml(guest.kernel, guest.initramfs, guest.cmdline, serials[src]))
    uuid = (await vcli("define", str(xml), "--host", src))["uuid"]
    await vcli("start", "mig1", "--host", src)
    dst_xml.write_text(kernel_xml(guest.kernel, guest.initramfs, guest.cmdline, serials[dst], uuid))
    await wait_tick(serials[src], 0)  # it runs: two ticks seen
    return Guest(serials, dst_xml, uuid)


async def qmp_migration(state_dir: Path, uuid: str) -> dict[str, object]:
    """``query-migrate`` on the QEMU's own QMP socket (its agent is gone: QEMU serves
    one monitor client at a time)."""
    status = json.loads(next(state_dir.rglob(f"{uuid}.status")).read_text())
    client = QMPClient("restart-test")
    await client.connect(status["qmp_socket"])
    try:
        answer = await client.execute("query-migrate")
    finally:
        await client.disconnect()
    assert isinstance(answer, dict)
    return answer


async def migrating_on(state_dir: Path, uuid: str) -> None:
    """The premise that QEMU keeps migrating without its agent: ``query-migrate`` says
    active and the RAM sent grows between two looks. QEMU is in ``setup`` first (on a
    loaded machine still when the agent is killed): that is waited out, bounded."""
    first = await qmp_migration(state_dir, uuid)
    async with asyncio.timeout(30):
        while first.get("status") == "setup":
            await asyncio.sleep(0.1)
            first = await qmp_migration(state_dir, uuid)
    assert first.get("status") == "active", first
    async with asyncio.timeout(30):
        while True:
            await asyncio.sleep(0.2)
            now = await qmp_migration(state_dir, uuid)
            assert now.get("status") == "active", now
            ram, ram0 = now.get("ram"), first.get("ram")
            assert isinstance(ram, dict) and isinstance(ram0, dict), now
            if ram["transferred"] > ram0["transferred"]:
                return


@asynccontextmanager
async def killed_while_streaming(
    base: Path, src: str, dst: str, victim: str, bandwidth: str, *scheduler_options: str
) -> AsyncIterator[Guest]:
    """Both agents and the scheduler (started at once), mig1 booted on ``src`` and migrating
    to ``dst`` at ``bandwidth``, and ``victim``'s agent SIGKILLed as soon as the scheduler
    says the source streams; the survivors stop when the block ends."""
    survivor = dst if victim == src else src
    async with contextlib.AsyncExitStack() as stack, contextlib.AsyncExitStack() as doomed:
        _kept, _sched, agent = await enter_together(  # the victim's exit: no-op once killed
            (stack, qemu_agent(base, survivor)),
            (stack, scheduler_process(base / "sched", *scheduler_options)),
            (doomed, qemu_agent(base, victim)),
        )
        await wait_hosts(2)
        guest = await boot(base, src, dst)
        await vcli(
            "migrate", "mig1", "--to", dst, "--xml", str(guest.dst_xml), "--bandwidth", bandwidth
        )  # fmt: skip
        await wait_migration("mig1", until=STREAMING)
        assert qemu_pids_under(base / dst), "no incoming QEMU on the destination"
        await kill(agent)
        await doomed.aclose()
        yield guest


async def test_destination_agent_killed_and_restarted(
    vhost: str,  # noqa: F811
    e2e_root: Path,
) -> None:
    base = e2e_root / f"dkill-{time.monotonic_ns()}"
    base.mkdir()
    a_host, b_host = unique_host("src"), unique_host("dst")
    dirs = {a_host: base / a_host, b_host: base / b_host}
    async with killed_while_streaming(
        base, a_host, b_host, b_host, DST_KILL_BANDWIDTH, *SHORT_STEPS
    ) as guest:
        rec = await wait_migration("mig1", timeout=90)
        assert rec["state"] == "failed", rec
        assert qemu_pids_under(dirs[b_host]), "the orphaned incoming QEMU should still run"
        # the destination agent comes back: the pending cleanup kills the orphan, then
        # (only then) the source is resumed
        async with qemu_agent(base, b_host):
            where = await wait_one_place("mig1", dirs)
            assert where == a_host
            await guest.ticks_on(a_host, base)  # the source really runs the guest again
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
    async with killed_while_streaming(base, a_host, b_host, a_host, SRC_KILL_BANDWIDTH) as guest:
        await migrating_on(dirs[a_host], guest.uuid)  # QEMU goes on without its agent
        async with qemu_agent(base, a_host):
            log = (dirs[a_host] / f"agent-{a_host}.log").read_text()
            assert "outgoing migration reattached (active)" in log, "premise: still streaming"
            # the reattached job follows QEMU's stream to its end: the migration goes
            # forward (a rollback here would mean the restart lost the job)
            rec = await wait_migration("mig1", timeout=90)
            assert rec["state"] == "completed", rec
            where = await wait_one_place("mig1", dirs)
            assert where == b_host, rec
            await guest.ticks_on(where, base)
            await vcli("destroy", "mig1", "--host", where)
    assert not qemu_pids_under(base)
