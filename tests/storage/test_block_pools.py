"""fs, disk and iscsi-direct pools on real loop devices and a real tgtd target."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from agent.jobs import JobState
from drivers.storage.fs import mounted_device
from tests.storage.conftest import (
    Loop,
    Storage,
    Target,
    dir_pool_xml,
    need_tools,
    open_storage,
)
from virtbus.errors import (
    InvalidArgument,
    NoSupport,
    OperationFailed,
    OperationInvalid,
)
from virtbus.storage import volume_xml

MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture
async def st(workdir: Path) -> Storage:
    need_tools()
    root = workdir / "images"
    root.mkdir()
    return await open_storage(workdir / "state", root, transfer_idle_timeout=5.0)


def fs_xml(name: str, dev: str, target: Path, fmt: str = "ext4") -> str:
    return dir_pool_xml(
        name, target, "fs", f"<source><device path='{dev}'/><format type='{fmt}'/></source>"
    )


async def test_fs_pool_mounts_serves_and_unmounts(st: Storage, loops: list[Loop]) -> None:
    loop = Loop.make(st.root.parent, 64)
    loops.append(loop)
    loop.mkfs("ext4")
    target = st.root / "fs"
    await st.pools.define(fs_xml("fs", loop.dev, target))
    await st.pools.build("fs")  # the mount point only (no --overwrite: no mkfs)
    await st.pools.start("fs")
    assert await mounted_device(target) == os.stat(loop.dev).st_rdev
    vol = await st.pools.create_volume("fs", volume_xml("v.qcow2", GiB, format="qcow2"))
    assert Path(vol.path).parent == target
    assert 50 * MiB < st.pools.get("fs").sizes.capacity < 64 * MiB
    again = await open_storage(st.state, st.root)  # an agent restart: still mounted, active
    assert again.pools.get("fs").active and [v.name for v in again.pools.volumes("fs")] == [
        "v.qcow2"
    ]
    with pytest.raises(OperationInvalid, match="already active"):
        await st.pools.start("fs")
    await st.pools.destroy("fs")
    assert await mounted_device(target) is None and os.listdir(target) == []


async def test_fs_build_overwrite_rules(st: Storage, loops: list[Loop]) -> None:
    loop = Loop.make(st.root.parent, 320)
    loops.append(loop)
    loop.mkfs("ext4")
    await st.pools.define(fs_xml("x", loop.dev, st.root / "x", "xfs"))
    with pytest.raises(OperationInvalid, match="already holds a ext4"):
        await st.pools.build("x", overwrite=False)
    await st.pools.build("x", overwrite=True)  # mkfs.xfs -f
    await st.pools.start("x")
    assert (await st.pools.create_volume("x", volume_xml("a", MiB))).capacity == MiB
    await st.pools.destroy("x")


async def test_fs_pool_fills_up(st: Storage, loops: list[Loop]) -> None:
    loop = Loop.make(st.root.parent, 32)
    loops.append(loop)
    loop.mkfs("ext4")
    target = st.root / "small"
    await st.pools.define(fs_xml("small", loop.dev, target))
    await st.pools.start("small", build=True)
    free = st.pools.get("small").sizes.available
    assert 16 * MiB < free < 32 * MiB
    with pytest.raises(OperationFailed, match="not enough space"):
        await st.pools.create_volume("small", volume_xml("big.raw", 64 * MiB, format="raw"))
    assert sorted(os.listdir(target)) == ["lost+found"]
    # filled behind the agent's back after its check: the tool itself hits ENOSPC
    await st.pools.create_volume("small", volume_xml("old.raw", 2 * MiB, format="raw"))
    old = (target / "old.raw").read_bytes()
    job = await st.pools.upload_begin("small", "old.raw", 8 * MiB)
    filler = target / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(os.urandom(MiB))
                fh.flush()
        except OSError:
            pass
    with pytest.raises(OperationFailed, match="full"):
        for offset in range(0, 8 * MiB, MiB):
            await st.pools.upload_chunk(job.id, offset, os.urandom(MiB))
    assert (await st.jobs.wait(job.id, 30)).state is JobState.FAILED
    assert (target / "old.raw").read_bytes() == old
    with pytest.raises(OperationFailed, match="full"):
        await st.pools.create_volume(
            "small",
            "<volume><name>meta.qcow2</name><capacity unit='T'>4</capacity>"
            "<target><format type='qcow2'/></target></volume>",
            prealloc_metadata=True,
        )
    assert sorted(os.listdir(target)) == ["filler", "lost+found", "old.raw"]
    filler.unlink()
    await st.pools.destroy("small")


async def test_disk_pool_partitions(st: Storage, loops: list[Loop]) -> None:
    loop = Loop.make(st.root.parent, 128, partitions=True)
    loops.append(loop)
    base = os.path.basename(loop.dev)
    xml = (
        f"<pool type='disk'><name>d</name><source><device path='{loop.dev}'/>"
        "<format type='gpt'/></source><target><path>/dev</path></target></pool>"
    )
    await st.pools.define(xml)
    with pytest.raises(OperationFailed, match="no partition table"):
        await st.pools.start("d")
    await st.pools.start("d", build=True)
    with pytest.raises(InvalidArgument, match=f"expected '{base}p1'"):
        await st.pools.create_volume("d", volume_xml("sda1", 16 * MiB))
    p1 = await st.pools.create_volume("d", volume_xml(f"{base}p1", 16 * MiB))
    assert p1.type == "block" and p1.capacity == 16 * MiB and p1.format == "linux"
    assert stat.S_ISBLK(os.stat(p1.path).st_mode)
    # clone a volume of a dir pool into the next partition
    await st.pools.define(dir_pool_xml("files", st.root / "files"))
    await st.pools.start("files", build=True)
    src = await st.pools.create_volume("files", volume_xml("s.raw", 8 * MiB, format="raw"))
    data = os.urandom(8 * MiB)
    Path(src.path).write_bytes(data)
    job = await st.pools.clone_volume("d", volume_xml(f"{base}p2", None), "files", "s.raw")
    assert (await st.jobs.wait(job.id, 60)).state is JobState.COMPLETED, st.jobs.get(job.id).error
    p2 = await st.pools.volume("d", f"{base}p2")
    with open(p2.path, "rb") as fh:
        assert fh.read(8 * MiB) == data
    with pytest.raises(NoSupport, match="half-written"):
        await st.pools.upload_begin("d", p2.name, MiB)
    with pytest.raises(NoSupport, match="resize"):
        await st.pools.resize_volume("d", p2.name, 32 * MiB)
    with pytest.raises(OperationFailed, match="no free extent"):
        await st.pools.create_volume("d", volume_xml(f"{base}p3", 200 * MiB))
    await st.pools.delete_volume("d", p1.name)
    await st.pools.refresh("d")
    assert [v.name for v in st.pools.volumes("d")] == [p2.name]
    await st.pools.destroy("d")
    await st.pools.delete("d")  # wipes the table
    with pytest.raises(OperationFailed, match="no partition table"):
        await st.pools.start("d")


async def test_disk_build_refuses_a_device_in_use(st: Storage, loops: list[Loop]) -> None:
    loop = Loop.make(st.root.parent, 32, partitions=True)
    loops.append(loop)
    loop.mkfs("ext4")
    await st.pools.define(
        f"<pool type='disk'><name>busy</name><source><device path='{loop.dev}'"
        "/></source><target><path>/dev</path></target></pool>"
    )
    with pytest.raises(OperationInvalid, match=r"not empty .*ext4"):
        await st.pools.build("busy")
    await st.pools.build("busy", overwrite=True)
    await st.pools.start("busy")


def iscsi_xml(t: Target, name: str = "lun", iqn: str | None = None) -> str:
    return (
        f"<pool type='iscsi-direct'><name>{name}</name><source>"
        f"<host name='127.0.0.1' port='{t.port}'/><device path='{iqn or t.iqn}'/>"
        f"<initiator><iqn name='{t.initiator}'/></initiator></source></pool>"
    )


async def test_iscsi_direct_pool_lists_and_wipes_luns(
    st: Storage, iscsi_target: Target, workdir: Path
) -> None:
    await st.pools.define(iscsi_xml(iscsi_target))
    await st.pools.start("lun")
    vols = st.pools.volumes("lun")
    assert [(v.name, v.capacity, v.type) for v in vols] == [
        ("unit:0:0:1", 16 * MiB, "network"),
        ("unit:0:0:2", 32 * MiB, "network"),
    ]
    assert vols[0].path == f"iscsi://127.0.0.1:{iscsi_target.port}/{iscsi_target.iqn}/1"
    resolved = await st.pools.resolve("lun", "unit:0:0:2", "dom-1")
    assert resolved.kind == "network" and resolved.network["lun"] == 2
    assert resolved.network["initiator-name"] == iscsi_target.initiator
    st.pools.release("dom-1")
    with pytest.raises(NoSupport, match="LUNs belong to the target"):
        await st.pools.create_volume("lun", volume_xml("x", MiB))
    with pytest.raises(NoSupport, match="zeros only"):
        raise_error(
            await st.jobs.wait((await st.pools.wipe_volume("lun", "unit:0:0:1", "random")).id, 30)
        )
    assert (workdir / "lun1.img").read_bytes()[:10] == b"LUN-1-DATA"
    job = await st.pools.wipe_volume("lun", "unit:0:0:1", "zero")
    assert (await st.jobs.wait(job.id, 60)).state is JobState.COMPLETED, st.jobs.get(job.id).error
    await asyncio.sleep(0)
    assert (workdir / "lun1.img").read_bytes()[:10] == bytes(10)
    await st.pools.define(iscsi_xml(iscsi_target, "nope", "iqn.2024-01.dev.virtbus:absent"))
    with pytest.raises(OperationFailed, match="not exported"):
        await st.pools.start("nope")


def raise_error(job: object) -> None:
    from agent.jobs import Job
    from virtbus.errors import error_from_wire

    assert isinstance(job, Job)
    if job.error:
        raise error_from_wire(job.error)
