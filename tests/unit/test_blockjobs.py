"""Block jobs without QEMU: how a commit or pull resolves its layers (and refuses bad
ones), how a definition names a chain, virtbus's job ids (what a restarted agent adopts),
the QMP event mapping that leaves virtbus's own jobs to their follower, and the test
driver's simulation. The real QEMU path is tests/e2e/test_qemu_blockjobs.py."""

from __future__ import annotations

import uuid as uuidlib

import pytest

from drivers.base import BlockJobs, DriverEvent
from drivers.blockjobs import disk_chain, plan_commit, plan_pull, with_chain
from drivers.qemu import events as ev
from drivers.qemu.blockjobs import job_id, parse_job_id
from drivers.test import TestDriver
from virtbus.domain import parse_domain_xml
from virtbus.errors import InvalidArgument, NoSupport, OperationInvalid
from virtbus.protocol.blockjob import BlockCommit, BlockCopy, BlockPull
from virtbus.protocol.events import DomainState

FILES = ["/i/top", "/i/mid", "/i/base"]


def commit(**kw: object) -> BlockCommit:
    return BlockCommit(domain="d", disk="vda", **kw)  # type: ignore[arg-type]


def test_commit_and_pull_resolve_their_layers_as_libvirt() -> None:
    assert plan_commit("vda", FILES, commit(active=True)) == (0, 2)
    assert plan_commit("vda", FILES, commit(active=True, shallow=True)) == (0, 1)
    assert plan_commit("vda", FILES, commit(top="/i/mid")) == (1, 2)
    assert plan_commit("vda", FILES, commit(active=True, base="/i/mid")) == (0, 1)
    with pytest.raises(InvalidArgument, match="--active"):
        plan_commit("vda", FILES, commit())
    with pytest.raises(InvalidArgument, match="not in the image chain"):
        plan_commit("vda", FILES, commit(top="/elsewhere"))
    with pytest.raises(InvalidArgument, match="not below"):
        plan_commit("vda", FILES, commit(top="/i/mid", base="/i/top"))
    with pytest.raises(InvalidArgument, match="no backing image"):
        plan_commit("vda", FILES[:1], commit(active=True))
    with pytest.raises(InvalidArgument, match="no backing image"):
        plan_commit("vda", FILES, commit(top="/i/base"))
    pull = BlockPull(domain="d", disk="vda")
    assert plan_pull("vda", FILES, pull) is None
    assert plan_pull("vda", FILES, BlockPull(domain="d", disk="vda", base="/i/base")) == 2
    with pytest.raises(InvalidArgument, match="active layer"):
        plan_pull("vda", FILES, BlockPull(domain="d", disk="vda", base="/i/top"))
    with pytest.raises(InvalidArgument, match="no backing image"):
        plan_pull("vda", FILES[:1], pull)


def domain_xml(name: str) -> str:
    return f"""<domain type='test'><name>{name}</name><uuid>{uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type>hvm</type></os>
  <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
  <source file='/i/top'/><backingStore type='file'><format type='qcow2'/>
  <source file='/i/mid'/><backingStore type='file'><format type='raw'/>
  <source file='/i/base'/></backingStore></backingStore>
  <target dev='vda' bus='virtio'/></disk></devices>
</domain>"""


def test_a_definition_names_a_chain() -> None:
    defn = parse_domain_xml(domain_xml("d"))
    chain = disk_chain(defn.disks[0])
    assert chain == [("/i/top", "qcow2"), ("/i/mid", "qcow2"), ("/i/base", "raw")]
    shorter = with_chain(defn, "vda", [chain[0], chain[2]])
    assert disk_chain(shorter.disks[0]) == [("/i/top", "qcow2"), ("/i/base", "raw")]
    alone = with_chain(defn, "vda", [chain[2]])
    assert disk_chain(alone.disks[0]) == [("/i/base", "raw")]
    assert alone.disks[0].driver_type == "raw" and "<backingStore/>" in alone.to_xml()
    assert disk_chain(defn.disks[0]) == chain  # a copy: the original is untouched


def test_job_ids_name_the_job_and_its_disk() -> None:
    assert parse_job_id(job_id("acommit", "vda")) == ("active-commit", "vda")
    assert parse_job_id(job_id("pull", "sdb")) == ("pull", "sdb")
    assert parse_job_id("virtbus-snapshot-save-3") is None  # a snapshot job is not adopted
    assert parse_job_id("someone-elses") is None
    ctx = ev.Context(DomainState.RUNNING, "booted")
    mine = ev.map_event("BLOCK_JOB_COMPLETED", {"device": "virtbus-pull-vda", "type": "stream"},
                        ctx)  # fmt: skip
    assert mine.events == ()  # its follower publishes it, with the disk and type
    theirs = ev.map_event("BLOCK_JOB_COMPLETED", {"device": "drive0", "type": "stream"}, ctx)
    assert [e[0] for e in theirs.events] == ["block_job"]


async def test_the_test_driver_simulates_block_jobs() -> None:
    drv = TestDriver()
    seen: list[DriverEvent] = []
    await drv.open(seen.append)
    assert isinstance(drv, BlockJobs)
    await drv.define(domain_xml("d"))
    with pytest.raises(OperationInvalid, match="not running"):
        await drv.block_commit("d", commit(active=True))
    await drv.start("d")
    done = await drv.block_commit("d", commit(top="/i/mid"))
    assert done.type == "commit" and await drv.block_job_info("d", "vda") is None
    assert [f for f, _ in disk_chain(parse_domain_xml(await drv.xml("d")).disks[0])] == [
        "/i/top", "/i/base"]  # fmt: skip
    ready = await drv.block_commit("d", commit(active=True))
    assert ready.ready and ready.type == "active-commit"
    with pytest.raises(OperationInvalid, match="already has a block job"):
        await drv.block_pull("d", BlockPull(domain="d", disk="vda"))
    assert (await drv.block_job_speed("d", "vda", 7)).bandwidth == 7
    await drv.block_job_abort("d", "vda", True)
    assert disk_chain(parse_domain_xml(await drv.xml("d")).disks[0]) == [("/i/base", "raw")]
    with pytest.raises(OperationInvalid, match="no block job"):
        await drv.block_job_abort("d", "vda", False)
    assert await drv.block_errors("d") == []
    copy = await drv.block_copy("d", BlockCopy(domain="d", disk="vda", dest="/i/copy",
                                               format="raw"))  # fmt: skip
    assert (copy.type, copy.ready) == ("copy", True)
    await drv.block_job_abort("d", "vda", True)  # pivot: vda runs on the copy
    assert disk_chain(parse_domain_xml(await drv.xml("d")).disks[0]) == [("/i/copy", "raw")]
    end = drv.block_job_end("d", "vda")
    assert end is not None and (end.type, end.status) == ("copy", "completed")
    with pytest.raises(NoSupport, match="shallow"):
        await drv.block_copy("d", BlockCopy(domain="d", disk="vda", dest="/x", shallow=True))
    statuses = [(e.data["type"], e.data["status"]) for e in seen if e.event == "block_job"]
    assert statuses == [("commit", "completed"), ("active-commit", "ready"),
                        ("active-commit", "completed"), ("copy", "ready"),
                        ("copy", "completed")]  # fmt: skip
