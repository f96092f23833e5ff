"""Issue 3 end to end: a real ``virtbus-agent --driver qemu`` process, real QEMU guests,
the real CLI and RabbitMQ; events are watched on the bus as a subscriber sees them."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_qemu_driver import firmware_xml, kernel_xml, wait_serial
from tests.guests import TestGuest, build_test_guest
from tests.procs import BUS_URL, agent_process, cli, unique_host
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import EVENTS_EXCHANGE
from virtbus.protocol.events import routing_word

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]
EVENT_WAIT = 60.0


class Events:
    """Every event of one host, as a bus subscriber receives them."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def add(self, body: dict[str, Any]) -> None:
        self.seen.append(body)
        self._changed.set()

    def of(self, domain: str) -> list[tuple[str, str | None]]:
        return [(e["event"], e["detail"]) for e in self.seen if e["domain"] == domain]

    async def wait_count(self, domain: str, event: str, detail: str | None, n: int) -> None:
        """Until ``domain`` had ``(event, detail)`` at least ``n`` times."""
        async with asyncio.timeout(EVENT_WAIT):
            while self.of(domain).count((event, detail)) < n:
                self._changed.clear()
                await self._changed.wait()

    async def until(self, done: Callable[[], bool], timeout: float = EVENT_WAIT) -> None:
        """Until ``done()`` holds, checked whenever an event arrives."""
        async with asyncio.timeout(timeout):
            while not done():
                self._changed.clear()
                await self._changed.wait()

    async def wait(self, domain: str, event: str, detail: str | None = None) -> None:
        async with asyncio.timeout(EVENT_WAIT):
            while (event, detail) not in self.of(domain) and not (
                detail is None and any(e == event for e, _ in self.of(domain))
            ):
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


@pytest.fixture
async def qemu_agent(
    e2e_root: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[str, Path, Events]]:
    extra: tuple[str, ...] = getattr(request, "param", ())  # agent flags (--uvloop)
    host = unique_host("q")
    base = Path(tempfile.mkdtemp(prefix="a", dir=e2e_root))
    bus = open_bus(BUS_URL, src="test")
    await bus.connect()
    sub = await bus.subscribe(EVENTS_EXCHANGE, [f"{routing_word(host)}.#"])
    events = Events()

    async def pump() -> None:
        async for env in sub:
            events.add(env.body)

    pumping = asyncio.create_task(pump())
    try:
        async with agent_process(host, base, *extra, driver="qemu"):
            yield host, base, events
            listing = await cli("--json", "list", "--host", host)
            for dom in listing.json():  # leave no guest behind: the agent keeps them running
                await cli("destroy", dom["name"], "--host", host)
    finally:
        pumping.cancel()
        await sub.close()
        await bus.close()


@pytest.mark.parametrize(
    "qemu_agent",
    [pytest.param((), id="asyncio"), pytest.param(("--uvloop",), id="uvloop")],
    indirect=True,
)
async def test_lifecycle_through_the_bus(
    qemu_agent: tuple[str, Path, Events], guest: TestGuest
) -> None:
    host, base, events = qemu_agent
    serial = base / "k1.serial"
    xml_file = base / "k1.xml"
    xml_file.write_text(kernel_xml(guest, "k1", serial))

    async def ok(*args: str) -> str:
        r = await cli(*args, "--host", host)
        assert r.code == 0, (args, r.err)
        return r.out

    await ok("define", str(xml_file))
    await ok("start", "k1")
    await wait_serial(serial, "VIRTBUS-GUEST-READY")
    await ok("suspend", "k1")
    assert "paused" in await ok("domstate", "k1")
    await ok("resume", "k1")
    await ok("shutdown", "k1")  # ACPI: the guest decides, and powers off
    await events.wait("k1", "stopped", "shutdown")
    assert "shut off" in await ok("domstate", "k1")
    await ok("start", "k1")  # QEMU truncated the serial file: counting starts again
    await wait_serial(serial, "VIRTBUS-GUEST-READY")
    await ok("reboot", "k1")
    await events.wait("k1", "reboot")
    await wait_serial(serial, "VIRTBUS-GUEST-READY", count=2)
    assert "running" in await ok("domstate", "k1")
    info = (await cli("--json", "dominfo", "k1", "--host", host)).json()
    assert info["state"] == "running" and info["cpu_time_ns"] > 0 and info["id"] is not None
    xml = await ok("dumpxml", "k1")
    assert f"id='{info['id']}'" in xml and "<kernel>" in xml
    await ok("destroy", "k1")
    await ok("undefine", "k1")
    await events.wait("k1", "undefined")
    seen = events.of("k1")
    while seen.count(("reboot", None)) > 1:  # SeaBIOS may reset once more after a reboot
        seen.remove(("reboot", None))
    assert seen == [
        ("defined", "added"), ("started", "booted"), ("suspended", "paused"),
        ("resumed", "unpaused"), ("shutdown", "guest"), ("stopped", "shutdown"),
        ("started", "booted"), ("reboot", None), ("stopped", "destroyed"),
        ("undefined", "removed"),
    ]  # fmt: skip
    seqs = [e["seq"] for e in events.seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_guest_poweroff_crash_and_panic(
    qemu_agent: tuple[str, Path, Events], guest: TestGuest
) -> None:
    host, base, events = qemu_agent
    guests = {
        "k-off": kernel_xml(guest, "k-off", base / "off.serial", cmds="poweroff@1"),
        "k-kill": kernel_xml(guest, "k-kill", base / "kill.serial"),
        "k-panic": kernel_xml(guest, "k-panic", base / "panic.serial", cmds="panic@1",
                              panic=True),
    }  # fmt: skip
    for name, xml in guests.items():
        (base / f"{name}.xml").write_text(xml)
        assert (await cli("define", str(base / f"{name}.xml"), "--host", host)).code == 0
        assert (await cli("start", name, "--host", host)).code == 0
    await wait_serial(base / "kill.serial", "VIRTBUS-GUEST-READY")
    uuid = (await cli("--json", "dominfo", "k-kill", "--host", host)).json()["uuid"]
    pid = int((base / "run" / f"{uuid}.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    await events.wait("k-off", "stopped", "shutdown")
    await events.wait("k-kill", "stopped", "failed")
    await events.wait("k-panic", "stopped", "crashed")
    assert events.of("k-off")[2:] == [("shutdown", "guest"), ("stopped", "shutdown")]
    assert events.of("k-kill")[2:] == [("stopped", "failed")]
    assert events.of("k-panic")[2:] == [("crashed", "panicked"), ("stopped", "crashed")]


async def test_bad_definitions_are_clear_errors(qemu_agent: tuple[str, Path, Events]) -> None:
    host, base, _ = qemu_agent
    # a PCI address no host has (bus 0x7f): defined as libvirt does, refused at start
    hostdev = ("<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='0x7f' "
               "slot='0x1f' function='7'/></source></hostdev>")  # fmt: skip
    (base / "u.xml").write_text(firmware_xml("fw-u", devices=hostdev))
    assert (await cli("define", str(base / "u.xml"), "--host", host)).code == 0
    r = await cli("start", "fw-u", "--host", host)
    assert r.code != 0 and "OPERATION_FAILED" in r.err and "0000:7f:1f.7" in r.err, r.err
    missing = base / "missing.qcow2"
    disk = (f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{missing}'/><target dev='vda' bus='virtio'/></disk>")  # fmt: skip
    (base / "m.xml").write_text(firmware_xml("fw-m", devices=disk))
    assert (await cli("define", str(base / "m.xml"), "--host", host)).code == 0
    r = await cli("start", "fw-m", "--host", host)
    assert r.code != 0 and str(missing) in r.err, r.err
    r = await cli("resume", "fw-m", "--host", host)
    assert r.code != 0 and "OPERATION_INVALID" in r.err
