"""setmem / setmaxmem: libvirt's rules (drivers/memory.py) on the test driver, the
definition edits, and the CLI's scaled sizes. The real balloon is in
tests/e2e/test_qemu_guest_events.py."""

from __future__ import annotations

import pytest

from drivers.base import Affect, DriverEvent
from drivers.test import TestDriver, TestHostSpec
from virtbus.cli.domain import memory_size
from virtbus.domain import parse_domain_xml
from virtbus.errors import InvalidArgument, OperationInvalid

XML = """<domain type='test'><name>m1</name>
  <memory unit='MiB'>256</memory><currentMemory unit='MiB'>192</currentMemory>
  <os><type>hvm</type></os>{devices}</domain>"""
NO_BALLOON = "<devices><memballoon model='none'/></devices>"
LIVE, CONFIG = Affect(live=True), Affect(config=True)


@pytest.fixture
async def drv() -> tuple[TestDriver, list[DriverEvent]]:
    events: list[DriverEvent] = []
    driver = TestDriver(TestHostSpec(cpus=4, memory_kib=8 << 20))
    await driver.open(events.append)
    return driver, events


async def test_live_setmem_moves_the_balloon_and_reports_it(
    drv: tuple[TestDriver, list[DriverEvent]],
) -> None:
    driver, events = drv
    await driver.define(XML.format(devices=""))
    await driver.start("m1")
    await driver.set_memory("m1", 100 * 1024, False, Affect())  # CURRENT: live when running
    assert (await driver.info("m1")).memory_kib == 100 * 1024
    assert [(e.event, e.data) for e in events if e.event == "balloon_change"] == [
        ("balloon_change", {"actual": 100 * 1024})
    ]
    live = parse_domain_xml(await driver.xml("m1"))
    assert live.current_memory_kib == 100 * 1024
    await driver.destroy("m1")
    assert parse_domain_xml(await driver.xml("m1")).current_memory_kib == 192 * 1024  # untouched


@pytest.mark.parametrize(
    ("devices", "kib", "maximum", "error", "words"),
    [
        ("", 300 * 1024, False, InvalidArgument, "higher than max memory"),
        ("", 512 * 1024, True, OperationInvalid, "maximum memory on an active domain"),
        (NO_BALLOON, 100 * 1024, False, OperationInvalid, "without the balloon device"),
    ],
)
async def test_live_refusals_change_nothing(
    drv: tuple[TestDriver, list[DriverEvent]],
    devices: str, kib: int, maximum: bool, error: type[Exception], words: str,
) -> None:  # fmt: skip
    driver, events = drv
    await driver.define(XML.format(devices=devices))
    await driver.start("m1")
    before = await driver.xml("m1")
    with pytest.raises(error, match=words):
        await driver.set_memory("m1", kib, maximum, LIVE)
    assert await driver.xml("m1") == before
    assert not [e for e in events if e.event == "balloon_change"]


async def test_config_changes_only_the_definition(
    drv: tuple[TestDriver, list[DriverEvent]],
) -> None:
    driver, _ = drv
    await driver.define(XML.format(devices=""))
    await driver.set_memory("m1", 128 * 1024, True, Affect())  # shut off: CURRENT is config
    defn = parse_domain_xml(await driver.xml("m1"))
    assert (defn.memory_kib, defn.current_memory_kib) == (128 * 1024, 128 * 1024)  # lowered
    with pytest.raises(InvalidArgument):
        await driver.set_memory("m1", 200 * 1024, False, CONFIG)
    await driver.set_memory("m1", 512 * 1024, True, CONFIG)
    await driver.set_memory("m1", 300 * 1024, False, CONFIG)
    defn = parse_domain_xml(await driver.xml("m1"))
    assert (defn.memory_kib, defn.current_memory_kib) == (512 * 1024, 300 * 1024)
    with pytest.raises(OperationInvalid, match="not running"):
        await driver.set_memory("m1", 300 * 1024, False, LIVE)


def test_numa_cells_make_up_the_memory() -> None:
    defn = parse_domain_xml(
        "<domain type='test'><name>n</name><memory unit='MiB'>256</memory>"
        "<cpu><numa><cell id='0' cpus='0' memory='256' unit='MiB'/></numa></cpu>"
        "<os><type>hvm</type></os></domain>"
    )
    with pytest.raises(ValueError, match="NUMA"):
        defn.set_memory_kib(1024)


@pytest.mark.parametrize(
    ("text", "kib"),
    [("1024", 1024), ("512M", 512 * 1024), ("1G", 1 << 20), ("1GiB", 1 << 20),
     ("1GB", 976563), ("4096b", 4), ("1k", 1)],
)  # fmt: skip
def test_memory_sizes_as_virsh_reads_them(text: str, kib: int) -> None:
    assert memory_size(text) == kib


@pytest.mark.parametrize("text", ["", "12Q", "-5", "M", "0", "1.5G", "9" * 30])
def test_bad_memory_sizes(text: str) -> None:
    with pytest.raises(InvalidArgument, match="Invalid memory size"):
        memory_size(text)
