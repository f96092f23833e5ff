"""``virtbus migrate --copy-storage-all`` (and ``--copy-storage-inc``) of a real QEMU
guest between two agents whose pools are separate directories, driven by
virtbus-scheduler.

The guest's disk is a qcow2 volume of pool ``cs`` on the source only: 8 MiB of the test
disk's sector pattern, then 8 MiB of 0x5A. Inside the guest, ``write 1`` puts zeros over
[8, 9) MiB: the marker. The destination's ``cs`` starts empty; after the migration the
guest, now running there, reads its disk back (``disk-md5 16``) and must see exactly
pattern + marker + 0x5A: the bytes came through the NBD mirror, the guest's write too.

Before that, on the same guest: each bad input is refused with its code while the guest
keeps running on the source and both agents keep serving; and the destination QEMU is
killed while the disks are being copied (the mirror rate-limited to 4 MiB/s; the error
says the mirror failed and memory was never sent): the migration fails, the guest runs on
the source with its disk as it was, and no volume is left on the destination;
``migrate-cancel`` in that phase (1 MiB/s) ends the same way, cancelled,
and so does one sent once the scheduler says memory is being sent (``--bandwidth 4``:
the disks take 4 s, memory some more). The source agent is SIGKILLed while the disks are
copied (QEMU keeps mirroring: its mirror job and NBD node are seen on its QMP socket) and
restarted: it cancels them and the migration fails back to the source. After each of
these two rollbacks the source QEMU's QMP socket (the agent stopped a moment) shows no
job and no NBD node left, and the last migration of the same guest, the real one,
succeeds.

Then ``--copy-storage-inc``: a second guest runs on a qcow2 overlay (a file disk) whose
base, the same 16 MiB, is in both pools; it writes the marker into the overlay and moves
with only the overlay copied: it reads the marker and the base back at the destination,
whose overlay holds less than 8 MiB over that host's base (refused with NO_STORAGE_VOL
while the base is missing there).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.e2e.conftest import qemu_pids_under
from tests.guests import ensure_test_guest
from tests.integration.test_scheduler_cluster import (  # noqa: F401 - the vhost fixture
    URL,
    agents,
    placed,
    scheduler_process,
    vcli,
    vhost,
    wait_hosts,
)
from tests.procs import AgentProc, agent_process, cli
from virtbus.client import Client
from virtbus.protocol.migration import MigrationRecord

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]
MIB = 1 << 20
CONTROL = "org.virtbus.guest.0"
REPLY_TIMEOUT = 30.0


def guest_xml(kernel: Path, initrd: Path, cmdline: str, serial: Path, pool: str,
              uuid: str = "", name: str = "cs1", file: Path | None = None) -> str:  # fmt: skip
    """The test guest on volume ``disk.qcow2`` of ``pool``, or on the image ``file``."""
    disk = (f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source"
            f" file='{file}'/>" if file else "<disk type='volume' device='disk'><driver"
            f" name='qemu' type='qcow2'/><source pool='{pool}' volume='disk.qcow2'/>")  # fmt: skip
    return f"""<domain type='qemu'>
  <name>{name}</name>{f"<uuid>{uuid}</uuid>" if uuid else ""}
  <memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{cmdline}</cmdline></os>
  <features><acpi/></features>
  <devices>
    <channel type='unix'><target type='virtio' name='{CONTROL}'/></channel>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    {disk}<target dev='vda' bus='virtio'/></disk>
  </devices>
</domain>"""


class Guest:
    """The guest's control port (a virtio-serial channel): one command, one reply line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, state_dir: Path, uuid: str) -> Guest:
        (sock,) = list(state_dir.rglob(f"{uuid}.channel0.sock"))
        return cls(*await asyncio.open_unix_connection(str(sock)))

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

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def wait_text(path: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text.encode() not in (path.read_bytes() if path.exists() else b""):
        assert time.monotonic() < deadline, f"{text!r} never on {path}"
        await asyncio.sleep(0.2)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs (a pool that lacks room); unmounted afterwards."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def listening_tcp(pid: int) -> int:
    """How many TCP sockets ``pid`` listens on (an NBD server left open would be one)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A":  # LISTEN
                inodes.add(fields[9])
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return sum(1 for link in links if link.startswith("socket:[") and link[8:-1] in inodes)


async def wait_pool(host: str, pool: str, timeout: float = 15) -> None:
    """The scheduler's view shows ``pool`` running on ``host`` (its placement filter
    reads the heartbeats): a migration asked earlier would be NO_HOST."""
    async with asyncio.timeout(timeout):
        while True:
            seen = [h for h in await vcli("hosts") if h["host"] == host]
            if seen and any(p["name"] == pool and p["state"] == "running"
                            for p in seen[0].get("pools", [])):  # fmt: skip
                return
            await asyncio.sleep(0.2)


async def until(mid: str, ready: Callable[[MigrationRecord], bool],
                timeout: float = 60) -> MigrationRecord:  # fmt: skip
    """Follow migration ``mid`` (the scheduler's long poll) until ``ready`` holds for its
    record; fails if it ends first."""
    async with await Client.connect(URL) as client, asyncio.timeout(timeout):
        async for rec in client.scheduler.follow(mid):
            if ready(rec):
                return rec
    raise AssertionError(f"migration {mid} ended without that: {rec}")


async def qmp_leftovers(state_dir: Path, uuid: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The source QEMU's jobs and its copy-storage NBD nodes, asked on its QMP socket
    while its agent is gone (QEMU serves one monitor client at a time)."""
    status = json.loads(next(state_dir.rglob(f"{uuid}.status")).read_text())
    client = QMPClient("cs-test")
    await client.connect(status["qmp_socket"])
    try:
        jobs = await client.execute("query-jobs")
        nodes = await client.execute("query-named-block-nodes")
    finally:
        await client.disconnect()
    assert isinstance(jobs, list) and isinstance(nodes, list)
    names = [str(n["node-name"]) for n in nodes if str(n["node-name"]).startswith("virtbus-nbd-")]
    return jobs, names


async def kill(agent: AgentProc) -> None:
    agent.proc.kill()
    await agent.proc.wait()


async def refused(dst_xml: Path, to: str, code: str, name: str = "cs1",
                  flag: str = "--copy-storage-all") -> None:  # fmt: skip
    """A copy-storage migration that must fail with ``code`` (CLI exit 1)."""
    r = await cli("migrate", name, "--to", to, "--xml", str(dst_xml), flag, "--wait", bus=URL,
                  timeout=90)  # fmt: skip
    assert r.code == 1 and code in r.err, (r.code, r.err)


async def test_copy_storage_all_moves_the_guest_and_its_disk(
    vhost: str,  # noqa: F811
    e2e_root: Path,
) -> None:
    guest = await ensure_test_guest()
    base = e2e_root / f"cs{os.getpid() % 10000}"  # short: the channel socket path is bounded
    base.mkdir()
    pool_a, pool_b = base / "pool-a", base / "pool-b"
    pool_a.mkdir()
    pool_b.mkdir()
    # the source volume: the sector pattern, then 0x5A (the marker must overwrite data)
    pattern = guest.disk.read_bytes()[: 8 * MIB]
    raw = base / "disk.raw"
    raw.write_bytes(pattern + b"\x5a" * (8 * MIB))
    convert = ["qemu-img", "convert", "-O", "qcow2", str(raw), str(pool_a / "disk.qcow2")]
    await asyncio.to_thread(subprocess.run, convert, check=True)
    marked = base / "marked.raw"  # what the guest's disk holds after the marker
    marked.write_bytes(pattern + bytes(MIB) + b"\x5a" * (7 * MIB))
    expected = hashlib.md5(marked.read_bytes()).hexdigest()
    serial, dst_serial = base / "cs1-src.serial", base / "cs1-dst.serial"
    args = (guest.kernel, guest.initramfs, guest.cmdline)
    (base / "cs1.xml").write_text(guest_xml(*args, serial, "cs"))
    try:
        config = base / "agent.toml"  # the pools live under the test's directory
        config.write_text(f"[storage]\nroots = [{json.dumps(str(base))}]\n")
        async with (
            agents(base, 2, "--config", str(config), driver="qemu") as (a, b),
            scheduler_process(base / "sched"),
            contextlib.AsyncExitStack() as restarted,  # the source agent after each kill
        ):
            src = a

            async def restart_source() -> AgentProc:
                return await restarted.enter_async_context(agent_process(
                    a.host, a.state_dir, "--config", str(config), driver="qemu", bus=URL,
                    keep_queue=True,
                ))  # fmt: skip

            await wait_hosts(2)
            for host, path in ((a.host, pool_a), (b.host, pool_b)):
                await vcli("pool-create-as", "cs", "dir", "--target", str(path), "--host", host)
                await wait_pool(host, "cs")
            await vcli("define", str(base / "cs1.xml"), "--host", a.host)
            await vcli("start", "cs1", "--host", a.host)
            uuid = (await vcli("dominfo", "cs1", "--host", a.host))["uuid"]
            await wait_text(serial, "VIRTBUS-GUEST-READY")
            g = await Guest.connect(a.state_dir, uuid)
            try:
                assert await g.ask("write 1", "VIRTBUS-DONE") == "write 1"  # the marker
                assert await g.ask("disk-md5 16", "VIRTBUS-DISK-MD5") == f"16 {expected}"
            finally:
                await g.close()

            def dst_xml(pool: str) -> Path:
                path = base / f"cs1-dst-{pool}.xml"
                path.write_text(guest_xml(*args, dst_serial, pool, uuid))
                return path

            async def storage_phase(mid: str) -> None:
                """Wait until the disk copy is under way (some bytes sent, memory not yet):
                the scheduler's long poll, which fails if the migration ends first."""

                def copying(m: MigrationRecord) -> bool:
                    return m.phase == "storage" and m.progress.get("disk_transferred", 0) > 0

                rec = await until(mid, copying, timeout=30)
                progress = rec.progress
                assert progress["phase"] == "disk" and progress["disk_total"] >= 16 * MIB, progress

            async def on_source_only() -> None:
                """The guest runs at the source; the destination serves and holds no copy."""
                assert await placed("cs1") == [(a.host, "running")]
                assert [v["name"] for v in await vcli("vol-list", "cs", "--host", b.host)] == []
                assert sorted(os.listdir(pool_b)) == []

            # --- bad input: each refused with its code; nothing made, both agents serve ---
            await refused(dst_xml("nosuch"), b.host, "NO_STORAGE_POOL")
            await on_source_only()
            await vcli("vol-create-as", "cs", "disk.qcow2", "16M", "--format", "qcow2",
                       "--host", b.host)  # fmt: skip
            await refused(dst_xml("cs"), b.host, "OPERATION_INVALID")  # never overwritten
            await vcli("vol-delete", "disk.qcow2", "--pool", "cs", "--host", b.host)
            with tmpfs(base / "tiny", "4m") as tiny:
                await vcli("pool-create-as", "tiny", "dir", "--target", str(tiny), "--host", b.host)
                await wait_pool(b.host, "tiny")
                await refused(dst_xml("tiny"), b.host, "OPERATION_FAILED")  # 16 MiB into 4
                assert os.listdir(tiny) == []
                await vcli("pool-destroy", "tiny", "--host", b.host)
            await on_source_only()

            # --- the destination QEMU dies while the disk is copied: rolled back (the
            # mirror, rate-limited, sees the lost target only after its pause: at 4 MiB/s
            # that is the disk's 4 s, not 16 s at 1 MiB/s) ---
            r = await cli("--json", "migrate", "cs1", "--to", b.host, "--xml", str(dst_xml("cs")),
                          "--copy-storage-all", "--bandwidth", "4", bus=URL)  # fmt: skip
            assert r.code == 0, r.err
            mid = json.loads(r.out)["id"]
            await storage_phase(mid)
            (dst_pid,) = qemu_pids_under(b.state_dir)
            os.kill(dst_pid, signal.SIGKILL)
            rec = await until(mid, lambda m: m.state != "running")
            assert rec.state == "failed", rec
            # the premise: the kill landed in the disk copy (the mirror failed, memory was
            # never being sent), not after it
            assert "mirror of disk 'vda'" in (rec.error or ""), rec
            assert "progress" not in [p for p, _t in rec.history], rec.history
            await on_source_only()
            g = await Guest.connect(a.state_dir, uuid)
            try:
                assert await g.ask("ping x", "VIRTBUS-PONG") == "x"
                assert await g.ask("disk-md5 16", "VIRTBUS-DISK-MD5") == f"16 {expected}"
            finally:
                await g.close()

            # --- migrate-cancel while the disk is copied: rolled back the same way ---
            r = await cli("--json", "migrate", "cs1", "--to", b.host, "--xml", str(dst_xml("cs")),
                          "--copy-storage-all", "--bandwidth", "1", bus=URL)  # fmt: skip
            assert r.code == 0, r.err
            mid = json.loads(r.out)["id"]
            await storage_phase(mid)
            await vcli("migrate-cancel", "cs1")
            rec = await until(mid, lambda m: m.state != "running")
            assert rec.state == "cancelled", rec
            await on_source_only()
            assert qemu_pids_under(b.state_dir) == []

            async def rolled_back() -> None:
                """The guest runs on at the source, its disk as it was, the destination holds
                nothing; the source QEMU keeps no job and no NBD node (asked on its QMP
                socket with the agent stopped, then the agent comes back)."""
                nonlocal src
                await on_source_only()
                assert qemu_pids_under(b.state_dir) == []
                g = await Guest.connect(a.state_dir, uuid)
                try:
                    assert await g.ask("ping y", "VIRTBUS-PONG") == "y"
                    assert await g.ask("disk-md5 16", "VIRTBUS-DISK-MD5") == f"16 {expected}"
                finally:
                    await g.close()
                await kill(src)
                assert await qmp_leftovers(a.state_dir, uuid) == ([], [])
                src = await restart_source()

            # --- migrate-cancel while memory is sent (after the disks were copied) ---
            r = await cli("--json", "migrate", "cs1", "--to", b.host, "--xml", str(dst_xml("cs")),
                          "--copy-storage-all", "--bandwidth", "4", bus=URL)  # fmt: skip
            assert r.code == 0, r.err
            mid = json.loads(r.out)["id"]
            rec = await until(mid, lambda m: m.phase == "progress" and m.progress.get("phase")
                              == "memory" and m.progress.get("status") == "active")  # fmt: skip
            await vcli("migrate-cancel", "cs1")
            rec = await until(mid, lambda m: m.state != "running")
            assert rec.state == "cancelled", rec
            phases = [p for p, _t in rec.history]
            assert phases.index("storage") < phases.index("progress") < phases.index("rollback")
            await rolled_back()

            # --- the source agent is killed while the disks are copied, and restarted: the
            # mirrors QEMU kept are found by their names and cancelled, the migration fails
            # back to the source ---
            r = await cli("--json", "migrate", "cs1", "--to", b.host, "--xml", str(dst_xml("cs")),
                          "--copy-storage-all", "--bandwidth", "1", bus=URL)  # fmt: skip
            assert r.code == 0, r.err
            mid = json.loads(r.out)["id"]
            await storage_phase(mid)
            await kill(src)
            jobs, nbd_nodes = await qmp_leftovers(a.state_dir, uuid)  # premise: left running
            assert [(j["id"], j["status"]) for j in jobs] == [("virtbus-migrate-vda", "running")]
            assert nbd_nodes == ["virtbus-nbd-vda"]
            src = await restart_source()
            rec = await until(mid, lambda m: m.state != "running", timeout=90)
            assert rec.state == "failed" and "agent restarted" in (rec.error or ""), rec
            await rolled_back()

            # --- the real thing: the marker is read back at the destination ---
            r = await cli("--json", "migrate", "cs1", "--to", b.host, "--xml", str(dst_xml("cs")),
                          "--copy-storage-all", "--wait", bus=URL, timeout=120)  # fmt: skip
            assert r.code == 0, r.err
            rec = json.loads(r.out)
            phases = [p for p, _t in rec["history"]]
            assert phases.index("storage") < phases.index("progress") < phases.index("finish"), (
                phases
            )
            assert await placed("cs1") == [(b.host, "running")]
            g = await Guest.connect(b.state_dir, uuid)
            try:
                assert await g.ask("disk-md5 16", "VIRTBUS-DISK-MD5") == f"16 {expected}"
            finally:
                await g.close()
            assert sorted(os.listdir(pool_b)) == ["disk.qcow2"]
            (dst_pid,) = qemu_pids_under(b.state_dir)
            assert listening_tcp(dst_pid) == 0, "the NBD export of the guest's disk stays open"
            # the source's volume stays as the guest left it (libvirt keeps it too)
            compare = ["qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                       str(pool_a / "disk.qcow2"), str(marked)]  # fmt: skip
            check = await asyncio.to_thread(subprocess.run, compare, check=False)
            assert check.returncode == 0, "the source's disk changed"
            await vcli("destroy", "cs1", "--host", b.host)

            # --- --copy-storage-inc: only the top image moves; its base is on both hosts. A
            # file disk (QEMU follows its image's backing; a volume disk runs alone), in the
            # pool holding its directory: the destination's path comes with --xml ---
            for pool in (pool_b, pool_a):  # pool_a's base comes after the refusal below
                convert = ["qemu-img", "convert", "-O", "qcow2", str(raw), str(pool / "base.qcow2")]
                if pool == pool_b:
                    await asyncio.to_thread(subprocess.run, convert, check=True)
            overlay = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                       "-b", str(pool_b / "base.qcow2"), str(pool_b / "top.qcow2")]  # fmt: skip
            await asyncio.to_thread(subprocess.run, overlay, check=True)
            await vcli("pool-refresh", "cs", "--host", b.host)
            serial2 = base / "cs2-src.serial"
            (base / "cs2.xml").write_text(guest_xml(*args, serial2, "cs", name="cs2",
                                                    file=pool_b / "top.qcow2"))  # fmt: skip
            await vcli("define", str(base / "cs2.xml"), "--host", b.host)
            await vcli("start", "cs2", "--host", b.host)
            uuid2 = (await vcli("dominfo", "cs2", "--host", b.host))["uuid"]
            await wait_text(serial2, "VIRTBUS-GUEST-READY")
            g = await Guest.connect(b.state_dir, uuid2)
            try:
                assert await g.ask("write 1", "VIRTBUS-DONE") == "write 1"  # into the top
                assert await g.ask("disk-md5 16", "VIRTBUS-DISK-MD5") == f"16 {expected}"
            finally:
                await g.close()
            dst2 = base / "cs2-dst.xml"
            dst2.write_text(guest_xml(*args, base / "cs2-dst.serial", "cs", uuid2, name="cs2",
                                      file=pool_a / "top.qcow2"))  # fmt: skip
            await refused(dst2, a.host, "NO_STORAGE_VOL", "cs2", "--copy-storage-inc")  # no base
            assert not (pool_a / "top.qcow2").exists()
            await asyncio.to_thread(subprocess.run, convert, check=True)  # the base on a too
            await vcli("pool-refresh", "cs", "--host", a.host)
            r = await cli("migrate", "cs2", "--to", a.host, "--xml", str(dst2),
                          "--copy-storage-inc", "--wait", bus=URL, timeout=120)  # fmt: skip
            assert r.code == 0, r.err
            assert await placed("cs2") == [(a.host, "running")]
            g = await Guest.connect(a.state_dir, uuid2)
            try:
                assert await g.ask("disk-md5 16", "VIRTBUS-DISK-MD5") == f"16 {expected}"
            finally:
                await g.close()
            info = ["qemu-img", "info", "-U", "--output=json", str(pool_a / "top.qcow2")]
            done = await asyncio.to_thread(subprocess.run, info, check=True, capture_output=True)
            top = json.loads(done.stdout)
            assert top["backing-filename"] == str(pool_a / "base.qcow2"), top
            assert top["actual-size"] < 8 * MIB, top  # the top only: the base did not move
            await vcli("destroy", "cs2", "--host", a.host)
    finally:
        for pid in qemu_pids_under(base):  # never leave a guest behind
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
