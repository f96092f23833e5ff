"""Issue 4, QEMU side: a restarted ``virtbus-agent --driver qemu`` finds its guests again.

Real agent processes, real QEMU (firmware-only guests: no kernel is needed to be paused or
killed), the real CLI and RabbitMQ; events are watched on the bus as a subscriber sees
them. The agent is killed with SIGKILL, the guests are changed behind its back, and the
next agent must report and publish (``reconciled``) what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.e2e.conftest import qemu_pids_under
from tests.e2e.test_qemu_agent import Events
from tests.e2e.test_qemu_driver import firmware_xml
from tests.procs import BUS_URL, AgentProc, agent_process, cli, unique_host
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import EVENTS_EXCHANGE
from virtbus.protocol.events import routing_word

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq]
WAIT = 30.0


@contextlib.asynccontextmanager
async def host_events(host: str) -> AsyncIterator[Events]:
    bus = open_bus(BUS_URL, src="test")
    await bus.connect()
    sub = await bus.subscribe(EVENTS_EXCHANGE, [f"{routing_word(host)}.#"])
    events = Events()

    async def pump() -> None:
        async for env in sub:
            events.add(env.body)

    pumping = asyncio.create_task(pump(), name="test-event-pump")
    try:
        yield events
    finally:
        pumping.cancel()
        await sub.close()
        await bus.close()


async def kill9(agent: AgentProc) -> None:
    agent.proc.kill()
    await agent.proc.wait()


def status_of(base: Path, uuid: str) -> dict[str, Any]:
    return dict(json.loads((base / "run" / f"{uuid}.status").read_text()))


async def qmp(socket: str, cmd: str) -> Any:
    """One QMP command on a guest's socket, as an operator would while the agent is gone."""
    client = QMPClient("test")
    await client.connect(socket)
    try:
        return await client.execute(cmd)
    finally:
        await client.disconnect()


async def wait_gone(pid: int) -> None:
    for _ in range(int(WAIT / 0.05)):
        if not _alive(pid):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"pid {pid} still alive")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


async def define_and_start(host: str, base: Path, name: str) -> str:
    xml = base / f"{name}.xml"
    xml.write_text(firmware_xml(name))
    for step in (("define", str(xml)), ("start", name)):
        r = await cli(*step, "--host", host)
        assert r.code == 0, (step, r.err)
    return str((await cli("--json", "dominfo", name, "--host", host)).json()["uuid"])


async def destroy_all(host: str, base: Path) -> None:
    listing = await cli("--json", "list", "--host", host)
    if listing.code == 0:
        for dom in listing.json():
            await cli("destroy", dom["name"], "--host", host)
    for pid in qemu_pids_under(base):  # what the agent could not reach
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def base(e2e_root: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix="d", dir=e2e_root))


async def test_restart_reconciles_paused_and_killed_guests(base: Path) -> None:
    host = unique_host("qd")
    async with host_events(host) as events:
        try:
            async with agent_process(host, base, driver="qemu", keep_queue=True) as first:
                uuids = {
                    n: await define_and_start(host, base, n) for n in ("d-run", "d-pause", "d-kill")
                }
                await events.wait("d-kill", "started", "booted")
                await asyncio.sleep(0.3)  # the event task writes the status after the reply
                await kill9(first)
            # behind the (dead) agent's back: pause one guest, kill another's QEMU
            assert (await qmp(status_of(base, uuids["d-pause"])["qmp_socket"], "stop")) == {}
            killed = int(status_of(base, uuids["d-kill"])["pid"])
            os.kill(killed, signal.SIGKILL)
            await wait_gone(killed)
            before = len(events.seen)
            async with agent_process(host, base, driver="qemu"):
                await events.wait("d-pause", "suspended", "paused")
                await events.wait("d-kill", "stopped", "failed")
                fresh = events.seen[before:]
                assert [(e["domain"], e["event"], e["detail"], e["reconciled"]) for e in fresh] == [
                    ("d-pause", "suspended", "paused", True),
                    ("d-kill", "stopped", "failed", True),
                ] or sorted(
                    (e["domain"], e["event"], e["detail"], e["reconciled"]) for e in fresh
                ) == [
                    ("d-kill", "stopped", "failed", True),
                    ("d-pause", "suspended", "paused", True),
                ]
                listing = (await cli("--json", "list", "--all", "--host", host)).json()
                states = {d["name"]: (d["state"], d["reason"]) for d in listing}
                assert states == {
                    "d-run": ("running", "booted"),
                    "d-pause": ("paused", "user"),
                    "d-kill": ("shutoff", "crashed"),
                }, states
                info = (await cli("--json", "dominfo", "d-run", "--host", host)).json()
                assert info["state"] == "running" and info["id"] is not None
                assert not (base / "run" / f"{uuids['d-kill']}.status").exists()
                # the survivors obey; the dead one can start again
                for step, name in (("resume", "d-pause"), ("suspend", "d-run"),
                                   ("resume", "d-run"), ("start", "d-kill")):  # fmt: skip
                    r = await cli(step, name, "--host", host)
                    assert r.code == 0, (step, name, r.err)
                await events.wait("d-pause", "resumed", "unpaused")
                await events.wait("d-kill", "started", "booted")
                tail = [(e["domain"], e["event"], e["detail"], e["reconciled"])
                        for e in events.seen[before + 2 :]]  # fmt: skip
                assert ("d-run", "suspended", "paused", False) in tail
                for name in ("d-run", "d-pause", "d-kill"):
                    r = await cli("destroy", name, "--host", host)
                    assert r.code == 0, (name, r.err)
                assert qemu_pids_under(base) == []
        finally:
            await destroy_all(host, base)


async def test_corrupt_files_are_set_aside(base: Path) -> None:
    """A truncated status file and a garbage definition: set aside, the agent starts, and
    the guest whose status was lost is reported (not killed)."""
    host = unique_host("qc")
    try:
        async with agent_process(host, base, driver="qemu", keep_queue=True) as first:
            uuid = await define_and_start(host, base, "c-run")
            await asyncio.sleep(0.3)
            await kill9(first)
        status_file = base / "run" / f"{uuid}.status"
        pid = int(status_of(base, uuid)["pid"])
        status_file.write_bytes(status_file.read_bytes()[:40])  # torn write
        garbage = base / "domains" / "0f0f0f0f-0000-4000-8000-000000000000.xml"
        garbage.write_bytes(b"<domain type='qemu'><name>half")
        async with agent_process(host, base, driver="qemu"):
            listing = (await cli("--json", "list", "--all", "--host", host)).json()
            assert [(d["name"], d["state"]) for d in listing] == [("c-run", "shutoff")]
            assert _alive(pid), "a running guest must never be killed for a bad file"
            again = await cli("start", "c-run", "--host", host)  # would be a second QEMU
            assert again.code != 0 and f"pid {pid}" in again.err, again
        assert not status_file.exists() and not garbage.exists()
        aside = sorted(p.name for p in base.rglob("*.corrupt-*"))
        assert len(aside) == 2 and any(n.startswith(f"{uuid}.status") for n in aside), aside
        log = (base / f"agent-{host}.log").read_text()
        assert log.count("set aside corrupt") == 2, log
        assert f"QEMU pid {pid}" in log and "not known to this agent" in log, log
    finally:
        for pid in qemu_pids_under(base):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await wait_gone(pid)
