"""The test driver's live migration (the steps the scheduler drives), between two drivers."""

from __future__ import annotations

import asyncio

import pytest

from drivers.base import DriverEvent, MigrationParams
from drivers.test import TestDriver, TestHostSpec
from virtbus.errors import MigrateFailed, OperationInvalid

XML = """<domain type='test'><name>m1</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type>hvm</type></os></domain>"""


def pair(
    migration_time: float = 0.0,
) -> tuple[TestDriver, TestDriver, list[DriverEvent], list[DriverEvent]]:
    spec = TestHostSpec(cpus=4, memory_kib=1 << 20)
    return (
        TestDriver(spec, migration_time=migration_time),
        TestDriver(spec, migration_time=migration_time),
        [],
        [],
    )


async def _open(
    src: TestDriver, dst: TestDriver, se: list[DriverEvent], de: list[DriverEvent]
) -> None:
    await src.open(se.append)
    await dst.open(de.append)
    await src.define(XML)
    await src.start("m1")
    se.clear()


async def _wait_done(src: TestDriver) -> str:
    for _ in range(200):
        status = (await src.migrate_status("m1")).status
        if status not in ("setup", "active", "postcopy-active"):
            return status
        await asyncio.sleep(0.02)
    raise AssertionError("migration did not end")


def _seq(events: list[DriverEvent]) -> list[tuple[str, str | None]]:
    return [(e.event, e.detail) for e in events if e.event != "migration"]


async def test_successful_migration_moves_the_guest_with_libvirt_events() -> None:
    src, dst, se, de = pair(0.2)
    await _open(src, dst, se, de)
    params = MigrationParams()
    xml = await src.migrate_begin("m1")
    uri = await dst.migrate_prepare(xml, params)
    assert uri.startswith("tcp:127.0.0.1:")
    assert (await dst.info("m1")).state.label == "paused"
    assert not (await dst.info("m1")).persistent
    await src.migrate_perform("m1", uri, params)
    assert await _wait_done(src) == "completed"
    await dst.migrate_finish("m1", True)
    await src.migrate_confirm("m1", True)
    assert src.lookup("m1") is None
    info = await dst.info("m1")
    assert (info.state.label, info.reason, info.persistent) == ("running", "migrated", True)
    assert _seq(se) == [
        ("suspended", "migrated"),
        ("stopped", "migrated"),
        ("undefined", "removed"),
    ]
    assert _seq(de) == [("started", "migrated"), ("defined", "added"), ("resumed", "migrated")]
    progress = [e.data for e in se if e.event == "migration"]
    assert progress[0]["status"] == "setup" and progress[-1]["status"] == "completed"
    assert any(p["status"] == "active" and p["transferred"] > 0 for p in progress)


async def test_destination_gone_fails_the_stream_and_rollback_keeps_source() -> None:
    src, dst, se, de = pair(1.0)
    await _open(src, dst, se, de)
    params = MigrationParams()
    uri = await dst.migrate_prepare(await src.migrate_begin("m1"), params)
    await src.migrate_perform("m1", uri, params)
    await asyncio.sleep(0.25)
    await dst.destroy("m1")  # "kill the destination QEMU"
    assert dst.lookup("m1") is None  # a transient incoming domain vanishes
    assert await _wait_done(src) == "failed"
    await src.migrate_confirm("m1", False)
    assert (await src.info("m1")).state.label == "running"


async def test_cancel_then_finish_false_and_confirm_false() -> None:
    src, dst, se, de = pair(1.0)
    await _open(src, dst, se, de)
    params = MigrationParams()
    uri = await dst.migrate_prepare(await src.migrate_begin("m1"), params)
    await src.migrate_perform("m1", uri, params)
    with pytest.raises(OperationInvalid):
        await src.migrate_begin("m1")
    await src.migrate_cancel("m1")
    assert (await src.migrate_status("m1")).status == "cancelled"
    with pytest.raises(MigrateFailed):
        await dst.migrate_finish("m1", True)  # the stream never completed
    await dst.migrate_finish("m1", False)
    await src.migrate_confirm("m1", False)
    assert dst.lookup("m1") is None
    assert (await src.info("m1")).state.label == "running"
    assert ("stopped", "failed") in _seq(de)


async def test_perform_to_a_closed_port_fails_at_once() -> None:
    src, dst, se, de = pair()
    await _open(src, dst, se, de)
    with pytest.raises(MigrateFailed):
        await src.migrate_perform("m1", "tcp:127.0.0.1:1", MigrationParams())
    assert (await src.info("m1")).state.label == "running"
