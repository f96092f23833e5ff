"""Live migration with non-shared disks: ``migrate --copy-storage-all`` through virtbus vs
the bare QMP sequence, in the same run (issue 16 part 5's benchmark).

The test guest (kernel + busybox initramfs, 256 MiB, TCG) with one 1 GiB qcow2 disk that
holds 200 MiB of data (random bytes at its start, the rest unallocated) moves back and
forth on 127.0.0.1 between two "hosts" whose disks are separate directories:

- **bare**: two QEMUs of our own (the driver's command line for the same definition) and
  qemu.qmp: ``qemu-img create`` of the destination image, spawn it with ``-incoming
  defer``, ``nbd-server-start`` + ``block-export-add`` (writable), ``migrate-incoming``;
  on the source ``blockdev-add`` (nbd) + ``blockdev-mirror`` (``sync=full``), wait for
  ``BLOCK_JOB_READY``, ``migrate`` with ``pause-before-switchover``, at
  ``pre-switchover`` ``block-job-cancel`` (wait ``BLOCK_JOB_COMPLETED``) and
  ``migrate-continue``, wait both sides ``completed``, ``nbd-server-stop`` and ``cont``
  on the destination, ``quit`` the source, remove its image: libvirt's sequence;
- **virtbus**: two real ``virtbus-agent --driver qemu``, ``virtbus-scheduler``, the
  Python client over RabbitMQ (a vhost of its own): ``scheduler.migrate`` with
  ``copy_storage_all`` and the record followed until ``completed`` (the destination
  agent makes the volume, the source's copy is dropped after each round, untimed, as the
  bare side's removal is not timed either).

Total = from the first step until the guest runs at the destination and the source QEMU
is gone. Rounds alternate which side goes first. Medians of ``--rounds`` (3). The load
average is printed before and after; every QEMU is killed by PID at the end.

    .venv/bin/python -m tests.bench.copy_storage [--rounds 3] [--force]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.bench.common import add_force, check_load, compile_tree
from tests.bench.migration_qemu import STARTED, BareQemu
from tests.e2e.conftest import qemu_pids_under
from tests.guests import build_test_guest
from tests.procs import agent_process, cli, private_vhost, scheduler_process, unique_host
from virtbus.client import Client
from virtbus.guests.build import TestGuest
from virtbus.protocol.migration import MigrationParams

MIB = 1 << 20
WAIT = 300.0  # s for one migration (a bound: TCG and 200 MiB on a loaded machine)
DISK_SIZE = "1G"
DATA_MIB = 200


def guest_xml(guest: TestGuest, name: str, uuid: str, disk: str, serial: Path) -> str:
    """``disk``: a ``<source .../>`` (a file for the bare side, a volume for virtbus)."""
    kind = "volume" if "pool=" in disk else "file"
    return f"""<domain type='qemu'>
  <name>{name}</name><uuid>{uuid}</uuid>
  <memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{guest.kernel}</kernel><initrd>{guest.initramfs}</initrd>
    <cmdline>{guest.cmdline}</cmdline></os>
  <features><acpi/></features>
  <devices>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <disk type='{kind}' device='disk'><driver name='qemu' type='qcow2'/>{disk}
      <target dev='vda' bus='virtio'/></disk>
  </devices>
</domain>"""


def copied(path: Path) -> None:
    """Premise: the destination's image really holds the data (not a sparse shell)."""
    used = path.stat().st_blocks * 512
    assert used >= DATA_MIB * MIB, f"{path} holds only {used // MIB} MiB"


def make_image(path: Path) -> None:
    """1 GiB qcow2 whose first 200 MiB are random data (the rest unallocated)."""
    raw = path.with_suffix(".raw")
    with raw.open("wb") as fh:
        for _ in range(DATA_MIB):
            fh.write(os.urandom(MIB))
        fh.truncate(1 << 30)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()


async def ticking(serial: Path) -> None:
    async with asyncio.timeout(WAIT):
        while b"VIRTBUS-TICK" not in (serial.read_bytes() if serial.exists() else b""):
            await asyncio.sleep(0.2)


class Events:
    """A QEMU's QMP events, with futures armed before the command that causes one."""

    def __init__(self, qemu: BareQemu) -> None:
        self.qemu = qemu
        self.waiters: list[tuple[Callable[[dict[str, Any]], bool], asyncio.Future[None]]] = []
        self.task = asyncio.create_task(self._listen(), name="bench-cs-events")

    async def _listen(self) -> None:
        async for msg in self.qemu.qmp.events:
            event: dict[str, Any] = dict(msg)
            for match, fut in list(self.waiters):
                if not fut.done() and match(event):
                    fut.set_result(None)

    def expect(self, name: str, **data: Any) -> asyncio.Future[None]:
        def match(e: dict[str, Any]) -> bool:
            got = e.get("data", {})
            return e["event"] == name and all(got.get(k) == v for k, v in data.items())

        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append((match, fut))
        fut.add_done_callback(lambda f: self.waiters.remove((match, fut)))
        return fut

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


class BareSide:
    """The guest on one of two QEMUs of our own, moved by the bare QMP sequence."""

    def __init__(self, guest: TestGuest, base: Path) -> None:
        self.guest, self.base = guest, base
        self.uuid = str(uuidlib.uuid4())
        self.where = 0  # which directory holds the running guest's image
        self.rounds = 0
        self.downtimes: list[int] = []  # ms, QEMU's query-migrate "downtime" of each
        self.qemu: BareQemu | None = None
        self.events: Events | None = None

    def image(self, side: int) -> Path:
        return self.base / f"bare-{side}" / "disk.qcow2"

    def xml(self, side: int) -> str:
        return guest_xml(self.guest, "bench-cs-bare", self.uuid,
                         f"<source file='{self.image(side)}'/>",
                         self.base / f"bare-{side}.serial")  # fmt: skip

    async def start(self) -> None:
        for side in (0, 1):
            self.image(side).parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(make_image, self.image(0))
        self.qemu = BareQemu(self.xml(0), self.base / "bare-run-0", False, incoming=False)
        await self.qemu.start()
        self.events = Events(self.qemu)
        await self.qemu.qmp.execute("cont")
        await ticking(self.base / "bare-0.serial")

    async def migrate(self) -> float:
        src, src_events = self.qemu, self.events
        assert src is not None and src_events is not None
        to = 1 - self.where
        self.rounds += 1
        t0 = time.perf_counter()
        create = ["qemu-img", "create", "-q", "-f", "qcow2", str(self.image(to)), DISK_SIZE]
        await asyncio.to_thread(subprocess.run, create, check=True)
        dst = BareQemu(self.xml(to), self.base / f"bare-run-{self.rounds}", False, incoming=True)
        await dst.start()
        dst_events = Events(dst)
        caps = [{"capability": "events", "state": True}]
        await dst.qmp.execute("migrate-set-capabilities", {"capabilities": caps})
        src_caps = [*caps, {"capability": "pause-before-switchover", "state": True}]
        await src.qmp.execute("migrate-set-capabilities", {"capabilities": src_caps})
        await src.qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 53})
        blocks: Any = await dst.qmp.execute("query-block")
        dst_node = next(b["inserted"]["node-name"] for b in blocks if "inserted" in b)
        blocks = await src.qmp.execute("query-block")
        src_node = next(b["inserted"]["node-name"] for b in blocks if "inserted" in b)
        port = _free_port()
        addr = {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}
        await dst.qmp.execute("nbd-server-start", {"addr": addr})
        export = {"type": "nbd", "id": "e0", "node-name": dst_node, "name": "vda",
                  "writable": True}  # fmt: skip
        await dst.qmp.execute("block-export-add", export)
        uri = f"tcp:127.0.0.1:{_free_port()}"
        await dst.qmp.execute("migrate-incoming", {"uri": uri})
        server = {"type": "inet", "host": "127.0.0.1", "port": str(port)}
        nbd = {"driver": "nbd", "node-name": "nbd0", "export": "vda", "server": server}
        await src.qmp.execute("blockdev-add", nbd)
        ready = src_events.expect("BLOCK_JOB_READY", device="mirror0")
        await src.qmp.execute("blockdev-mirror", {"job-id": "mirror0", "device": src_node,
                                                  "target": "nbd0", "sync": "full"})  # fmt: skip
        await asyncio.wait_for(ready, WAIT)
        paused = src_events.expect("MIGRATION", status="pre-switchover")
        done = [src_events.expect("MIGRATION", status="completed"),
                dst_events.expect("MIGRATION", status="completed")]  # fmt: skip
        await src.qmp.execute("migrate", {"uri": uri})
        await asyncio.wait_for(paused, WAIT)
        completed = src_events.expect("BLOCK_JOB_COMPLETED", device="mirror0")
        await src.qmp.execute("block-job-cancel", {"device": "mirror0"})
        await asyncio.wait_for(completed, WAIT)
        await src.qmp.execute("blockdev-del", {"node-name": "nbd0"})
        await src.qmp.execute("migrate-continue", {"state": "pre-switchover"})
        await asyncio.wait_for(asyncio.gather(*done), WAIT)
        await dst.qmp.execute("nbd-server-stop")
        await dst.qmp.execute("cont")
        info: Any = await src.qmp.execute("query-migrate")
        await src_events.close()
        await src.quit()
        total = time.perf_counter() - t0
        self.downtimes.append(int(info.get("downtime", -1)))
        copied(self.image(to))
        self.image(self.where).unlink()
        self.qemu, self.events, self.where = dst, dst_events, to
        return total

    async def close(self) -> None:
        if self.events is not None:
            await self.events.close()
        if self.qemu is not None:
            await self.qemu.quit()


def _free_port() -> int:
    from drivers.qemu.migration import free_port

    return free_port("127.0.0.1")


class VirtbusSide:
    """The guest on two real agents, moved by the scheduler."""

    def __init__(
        self, client: Client, hosts: tuple[str, str], pools: tuple[Path, Path], url: str
    ) -> None:
        self.client, self.hosts, self.pools, self.url = client, hosts, pools, url
        self.where = 0
        self.uuid = ""
        self.downtimes: list[int] = []  # ms, QEMU's query-migrate "downtime" of each

    async def migrate(self) -> float:
        to = 1 - self.where
        params = MigrationParams(copy_storage_all=True)
        t0 = time.perf_counter()
        started = await self.client.scheduler.migrate(self.uuid, self.hosts[to], params)
        record = started
        async for record in self.client.scheduler.follow(started.id):  # noqa: B007
            pass
        total = time.perf_counter() - t0
        assert record.state == "completed", (record.state, record.error)
        self.downtimes.append(int(record.progress.get("downtime_ms") or -1))
        copied(self.pools[to] / "disk.qcow2")
        # the source keeps its copy (as libvirt): drop it for the way back (untimed)
        r = await cli("vol-delete", "disk.qcow2", "--pool", "cs", "--host",
                      self.hosts[self.where], bus=self.url)  # fmt: skip
        assert r.code == 0, r.err
        self.where = to
        return total


def line(label: str, samples: list[float]) -> float:
    med = statistics.median(samples)
    print(f"  {label:8s} median {med:7.2f} s   min {min(samples):7.2f}   max {max(samples):7.2f}"
          f"   ({len(samples)} migrations)")  # fmt: skip
    return med


async def run(rounds: int, base: Path) -> None:
    guest = build_test_guest()
    vhost = f"virtbus-bench-cs-{os.getpid()}"
    times: dict[str, list[float]] = {"bare": [], "virtbus": []}
    pools: tuple[Path, Path] = (base / "pool-a", base / "pool-b")
    for pool in pools:
        pool.mkdir()
    config = base / "agent.toml"
    config.write_text(f"[storage]\nroots = [{json.dumps(str(base))}]\n")
    bare = BareSide(guest, base)
    with private_vhost(vhost) as url:
        hosts = (unique_host("csa"), unique_host("csb"))
        async with contextlib.AsyncExitStack() as stack:
            for host in hosts:
                (base / host).mkdir()
                agent = agent_process(host, base / host, "--config", str(config),
                                      driver="qemu", bus=url)  # fmt: skip
                await stack.enter_async_context(agent)
            await stack.enter_async_context(scheduler_process(base / "sched", bus=url))
            client = await Client.connect(url, timeout=WAIT)
            stack.push_async_callback(client.close)
            for host, pool in zip(hosts, pools, strict=True):
                r = await cli("pool-create-as", "cs", "dir", "--target", str(pool),
                              "--host", host, bus=url)  # fmt: skip
                assert r.code == 0, r.err
            await asyncio.to_thread(make_image, pools[0] / "disk.qcow2")
            r = await cli("pool-refresh", "cs", "--host", hosts[0], bus=url)
            assert r.code == 0, r.err
            vb = VirtbusSide(client, hosts, pools, url)
            vb.uuid = str(uuidlib.uuid4())
            volume = "<source pool='cs' volume='disk.qcow2'/>"
            xml = guest_xml(guest, "bench-cs", vb.uuid, volume, base / "vb.serial")
            dom = await client.host(hosts[0]).define(xml)
            await dom.start()
            try:
                await asyncio.gather(bare.start(), ticking(base / "vb.serial"))
                async with asyncio.timeout(30):  # the heartbeats show the domain placed
                    while not any(d.name == "bench-cs" for d in
                                  (await client.scheduler.domains())[0]):  # fmt: skip
                        await asyncio.sleep(0.2)
                sides = [("bare", bare.migrate), ("virtbus", vb.migrate)]
                for i in range(rounds):
                    for label, migrate in sides if i % 2 == 0 else sides[::-1]:
                        seconds = await migrate()
                        times[label].append(seconds)
                        print(f"  round {i + 1} {label:8s} {seconds:7.2f} s"
                              f"   load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
            finally:
                with contextlib.suppress(Exception):
                    await client.host(hosts[vb.where]).domain("bench-cs").destroy()
                await bare.close()
                for qemu in STARTED:
                    await qemu.quit()
    for pid in qemu_pids_under(base):
        os.kill(pid, 9)
    print(f"# --copy-storage-all, 256 MiB TCG guest, 1 GiB qcow2 with {DATA_MIB} MiB data,"
          f" 127.0.0.1, {rounds} rounds")  # fmt: skip
    med = {k: line(k, v) for k, v in times.items()}
    print(f"  virtbus / bare: {med['virtbus'] / med['bare']:.3f}; virtbus - bare:"
          f" {(med['virtbus'] - med['bare']) * 1000:+.0f} ms (target <= +200 ms)")  # fmt: skip
    for label, side in (("bare", bare), ("virtbus", vb)):
        print(f"  {label:8s} downtime median {statistics.median(side.downtimes):6.0f} ms"
              f"   all {side.downtimes}")  # fmt: skip


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    add_force(parser)
    args = parser.parse_args(argv)
    check_load(args.force)
    compile_tree()
    base = Path(tempfile.mkdtemp(prefix="vb-cs-"))  # short: socket paths are bounded
    try:
        await run(args.rounds, base)
    finally:
        for pid in qemu_pids_under(base):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        shutil.rmtree(base, ignore_errors=True)
    one, five, _ = os.getloadavg()
    print(f"load average at the end: {one:.2f} {five:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
