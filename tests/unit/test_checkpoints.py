"""Checkpoints and backups without a hypervisor: the XML requests, the metadata store
(its tree and its file), and the test driver's simulation with the QEMU driver's checks
(the QEMU driver itself: tests/e2e/test_qemu_backup.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from drivers.base import DriverEvent
from drivers.checkpoints import CheckpointStore
from drivers.test import TestDriver
from virtbus.cli.backup import request_xml
from virtbus.domain.checkpoint import (
    CheckpointRequest,
    parse_backup_request,
    parse_checkpoint_request,
)
from virtbus.errors import (
    ConfigUnsupported,
    InvalidArgument,
    NoDomainCheckpoint,
    NoSupport,
    OperationInvalid,
    XMLError,
)

DOMAIN = """<domain type='test'><name>d</name>
  <memory unit='MiB'>64</memory><os><type>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/nonexistent/d.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='/nonexistent/d.raw'/><target dev='vdb' bus='virtio'/></disk>
  </devices></domain>"""
NO_RAW = ("<domaincheckpoint><name>{}</name><disks><disk name='vdb' checkpoint='no'/></disks>"
          "</domaincheckpoint>")  # fmt: skip
ONLY_VDA = ("<domainbackup>{}<disks><disk name='vda'><target file='{}'/></disk>"
            "<disk name='vdb' backup='no'/></disks></domainbackup>")  # fmt: skip


def test_checkpoint_and_backup_xml() -> None:
    req = parse_checkpoint_request(NO_RAW.format("c1"))
    assert req == CheckpointRequest("c1", None, {"vdb": "no"})
    assert parse_checkpoint_request(None) == CheckpointRequest()
    with pytest.raises(XMLError):
        parse_checkpoint_request("<domainsnapshot/>")
    with pytest.raises(InvalidArgument):
        parse_checkpoint_request("<domaincheckpoint><name>a/b</name></domaincheckpoint>")
    backup = parse_backup_request(ONLY_VDA.format("<incremental>c1</incremental>", "/b/x"))
    assert backup.incremental == "c1" and backup.skip == {"vdb"}
    assert [(d.target, d.file, d.format) for d in backup.disks] == [("vda", "/b/x", "qcow2")]
    with pytest.raises(NoSupport, match="pull"):
        parse_backup_request("<domainbackup mode='pull'/>")
    with pytest.raises(InvalidArgument, match="absolute"):
        parse_backup_request(ONLY_VDA.format("", "rel/x"))
    xml = request_xml("c1", "d & e", ["vdb,checkpoint=no"])
    assert parse_checkpoint_request(xml) == CheckpointRequest("c1", "d & e", {"vdb": "no"})


async def test_store_reparents_and_persists(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for name in ("a", "b", "c"):
        cp = store.new("u", "d", CheckpointRequest(name), [])
        await store.add("u", cp)
    assert [(i.name, i.parent) for i in store.infos("u", "d")] == [
        ("a", None), ("b", "a"), ("c", "b")]  # fmt: skip
    with pytest.raises(OperationInvalid):
        store.new("u", "d", CheckpointRequest("a"), [])
    await store.remove("u", "b")
    again = CheckpointStore(tmp_path)
    await again.load()
    assert [(i.name, i.parent) for i in again.infos("u", "d")] == [("a", None), ("c", "a")]
    assert again.new("u", "d", CheckpointRequest("z"), []).parent == "c"
    with pytest.raises(NoDomainCheckpoint):
        again.get("u", "d", "b")


async def test_test_driver_simulates_the_qemu_checks(tmp_path: Path) -> None:
    events: list[DriverEvent] = []
    drv = TestDriver(backup_time=30.0)
    await drv.open(events.append)
    await drv.define(DOMAIN)
    await drv.start("d")
    with pytest.raises(ConfigUnsupported, match="vdb"):
        await drv.checkpoint_create("d", None)  # a raw disk holds no bitmap
    c1 = await drv.checkpoint_create("d", NO_RAW.format("c1"))
    assert c1.disks == ["vda"] and c1.parent is None
    with pytest.raises(NoDomainCheckpoint):
        await drv.backup_begin("d", ONLY_VDA.format("<incremental>x</incremental>", "/b/1"),
                               None)  # fmt: skip
    with pytest.raises(ConfigUnsupported, match="vdb"):  # an incremental backup of raw
        await drv.backup_begin("d", "<domainbackup><incremental>c1</incremental></domainbackup>",
                               None)  # fmt: skip
    inc = ONLY_VDA.format("<incremental>c1</incremental>", tmp_path / "inc")
    started = await drv.backup_begin("d", inc, NO_RAW.format("c2"))
    assert started.checkpoint == "c2" and str(tmp_path / "inc") in started.xml
    assert (await drv.job_info("d", False)).type == "unbounded"
    with pytest.raises(OperationInvalid, match="active backup job"):
        await drv.backup_begin("d", ONLY_VDA.format("", tmp_path / "other"), None)
    with pytest.raises(OperationInvalid, match="in use"):
        await drv.checkpoint_delete("d", "c1", False)
    assert (await drv.job_abort("d")).type == "cancelled"
    assert events[-1].event == "job_completed" and events[-1].data["status"] == "cancelled"
    assert (await drv.job_info("d", False)).type == "none"
    with pytest.raises(OperationInvalid):
        await drv.job_abort("d")
    assert (await drv.checkpoint_info("d", "c2")).parent == "c1"
    assert await drv.checkpoint_delete("d", "c1", False) == ["c1"]
    assert (await drv.checkpoint_info("d", "c2")).parent is None
    await drv.destroy("d")
    with pytest.raises(OperationInvalid, match="checkpoints"):
        await drv.undefine("d")
    await drv.close()


async def test_test_driver_backup_completes() -> None:
    events: list[DriverEvent] = []
    drv = TestDriver()
    await drv.open(events.append)
    await drv.define(DOMAIN)
    await drv.start("d")
    await drv.backup_begin("d", ONLY_VDA.format("", "/nonexistent/full"), None)
    async with asyncio.timeout(5):
        while not any(e.event == "job_completed" for e in events):
            await asyncio.sleep(0)
    assert (await drv.job_info("d", True)).type == "completed"
    await drv.close()
