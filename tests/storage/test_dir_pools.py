"""dir pools through the StoragePools manager: real files, real qemu-img, real events.

Each handled bad input is one test, and each test checks the premise (the volume is
there, the file exists) before the failure it provokes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest

from agent.jobs import JobState
from tests.storage.conftest import Recorder, Storage, dir_pool_xml, need_tools, open_storage
from virtbus.errors import (
    ConfigUnsupported,
    InvalidArgument,
    NoStoragePool,
    NoStorageVol,
    NoSupport,
    OperationFailed,
    OperationInvalid,
    XMLError,
)
from virtbus.storage import Backing, parse_pool_xml, volume_xml

GiB, MiB = 1 << 30, 1 << 20


def validate(tmp: Path, xml: str, kind: str) -> None:
    path = tmp / f"v-{kind}.xml"
    path.write_text(xml)
    done = subprocess.run(["virt-xml-validate", str(path), kind], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + xml


def temps(path: Path) -> list[str]:
    return [p for p in os.listdir(path) if p.startswith(".")]


@pytest.fixture
async def st(workdir: Path) -> Storage:
    need_tools()
    root = workdir / "images"
    root.mkdir()
    s = await open_storage(workdir / "state", root)
    await s.pools.define(dir_pool_xml("p", root / "p"))
    await s.pools.build("p")
    await s.pools.start("p")
    return s


async def test_lifecycle_events_volumes_and_dumpxml(st: Storage, workdir: Path) -> None:
    pools, target = st.pools, st.root / "p"
    raw = await pools.create_volume("p", volume_xml("a.raw", 8 * MiB, format="raw"))
    assert (raw.format, raw.capacity, raw.type) == ("raw", 8 * MiB, "file")
    assert raw.allocation >= 8 * MiB  # libvirt: no <allocation> means fully allocated
    sparse = await pools.create_volume("p", volume_xml("s.raw", GiB, format="raw", allocation=0))
    assert sparse.allocation < MiB and sparse.physical == GiB
    base = await pools.create_volume("p", volume_xml("base.qcow2", GiB, format="qcow2"))
    top = await pools.create_volume(
        "p", volume_xml("top.qcow2", None, format="qcow2", backing=Backing(base.path, None))
    )
    assert top.capacity == GiB and top.backing == Backing(base.path, "qcow2")
    assert [v.name for v in pools.volumes("p")] == ["a.raw", "base.qcow2", "s.raw", "top.qcow2"]
    validate(workdir, await pools.volume_xml("p", "top.qcow2"), "storagevol")
    validate(workdir, pools.xml("p"), "storagepool")
    info = pools.get("p").info()
    assert info["state"] == "running" and info["capacity"] > 0 and info["volumes"] == 4
    # a file dropped in behind the agent is adopted by a refresh
    (target / "dropped.img").write_bytes(b"\0" * 4096)
    await pools.refresh("p")
    assert "dropped.img" in [v.name for v in pools.volumes("p")]
    for name in ("top.qcow2", "base.qcow2", "a.raw", "s.raw", "dropped.img"):
        await pools.delete_volume("p", name)
    assert os.listdir(target) == []
    await pools.destroy("p")
    await pools.delete("p")
    assert not target.exists()
    await pools.undefine("p")
    assert st.rec.pools("p") == [
        "defined",
        "started",
        "refreshed",
        "stopped",
        "deleted",
        "undefined",
    ]
    with pytest.raises(NoStoragePool):
        pools.get("p")


async def test_lookups_and_state_errors(st: Storage) -> None:
    pools = st.pools
    uuid = pools.get("p").defn.uuid
    assert pools.get(uuid).name == "p"
    with pytest.raises(OperationInvalid, match="already active"):
        await pools.start("p")
    with pytest.raises(OperationInvalid, match="active"):
        await pools.undefine("p")
    with pytest.raises(NoStorageVol):
        await pools.volume("p", "nothing")
    await pools.destroy("p")
    with pytest.raises(OperationInvalid, match="not active"):
        await pools.create_volume("p", volume_xml("x", MiB))
    with pytest.raises(OperationInvalid, match="not active"):
        await pools.destroy("p")


@pytest.mark.parametrize("name", ["a/b", "..", ".", "-rf", "a\x01b"])
async def test_bad_volume_names(st: Storage, name: str) -> None:
    with pytest.raises((InvalidArgument, XMLError)):
        await st.pools.create_volume(
            "p",
            volume_xml(name, MiB)
            if "\x01" not in name
            else f"<volume><name>{name}</name></volume>",
        )
    with pytest.raises(InvalidArgument):
        await st.pools.delete_volume("p", name)
    assert os.listdir(st.root / "p") == [] and not (st.root / "b").exists()


async def test_absurd_capacity_and_unknown_formats(st: Storage) -> None:
    pools = st.pools
    with pytest.raises(InvalidArgument, match="more than the largest volume"):
        await pools.create_volume("p", volume_xml("big", 1 << 60, format="qcow2"))  # 1 EiB
    with pytest.raises(XMLError, match="non-negative"):
        await pools.create_volume("p", "<volume><name>n</name><capacity>-1</capacity></volume>")
    with pytest.raises(XMLError, match="unit"):
        await pools.create_volume(
            "p", "<volume><name>n</name><capacity unit='parsecs'>12</capacity></volume>"
        )
    with pytest.raises(XMLError, match="format"):
        await pools.create_volume("p", volume_xml("f", MiB, format="floppy"))
    with pytest.raises(NoSupport, match="vmdk"):
        await pools.create_volume("p", volume_xml("f", MiB, format="vmdk"))
    with pytest.raises(InvalidArgument, match="needs a capacity"):
        await pools.create_volume("p", "<volume><name>c</name></volume>")
    with pytest.raises(ConfigUnsupported, match="encrypted"):
        await pools.create_volume(
            "p",
            "<volume><name>e</name><capacity>1</capacity><target>"
            "<encryption format='luks'/></target></volume>",
        )
    assert os.listdir(st.root / "p") == []
    assert (await pools.create_volume("p", volume_xml("ok", MiB))).capacity == MiB  # still serves


async def test_backing_store_must_be_a_volume(st: Storage) -> None:
    assert Path("/etc/hostname").exists()
    with pytest.raises(InvalidArgument, match="not a volume"):
        await st.pools.create_volume(
            "p", volume_xml("evil", GiB, format="qcow2", backing=Backing("/etc/hostname", "raw"))
        )
    assert os.listdir(st.root / "p") == []


async def test_pool_targets_outside_the_roots_are_refused(st: Storage, workdir: Path) -> None:
    outside = workdir / "elsewhere"
    with pytest.raises(OperationInvalid, match="outside the directories allowed"):
        await st.pools.define(dir_pool_xml("o", outside))
    link = st.root / "link"
    link.symlink_to(workdir)  # inside by name, outside in fact
    with pytest.raises(OperationInvalid, match="outside"):
        await st.pools.define(dir_pool_xml("l", link / "x"))
    with pytest.raises(OperationInvalid, match="not allowed"):
        await st.pools.define(
            dir_pool_xml("f", st.root / "f", "fs", "<source><device path='/dev/sda'/></source>")
        )
    with pytest.raises(OperationFailed, match="same storage"):
        await st.pools.define(dir_pool_xml("twin", st.root / "p"))
    assert not outside.exists() and [p.name for p in st.pools.pools()] == ["p"]


async def test_two_creates_of_one_name_one_wins(st: Storage) -> None:
    xml = volume_xml("race.qcow2", GiB, format="qcow2")
    results = await asyncio.gather(
        *(st.pools.create_volume("p", xml) for _ in range(4)), return_exceptions=True
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1 and len(lost) == 3
    assert all(isinstance(e, OperationFailed) for e in lost), lost
    assert os.listdir(st.root / "p") == ["race.qcow2"]
    with pytest.raises(OperationFailed, match="already exists"):
        await st.pools.create_volume("p", xml)


async def test_pool_dir_disappears(st: Storage) -> None:
    await st.pools.create_volume("p", volume_xml("v", MiB))
    os.unlink(st.root / "p" / "v")
    os.rmdir(st.root / "p")
    with pytest.raises(OperationFailed, match="inactive"):
        await st.pools.refresh("p")
    assert st.pools.get("p").info()["state"] == "inactive"
    assert st.rec.pools("p")[-1] == "stopped"
    with pytest.raises(OperationFailed, match="does not exist"):
        await st.pools.start("p")
    await st.pools.build("p")
    await st.pools.start("p")  # still serves
    assert st.pools.volumes("p") == []


async def test_resize(st: Storage) -> None:
    pools = st.pools
    await pools.create_volume("p", volume_xml("r.qcow2", GiB, format="qcow2"))
    assert (await pools.resize_volume("p", "r.qcow2", 2 * GiB)).capacity == 2 * GiB
    assert (await pools.resize_volume("p", "r.qcow2", GiB, delta=True)).capacity == 3 * GiB
    with pytest.raises(InvalidArgument, match="without --shrink"):
        await pools.resize_volume("p", "r.qcow2", GiB)
    assert (await pools.volume("p", "r.qcow2")).capacity == 3 * GiB
    got = await pools.resize_volume("p", "r.qcow2", GiB, shrink=True)
    assert got.capacity == GiB
    with pytest.raises(InvalidArgument, match="largest"):
        await pools.resize_volume("p", "r.qcow2", 1 << 60)


async def test_restart_readopts_pools_and_keeps_stored_formats(st: Storage, workdir: Path) -> None:
    pools = st.pools
    await pools.define(dir_pool_xml("auto", st.root / "auto"))
    await pools.build("auto")
    await pools.set_autostart("auto", True)
    raw = await pools.create_volume("p", volume_xml("guest.raw", MiB, format="raw"))
    # the guest writes a qcow2 header into its raw disk: probing would believe it
    await asyncio.to_thread(
        subprocess.run,
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "/etc/hostname",
            "-F",
            "raw",
            str(workdir / "evil.qcow2"),
            "1M",
        ],
        check=True,
    )
    Path(raw.path).write_bytes((workdir / "evil.qcow2").read_bytes().ljust(MiB, b"\0"))
    rec = Recorder()
    again = await open_storage(st.state, st.root, rec)
    assert again.pools.get("p").info()["state"] == "running"  # still there: stays active
    assert again.pools.get("auto").info()["state"] == "running"  # autostart
    assert rec.pools("auto") == ["started"] and rec.pools("p") == []
    facts = await again.pools.volume("p", "guest.raw")
    assert facts.format == "raw" and facts.backing is None


async def test_restart_after_the_pool_went_away(st: Storage) -> None:
    os.rmdir(st.root / "p")
    rec = Recorder()
    again = await open_storage(st.state, st.root, rec)
    assert again.pools.get("p").info()["state"] == "inactive"
    assert [(e.event, e.reconciled) for e in rec.pool_events] == [("stopped", True)]


async def test_transient_pool_create_and_destroy(st: Storage) -> None:
    pool = await st.pools.create(dir_pool_xml("t", st.root / "t"), build=True)
    assert not pool.persistent and pool.active
    with pytest.raises(OperationInvalid, match="transient"):
        await st.pools.set_autostart("t", True)
    await st.pools.destroy("t")
    with pytest.raises(NoStoragePool):
        st.pools.get("t")


async def test_leased_volume_cannot_be_deleted(st: Storage) -> None:
    await st.pools.create_volume("p", volume_xml("disk.qcow2", GiB, format="qcow2"))
    resolved = await st.pools.resolve("p", "disk.qcow2", "uuid-1")
    assert (resolved.kind, resolved.format) == ("file", "qcow2")
    with pytest.raises(OperationInvalid, match="in use by domain uuid-1"):
        await st.pools.delete_volume("p", "disk.qcow2")
    with pytest.raises(OperationInvalid, match="in use"):
        await st.pools.destroy("p")
    st.pools.release("uuid-1")
    await st.pools.delete_volume("p", "disk.qcow2")
    with pytest.raises(Exception, match="not found in pool 'p'"):
        await st.pools.resolve("p", "disk.qcow2", "uuid-1")


async def test_every_unsupported_type_defines_and_refuses_with_a_reason(st: Storage) -> None:
    xml = (
        "<pool type='logical'><source><name>vg9</name></source>"
        "<target><path>/dev/vg9</path></target></pool>"
    )
    pool = await st.pools.define(xml)
    assert pool.support is not None and "device-mapper" in pool.support
    with pytest.raises(NoSupport, match="device-mapper"):
        await st.pools.start("vg9")
    rbd = await st.pools.define(
        "<pool type='rbd'><source><name>r</name><host name='m'/></source></pool>"
    )
    with pytest.raises(NoSupport, match="Ceph"):
        await st.pools.build(rbd.name)
    assert parse_pool_xml(st.pools.xml("vg9")).name == "vg9"


async def test_clone_job_progress_and_cross_pool(st: Storage) -> None:
    pools = st.pools
    await pools.define(dir_pool_xml("q", st.root / "q"))
    await pools.start("q", build=True)
    src = await pools.create_volume("p", volume_xml("src.raw", 64 * MiB, format="raw"))
    Path(src.path).write_bytes(os.urandom(64 * MiB))
    job = await pools.clone_volume(
        "q", volume_xml("copy.qcow2", None, format="qcow2"), "p", "src.raw"
    )
    with pytest.raises(OperationInvalid, match="in use by a job"):
        await pools.delete_volume("p", "src.raw")  # the source is read
    done = await st.jobs.wait(job.id, timeout=120)
    assert done.state is JobState.COMPLETED, done.error
    events = st.rec.jobs(job.id)
    assert events[0] == "started" and events[-1] == "completed"
    copy = await pools.volume("q", "copy.qcow2")
    assert (copy.format, copy.capacity) == ("qcow2", 64 * MiB)
    cmp = await asyncio.to_thread(
        subprocess.run,
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", src.path, copy.path],
        capture_output=True,
    )
    assert cmp.returncode == 0, cmp.stdout
    await pools.delete_volume("p", "src.raw")  # no longer leased


async def test_clone_cancel_leaves_nothing(st: Storage) -> None:
    pools = st.pools
    src = await pools.create_volume("p", volume_xml("big.raw", 512 * MiB, format="raw"))
    with open(src.path, "r+b") as fh:  # data everywhere: convert takes a while
        for i in range(0, 512, 8):
            fh.seek(i * MiB)
            fh.write(os.urandom(MiB))
    job = await pools.clone_volume("p", volume_xml("c.qcow2", None, format="qcow2"), "p",
                                   "big.raw", owner="alice")  # fmt: skip
    assert pools.get("p").busy == {"c.qcow2": "cloning"}
    # the owner rules see the copy as its maker's before its record is written
    assert await pools.volume_owner("p/c.qcow2") == "alice"
    await st.jobs.cancel(job.id)
    assert st.jobs.get(job.id).state is JobState.CANCELLED
    assert sorted(os.listdir(st.root / "p")) == ["big.raw"]
    assert pools.get("p").busy == {}
    assert await pools.volume_owner("p/c.qcow2") is None
    await pools.delete_volume("p", "big.raw")


async def test_wipe_zero_and_random(st: Storage) -> None:
    pools = st.pools
    vol = await pools.create_volume("p", volume_xml("w.raw", 4 * MiB, format="raw"))
    Path(vol.path).write_bytes(b"\xaa" * (4 * MiB))
    job = await pools.wipe_volume("p", "w.raw", "zero")
    assert (await st.jobs.wait(job.id, 60)).state is JobState.COMPLETED
    assert Path(vol.path).read_bytes() == bytes(4 * MiB)
    job = await pools.wipe_volume("p", "w.raw", "random")
    assert (await st.jobs.wait(job.id, 60)).state is JobState.COMPLETED
    data = Path(vol.path).read_bytes()
    assert data != bytes(4 * MiB) and len(data) == 4 * MiB
    q = await pools.create_volume("p", volume_xml("w.qcow2", GiB, format="qcow2"))
    job = await pools.wipe_volume("p", "w.qcow2", "zero")
    assert (await st.jobs.wait(job.id, 60)).state is JobState.COMPLETED
    assert (await pools.volume("p", "w.qcow2")).format == "raw"  # as libvirt: content gone
    with pytest.raises(InvalidArgument, match="unknown wipe algorithm"):
        await pools.wipe_volume("p", "w.raw", "shred")
    with pytest.raises(NoSupport, match="trim"):
        failed = await pools.wipe_volume("p", "w.raw", "trim")
        raise_job(await st.jobs.wait(failed.id, 60))
    assert q.path


def raise_job(job: object) -> None:
    from agent.jobs import Job

    assert isinstance(job, Job)
    if job.error:
        from virtbus.errors import error_from_wire

        raise error_from_wire(job.error)


async def test_job_records_survive_a_restart(st: Storage) -> None:
    pools = st.pools
    src = await pools.create_volume("p", volume_xml("s.raw", 256 * MiB, format="raw"))
    with open(src.path, "r+b") as fh:
        for i in range(0, 256, 4):
            fh.seek(i * MiB)
            fh.write(os.urandom(MiB))
    job = await pools.clone_volume("p", volume_xml("d.raw", None, format="raw"), "p", "s.raw")
    record = json.loads((st.state / "jobs" / f"{job.id}.json").read_text())
    assert record["state"] == "running"
    # the agent dies: its tasks stop without any cleanup (simulated by the record alone)
    rec = Recorder()
    again = await open_storage(st.state, st.root, rec)
    await st.jobs.cancel(job.id)  # the old process' task, so it stops using the files
    again_job = again.jobs.get(job.id)
    assert again_job.state is JobState.FAILED and "restarted" in str(again_job.error)
    assert ("failed" in rec.jobs(job.id)) and temps(st.root / "p") == []


async def test_remove_all_storage_of_an_undefined_domain(st: Storage) -> None:
    """What ``undefine --remove-all-storage`` does after the undefine: every volume of the
    domain, named by reference or by path, is deleted; one that is gone is reported."""
    from drivers.test import TestDriver
    from virtbus.domain import parse_domain_xml

    pools = st.pools
    a = await pools.create_volume("p", volume_xml("a.qcow2", GiB, format="qcow2"))
    await pools.create_volume("p", volume_xml("b.qcow2", GiB, format="qcow2"))
    xml = (
        "<domain type='test'><name>vm</name><memory>65536</memory><os><type>hvm</type></os>"
        "<devices><disk type='volume'><source pool='p' volume='b.qcow2'/><target dev='vda'/>"
        f"</disk><disk type='file'><source file='{a.path}'/><target dev='vdb'/></disk>"
        "<disk type='file'><source file='/etc/hostname'/><target dev='vdc'/></disk>"
        "<disk type='volume'><source pool='p' volume='gone'/><target dev='vdd'/></disk>"
        "</devices></domain>"
    )
    driver = TestDriver()
    driver.set_volume_resolver(pools)
    await driver.define(xml)
    defn = parse_domain_xml(await driver.xml("vm"))
    volumes = pools.volumes_of(defn)
    assert volumes == [("p", "b.qcow2"), ("p", "a.qcow2"), ("p", "gone")]  # not /etc/hostname
    await driver.undefine("vm")
    results = await pools.remove_volumes(volumes)
    assert [(v, e is None) for _p, v, e in results] == [
        ("b.qcow2", True),
        ("a.qcow2", True),
        ("gone", False),
    ]
    assert os.listdir(st.root / "p") == [] and Path("/etc/hostname").exists()
