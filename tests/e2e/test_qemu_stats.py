"""libvirt domstats from a real QEMU guest (TCG, the test kernel) doing disk reads and
burning CPU, and metrics messages over the real RabbitMQ.

The first tests drive QEMU directly (tests.guests' command line, QMP through qemu.qmp)
and collect with :class:`drivers.qemu.stats.QemuStats`, the collector the QEMU driver
uses; the last one runs the whole agent (QEMU driver, AMQP bus) and listens on
``virtbus.metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from drivers.qemu.stats import QemuStats, StatsTarget
from tests.e2e.test_guest_boot import RunningGuest, running
from tests.guests.build import TestGuest, build_test_guest
from virtbus.domain import parse_domain_xml
from virtbus.errors import OperationFailed
from virtbus.protocol.events import DomainState

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

MIB = 1024 * 1024
BALLOON = ("-device", "virtio-balloon-pci,id=balloon0")


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


def _target(vm: RunningGuest, disk: Path) -> StatsTarget:
    """The definition matching tests.guests' command line (256 MiB, 1 vCPU, vda)."""
    defn = parse_domain_xml(
        "<domain type='qemu'><name>stats-guest</name><memory unit='MiB'>256</memory>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
        "<interface type='user'><model type='virtio'/></interface>"
        "</devices></domain>"
    )
    assert vm.proc is not None

    async def execute(cmd: str, args: dict[str, Any] | None) -> Any:
        try:  # as drivers.qemu.monitor does: QMP errors become virtbus errors
            return await vm.qmp.execute(cmd, args)
        except ExecuteError as exc:
            raise OperationFailed(str(exc)) from None

    return StatsTarget(
        name="stats-guest",
        state=DomainState.RUNNING,
        reason="booted",
        defn=defn,
        pid=vm.proc.pid,
        execute=execute,
    )


async def _done(vm: RunningGuest, command: str, start: int) -> int:
    index, _ = await vm.control.wait_for(lambda line: line == f"VIRTBUS-DONE {command}", 60, start)
    return index + 1


async def test_cpu_and_disk_reads_are_seen(guest: TestGuest) -> None:
    async with running(guest, extra_args=BALLOON) as vm:
        await vm.wait_ready()
        disk = vm.workdir / "disk.raw"
        target, stats = _target(vm, disk), QemuStats()

        first = (await stats.collect([target]))["stats-guest"]
        assert first["state.state"] == 1 and first["cpu.time"] > 0
        assert first["block.count"] == 1 and first["block.0.name"] == "vda"
        assert first["block.0.path"] == str(disk)
        assert first["block.0.capacity"] == 16 * MIB
        assert first["vcpu.current"] == 1 and first["vcpu.0.state"] == 1
        assert first["balloon.current"] == 256 * 1024 and first["balloon.maximum"] == 256 * 1024
        assert first["balloon.rss"] > 0
        assert first["net.count"] == 1 and "net.0.name" not in first  # user net: no host device

        await vm.control.send("read 8")
        line = await _done(vm, "read 8", 0)
        await vm.control.send("burn 1")
        await _done(vm, "burn 1", line)
        second = await _until_burnt(stats, target, first)
        await vm.control.send("burn-stop")
        blockstats = await vm.qmp.execute("query-blockstats")

    read = second["block.0.rd.bytes"] - first["block.0.rd.bytes"]
    assert read >= 8 * MIB, (first, second)
    assert second["block.0.rd.reqs"] > first["block.0.rd.reqs"]
    assert second["block.0.rd.times"] > first["block.0.rd.times"]
    # nothing touched the disk between the last pass and query-blockstats: same numbers
    qemu = next(e["stats"] for e in blockstats if e.get("device") == "disk0")
    assert second["block.0.rd.bytes"] == qemu["rd_bytes"]
    assert second["block.0.rd.reqs"] == qemu["rd_operations"]
    assert second["block.0.wr.bytes"] == qemu["wr_bytes"]
    # the busy loop: the vCPU thread and the process both gained >= 1 s
    assert second["cpu.time"] - first["cpu.time"] >= 1_000_000_000, (first, second)
    assert second["vcpu.0.time"] - first["vcpu.0.time"] >= 1_000_000_000
    assert second["cpu.time"] == second["cpu.user"] + second["cpu.system"]


async def _until_burnt(
    stats: QemuStats, target: StatsTarget, first: dict[str, Any], timeout: float = 60.0
) -> dict[str, Any]:
    """Collect until the vCPU burnt >= 1 s more than in ``first`` (a loaded host is slow)."""
    deadline = time.monotonic() + timeout
    while True:
        now = (await stats.collect([target]))["stats-guest"]
        if now["vcpu.0.time"] - first["vcpu.0.time"] >= 1_000_000_000:
            return now
        assert time.monotonic() < deadline, (first, now)
        await asyncio.sleep(0.5)


async def test_groups_and_stopped_domain(guest: TestGuest) -> None:
    async with running(guest) as vm:
        await vm.wait_ready()
        target = _target(vm, vm.workdir / "disk.raw")
        stats = QemuStats()
        only = (await stats.collect([target], frozenset({"state", "block"})))["stats-guest"]
        assert {k.split(".")[0] for k in only} == {"state", "block"}
        # no balloon device in this guest: current = the definition's memory
        bal = (await stats.collect([target], frozenset({"balloon"})))["stats-guest"]
        assert bal["balloon.current"] == 256 * 1024
    off = StatsTarget("off", DomainState.SHUTOFF, "shutdown", target.defn)
    fields = (await QemuStats().collect([off]))["off"]
    assert fields["state.state"] == 5 and fields["block.count"] == 1
    assert "cpu.time" not in fields and fields["net.count"] == 0


async def test_collection_pass_is_cheap(guest: TestGuest) -> None:
    """One pass over one guest: the agent's CPU time (the 50-guest figure is the bench's)."""
    async with running(guest, extra_args=BALLOON) as vm:
        await vm.wait_ready()
        target, stats = _target(vm, vm.workdir / "disk.raw"), QemuStats()
        await stats.collect([target])  # warm the static caches
        c0 = time.process_time()
        for _ in range(20):
            await stats.collect([target])
        per_pass = (time.process_time() - c0) / 20
    print(f"[stats] agent CPU per pass, one guest: {per_pass * 1e3:.2f} ms")
    assert per_pass < 0.02


# --- the whole agent: QEMU driver, RabbitMQ ----------------------------------------------
AGENT_INTERVAL = 1.0  # s
FIRMWARE_XML = (
    "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
    "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices/></domain>"
)


def _kernel_xml(guest: TestGuest, name: str, disk: Path, cmds: str) -> str:
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='q35'>hvm</type>"
        f"<kernel>{guest.kernel}</kernel><initrd>{guest.initramfs}</initrd>"
        f"<cmdline>{guest.cmdline} virtbus.cmd={cmds}</cmdline></os><devices>"
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
        "</devices></domain>"
    )


async def test_agent_publishes_one_message_per_domain_per_interval(
    guest: TestGuest, e2e_root: Path, rabbitmq: None
) -> None:
    from agent.service import AgentService
    from drivers.qemu import QemuDriver
    from tests.procs import BUS_URL, qemu_test_settings, unique_host
    from virtbus.bus.factory import open_bus
    from virtbus.bus.topology import METRICS_EXCHANGE
    from virtbus.errors import VirtbusError
    from virtbus.protocol import ops
    from virtbus.settings import AgentSettings

    base = Path(tempfile.mkdtemp(prefix="st", dir=e2e_root))
    host = unique_host("stats")
    settings = AgentSettings(
        host=host, driver="qemu", state_dir=base / "state", run_dir=base / "run",
        heartbeat_interval=60.0, metrics_interval=AGENT_INTERVAL,
    )  # fmt: skip
    service = AgentService(
        settings,
        open_bus(BUS_URL, src=host),
        QemuDriver(settings.state_dir, settings.runtime_dir, qemu_test_settings(base)),
    )
    client = open_bus(BUS_URL, src=f"{host}-client")
    await service.start()  # with its metrics publisher
    await client.connect()
    route = ops.agent_route(host)
    sub = await client.subscribe(METRICS_EXCHANGE, [f"{host}.#"])
    disk = guest.clone_disk(base / "disk.raw")
    names = ("busy", "idle")
    try:
        # the busy guest reads 8 MiB at tick 2 (1 s after boot) and burns CPU from tick 3
        xmls = (_kernel_xml(guest, "busy", disk, "read+8@2,burn+1@3"),
                FIRMWARE_XML.format(name="idle"))  # fmt: skip
        for xml, name in zip(xmls, names, strict=True):
            await client.call(route, ops.DOMAIN_DEFINE, {"xml": xml})
            await client.call(route, ops.DOMAIN_START, {"domain": name})
        by_pass: dict[float, list[str]] = {}
        busy: list[dict[str, Any]] = []
        async with asyncio.timeout(90):
            async for env in sub:
                who = env.body.get("domain", "_host")
                by_pass.setdefault(env.body["ts"], []).append(who)
                if who == "busy" and env.body["stats"]["state.state"] == 1:
                    busy.append(env.body["stats"])
                if len(busy) >= 2 and _busy_enough(busy[0], busy[-1]) and len(by_pass) >= 4:
                    break
        on_demand = await client.call(route, ops.DOMAIN_STATS, {"domains": ["busy"]})
    finally:
        await sub.close()
        for name in names:
            with contextlib.suppress(VirtbusError):
                await client.call(route, ops.DOMAIN_DESTROY, {"domain": name})
        await client.close()
        await service.stop()
        shutil.rmtree(base, ignore_errors=True)
    passes = sorted(by_pass)
    for ts in passes[1:-1]:  # complete passes (we may have joined or left mid-pass)
        assert sorted(by_pass[ts]) == ["_host", "busy", "idle"], by_pass
    gaps = [b - a for a, b in itertools.pairwise(passes)]
    assert all(AGENT_INTERVAL * 0.5 < g < AGENT_INTERVAL * 2.5 for g in gaps), gaps
    stats = on_demand["domains"]["busy"]
    assert stats["block.0.name"] == "vda" and stats["block.0.path"] == str(disk)
    assert stats["block.0.rd.bytes"] >= busy[-1]["block.0.rd.bytes"]
    assert stats["cpu.time"] >= busy[-1]["cpu.time"]


def _busy_enough(first: dict[str, Any], last: dict[str, Any]) -> bool:
    """The busy guest's reads and burn show in its published figures."""
    return (
        last.get("block.0.rd.bytes", 0) - first.get("block.0.rd.bytes", 0) >= 8 * MIB
        and last.get("cpu.time", 0) - first.get("cpu.time", 0) >= 1_000_000_000
    )
