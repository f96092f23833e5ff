"""Live migration with real QEMU between two real agents (RabbitMQ on 127.0.0.1).

Two ``virtbus-agent --driver qemu`` processes with different host names on this machine
are driven through their ``migration.*`` bus ops (libvirt's v3 steps: begin, prepare,
perform, status, finish, confirm). The guest is the test kernel (TCG, 256 MiB) whose
serial console prints ``VIRTBUS-TICK n`` every 0.5 s; each QEMU writes the console to its
own file, so "it kept running" is: the destination's file continues the count.
RabbitMQ down -> these tests fail (they never skip).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from drivers.base import DriverEvent, MigrationParams
from drivers.qemu import QemuDriver
from drivers.qemu.migration import MigrationSettings
from tests.e2e.conftest import qemu_pids_under
from tests.guests import TestGuest, build_test_guest
from tests.procs import BUS_URL, agent_process, qemu_test_settings, unique_host
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import EVENTS_EXCHANGE
from virtbus.errors import VirtbusError
from virtbus.protocol import ops

CALL_TIMEOUT = 30.0  # s, one agent op (prepare starts a QEMU)
MIGRATION_TIMEOUT = 60.0  # s, one migration under TCG on a 2-core machine
TICK = re.compile(r"VIRTBUS-TICK (\d+)")


@pytest.fixture(scope="module")
def test_guest() -> TestGuest:
    return build_test_guest()


def guest_xml(guest: TestGuest, name: str, serial: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name><uuid>{uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{guest.kernel}</kernel><initrd>{guest.initramfs}</initrd>
    <cmdline>{guest.cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <devices><serial type='file'><source path='{serial}'/><target port='0'/></serial></devices>
</domain>"""


def with_serial(xml: str, serial: Path) -> str:
    """The destination's copy of the definition: its own console file."""
    return re.sub(r"(<serial type='file'>\s*<source path=')[^']*'", rf"\g<1>{serial}'", xml)


def ticks(path: Path) -> list[int]:
    try:
        return [int(n) for n in TICK.findall(path.read_text(errors="replace"))]
    except OSError:
        return []


async def wait_ticks(path: Path, above: int, timeout: float = 60.0) -> int:
    """Wait until the console file shows a tick greater than ``above``; the last one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = await asyncio.to_thread(ticks, path)
        if seen and seen[-1] > above:
            return seen[-1]
        await asyncio.sleep(0.2)
    raise AssertionError(f"no tick above {above} on {path}: {ticks(path)[-5:]}")


@dataclass
class Cluster:
    """Two agents, a bus client and every event the two hosts publish."""

    root: Path
    hosts: tuple[str, str]
    bus: Any
    events: list[dict[str, Any]] = field(default_factory=list)
    at: str = ""  # the host running the guest the tests of TestOneGuest share
    serial: Path = Path()  # that guest's console file there
    hops: int = 0

    async def call(
        self, host: str, op: str, body: dict[str, Any], timeout: float = CALL_TIMEOUT
    ) -> Any:
        return await self.bus.call(ops.agent_route(host), op, body, timeout=timeout)

    def seen(self, host: str, name: str, since: int = 0) -> list[tuple[str, str | None]]:
        """The events of ``name`` at ``host`` (from the ``since``-th event of the two)."""
        mine = [e for e in self.events[since:] if e["host"] == host and e["domain"] == name]
        return [(e["event"], e["detail"]) for e in mine if e["event"] != "migration"]

    def progress(self, host: str, name: str, since: int = 0) -> list[dict[str, Any]]:
        mine = [e for e in self.events[since:] if e["host"] == host and e["domain"] == name]
        return [e["data"] for e in mine if e["event"] == "migration"]

    def qemus(self, host: str) -> list[int]:
        return qemu_pids_under(self.root / host)

    async def boot(self, guest: TestGuest, host: str, name: str) -> Path:
        serial = self.root / f"{name}-0.serial"
        await self.call(host, ops.DOMAIN_DEFINE, {"xml": guest_xml(guest, name, serial)})
        await self.call(host, ops.DOMAIN_START, {"domain": name})
        await wait_ticks(serial, 1)
        return serial

    async def migrate(self, name: str, src: str, dst: str, serial: Path,
                      params: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        """The v3 steps as a coordinator runs them; returns the final status map."""
        begun = await self.call(src, ops.MIGRATION_BEGIN, {"domain": name})
        xml = with_serial(begun["xml"], serial)
        prepared = await self.call(dst, ops.MIGRATION_PREPARE, {"xml": xml, "params": params or {}})
        body = {"domain": name, "uri": prepared["uri"], "params": params or {}}
        await self.call(src, ops.MIGRATION_PERFORM, body)
        status = await self.wait_migration(src, name)
        ok = status["status"] == "completed"
        await self.call(dst, ops.MIGRATION_FINISH, {"domain": name, "success": ok})
        await self.call(src, ops.MIGRATION_CONFIRM, {"domain": name, "success": ok})
        return status

    async def wait_migration(self, src: str, name: str) -> dict[str, Any]:
        deadline = time.monotonic() + MIGRATION_TIMEOUT
        while time.monotonic() < deadline:
            status = await self.call(src, ops.MIGRATION_STATUS, {"domain": name})
            if status["status"] in ("completed", "failed", "cancelled"):
                return dict(status)
            await asyncio.sleep(0.05)
        raise AssertionError(f"migration of {name} did not end in {MIGRATION_TIMEOUT}s")

    async def state(self, host: str, name: str) -> str | None:
        listing = await self.call(host, ops.DOMAIN_LIST, {"all": True})
        found = [d for d in listing["domains"] if d["name"] == name]
        return found[0]["state"] if found else None

    async def settle(self, check: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, "condition not reached"
            await asyncio.sleep(0.05)

    async def ready(self) -> tuple[str, str, Path, int]:
        """The premise of a test of :class:`TestOneGuest`: its guest runs at ``at`` (one
        QEMU there, none at the other host, no definition there), ticking on its console.
        (that host, the other one, that console, the number of events seen so far)"""
        src = self.at
        (dst,) = (h for h in self.hosts if h != src)
        assert await self.state(src, GUEST) == "running", f"premise: {GUEST} runs at {src}"
        assert await self.state(dst, GUEST) is None, f"premise: {GUEST} is not at {dst}"
        assert len(self.qemus(src)) == 1 and not self.qemus(dst), "premise: one QEMU"
        before = await wait_ticks(self.serial, -1)
        assert await wait_ticks(self.serial, before) > before, "premise: it ticks"
        return src, dst, self.serial, len(self.events)

    def next_serial(self) -> Path:
        """A console file for the guest's next destination."""
        self.hops += 1
        return self.root / f"{GUEST}-{self.hops}.serial"


@asynccontextmanager
async def cluster(e2e_root: Path) -> AsyncIterator[Cluster]:
    root = e2e_root / f"mig-{uuidlib.uuid4().hex[:6]}"
    hosts = (unique_host("miga"), unique_host("migb"))
    async with AsyncExitStack() as stack:
        for host in hosts:
            (root / host).mkdir(parents=True)
            await stack.enter_async_context(agent_process(host, root / host, driver="qemu"))
        bus = open_bus(BUS_URL, src="test-migration")
        await bus.connect()
        stack.push_async_callback(bus.close)
        sub = await bus.subscribe(EVENTS_EXCHANGE, [f"{h}.#" for h in hosts])
        stack.push_async_callback(sub.close)
        cl = Cluster(root, hosts, bus)

        async def collect() -> None:
            async for envelope in sub:
                cl.events.append(envelope.body)

        task = asyncio.create_task(collect(), name="test-migration-events")
        try:
            yield cl
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for host in hosts:  # leave no guest behind (agents keep QEMUs running)
                with contextlib.suppress(VirtbusError):
                    listing = await cl.call(host, ops.DOMAIN_LIST, {"all": True})
                    for dom in listing["domains"]:
                        if dom["state"] != "shutoff":
                            await cl.call(host, ops.DOMAIN_DESTROY, {"domain": dom["name"]})


MODES: list[tuple[str, dict[str, Any]]] = [
    ("bandwidth", {"bandwidth_mib_s": 50}),
    ("auto-converge", {"auto_converge": True, "bandwidth_mib_s": 50, "max_downtime_ms": 100}),
    ("multifd", {"parallel": 2}),
    ("postcopy", {"postcopy": True}),
]


async def _slow_migration(cl: Cluster, name: str, a: str, b: str, serial: Path) -> str:
    """Start a bandwidth-limited migration a->b and wait until it is really streaming."""
    begun = await cl.call(a, ops.MIGRATION_BEGIN, {"domain": name})
    params = {"bandwidth_mib_s": 2}
    xml = with_serial(begun["xml"], serial)
    prepared = await cl.call(b, ops.MIGRATION_PREPARE, {"xml": xml, "params": params})
    await cl.call(
        a, ops.MIGRATION_PERFORM, {"domain": name, "uri": prepared["uri"], "params": params}
    )
    deadline = time.monotonic() + 20
    while True:
        status = await cl.call(a, ops.MIGRATION_STATUS, {"domain": name})
        if status["status"] == "active" and status["transferred"] > 0:
            return str(status["status"])
        assert status["status"] in ("setup", "active") and time.monotonic() < deadline, status
        await asyncio.sleep(0.05)


GUEST = "mover"  # the guest the tests of TestOneGuest share


@pytest_asyncio.fixture(scope="class", loop_scope="class")
async def shared(test_guest: TestGuest, e2e_root: Path) -> AsyncIterator[Cluster]:
    """Two agents and one guest, booted once, for the tests of :class:`TestOneGuest`:
    each finds it where the test before left it (:meth:`Cluster.ready`)."""
    async with cluster(e2e_root) as cl:
        cl.at = cl.hosts[0]
        cl.serial = await cl.boot(test_guest, cl.at, GUEST)
        yield cl


@pytest.mark.asyncio(loop_scope="class")  # the shared cluster's loop
class TestOneGuest:
    async def test_live_migration_keeps_the_guest_running(self, shared: Cluster) -> None:
        cl = shared
        a, b, serial_a, mark = await cl.ready()
        serial_b = cl.next_serial()
        status = await cl.migrate(GUEST, a, b, serial_b)
        assert status["status"] == "completed", status
        cl.at, cl.serial = b, serial_b
        last_at_source = ticks(serial_a)[-1]
        assert await wait_ticks(serial_b, last_at_source + 2) > last_at_source + 2
        assert await cl.state(b, GUEST) == "running"
        assert await cl.state(a, GUEST) is None  # definition removed at the source
        await cl.settle(lambda: not cl.qemus(a))  # the source QEMU is gone
        assert len(cl.qemus(b)) == 1
        info = await cl.call(b, ops.DOMAIN_INFO, {"domain": GUEST})
        assert (info["state"], info["reason"], info["persistent"]) == ("running", "migrated", True)
        await cl.settle(lambda: ("undefined", "removed") in cl.seen(a, GUEST, mark))
        await cl.settle(lambda: ("resumed", "migrated") in cl.seen(b, GUEST, mark))
        assert cl.seen(a, GUEST, mark) == [
            ("suspended", "migrated"), ("stopped", "migrated"), ("undefined", "removed"),
        ]  # fmt: skip
        assert cl.seen(b, GUEST, mark) == [
            ("started", "migrated"), ("defined", "added"), ("resumed", "migrated"),
        ]  # fmt: skip
        progress = cl.progress(a, GUEST, mark)
        assert progress[-1]["status"] == "completed" and progress[-1]["remaining"] == 0
        assert progress[-1]["total"] >= 256 * 1024 * 1024 and progress[-1]["passes"] >= 1
        assert not cl.progress(b, GUEST, mark)  # progress is the source's to report

    async def test_migration_modes_ping_pong(self, shared: Cluster) -> None:
        """One guest moves A->B->A->... once per mode, still counting after every hop."""
        cl = shared
        first, second, serial, mark = await cl.ready()
        hosts = (first, second)
        for hop, (mode, params) in enumerate(MODES, start=1):
            src, dst = hosts[(hop - 1) % 2], hosts[hop % 2]
            next_serial = cl.next_serial()
            hop_mark = len(cl.events)
            status = await cl.migrate(GUEST, src, dst, next_serial, params)
            assert status["status"] == "completed", (mode, status)
            cl.at, cl.serial = dst, next_serial
            before = ticks(serial)[-1]
            assert await wait_ticks(next_serial, before + 1) > before, mode
            assert await cl.state(dst, GUEST) == "running", mode
            assert await cl.state(src, GUEST) is None, mode
            await cl.settle(lambda src=src: not cl.qemus(src))
            await cl.settle(lambda src=src, m=hop_mark: ("undefined", "removed")
                            in cl.seen(src, GUEST, m))  # fmt: skip
            serial = next_serial
        # the postcopy hop (the 4th, from hosts[1]) switches after the first pass unless the
        # guest converged within it; it completed either way (above)
        statuses = [p["status"] for p in cl.progress(hosts[1], GUEST, mark)]
        print("statuses reported by", hosts[1], statuses)
        assert statuses.count("completed") == 2

    async def test_killed_destination_leaves_the_source_running(self, shared: Cluster) -> None:
        cl = shared
        a, b, serial_a, mark = await cl.ready()
        await _slow_migration(cl, GUEST, a, b, cl.next_serial())
        (dest_pid,) = cl.qemus(b)
        os.kill(dest_pid, signal.SIGKILL)
        status = await cl.wait_migration(a, GUEST)
        assert status["status"] == "failed", status
        finish = await cl.call(b, ops.MIGRATION_FINISH, {"domain": GUEST, "success": False})
        assert finish["state"] == "absent"
        await cl.call(a, ops.MIGRATION_CONFIRM, {"domain": GUEST, "success": False})
        assert await cl.state(a, GUEST) == "running"
        assert await cl.state(b, GUEST) is None
        before = ticks(serial_a)[-1]
        assert await wait_ticks(serial_a, before + 1) > before  # still counting at the source
        await cl.settle(lambda: ("stopped", "failed") in cl.seen(b, GUEST, mark))
        assert not cl.qemus(b)

    async def test_cancel_mid_migration(self, shared: Cluster) -> None:
        cl = shared
        a, b, serial_a, mark = await cl.ready()
        await _slow_migration(cl, GUEST, a, b, cl.next_serial())
        await cl.call(a, ops.MIGRATION_CANCEL, {"domain": GUEST})
        status = await cl.call(a, ops.MIGRATION_STATUS, {"domain": GUEST})
        assert status["status"] == "cancelled", status
        finish = await cl.call(b, ops.MIGRATION_FINISH, {"domain": GUEST, "success": False})
        assert finish["state"] == "absent"
        await cl.call(a, ops.MIGRATION_CONFIRM, {"domain": GUEST, "success": False})
        assert await cl.state(a, GUEST) == "running"
        assert await cl.state(b, GUEST) is None
        await cl.settle(lambda: not cl.qemus(b))  # the destination QEMU is gone
        before = ticks(serial_a)[-1]
        assert await wait_ticks(serial_a, before + 1) > before
        await cl.settle(lambda: ("stopped", "failed") in cl.seen(b, GUEST, mark))
        assert cl.seen(b, GUEST, mark) == [("started", "migrated"), ("stopped", "failed")]

    async def test_status_with_wait_answers_when_the_migration_ends(self, shared: Cluster) -> None:
        """``migration.status`` with ``wait`` is a long poll (what the scheduler follows a
        migration with): asked right after perform, it answers with the end, as QEMU's
        MIGRATION event reports it, not with the progress of that moment."""
        cl = shared
        a, b, _serial_a, _mark = await cl.ready()
        serial_b = cl.next_serial()
        begun = await cl.call(a, ops.MIGRATION_BEGIN, {"domain": GUEST})
        params = {"bandwidth_mib_s": 20}  # the stream takes a while: not over at once
        xml = with_serial(begun["xml"], serial_b)
        prepared = await cl.call(b, ops.MIGRATION_PREPARE, {"xml": xml, "params": params})
        body = {"domain": GUEST, "uri": prepared["uri"], "params": params}
        await cl.call(a, ops.MIGRATION_PERFORM, body)
        status = await cl.call(a, ops.MIGRATION_STATUS, {"domain": GUEST, "wait": 60},
                               timeout=MIGRATION_TIMEOUT + CALL_TIMEOUT)  # fmt: skip
        assert status["status"] == "completed", status
        await cl.call(b, ops.MIGRATION_FINISH, {"domain": GUEST, "success": True})
        await cl.call(a, ops.MIGRATION_CONFIRM, {"domain": GUEST, "success": True})
        cl.at, cl.serial = b, serial_b
        assert await cl.state(b, GUEST) == "running"
        assert await cl.state(a, GUEST) is None
        await cl.settle(lambda: not cl.qemus(a))


async def test_postcopy_switch_in_process(test_guest: TestGuest, e2e_root: Path) -> None:
    """Driver level (two QemuDriver instances in this process): postcopy really engaged.

    Over the bus the switch happens after the first pass, which an idle guest often never
    needs; here the source switches as soon as the first pass runs (slowed by a bandwidth
    limit), so the guest finishes its move in postcopy mode.
    """
    root = e2e_root / f"pc-{uuidlib.uuid4().hex[:6]}"
    events: list[DriverEvent] = []
    eager = MigrationSettings(postcopy_after_passes=0)  # the source switches at once
    src = QemuDriver(root / "a" / "state", root / "a" / "run", qemu_test_settings(root / "a"),
                     migration=eager)  # fmt: skip
    dst = QemuDriver(root / "b" / "state", root / "b" / "run", qemu_test_settings(root / "b"))
    for drv in (src, dst):
        await drv.open(events.append)
    serial_a, serial_b = root / "pc-0.serial", root / "pc-1.serial"
    try:
        ref = await src.define(guest_xml(test_guest, "pc", serial_a))
        await src.start(ref.name)
        last = await wait_ticks(serial_a, 1)
        params = MigrationParams(postcopy=True, bandwidth_mib_s=20)
        xml = with_serial(await src.migrate_begin("pc"), serial_b)
        uri = await dst.migrate_prepare(xml, params)
        await src.migrate_perform("pc", uri, params)
        deadline = time.monotonic() + MIGRATION_TIMEOUT
        while (status := await src.migrate_status("pc")).status not in ("completed", "failed"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert status.status == "completed", status
        await dst.migrate_finish("pc", True)
        await src.migrate_confirm("pc", True)
        seen = [e.data["status"] for e in events if e.event == "migration"]
        assert "postcopy-active" in seen, seen
        assert await wait_ticks(serial_b, last + 2) > last + 2
        assert (await dst.info("pc")).state.label == "running" and src.lookup("pc") is None
    finally:
        for drv in (src, dst):
            if drv.lookup("pc") is not None and (await drv.info("pc")).state.label != "shutoff":
                await drv.destroy("pc")
            await drv.close()
