"""Issue 4: no event is lost when the broker goes away.

Guests power themselves off while the agent cannot reach RabbitMQ — first through a TCP
proxy of ours that we cut, then during a real broker restart (``rabbitmqctl
stop_app``/``start_app``). A subscriber reading the event history must receive every
event exactly once, in order, with consecutive sequence numbers.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import qemu_pids_under
from tests.e2e.test_qemu_driver import kernel_xml, wait_serial
from tests.faults import TcpProxy
from tests.guests import TestGuest, build_test_guest
from tests.procs import BUS_URL, agent_process, cli, unique_host
from virtbus.bus.factory import open_bus

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]
WAIT = 90.0


class History:
    """The host's events as a history subscriber sees them, duplicates included."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.raw: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    def unique(self) -> list[dict[str, Any]]:
        seen: dict[int, dict[str, Any]] = {}
        for body in self.raw:
            seen.setdefault(body["seq"], body)
        return [seen[s] for s in sorted(seen)]

    async def wait_for(self, domain: str, event: str, detail: str) -> None:
        async with asyncio.timeout(WAIT):
            while not any(
                (e["domain"], e["event"], e["detail"]) == (domain, event, detail) for e in self.raw
            ):
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


@pytest.fixture
async def history() -> AsyncIterator[tuple[str, History]]:
    host = unique_host("out")
    bus = open_bus(BUS_URL, src="outage-test")
    await bus.connect()
    sub = await bus.history(time.time() - 1)
    hist = History(host)

    async def pump() -> None:
        async for env in sub:
            if env.body.get("host") == host:
                hist.raw.append(env.body)
                hist.changed.set()

    task = asyncio.create_task(pump())
    try:
        yield host, hist
    finally:
        task.cancel()
        await sub.close()
        await bus.close()


async def rabbitmqctl(*args: str) -> None:
    await asyncio.to_thread(
        subprocess.run, ["rabbitmqctl", *args], check=True, capture_output=True, timeout=120
    )


async def wait_exit(base: Path, count: int) -> None:
    async with asyncio.timeout(WAIT):
        while len(qemu_pids_under(base)) > count:
            await asyncio.sleep(0.2)


async def start_guests(host: str, base: Path, guest: TestGuest, ticks: dict[str, int]) -> None:
    for name, tick in ticks.items():
        xml = base / f"{name}.xml"
        xml.write_text(kernel_xml(guest, name, base / f"{name}.serial", cmds=f"poweroff@{tick}"))
        for verb, arg in (("define", str(xml)), ("start", name)):
            r = await cli(verb, arg, "--host", host)
            assert r.code == 0, (verb, name, r.err)
    for name in ticks:
        await wait_serial(base / f"{name}.serial", "VIRTBUS-GUEST-READY", timeout=WAIT)


def assert_complete(hist: History, names: list[str]) -> None:
    """Every event exactly once (after dedup of redeliveries), in order, no gap."""
    events = hist.unique()
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"gap in {seqs}"
    for name in names:
        mine = [(e["event"], e["detail"]) for e in events if e["domain"] == name]
        assert mine == [
            ("defined", "added"), ("started", "booted"), ("shutdown", "guest"),
            ("stopped", "shutdown"),
        ], (name, mine)  # fmt: skip


async def test_events_survive_a_cut_link(
    history: tuple[str, History], guest: TestGuest, e2e_root: Path
) -> None:
    host, hist = history
    base = Path(tempfile.mkdtemp(prefix="o", dir=e2e_root))
    proxy = TcpProxy()
    await proxy.start()
    try:
        async with agent_process(host, base, driver="qemu", bus=proxy.url()):
            # Ticks are 0.5 s: the guests power off 10-12 s after boot, well after the cut.
            await start_guests(host, base, guest, {"p1": 20, "p2": 22, "p3": 24})
            proxy.cut()  # the guests power themselves off while the agent is cut off
            seen_at_cut = len(hist.raw)
            await wait_exit(base, 0)
            await asyncio.sleep(0.5)
            assert len(hist.raw) == seen_at_cut, "published while cut?"
            proxy.restore()
            for name in ("p1", "p2", "p3"):
                await hist.wait_for(name, "stopped", "shutdown")
    finally:
        await proxy.close()
    assert_complete(hist, ["p1", "p2", "p3"])


async def test_events_survive_a_broker_restart(
    history: tuple[str, History], guest: TestGuest, e2e_root: Path
) -> None:
    host, hist = history
    base = Path(tempfile.mkdtemp(prefix="r", dir=e2e_root))
    async with agent_process(host, base, driver="qemu"):
        await start_guests(host, base, guest, {"r1": 20, "r2": 22})
        await rabbitmqctl("stop_app")
        try:
            await wait_exit(base, 0)
        finally:
            await rabbitmqctl("start_app")
        for name in ("r1", "r2"):
            await hist.wait_for(name, "stopped", "shutdown")
    assert_complete(hist, ["r1", "r2"])
