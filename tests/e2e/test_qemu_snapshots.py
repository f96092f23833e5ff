"""Issue 16, internal snapshots end to end: a real ``virtbus-agent --driver qemu``, real
TCG guests with qcow2 disks, the real CLI and RabbitMQ. The test guest's tick counter on
its serial console proves a revert brings the guest's memory back: the first tick printed
after the revert is the one after the snapshot, not after the time in between."""

from __future__ import annotations

import asyncio
import itertools
import re
import shutil
import subprocess
import tempfile
import uuid as uuidlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.compat.corpus import ensure_corpus
from tests.e2e.test_qemu_agent import EVENT_WAIT, Events
from tests.e2e.test_qemu_driver import wait_serial
from tests.guests import TestGuest, build_test_guest
from tests.procs import BUS_URL, CliResult, agent_process, cli, delete_queues, unique_host
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import EVENTS_EXCHANGE
from virtbus.protocol.events import routing_word

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]
_TICK = re.compile(r"VIRTBUS-TICK (\d+)")


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


def disk_xml(path: Path, fmt: str = "qcow2", dev: str = "vda") -> str:
    return (f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
            f"<source file='{path}'/><target dev='{dev}' bus='virtio'/></disk>")  # fmt: skip


def guest_xml(guest: TestGuest, name: str, serial: Path, disks: str) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name><uuid>{uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{guest.kernel}</kernel><initrd>{guest.initramfs}</initrd>
    <cmdline>{guest.cmdline} virtbus.tick=0.2</cmdline>
  </os>
  <features><acpi/></features>
  <devices>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    {disks}
  </devices>
</domain>"""


def image(path: Path, fmt: str = "qcow2") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), "64M"], check=True)
    return path


def image_snapshots(path: Path) -> list[str]:
    """The internal snapshots qemu-img sees in the image (-U: the guest may run)."""
    out = subprocess.run(["qemu-img", "snapshot", "-U", "-l", str(path)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return [line.split()[1] for line in out.splitlines()[2:] if line.split()]


def ticks(serial: Path, offset: int = 0) -> list[int]:
    text = serial.read_bytes()[offset:].decode(errors="replace")
    return [int(m) for m in _TICK.findall(text)]


async def wait_tick(serial: Path, at_least: int, offset: int = 0) -> int:
    """Wait for a tick >= ``at_least`` printed after ``offset``; the last one seen."""
    async with asyncio.timeout(EVENT_WAIT):
        while True:
            seen = await asyncio.to_thread(ticks, serial, offset)
            if seen and seen[-1] >= at_least:
                return seen[-1]
            await asyncio.sleep(0.05)


async def tick_after_revert(serial: Path, offset: int, last: int) -> int:
    """The tick the guest printed first after going back in time: of the ticks printed
    after ``offset`` (QEMU appends to the file), preceded by ``last``, the one printed just
    before ``offset``, the first one lower than the one before. ``last`` counts: a quick
    revert lands before the guest prints again, and then no later pair goes down."""
    async with asyncio.timeout(EVENT_WAIT):
        while True:
            seen = [last, *await asyncio.to_thread(ticks, serial, offset)]
            for previous, tick in itertools.pairwise(seen):
                if tick <= previous:
                    return tick
            await asyncio.sleep(0.05)


async def first_tick(serial: Path, offset: int) -> int:
    async with asyncio.timeout(EVENT_WAIT):
        while not (seen := await asyncio.to_thread(ticks, serial, offset)):
            await asyncio.sleep(0.05)
        return seen[0]


@asynccontextmanager
async def qemu_agent(h: Host) -> AsyncIterator[None]:
    """The host's agent (its queue kept for a restart); a failing test leaves no guest."""
    async with agent_process(h.name, h.base, driver="qemu", keep_queue=True):
        try:
            yield
        except BaseException:
            await _destroy_all(h)
            log = h.base / f"agent-{h.name}.log"
            print(log.read_text(errors="replace")[-6000:] if log.exists() else "no agent log")
            raise


class Host:
    def __init__(self, name: str, base: Path, events: Events) -> None:
        self.name, self.base, self.events = name, base, events

    async def run(self, *args: str) -> CliResult:
        # a snapshot of a loaded machine's 256 MiB guest can take QEMU tens of seconds
        return await cli("--timeout", "240", *args, "--host", self.name, timeout=300.0)

    async def ok(self, *args: str) -> str:
        r = await self.run(*args)
        assert r.code == 0, (args, r.err)
        return r.out

    async def fails(self, code: str, *args: str) -> str:
        r = await self.run(*args)
        assert r.code != 0 and code in r.err, (args, r.code, r.out, r.err)
        return r.err


@asynccontextmanager
async def events_host(e2e_root: Path) -> AsyncIterator[Host]:
    """Events of a fresh host name; the test starts (and restarts) its agent itself."""
    name = unique_host("snap")
    base = Path(tempfile.mkdtemp(prefix="s", dir=e2e_root))
    bus = open_bus(BUS_URL, src="test")
    await bus.connect()
    sub = await bus.subscribe(EVENTS_EXCHANGE, [f"{routing_word(name)}.#"])
    events = Events()

    async def pump() -> None:
        async for env in sub:
            events.add(env.body)

    pumping = asyncio.create_task(pump())
    try:
        yield Host(name, base, events)
    finally:
        pumping.cancel()
        await sub.close()
        await bus.close()
        await delete_queues(f"virtbus.agent.{name}")


@pytest.fixture
async def host(e2e_root: Path) -> AsyncIterator[Host]:
    async with events_host(e2e_root) as h:
        yield h


async def _destroy_all(h: Host) -> None:
    for dom in (await cli("--json", "list", "--host", h.name)).json():
        await cli("destroy", dom["name"], "--host", h.name)


def validate(xml: str, base: Path) -> None:
    """virt-xml-validate (the installed libvirt 9.0) on the snapshot without its <domain>
    (optional in domainsnapshot.rng; the driver completes definitions as libvirt 11 does,
    e.g. an itco watchdog 9.0's schema lacks), and the whole document against libvirt
    11's domainsnapshot.rng, the reference the compat harness holds dumpxml to."""
    tool = shutil.which("virt-xml-validate")
    assert tool, "virt-xml-validate missing: run deploy/setup-dev (libvirt-clients)"
    whole, bare = base / "snap.xml", base / "snap-bare.xml"
    whole.write_text(xml)
    bare.write_text(re.sub(r"\n  <domain .*</domain>", "", xml, flags=re.DOTALL))
    assert "<domain " not in bare.read_text()
    done = subprocess.run([tool, str(bare), "domainsnapshot"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    schema = ensure_corpus().schemas / "domainsnapshot.rng"
    done = subprocess.run(["xmllint", "--noout", "--relaxng", str(schema), str(whole)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


async def test_running_snapshot_revert_restores_memory_and_survives_restart(
    host: Host, guest: TestGuest
) -> None:
    h, base = host, host.base
    serial, disk = base / "k.serial", image(base / "k.qcow2")
    (base / "k.xml").write_text(guest_xml(guest, "k", serial, disk_xml(disk)))
    async with qemu_agent(h):
        await h.ok("define", str(base / "k.xml"))
        await h.ok("start", "k")
        await wait_serial(serial, "VIRTBUS-GUEST-READY")
        await wait_tick(serial, 3)
        before = ticks(serial)[-1]
        out = await h.ok("snapshot-create-as", "k", "s1", "--description", "first one")
        assert "Domain snapshot s1 created" in out
        after = ticks(serial)[-1]
        assert image_snapshots(disk) == ["s1"]
        late = await wait_tick(serial, after + 15)  # 3 s of guest life after the snapshot
        last = ticks(serial)[-1]  # read first: a tick printed meanwhile lies after offset
        offset = serial.stat().st_size
        await h.ok("snapshot-revert", "k", "s1")
        first = await tick_after_revert(serial, offset, last)
        # memory came back: counting resumes right after the snapshot's tick
        assert before <= first <= after + 2 < late, (before, first, after, late)
        await h.events.wait("k", "resumed", "from_snapshot")
        seen = h.events.of("k")
        assert seen[2:] == [("suspended", "from_snapshot"), ("resumed", "from_snapshot")], seen
        assert "running (from_snapshot)" in await h.ok("domstate", "k", "--reason")

        # a child, the tree, the metadata verbs; dumpxml is valid libvirt XML
        await h.ok("snapshot-create", "k")  # libvirt's default name: the time
        named = (await h.run("--json", "snapshot-current", "k")).json()["name"]
        assert named.isdigit() and await h.ok("snapshot-parent", "k", named) == "s1\n"
        tree = await h.ok("snapshot-list", "k", "--tree")
        assert tree.splitlines() == ["s1", "  |", f"  +- {named}"], tree
        assert (await h.ok("snapshot-list", "k", "--roots", "--name")).split() == ["s1"]
        assert (await h.ok("snapshot-list", "k", "--leaves", "--name")).split() == [named]
        info = await h.ok("snapshot-info", "k", "s1")
        assert re.search(r"Children:\s+1", info) and re.search(r"Current:\s+no", info), info
        xml = await h.ok("snapshot-dumpxml", "k", "s1")
        assert "<state>running</state>" in xml and "<description>first one</description>" in xml
        validate(xml, base)
        err = await h.fails("OPERATION_INVALID", "snapshot-delete", "k", "s1")
        assert "descendant" in err and image_snapshots(disk) == ["s1", named]

    # the metadata survives the agent; the restarted agent reverts paused (--paused)
    async with qemu_agent(h):
        assert (await h.ok("snapshot-list", "k", "--name")).split() == ["s1", named]
        assert (await h.ok("snapshot-current", "k", "--name")).strip() == named
        await h.ok("snapshot-revert", "k", "s1", "--paused")
        await h.events.wait("k", "suspended", "from_snapshot")
        assert "paused" in await h.ok("domstate", "k")
        await asyncio.sleep(0.5)  # paused: no tick may come (a running guest prints 2)
        offset = serial.stat().st_size
        await asyncio.sleep(0.5)
        assert serial.stat().st_size == offset, "a paused guest printed"
        await h.ok("resume", "k")
        first = await first_tick(serial, offset)
        assert before <= first <= after + 2, (before, first, after)
        out = await h.ok("snapshot-delete", "k", "s1", "--children")
        assert "Domain snapshot s1 deleted" in out
        assert image_snapshots(disk) == []
        assert (await h.ok("snapshot-list", "k", "--name")).split() == []
        await h.fails("NO_DOMAIN_SNAPSHOT", "snapshot-current", "k")
        await _destroy_all(h)


async def test_offline_snapshot_and_bad_input(host: Host, guest: TestGuest) -> None:
    h, base = host, host.base
    disk = image(base / "o.qcow2")
    raw = image(base / "r.raw", "raw")
    (base / "o.xml").write_text(guest_xml(guest, "o", base / "o.serial", disk_xml(disk)))
    (base / "r.xml").write_text(guest_xml(guest, "r", base / "r.serial", disk_xml(raw, "raw")))
    async with qemu_agent(h):
        await h.ok("define", str(base / "o.xml"))
        await h.ok("define", str(base / "r.xml"))
        # shut off: qemu-img snapshot; the snapshot's state is shutoff, no memory
        await h.ok("snapshot-create-as", "o", "off1")
        assert image_snapshots(disk) == ["off1"]
        assert "<state>shutoff</state>" in await h.ok("snapshot-dumpxml", "o", "off1")
        # a raw disk cannot hold an internal snapshot: a clear error, nothing recorded
        err = await h.fails("CONFIG_UNSUPPORTED", "snapshot-create-as", "r", "x")
        assert "'vda'" in err and "raw" in err and "qcow2" in err
        assert (await h.ok("snapshot-list", "r", "--name")).split() == []
        # another domain's snapshot is not this domain's
        await h.fails("NO_DOMAIN_SNAPSHOT", "snapshot-revert", "r", "off1")
        await h.fails("NO_DOMAIN_SNAPSHOT", "snapshot-info", "o", "nope")
        # bad requests, refused before anything is done
        await h.fails("INVALID_ARG", "snapshot-create-as", "o", "a/b")
        await h.fails("OPERATION_INVALID", "snapshot-create-as", "o", "off1")
        await h.fails("NO_SUPPORT", "snapshot-create-as", "o", "e", "--reuse-external")
        err = await h.fails("XML_ERROR", "snapshot-create-as", "o", "e", "--memspec",
                            f"file={base}/o.mem")  # shut off: no memory to save  # fmt: skip
        assert "offline" in err and not (base / "o.mem").exists()
        await h.fails("OPERATION_INVALID", "undefine", "o")  # it has snapshots
        # running, then reverted to the shut-off snapshot: destroyed with from_snapshot
        await h.ok("start", "o")
        await wait_serial(base / "o.serial", "VIRTBUS-GUEST-READY")
        await h.ok("snapshot-revert", "o", "off1")
        await h.events.wait("o", "stopped", "from_snapshot")
        assert "shut off" in await h.ok("domstate", "o")
        # --running boots it from the reverted disks
        await h.ok("snapshot-revert", "o", "off1", "--running")
        await h.events.wait("o", "started", "from_snapshot")
        assert "running" in await h.ok("domstate", "o")
        await h.ok("destroy", "o")
        await h.ok("snapshot-delete", "o", "off1")
        assert image_snapshots(disk) == []
        await h.ok("undefine", "o")
        # the agent still serves after every refusal
        listing = (await cli("--json", "list", "--all", "--host", h.name)).json()
        assert [d["name"] for d in listing] == ["r"]
        await _destroy_all(h)
