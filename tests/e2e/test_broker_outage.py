"""Issue 4: no event is lost when the broker goes away.

Guests power themselves off while the agent cannot reach RabbitMQ — first through a TCP
proxy of ours that we cut, then during a real broker restart (``rabbitmqctl
stop_app``/``start_app``). A subscriber reading the event history must receive every
event exactly once, in order, with consecutive sequence numbers. The guests are told to
power off (``poweroff`` on their control port, a virtio-serial channel: no bus involved)
once the link is gone, not at a boot tick chosen to fall after it.

The cut link is a proxy of ours in front of the shared broker (only our agent's link goes
through it); the restarted broker is a node of the test's own (tests/rabbitnode.py: its own
name, ports and data dir), never the shared one. Each test checks its premise: the guests
were running when the link went, and their power-off events were really held in the agent's
outbox (unconfirmed records on disk) until it came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RABBITMQ_PORT
from tests.e2e.conftest import qemu_pids_under
from tests.e2e.test_qemu_driver import kernel_xml, wait_serial
from tests.faults import TcpProxy
from tests.guests import CONTROL_PORT_NAME, TestGuest, build_test_guest
from tests.procs import BUS_URL, agent_process, cli, unique_host
from tests.rabbitnode import RabbitNode, rabbit_node
from virtbus.bus.factory import open_bus
from virtbus.store import decode_records, read_bytes

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]
WAIT = 90.0
CONTROL = f"<channel type='unix'><target type='virtio' name='{CONTROL_PORT_NAME}'/></channel>"


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
async def node() -> AsyncIterator[RabbitNode]:
    async with rabbit_node() as n:
        yield n


@contextlib.asynccontextmanager
async def history_on(url: str) -> AsyncIterator[tuple[str, History]]:
    """A fresh host name, and its events as a history subscriber on ``url`` sees them."""
    host = unique_host("out")
    bus = open_bus(url, src="outage-test")
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


async def unconfirmed(base: Path) -> list[dict[str, Any]]:
    """The outbox's events on disk that the broker has not confirmed (their bodies).

    Read, never loaded: ``RecordLog.load`` rewrites a log whose tail it finds torn, and a
    read can meet the agent's append half done; the agent would then append to a file
    no longer in the directory, and this poll never see what it waits for."""
    from virtbus.protocol.codec import decode

    records, _ = decode_records(await read_bytes(base / "outbox" / "events.log") or b"")
    acked = max((r["ack"] for r in records if isinstance(r.get("ack"), int)), default=0)
    events = [decode(r["event"]).body for r in records if isinstance(r.get("event"), bytes)]
    return [e for e in events if e["seq"] > acked]


def held_power_offs(events: list[dict[str, Any]], names: list[str]) -> set[tuple[str, str]]:
    return {(e["domain"], e["event"]) for e in events if e["domain"] in names}


async def wait_exit(base: Path, count: int) -> None:
    async with asyncio.timeout(WAIT):
        while len(qemu_pids_under(base)) > count:
            await asyncio.sleep(0.2)


async def start_guests(
    host: str, base: Path, guest: TestGuest, names: list[str], bus: str
) -> dict[str, str]:
    """Define and start ``names`` (at once: they boot together anyway) and wait until each
    is ready; their uuids by name."""

    async def one(name: str) -> str:
        xml = base / f"{name}.xml"
        xml.write_text(kernel_xml(guest, name, base / f"{name}.serial", devices=CONTROL))
        for verb, arg in (("define", str(xml)), ("start", name)):
            r = await cli(verb, arg, "--host", host, bus=bus)
            assert r.code == 0, (verb, name, r.err)
        await wait_serial(base / f"{name}.serial", "VIRTBUS-GUEST-READY", timeout=WAIT)
        found = re.search(r"<uuid>([^<]+)</uuid>", xml.read_text())
        assert found is not None
        return found[1]

    uuids = await asyncio.gather(*(one(name) for name in names))
    return dict(zip(names, uuids, strict=True))


async def power_off(base: Path, uuid: str) -> None:
    """``poweroff`` on the guest's control port (QEMU's socket, not the bus); returns once
    the guest acknowledged it (``poweroff -f`` follows)."""
    (sock,) = list(base.rglob(f"{uuid}.channel0.sock"))
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        writer.write(b"poweroff\n")
        await writer.drain()
        async with asyncio.timeout(WAIT):
            while b"VIRTBUS-ACK poweroff" not in (line := await reader.readline()):
                assert line, "control port closed before the guest acknowledged poweroff"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


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


async def test_events_survive_a_cut_link(guest: TestGuest, e2e_root: Path, rabbitmq: None) -> None:
    async with history_on(BUS_URL) as (host, hist):
        await _cut_link(host, hist, guest, e2e_root)


async def _cut_link(host: str, hist: History, guest: TestGuest, e2e_root: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="o", dir=e2e_root))
    names = ["p1", "p2", "p3"]
    proxy = TcpProxy(target_port=RABBITMQ_PORT)
    await proxy.start()
    try:
        async with agent_process(host, base, driver="qemu", bus=proxy.url()):
            uuids = await start_guests(host, base, guest, names, BUS_URL)
            proxy.cut()  # the guests power themselves off while the agent is cut off
            seen_at_cut = len(hist.raw)
            # the premise: all three were still running when the link went
            assert len(qemu_pids_under(base)) == 3, "a guest was gone before the cut"
            assert not {e["event"] for e in hist.raw} & {"shutdown", "stopped"}, hist.raw
            await asyncio.gather(*(power_off(base, uuids[name]) for name in names))
            await wait_exit(base, 0)
            async with asyncio.timeout(WAIT):  # the driver saw them go: in the outbox
                while len(held_power_offs(await unconfirmed(base), names)) < 2 * len(names):
                    await asyncio.sleep(0.1)
            assert len(hist.raw) == seen_at_cut, "published while cut?"
            proxy.restore()
            for name in ("p1", "p2", "p3"):
                await hist.wait_for(name, "stopped", "shutdown")
    finally:
        await proxy.close()
    assert_complete(hist, ["p1", "p2", "p3"])


async def test_events_survive_a_broker_restart(
    node: RabbitNode, guest: TestGuest, e2e_root: Path
) -> None:
    async with history_on(node.url) as (host, hist):
        await _broker_restart(node, host, hist, guest, e2e_root)


async def _broker_restart(
    node: RabbitNode, host: str, hist: History, guest: TestGuest, e2e_root: Path
) -> None:
    base = Path(tempfile.mkdtemp(prefix="r", dir=e2e_root))
    names = ["r1", "r2"]
    async with agent_process(host, base, driver="qemu", bus=node.url):
        uuids = await start_guests(host, base, guest, names, node.url)
        await node.stop_app()
        try:
            assert len(qemu_pids_under(base)) == 2, "a guest was gone before the broker"
            await asyncio.gather(*(power_off(base, uuids[name]) for name in names))
            await wait_exit(base, 0)
            async with asyncio.timeout(WAIT):
                while len(held_power_offs(await unconfirmed(base), names)) < 2 * len(names):
                    await asyncio.sleep(0.1)
        finally:
            await node.start_app()
        for name in ("r1", "r2"):
            await hist.wait_for(name, "stopped", "shutdown")
    assert_complete(hist, ["r1", "r2"])
