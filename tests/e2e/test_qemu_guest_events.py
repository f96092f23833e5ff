"""Guest-driven QEMU events from a real QEMU through a real agent, as a bus subscriber sees
them, and the memory verbs that move the balloon (setmem, setmaxmem).

One TCG guest with a virtio balloon and an i6300esb watchdog whose action is ``pause``:

- ``setmem --live`` sets the balloon's target; the guest's balloon driver gives the memory
  back and QEMU's BALLOON_CHANGE arrives as ``balloon_change``; dominfo and the live XML
  follow it. Refusals as libvirt's: above ``<memory>`` (INVALID_ARG), ``setmaxmem --live``
  (OPERATION_INVALID), a size that is no size (INVALID_ARG); ``--config`` changes only the
  definition.
- ``rtc_change``: the guest moves its clock an hour on and writes it to the CMOS RTC.
- ``watchdog``: the guest starts the i6300esb's timer and never feeds it; QEMU pauses the
  guest (``suspended`` with detail ``watchdog``, domstate reason ``watchdog``).

Each event is asserted with its premise: none of them is seen before the guest (or the
command) makes it happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import uuid as uuidlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.e2e.test_qemu_agent import Events
from tests.e2e.test_qemu_driver import wait_serial
from tests.e2e.test_qemu_durability import host_events
from tests.guests import TestGuest, build_test_guest
from tests.procs import agent_process, cli, unique_host

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]
CONTROL = "org.virtbus.guest.0"
REPLY_TIMEOUT = 60.0
MIB = 1024


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


def guest_xml(guest: TestGuest, name: str, uuid: str, serial: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name><uuid>{uuid}</uuid>
  <memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{guest.kernel}</kernel><initrd>{guest.initramfs}</initrd>
    <cmdline>{guest.cmdline}</cmdline></os>
  <features><acpi/></features>
  <devices>
    <channel type='unix'><target type='virtio' name='{CONTROL}'/></channel>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <watchdog model='i6300esb' action='pause'/>
    <memballoon model='virtio'/>
  </devices>
</domain>"""


class Control:
    """The guest's virtio-serial control port (a socket the driver makes in its run dir)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def ask(self, line: str, expect: str) -> str:
        self.writer.write(line.encode() + b"\n")
        await self.writer.drain()
        async with asyncio.timeout(REPLY_TIMEOUT):
            while True:
                raw = await self.reader.readline()
                assert raw, f"control port closed waiting for {expect!r}"
                text = raw.decode(errors="replace").strip()
                if text.startswith(expect):
                    return text[len(expect) :].strip()


@dataclass
class Host:
    name: str
    base: Path
    events: Events

    async def run(self, *args: str) -> tuple[int, str, str]:
        r = await cli(*args, "--host", self.name)
        return r.code, r.out, r.err

    async def ok(self, *args: str) -> str:
        rc, out, err = await self.run(*args)
        assert rc == 0, (args, err)
        return out

    async def json(self, *args: str) -> Any:
        r = await cli("--json", *args, "--host", self.name)
        assert r.code == 0, (args, r.err)
        return r.json()

    async def fails(self, code: str, *args: str) -> str:
        rc, _, err = await self.run(*args)
        assert rc == 1 and err.startswith(f"error: {code}: "), (args, rc, err)
        await self.ok("list")  # ... and the agent still serves
        return err

    async def balloon_at(self, domain: str, kib: int) -> None:
        """Until a ``balloon_change`` says the guest has ``kib`` (it gets there in steps)."""
        while not any(d.get("actual") == kib for d in self.data(domain, "balloon_change")):
            seen = len(self.data(domain, "balloon_change"))
            await self.events.wait_count(domain, "balloon_change", None, seen + 1)

    def data(self, domain: str, event: str) -> list[dict[str, Any]]:
        return [dict(e.get("data") or {}) for e in self.events.seen
                if e["domain"] == domain and e["event"] == event]  # fmt: skip


@pytest.fixture
async def host(e2e_root: Path) -> AsyncIterator[Host]:
    name = unique_host("ge")
    base = Path(tempfile.mkdtemp(prefix="ge", dir=e2e_root))
    async with host_events(name) as events, agent_process(name, base, driver="qemu"):
        h = Host(name, base, events)
        try:
            yield h
        finally:
            rc, out, _ = await h.run("--json", "list")
            if rc == 0:
                for dom in json.loads(out):
                    await h.run("destroy", dom["name"])


def current_memory_kib(xml: str) -> int:
    root = etree.fromstring(xml.encode())
    el = root.find("currentMemory")
    assert el is not None and el.get("unit") == "KiB", xml
    return int(el.text or 0)


async def test_balloon_rtc_and_watchdog_events_from_the_guest(host: Host, guest: TestGuest) -> None:
    uuid = str(uuidlib.uuid4())
    serial = host.base / "ge.serial"
    xml = host.base / "ge.xml"
    xml.write_text(guest_xml(guest, "ge", uuid, serial))
    await host.ok("define", str(xml))
    await host.ok("start", "ge")
    await wait_serial(serial, "VIRTBUS-GUEST-READY", timeout=180.0)
    reader, writer = await asyncio.open_unix_connection(
        str(host.base / "run" / f"{uuid}.channel0.sock")
    )
    control = Control(reader, writer)
    try:
        # --- the balloon ---------------------------------------------------------------
        info = await host.json("dominfo", "ge")
        assert info["memory_kib"] == 256 * MIB, info  # premise: the guest has all of it
        await host.ok("setmem", "ge", "200M", "--live")
        await host.balloon_at("ge", 200 * MIB)
        assert (await host.json("dominfo", "ge"))["memory_kib"] == 200 * MIB
        assert current_memory_kib(await host.ok("dumpxml", "ge")) == 200 * MIB
        err = await host.fails("INVALID_ARG", "setmem", "ge", "300M", "--live")
        assert "max memory" in err, err
        err = await host.fails("OPERATION_INVALID", "setmaxmem", "ge", "512M", "--live")
        assert "active domain" in err, err
        await host.fails("INVALID_ARG", "setmem", "ge", "12Q")
        await host.fails("INVALID_ARG", "setmem", "ge", "0")
        await host.ok("setmaxmem", "ge", "384M", "--config")  # the next boot's memory only
        await host.ok("setmem", "ge", "128M", "--config")
        assert (await host.json("dominfo", "ge"))["max_memory_kib"] == 256 * MIB

        # --- the RTC ---------------------------------------------------------------------
        assert host.data("ge", "rtc_change") == []  # premise: nothing changed it at boot
        assert await control.ask("rtc-set 3600", "VIRTBUS-") == "DONE rtc-set 3600"
        await host.events.wait("ge", "rtc_change")
        [rtc] = host.data("ge", "rtc_change")
        assert 3590 <= rtc["offset"] <= 3610, rtc

        # --- the watchdog ----------------------------------------------------------------
        assert host.data("ge", "watchdog") == []
        assert (await host.json("domstate", "ge"))["state"] == "running"
        assert await control.ask("watchdog-arm", "VIRTBUS-") == "DONE watchdog-arm"
        await host.events.wait("ge", "watchdog")
        await host.events.wait("ge", "suspended", "watchdog")
        assert [d["action"] for d in host.data("ge", "watchdog")] == ["pause"]
        state = await host.json("domstate", "ge")
        assert (state["state"], state["reason"]) == ("paused", "watchdog"), state
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    await host.ok("destroy", "ge")
    defined = etree.fromstring((await host.ok("dumpxml", "ge")).encode())
    assert defined.findtext("memory") == str(384 * MIB), etree.tostring(defined)
    assert current_memory_kib(await host.ok("dumpxml", "ge")) == 128 * MIB
