"""LXC driver: cgroup v1/v2 readers (on cgroup-shaped trees: this host only has v1 with
an empty unified hierarchy), procfs helpers, the monitor FIFO's wire format and reader."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from drivers.lxc import cgroups as cg
from drivers.lxc.monitor import MESSAGE, LxcState, MonitorFifo, MonitorMessage, decode, encode
from drivers.lxc.stats import StatsTarget, collect_one
from virtbus.domain import parse_domain_xml
from virtbus.protocol.events import DomainState
from virtbus.settings import Backoff

MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/un\\040ified rw,relatime - cgroup2 cgroup2 rw
"""


def test_mountinfo() -> None:
    v1, v2 = cg.parse_mountinfo(MOUNTINFO)
    assert v1 == {
        "cpu": Path("/sys/fs/cgroup/cpu,cpuacct"),
        "cpuacct": Path("/sys/fs/cgroup/cpu,cpuacct"),
        "memory": Path("/sys/fs/cgroup/memory"),
        "freezer": Path("/sys/fs/cgroup/freezer"),
    }
    assert v2 == Path("/sys/fs/cgroup/un ified")


def test_proc_cgroup_hybrid() -> None:
    mounts = cg.CgroupMounts(*cg.parse_mountinfo(MOUNTINFO))
    text = "4:memory:/lxc.payload.c1\n2:cpu,cpuacct:/lxc.payload.c1\n0::/lxc.payload.c1\n"
    paths = cg.parse_proc_cgroup(text, mounts)
    assert paths.v1["memory"] == Path("/sys/fs/cgroup/memory/lxc.payload.c1")
    assert paths.v1["cpuacct"] == Path("/sys/fs/cgroup/cpu,cpuacct/lxc.payload.c1")
    assert paths.v2 == Path("/sys/fs/cgroup/un ified/lxc.payload.c1")


def write(d: Path, files: dict[str, str]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)


def v1_tree(base: Path) -> tuple[cg.CgroupMounts, cg.ContainerCgroups]:
    write(base / "cpuacct" / "c", {"cpuacct.usage": "5000000000\n",
                                   "cpuacct.stat": "user 300\nsystem 100\n"})  # fmt: skip
    write(base / "memory" / "c", {
        "memory.usage_in_bytes": "10485760\n", "memory.limit_in_bytes": "67108864\n",
        "memory.stat": "cache 0\nrss 100\ntotal_rss 4194304\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
    })  # fmt: skip
    write(base / "freezer" / "c", {"freezer.state": "FROZEN\n"})
    write(base / "blkio" / "c", {
        "blkio.throttle.io_service_bytes": "7:3 Read 4096\n7:3 Write 8192\n7:3 Total 12288\n"
                                           "Total 12288\n",
        "blkio.throttle.io_serviced": "7:3 Read 1\n7:3 Write 2\n",
    })  # fmt: skip
    mounts = cg.CgroupMounts({k: base / k for k in ("cpuacct", "memory", "freezer", "blkio")})
    return mounts, cg.ContainerCgroups({k: base / k / "c" for k in mounts.v1}, None)


def v2_tree(base: Path, limit: str = "67108864") -> tuple[cg.CgroupMounts, cg.ContainerCgroups]:
    write(base / "c", {
        "cpu.stat": "usage_usec 5000000\nuser_usec 3000000\nsystem_usec 1000000\n",
        "memory.current": "10485760\n", "memory.max": f"{limit}\n",
        "memory.stat": "anon 4194304\nfile 0\n", "memory.events": "low 0\noom 3\noom_kill 2\n",
        "cgroup.events": "populated 1\nfrozen 1\n",
        "io.stat": "7:3 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n",
    })  # fmt: skip
    mounts = cg.CgroupMounts({}, base, frozenset({"cpu", "memory", "io"}))
    return mounts, cg.ContainerCgroups({}, base / "c")


@pytest.mark.parametrize("tree", [v1_tree, v2_tree])
def test_readers_v1_and_v2(tree: object, tmp_path: Path) -> None:
    mounts, paths = tree(tmp_path)  # type: ignore[operator]
    assert cg.cpu_times(paths, mounts, 10_000_000) == {
        "cpu.time": 5_000_000_000, "cpu.user": 3_000_000_000, "cpu.system": 1_000_000_000,
    }  # fmt: skip
    assert cg.memory(paths, mounts) == cg.MemoryFigures(10485760, 67108864, 4194304, 2)
    assert cg.frozen(paths, mounts) is True
    assert cg.block_io(paths, mounts) == [cg.BlockIO("7:3", 4096, 8192, 1, 2)]


def test_unlimited_memory(tmp_path: Path) -> None:
    mounts, paths = v2_tree(tmp_path, limit="max")
    assert cg.memory(paths, mounts).limit is None
    mounts, paths = v1_tree(tmp_path / "v1")
    (paths.v1["memory"] / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cg.memory(paths, mounts).limit is None


def test_stats_fields(tmp_path: Path) -> None:
    mounts, paths = v2_tree(tmp_path)
    defn = parse_domain_xml(
        "<domain type='lxc'><name>c</name><memory unit='MiB'>128</memory><vcpu>2</vcpu>"
        "<os><type>exe</type></os><devices><filesystem><source dir='/r'/><target dir='/'/>"
        "</filesystem><interface type='bridge'><source bridge='b'/><target dev='vh0'/>"
        "</interface></devices></domain>"
    )
    target = StatsTarget("c", DomainState.RUNNING, "booted", defn, paths, None)
    out = collect_one(target, frozenset({"state", "cpu-total", "balloon", "vcpu", "block"}),
                      mounts)  # fmt: skip
    assert out["state.state"] == 1 and out["state.reason"] == 1
    assert out["cpu.time"] == 5_000_000_000
    assert (out["balloon.current"], out["balloon.maximum"], out["balloon.rss"]) == (
        10240, 65536, 4096,
    )  # fmt: skip
    assert out["balloon.oom_kill"] == 2
    assert (out["vcpu.current"], out["vcpu.maximum"]) == (2, 2)
    assert out["block.count"] == 1 and out["block.0.wr.bytes"] == 8192
    off = collect_one(StatsTarget("c", DomainState.SHUTOFF, "shutdown", defn), frozenset(
        {"state", "cpu-total", "balloon", "interface"}), mounts)  # fmt: skip
    assert off == {"state.state": 5, "state.reason": 1, "balloon.maximum": 131072,
                   "net.count": 0}  # fmt: skip


def test_net_dev(tmp_path: Path) -> None:
    (tmp_path / "42" / "net").mkdir(parents=True)
    (tmp_path / "42" / "net" / "dev").write_text(
        "Inter-|   Receive                            |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes ...\n"
        "    lo:     100       1    0    0    0     0          0         0      100       1"
        "    0    0    0     0       0          0\n"
        "  vh0:    1000      10    1    2    0     0          0         0     2000      20"
        "    3    4    0     0       0          0\n"
    )
    assert cg.net_dev(42, ["vh0"], proc=tmp_path) == {"vh0": [1000, 10, 1, 2, 2000, 20, 3, 4]}


def test_process_alive_sees_a_zombie_as_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        # wait for the exit without reaping it: a zombie, as PID 1 leaves lxc's monitors here
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        with open(f"/proc/{child.pid}/stat") as fh:
            assert fh.read().rpartition(")")[2].split()[0] == "Z"
        assert not cg.process_alive(child.pid)
        assert cg.process_start_time(child.pid) is not None
    finally:
        child.wait()
    assert cg.process_alive(os.getpid())
    assert not cg.process_alive(child.pid)


# --- the monitor FIFO ---------------------------------------------------------------------
def test_wire_format_is_struct_lxc_msg() -> None:
    assert MESSAGE.size == 264  # int type; char name[NAME_MAX+1]; int value
    raw = bytearray(encode(MonitorMessage("c1", state=LxcState.FROZEN)))
    raw += encode(MonitorMessage("c1", exit_status=signal.SIGKILL))
    raw += MESSAGE.pack(1, b"c1", 5)  # a priority message: skipped
    raw += b"\0" * 10  # a torn tail stays in the buffer
    assert decode(raw) == [
        MonitorMessage("c1", state=LxcState.FROZEN),
        MonitorMessage("c1", exit_status=9),
    ]
    assert len(raw) == 10


async def test_reader_follows_and_reopens_a_replaced_fifo(tmp_path: Path) -> None:
    path = tmp_path / "run" / "lxc" / "x" / "monitor-fifo"
    got: list[MonitorMessage] = []
    connects: list[int] = []
    arrived = asyncio.Event()

    def on_message(msg: MonitorMessage) -> None:
        got.append(msg)
        arrived.set()

    async def on_connected() -> None:
        connects.append(len(got))
        arrived.set()

    fifo = MonitorFifo(path, on_message, on_connected, check_interval=0.05,
                       reopen=Backoff(initial=0.01, maximum=0.05))  # fmt: skip
    task = asyncio.create_task(fifo.run())

    async def until(check: object) -> None:
        async with asyncio.timeout(10):
            while not check():  # type: ignore[operator]
                arrived.clear()
                await arrived.wait()

    def send(msg: MonitorMessage) -> None:  # as liblxc does: non-blocking, one write
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, encode(msg))
        finally:
            os.close(fd)

    try:
        await until(lambda: connects == [0])
        send(MonitorMessage("c1", state=LxcState.RUNNING))
        await until(lambda: len(got) == 1)
        os.unlink(path)  # gone: the reader must notice and make a new one
        await until(lambda: len(connects) == 2)
        send(MonitorMessage("c1", state=LxcState.STOPPED))
        await until(lambda: len(got) == 2)
        assert got == [MonitorMessage("c1", state=LxcState.RUNNING),
                       MonitorMessage("c1", state=LxcState.STOPPED)]  # fmt: skip
        assert fifo.connected and fifo.connects == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_figures_read_a_containers_cgroups_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``_figures`` runs in a worker thread while the loop may set a stopping container's
    ``cgroups`` to None: it must use what it read once (a heartbeat died on None before)."""
    from types import SimpleNamespace

    from drivers.lxc.driver import LxcDriver

    groups = object()
    seen: list[object] = []

    class Stopping:
        t = SimpleNamespace(active=True)
        reads = 0

        @property
        def cgroups(self) -> object | None:  # gone after the first look
            self.reads += 1
            return groups if self.reads == 1 else None

    def cpu_times(g: object, mounts: object, n: int) -> dict[str, int]:
        seen.append(g)
        return {"cpu.time": 7}

    def memory(g: object, mounts: object) -> cg.MemoryFigures:
        seen.append(g)
        return cg.MemoryFigures(usage=1)

    monkeypatch.setattr(cg, "cpu_times", cpu_times)
    monkeypatch.setattr(cg, "memory", memory)
    driver = LxcDriver.__new__(LxcDriver)
    driver._mounts = None  # type: ignore[assignment]
    assert driver._figures([Stopping()]) == [(cg.MemoryFigures(usage=1), 7)]  # type: ignore[list-item]
    assert seen == [groups, groups]
