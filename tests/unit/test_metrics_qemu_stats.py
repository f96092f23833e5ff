"""drivers/qemu/stats.py without QEMU: canned QMP replies, this process's own /proc."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from drivers.qemu.stats import (
    QemuStats,
    StatsSettings,
    StatsTarget,
    balloon_guest_fields,
    block_fields,
    haltpoll_sums,
    host_stats,
)
from virtbus.domain import parse_domain_xml
from virtbus.errors import OperationFailed
from virtbus.protocol.events import DomainState

XML = """<domain type='kvm'><name>vm</name><memory unit='MiB'>512</memory>
<currentMemory unit='MiB'>256</currentMemory><vcpu>1</vcpu><os><type>hvm</type></os><devices>
<disk type='file' device='disk'><source file='/img/a.qcow2'/><target dev='vda'/></disk>
<disk type='file' device='disk'><source file='/img/b.raw'/><target dev='vdb'/></disk>
<interface type='user'/>
<interface type='ethernet'><target dev='tap7'/></interface>
</devices></domain>"""

BLOCK = [  # query-block with -blockdev: no device names, qdev paths
    {
        "device": "",
        "qdev": "/machine/peripheral/virtio-disk1/virtio-backend",
        "inserted": {
            "file": "/img/b.raw",
            "node-name": "fmt1",
            "image": {"virtual-size": 2048, "actual-size": 1024},
        },
    },
    {
        "device": "",
        "qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
        "inserted": {
            "file": "/img/a.qcow2",
            "node-name": "fmt0",
            "image": {"virtual-size": 4096, "actual-size": 512},
        },
    },
]
BLOCKSTATS = [
    {
        "device": "",
        "node-name": "fmt0",
        "qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
        "stats": {
            "rd_bytes": 100,
            "rd_operations": 2,
            "rd_total_time_ns": 7,
            "wr_bytes": 5,
            "wr_operations": 1,
            "wr_total_time_ns": 3,
            "flush_operations": 4,
            "flush_total_time_ns": 9,
            "wr_highest_offset": 65536,
        },
    },
    {
        "device": "",
        "node-name": "fmt1",
        "qdev": "/machine/peripheral/virtio-disk1/virtio-backend",
        "stats": {"rd_bytes": 200, "rd_operations": 3},
    },
]


def test_block_fields_match_disks_by_source_file() -> None:
    a, b = block_fields(["/img/a.qcow2", "/img/b.raw"], BLOCK, BLOCKSTATS)
    assert a == {
        "rd.reqs": 2,
        "rd.bytes": 100,
        "rd.times": 7,
        "wr.reqs": 1,
        "wr.bytes": 5,
        "wr.times": 3,
        "fl.reqs": 4,
        "fl.times": 9,
        "allocation": 65536,
        "capacity": 4096,
        "physical": 512,
    }
    assert b["rd.bytes"] == 200 and b["capacity"] == 2048 and b["wr.bytes"] == 0
    # without query-block (or paths) the devices are taken in order
    first, second = block_fields([None, None], [], BLOCKSTATS)
    assert first["rd.bytes"] == 100 and second["rd.bytes"] == 200


def test_balloon_guest_fields_and_haltpoll() -> None:
    assert balloon_guest_fields({"stats": {"stat-free-memory": -1}, "last-update": 0}) == {}
    assert balloon_guest_fields("nope") is None
    got = balloon_guest_fields(
        {
            "last-update": 17,
            "stats": {"stat-free-memory": 2048, "stat-major-faults": 3, "stat-swap-in": -1},
        }
    )
    assert got == {"balloon.last-update": 17, "balloon.unused": 2, "balloon.major_fault": 3}
    reply = [
        {
            "provider": "kvm",
            "stats": [
                {"name": "halt_poll_success_ns", "value": 5},
                {"name": "halt_poll_fail_ns", "value": 1},
            ],
        },
        {"provider": "kvm", "stats": [{"name": "halt_poll_success_ns", "value": 6}]},
    ]
    assert haltpoll_sums(reply) == {"cpu.haltpoll.success.time": 11, "cpu.haltpoll.fail.time": 1}


def test_host_stats_from_proc() -> None:
    got = host_stats()
    assert got["cpu.count"] >= 1 and got["memory.total"] > got["memory.free"] > 0
    assert {"cpu.user", "cpu.idle", "load.1", "memory.available"} <= set(got)


async def test_collect_with_canned_qmp(tmp_path: Path) -> None:
    stats_dir = tmp_path / "tap7" / "statistics"
    stats_dir.mkdir(parents=True)
    for i, name in enumerate(
        (
            "rx_bytes",
            "rx_packets",
            "rx_errors",
            "rx_dropped",
            "tx_bytes",
            "tx_packets",
            "tx_errors",
            "tx_dropped",
        )
    ):
        (stats_dir / name).write_text(f"{i + 1}\n")
    sent: list[str] = []
    pid = os.getpid()

    async def execute(cmd: str, args: dict[str, Any] | None) -> Any:
        sent.append(cmd)
        replies: dict[str, Any] = {
            "query-balloon": {"actual": 256 * 1024 * 1024},
            "query-cpus-fast": [{"cpu-index": 0, "thread-id": pid}],
            "query-blockstats": BLOCKSTATS,
            "query-block": BLOCK,
        }
        if cmd not in replies:
            raise OperationFailed(f"{cmd}: not here")
        return replies[cmd]

    target = StatsTarget(
        "vm", DomainState.RUNNING, "booted", parse_domain_xml(XML), pid, execute, kvm=True
    )
    collector = QemuStats(StatsSettings(net_sysfs=tmp_path, static_refresh=3))
    got = (await collector.collect([target]))["vm"]
    groups = [k.split(".")[0] for k in got]
    assert groups == sorted(groups, key=["state", "cpu", "balloon", "vcpu", "net", "block"].index)
    assert got["state.state"] == 1 and got["state.reason"] == 1
    assert got["cpu.time"] == got["cpu.user"] + got["cpu.system"]
    assert got["balloon.current"] == 256 * 1024 and got["balloon.maximum"] == 512 * 1024
    assert got["balloon.rss"] > 0 and "balloon.unused" not in got
    assert got["vcpu.0.state"] == 1 and got["vcpu.0.time"] >= 0 and "vcpu.0.delay" in got
    # user networking has no host device; the tap's counters are swapped (host tx = guest rx)
    assert got["net.count"] == 2 and "net.0.name" not in got and got["net.1.name"] == "tap7"
    assert got["net.1.rx.bytes"] == 5 and got["net.1.tx.bytes"] == 1 and got["net.1.tx.drop"] == 4
    assert got["block.count"] == 2 and got["block.1.path"] == "/img/b.raw"
    assert got["block.0.rd.bytes"] == 100 and got["block.1.capacity"] == 2048
    assert "cpu.haltpoll.success.time" not in got  # query-stats failed: not asked again
    first = list(sent)
    sent.clear()
    await collector.collect([target])
    # cached: thread ids, block geometry; given up: query-stats, guest-stats
    assert sorted(sent) == ["query-balloon", "query-blockstats"], (first, sent)
    sent.clear()
    await collector.collect([target])  # the third pass refreshes the static data
    assert {"query-cpus-fast", "query-block", "qom-get"} <= set(sent)


async def test_shut_off_and_partial_groups() -> None:
    off = StatsTarget("vm", DomainState.SHUTOFF, "destroyed", parse_domain_xml(XML))
    got = (await QemuStats().collect([off], frozenset({"state", "balloon", "block"})))["vm"]
    assert got == {
        "state.state": 5,
        "state.reason": 2,
        "balloon.current": 256 * 1024,
        "balloon.maximum": 512 * 1024,
        "block.count": 2,
        "block.0.name": "vda",
        "block.0.path": "/img/a.qcow2",
        "block.1.name": "vdb",
        "block.1.path": "/img/b.raw",
    }
