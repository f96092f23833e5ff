"""Live migration of a real QEMU guest between two agents, driven by virtbus-scheduler.

The test kernel's guest prints ``VIRTBUS-TICK n`` on its serial console every half
second. Each side writes its own serial file (the destination's definition is given with
``virtbus migrate --xml``, as in test_qemu_live_migration.py): after the move the source
QEMU is gone and the destination's file carries on from the source's last tick, so the
guest really kept running there. Migration over 127.0.0.1 TCP, shared storage (the same
image paths on both "hosts").
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from drivers.qemu.cgroup import PARENT
from tests.e2e.conftest import qemu_pids_under
from tests.e2e.test_qemu_cgroup_devices import devices_group, hierarchy
from tests.guests import TestGuest, ensure_test_guest
from tests.integration.test_scheduler_cluster import (  # noqa: F401 - the vhost fixture
    URL,
    agents,
    placed,
    scheduler_process,
    vcli,
    vhost,
    wait_hosts,
)
from tests.procs import AgentProc, agent_process, cli, unique_host

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]
TICK = re.compile(rb"VIRTBUS-TICK (\d+)")


def kernel_xml(kernel: Path, initrd: Path, cmdline: str, serial: Path, uuid: str = "") -> str:
    return f"""<domain type='qemu'>
  <name>mig1</name>{f"<uuid>{uuid}</uuid>" if uuid else ""}
  <memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline></os>
  <features><acpi/></features>
  <devices><serial type='file'><source path='{serial}'/><target port='0'/></serial></devices>
</domain>"""


def max_tick(path: Path) -> int:
    try:
        data = path.read_bytes()
    except OSError:
        return -1
    return max((int(m) for m in TICK.findall(data)), default=-1)


async def wait_tick(path: Path, above: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = await asyncio.to_thread(max_tick, path)
        if n > above:
            return n
        await asyncio.sleep(0.3)
    raise AssertionError(f"no VIRTBUS-TICK above {above} on {path}")


@dataclass
class Pair:
    """Two agents and the scheduler, and one guest (``mig1``) that the tests of
    :class:`TestOnePair` move back and forth: each finds it where the last one left it
    (:meth:`ready` asserts that premise) instead of starting agents and a guest of its own."""

    base: Path
    guest: TestGuest
    agents: tuple[AgentProc, AgentProc]
    uuid: str
    consoles: dict[str, Path]  # by host: the console file of its latest QEMU of the guest
    hops: int = 0

    async def ready(self) -> tuple[AgentProc, AgentProc, Path]:
        """The premise: the guest runs at one host of the pair and nowhere else (one QEMU
        there, the last source's gone), ticking on that host's console.
        (that host's agent, the other one's, that console)"""
        where = await placed("mig1")
        assert len(where) == 1 and where[0][1] == "running", f"premise: {where}"
        (at,) = (a for a in self.agents if a.host == where[0][0])
        (other,) = (a for a in self.agents if a is not at)
        last = max_tick(self.consoles[at.host])
        assert await wait_tick(self.consoles[at.host], last) > last, "premise: it ticks"
        assert len(qemu_pids_under(at.state_dir)) == 1
        async with asyncio.timeout(30):  # the last source's QEMU has quit (confirm)
            while qemu_pids_under(other.state_dir):
                await asyncio.sleep(0.05)
        return at, other, self.consoles[at.host]

    def dest(self, host: str) -> tuple[Path, Path]:
        """A definition for ``host`` with a console file of its own, and that file."""
        self.hops += 1
        serial, xml = self.base / f"mig1-{self.hops}.serial", self.base / f"mig1-{self.hops}.xml"
        g = self.guest
        xml.write_text(kernel_xml(g.kernel, g.initramfs, g.cmdline, serial, self.uuid))
        self.consoles[host] = serial
        return xml, serial


@pytest_asyncio.fixture(scope="class", loop_scope="class")
async def pair(vhost: str, e2e_root: Path) -> AsyncIterator[Pair]:  # noqa: F811
    """Class-scoped: torn down before the module's other tests start agents and a
    scheduler of their own in the same vhost."""
    guest = await ensure_test_guest()
    base = e2e_root / f"mig-{time.monotonic_ns()}"
    base.mkdir()
    serial, xml = base / "mig1-0.serial", base / "mig1.xml"
    xml.write_text(kernel_xml(guest.kernel, guest.initramfs, guest.cmdline, serial))
    try:
        async with agents(base, 2, driver="qemu") as (a, b), scheduler_process(base / "sched"):
            await wait_hosts(2)
            await vcli("define", str(xml), "--host", a.host)
            await vcli("start", "mig1", "--host", a.host)
            uuid = (await vcli("dominfo", "mig1", "--host", a.host))["uuid"]
            await wait_tick(serial, 2)
            p = Pair(base, guest, (a, b), uuid, {a.host: serial})
            try:
                yield p
            finally:  # the QEMU is killed below if this cannot reach it
                for host in (a.host, b.host):
                    await cli("destroy", "mig1", "--host", host, bus=URL)
    finally:
        for pid in qemu_pids_under(base):  # never leave a guest behind
            os.kill(pid, 9)


@pytest.mark.asyncio(loop_scope="class")  # the pair's loop
class TestOnePair:
    @pytest.mark.parametrize(
        "options",
        [(), ("--bandwidth", "64", "--auto-converge"), ("--postcopy",), ("--parallel", "2")],
        ids=["plain", "bandwidth-autoconverge", "postcopy", "multifd"],
    )
    async def test_running_guest_moves_and_keeps_ticking(
        self, pair: Pair, options: tuple[str, ...]
    ) -> None:
        a, b, serial = await pair.ready()
        dst_xml, dst_serial = pair.dest(b.host)
        src_pids = set(qemu_pids_under(a.state_dir))
        assert len(src_pids) == 1, src_pids
        r = await cli(
            "migrate", "mig1", "--to", b.host, "--xml", str(dst_xml), *options, "--wait",
            bus=URL, timeout=120,
        )  # fmt: skip
        assert r.code == 0, r.err
        assert await placed("mig1") == [(b.host, "running")]
        last_at_source = max_tick(serial)
        async with asyncio.timeout(30):  # confirm quit the source's QEMU; it may still exit
            while src_pids & set(qemu_pids_under(a.state_dir)):
                await asyncio.sleep(0.05)
        # only the destination writes this file, from where the source stopped
        assert await wait_tick(dst_serial, last_at_source + 2) > last_at_source + 2
        assert max_tick(serial) == last_at_source, "the source's console still counts"


async def test_a_guest_of_the_unprivileged_qemu_user_migrates(
    vhost: str,  # noqa: F811
) -> None:
    """Issue 13's "migration keeps working under the unprivileged uid": both agents run
    their QEMUs as ``virtbus-qemu`` (qemu_user); the guest moves and keeps ticking, its
    destination QEMU runs as that uid, the source's is gone."""
    qemu_user = pwd.getpwnam("virtbus-qemu")  # made by deploy/setup-dev
    guest = await ensure_test_guest()
    base = Path(tempfile.mkdtemp(prefix="virtbus-migdac-"))  # searchable by the QEMU user
    try:
        base.chmod(0o755)
        kernel, initrd = base / "vmlinuz", base / "initrd"
        shutil.copyfile(guest.kernel, kernel)
        shutil.copyfile(guest.initramfs, initrd)
        serial, dst_serial = base / "dac1-src.serial", base / "dac1-dst.serial"
        xml = base / "dac1.xml"
        xml.write_text(kernel_xml(kernel, initrd, guest.cmdline, serial).replace("mig1", "dac1"))
        user = ("--driver-option", "qemu_user=virtbus-qemu")
        async with (
            agents(base, 2, *user, driver="qemu") as (a, b),
            scheduler_process(base / "sched"),
        ):
            await wait_hosts(2)
            await vcli("define", str(xml), "--host", a.host)
            await vcli("start", "dac1", "--host", a.host)
            info = await cli("--json", "dominfo", "dac1", "--host", a.host, bus=URL)
            dst = kernel_xml(kernel, initrd, guest.cmdline, dst_serial, info.json()["uuid"])
            (base / "dac1-dst.xml").write_text(dst.replace("mig1", "dac1"))
            await wait_tick(serial, 2)
            r = await cli(
                "migrate", "dac1", "--to", b.host, "--xml", str(base / "dac1-dst.xml"),
                "--wait", bus=URL, timeout=120,
            )  # fmt: skip
            assert r.code == 0, r.err
            assert await placed("dac1") == [(b.host, "running")]
            (pid,) = qemu_pids_under(b.state_dir)
            status = Path(f"/proc/{pid}/status").read_text()
            uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
            assert uids is not None
            assert {int(x) for x in uids.group(1).split()} == {qemu_user.pw_uid}
            last = max_tick(serial)
            assert await wait_tick(dst_serial, last + 2) > last + 2
            async with asyncio.timeout(30):  # confirm quit the source's QEMU
                while qemu_pids_under(a.state_dir):
                    await asyncio.sleep(0.05)
            await vcli("destroy", "dac1", "--host", b.host)
    finally:
        for pid in qemu_pids_under(base):  # never leave a guest behind
            os.kill(pid, 9)
        shutil.rmtree(base, ignore_errors=True)


async def test_a_guest_with_its_own_uid_migrates_and_takes_one_of_the_destinations(
    vhost: str,  # noqa: F811
) -> None:
    """Issue 13 item 5 under migration: two agents with disjoint ``qemu_uid_range``s; the
    guest's QEMU runs as a uid of the source's range, its destination QEMU as one of the
    destination's, the source's uid is free once it left, and its disk (shared storage)
    moves from one uid to the other and back to its owner when the guest stops; a failed
    attempt first gives the disk back to the source's uid. Both agents confine QEMU to a
    device cgroup too (``cgroup_devices=on``): the destination's QEMU gets a group of its
    own agent's through the same launch, and the source's goes with its QEMU."""
    guest = await ensure_test_guest()
    base = Path(tempfile.mkdtemp(prefix="virtbus-miguid-"))  # searchable by every uid
    try:
        base.chmod(0o755)
        kernel, initrd = base / "vmlinuz", base / "initrd"
        shutil.copyfile(guest.kernel, kernel)
        shutil.copyfile(guest.initramfs, initrd)
        data = base / "data.img"
        data.write_bytes(bytes(1 << 20))
        data.chmod(0o644)
        disk = (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source "
                f"file='{data}'/><target dev='vdb' bus='virtio'/></disk></devices>")  # fmt: skip
        serial, dst_serial = base / "uid1-src.serial", base / "uid1-dst.serial"
        xml = base / "uid1.xml"
        xml.write_text(kernel_xml(kernel, initrd, guest.cmdline, serial)
                       .replace("mig1", "uid1").replace("</devices>", disk))  # fmt: skip
        ranges = ("232000-232009", "232100-232109")
        async with AsyncExitStack() as stack:
            procs = []
            for uids in ranges:
                host = unique_host("uid")
                (base / host).mkdir()
                procs.append(await stack.enter_async_context(agent_process(
                    host, base / host, "--driver-option", f"qemu_uid_range={uids}",
                    "--driver-option", "cgroup_devices=on",
                    driver="qemu", bus=URL, keep_queue=True)))  # fmt: skip
            a, b = procs
            await stack.enter_async_context(scheduler_process(base / "sched"))
            await wait_hosts(2)
            await vcli("define", str(xml), "--host", a.host)
            await vcli("start", "uid1", "--host", a.host)
            (pid,) = qemu_pids_under(a.state_dir)
            assert uid_of(pid) == 232000 and data.stat().st_uid == 232000
            info = await cli("--json", "dominfo", "uid1", "--host", a.host, bus=URL)
            uuid = info.json()["uuid"]
            src_group = devices_group(pid)
            assert src_group.startswith(f"/{PARENT}/") and src_group.endswith(uuid), src_group
            assert (hierarchy() / src_group.lstrip("/")).is_dir()
            dst = kernel_xml(kernel, initrd, guest.cmdline, dst_serial, uuid)
            dst = dst.replace("mig1", "uid1").replace("</devices>", disk)
            (base / "uid1-dst.xml").write_text(dst)
            await wait_tick(serial, 2)
            # a destination that fails after taking the disk over gives it back to the source
            hidden = base / "hidden"
            hidden.mkdir(mode=0o700)  # root's: the destination's uid cannot reach its console
            (base / "uid1-bad.xml").write_text(dst.replace(str(dst_serial), str(hidden / "s")))
            r = await cli(
                "migrate", "uid1", "--to", b.host, "--xml", str(base / "uid1-bad.xml"),
                "--wait", bus=URL, timeout=120,
            )  # fmt: skip
            assert r.code != 0 and "not searchable" in r.err, r.err
            assert await placed("uid1") == [(a.host, "running")]
            assert data.stat().st_uid == 232000 and allocations(b.state_dir) == {}
            r = await cli(
                "migrate", "uid1", "--to", b.host, "--xml", str(base / "uid1-dst.xml"),
                "--wait", bus=URL, timeout=120,
            )  # fmt: skip
            assert r.code == 0, r.err
            assert await placed("uid1") == [(b.host, "running")]
            (pid,) = qemu_pids_under(b.state_dir)
            assert uid_of(pid) == 232100 and data.stat().st_uid == 232100
            dst_group = devices_group(pid)  # the destination agent's, not the source's
            assert dst_group.endswith(uuid) and dst_group != src_group, dst_group
            last = max_tick(serial)
            assert await wait_tick(dst_serial, last + 2) > last + 2
            async with asyncio.timeout(30):  # confirm quit the source's QEMU
                while qemu_pids_under(a.state_dir):
                    await asyncio.sleep(0.05)
            assert allocations(a.state_dir) == {}  # the source's uid is free again
            async with asyncio.timeout(30):  # nor its group: removed once QEMU is reaped
                while (hierarchy() / src_group.lstrip("/")).exists():
                    await asyncio.sleep(0.05)
            assert allocations(b.state_dir) == {uuid: 232100}
            assert data.stat().st_uid == 232100  # the source's stop left it to the destination
            await vcli("destroy", "uid1", "--host", b.host)
            info_ = data.stat()
            assert (info_.st_uid, info_.st_mode & 0o777) == (0, 0o644)
    finally:
        for pid in qemu_pids_under(base):  # never leave a guest behind
            os.kill(pid, 9)
        shutil.rmtree(base, ignore_errors=True)


def uid_of(pid: int) -> int:
    found = re.search(r"^Uid:\s+(.*)$", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert found is not None
    (uid,) = {int(x) for x in found.group(1).split()}
    return uid


def allocations(state_dir: Path) -> dict[str, int]:
    (path,) = state_dir.rglob("qemu-uids.json")
    return {k: int(v) for k, v in json.loads(path.read_text())["uids"].items()}
