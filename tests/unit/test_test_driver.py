"""The driver contract, run against the in-memory test driver."""

from __future__ import annotations

import asyncio

import pytest

from drivers.base import Driver, DriverEvent, MigrationParams
from drivers.test import TestDriver, TestHostSpec
from virtbus.errors import (
    InvalidArgument,
    NoDomainError,
    OperationFailed,
    OperationInvalid,
    XMLError,
)
from virtbus.protocol.events import DomainState

XML = """<domain type='{type}'>
  <name>{name}</name>{uuid}
  <memory unit='MiB'>256</memory><currentMemory unit='MiB'>128</currentMemory>
  <vcpu current='1'>2</vcpu>
  <os><type>hvm</type></os>
</domain>"""
UUID = "<uuid>3f1d5a0e-8c1b-4d5e-9a55-1f0b7e6c2d41</uuid>"


def xml(name: str = "d1", uuid: str = "", hv: str = "test") -> str:
    return XML.format(name=name, uuid=uuid, type=hv)


@pytest.fixture
async def driver() -> tuple[Driver, list[DriverEvent]]:
    events: list[DriverEvent] = []
    drv = TestDriver(TestHostSpec(cpus=8, memory_kib=16 << 20))
    await drv.open(events.append)
    return drv, events


def pairs(events: list[DriverEvent]) -> list[tuple[str, str | None]]:
    return [(e.event, e.detail) for e in events]


async def test_full_lifecycle_events_and_states(driver: tuple[Driver, list[DriverEvent]]) -> None:
    drv, events = driver
    ref = await drv.define(xml())
    assert drv.lookup(ref.uuid) == ref and drv.lookup("d1") == ref
    assert drv.lookup(ref.uuid.replace("-", "")) == ref
    info = await drv.info("d1")
    assert (info.state, info.id, info.memory_kib, info.vcpus) == (
        DomainState.SHUTOFF,
        None,
        131072,
        1,
    )
    await drv.start("d1")
    running = await drv.info(ref.uuid)
    assert running.state == DomainState.RUNNING and running.reason == "booted" and running.id
    assert f"id='{running.id}'" in await drv.xml("d1")
    await drv.suspend("d1")
    assert (await drv.info("d1")).reason == "user"
    await drv.resume("d1")
    await drv.reboot("d1")
    await drv.reset("d1")
    await drv.shutdown("d1")
    await drv.start("d1")
    await drv.destroy("d1")
    assert "id=" not in (await drv.xml("d1")).splitlines()[0]
    await drv.undefine("d1")
    assert drv.lookup("d1") is None
    assert pairs(events) == [
        ("defined", "added"), ("started", "booted"), ("suspended", "paused"),
        ("resumed", "unpaused"), ("reboot", None), ("reboot", None), ("shutdown", "guest"),
        ("stopped", "shutdown"), ("started", "booted"), ("stopped", "destroyed"),
        ("undefined", "removed"),
    ]  # fmt: skip


@pytest.mark.parametrize("hv", ["test", "kvm", "qemu", "xen"])
async def test_accepts_every_hypervisor_type(
    driver: tuple[Driver, list[DriverEvent]], hv: str
) -> None:
    drv, _ = driver
    await drv.define(xml(hv=hv))
    await drv.start("d1")
    assert (await drv.info("d1")).hv_type == hv


async def test_wrong_states_are_operation_invalid(driver: tuple[Driver, list[DriverEvent]]) -> None:
    drv, events = driver
    await drv.define(xml())
    for verb in ("shutdown", "destroy", "reboot", "reset", "suspend", "resume"):
        with pytest.raises(OperationInvalid):
            await getattr(drv, verb)("d1")
    await drv.start("d1")
    for verb in ("start", "resume", "undefine"):
        with pytest.raises(OperationInvalid):
            await getattr(drv, verb)("d1")
    await drv.suspend("d1")
    with pytest.raises(OperationInvalid):
        await drv.suspend("d1")
    assert pairs(events)[-1] == ("suspended", "paused")  # failures emit nothing


async def test_unknown_domain_and_duplicates(driver: tuple[Driver, list[DriverEvent]]) -> None:
    drv, events = driver
    for verb in ("start", "info", "xml", "undefine", "destroy"):
        with pytest.raises(NoDomainError):
            await getattr(drv, verb)("ghost")
    ref = await drv.define(xml(uuid=UUID))
    with pytest.raises(OperationFailed, match="already exists"):
        await drv.define(xml(uuid="<uuid>11111111-2222-3333-4444-555555555555</uuid>"))
    with pytest.raises(OperationFailed, match="already defined"):
        await drv.define(xml(name="other", uuid=UUID))
    again = await drv.define(xml(uuid=UUID))  # same name + uuid: an update
    assert again == ref and pairs(events) == [("defined", "added"), ("defined", "updated")]
    with pytest.raises(XMLError):
        await drv.define("<domain type='test'><name>x</name></domain")


async def test_host_resources_count_active_memory(driver: tuple[Driver, list[DriverEvent]]) -> None:
    drv, _ = driver
    await drv.define(xml())
    before = await drv.host_resources()
    await drv.start("d1")
    after = await drv.host_resources()
    assert before.memory_total_kib == 16 << 20 and before.cpus == 8
    assert before.memory_free_kib - after.memory_free_kib == 131072
    assert [d.name for d in await drv.list_domains(include_inactive=False)] == ["d1"]


async def test_stats_use_libvirt_field_names(driver: tuple[Driver, list[DriverEvent]]) -> None:
    drv, _ = driver
    await drv.define(xml())
    await drv.start("d1")
    stats = (await drv.stats())["d1"]
    assert stats["state.state"] == 1 and stats["state.reason"] == 1  # running, booted
    assert stats["balloon.maximum"] == 262144 and stats["vcpu.current"] == 1
    assert stats["cpu.time"] >= 0 and stats["block.count"] == 0
    only = (await drv.stats(["d1"], frozenset({"state"})))["d1"]
    assert set(only) == {"state.state", "state.reason"}
    assert (await drv.host_stats())["domains.active"] == 1


async def test_migration_stream_is_a_supervised_task_that_close_ends() -> None:
    src, dst = TestDriver(migration_time=30.0), TestDriver()
    await src.open(lambda _e: None)
    await dst.open(lambda _e: None)
    await src.define(xml("m1"))
    await src.start("m1")
    params = MigrationParams()
    uri = await dst.migrate_prepare(await src.migrate_begin("m1"), params)
    await src.migrate_perform("m1", uri, params)
    assert (await src.migrate_status("m1")).status in ("setup", "active")
    tasks = [t for t in asyncio.all_tasks() if t.get_name() == "test-driver:migrate:m1"]
    assert len(tasks) == 1 and len(src._tasks) == 1  # owned by the driver's TaskGroup
    await src.close()  # ends the stream: nothing left running after close
    assert tasks[0].done() and len(src._tasks) == 0
    assert (await src.migrate_status("m1")).status == "cancelled"
    await dst.close()


async def test_event_rate_makes_running_domains_emit_rtc_change() -> None:
    events: list[DriverEvent] = []
    drv = TestDriver(TestHostSpec(cpus=8, memory_kib=16 << 20), event_rate=200)
    await drv.open(events.append)
    try:
        await drv.define(xml("r1"))
        await asyncio.sleep(0.3)  # nothing runs: no events, and no backlog either
        assert [e.event for e in events] == ["defined"]
        await drv.start("r1")
        await asyncio.sleep(0.5)
        ticks = [e for e in events if e.event == "rtc_change"]
        assert 40 <= len(ticks) <= 150, len(ticks)  # ~100; a bound on a loaded machine
        assert all(e.domain == "r1" for e in ticks)
        assert [e.data["offset"] for e in ticks] == list(range(1, len(ticks) + 1))
    finally:
        await drv.close()
    with pytest.raises(InvalidArgument):
        TestDriver(event_rate=-1)
    quiet: list[DriverEvent] = []
    off = TestDriver()  # off by default
    await off.open(quiet.append)
    await off.define(xml("r2"))
    await off.start("r2")
    await asyncio.sleep(0.2)
    await off.close()
    assert [e.event for e in quiet] == ["defined", "started"]
