"""domiftune's rules (virtbus/domain/bandwidth.py: libvirt's qemuDomainSetInterfaceParameters)
on the test driver, which stores the limits in the NIC's XML as the QEMU driver does (the
real tap's tc and nftables are in tests/network/test_guest_interfaces.py), and the CLI's
parsing of virsh's ``average,peak,burst,floor``."""

from __future__ import annotations

import pytest
from lxml import etree

from drivers.base import Affect
from drivers.test import TestDriver, TestHostSpec
from virtbus.cli.iface import interface_xml, parse_rate
from virtbus.domain import parse_domain_xml
from virtbus.domain.bandwidth import Bandwidth, Rate, RateChange
from virtbus.domain.views import build_interface
from virtbus.errors import ConfigUnsupported, InvalidArgument, OperationInvalid, XMLError
from virtbus.protocol.network import InterfaceRate

MAC = "52:54:00:aa:bb:01"
XML = """<domain type='test'><name>t1</name><memory unit='MiB'>64</memory>
  <os><type>hvm</type></os><devices>
  <interface type='network'><mac address='{mac}'/><source network='default'/>{bw}</interface>
  </devices></domain>"""
SHAPED = "<bandwidth><inbound average='1000' peak='2000' burst='64'/></bandwidth>"
LIVE, CONFIG = Affect(live=True), Affect(config=True)


@pytest.fixture
async def driver() -> TestDriver:
    drv = TestDriver(TestHostSpec(cpus=2, memory_kib=1 << 20))
    await drv.open(lambda _e: None)
    await drv.define(XML.format(mac=MAC, bw=SHAPED))
    return drv


async def test_limits_change_per_direction_live_and_config(driver: TestDriver) -> None:
    assert await driver.interface_bandwidth("t1", MAC, Affect()) == Bandwidth(Rate(1000, 2000, 64))
    await driver.start("t1")
    # a direction given replaces it whole; the other is kept
    await driver.tune_interface("t1", MAC, None, RateChange(300), LIVE)
    assert await driver.interface_bandwidth("t1", MAC.upper(), LIVE) == Bandwidth(
        Rate(1000, 2000, 64), Rate(300))  # fmt: skip
    await driver.tune_interface("t1", MAC, RateChange(500), None, Affect())  # CURRENT: live
    assert await driver.interface_bandwidth("t1", MAC, LIVE) == Bandwidth(Rate(500), Rate(300))
    assert "average='500'" in await driver.xml("t1")
    # --live only: the definition keeps its limits
    assert await driver.interface_bandwidth("t1", MAC, CONFIG) == Bandwidth(Rate(1000, 2000, 64))
    # an average of 0 alone removes that direction; none left: no <bandwidth> at all
    await driver.tune_interface("t1", MAC, RateChange(0), RateChange(0), LIVE)
    assert await driver.interface_bandwidth("t1", MAC, LIVE) is None
    assert "<bandwidth" not in await driver.xml("t1")
    await driver.tune_interface("t1", MAC, None, RateChange(700, 0, 32), CONFIG)
    await driver.destroy("t1")
    defn = parse_domain_xml(await driver.xml("t1"))
    assert defn.interfaces[0].bandwidth == Bandwidth(Rate(1000, 2000, 64), Rate(700, None, 32))


@pytest.mark.parametrize(
    ("iface", "inbound", "outbound", "error", "words"),
    [
        (MAC, RateChange(0, 100), None, InvalidArgument, "inbound average"),
        (MAC, None, RateChange(0, 0, 5), InvalidArgument, "outbound average"),
        (MAC, RateChange(100, 50), None, InvalidArgument, "below its average"),
        (MAC, RateChange(2**32 - 1), None, InvalidArgument, "kilobytes/s"),
        (MAC, RateChange(100, 0, 0, 10), None, ConfigUnsupported, "floor"),
        ("vnet99", RateChange(100), None, InvalidArgument, "'vnet99' is not a known interface"),
    ],
)
async def test_refusals_change_nothing(
    driver: TestDriver, iface: str, inbound: RateChange | None, outbound: RateChange | None,
    error: type[Exception], words: str,
) -> None:  # fmt: skip
    await driver.start("t1")
    before = await driver.xml("t1")
    for affect in (LIVE, Affect(live=True, config=True)):
        with pytest.raises(error, match=words):
            await driver.tune_interface("t1", iface, inbound, outbound, affect)
    assert await driver.xml("t1") == before
    assert await driver.interface_bandwidth("t1", MAC, CONFIG) == Bandwidth(Rate(1000, 2000, 64))


async def test_live_on_a_stopped_domain_and_bad_xml(driver: TestDriver) -> None:
    with pytest.raises(OperationInvalid, match="not running"):
        await driver.tune_interface("t1", MAC, RateChange(10), None, LIVE)
    for bad in ("<bandwidth><inbound average='0'/></bandwidth>",
                "<bandwidth><inbound average='-5'/></bandwidth>",
                "<bandwidth><outbound peak='10'/></bandwidth>"):  # fmt: skip
        with pytest.raises(XMLError):
            await driver.define(XML.format(mac="52:54:00:aa:bb:02", bw=bad).replace("t1", "t2"))


def test_the_cli_parses_virshs_rate_strings() -> None:
    assert parse_rate("100", "inbound") == InterfaceRate(average=100)
    assert parse_rate("100,,64", "inbound") == InterfaceRate(average=100, burst=64)
    assert parse_rate("0", "inbound") == InterfaceRate()
    for bad, words in (("abc", "malformed rate string 'abc'"), ("-5", "malformed"),
                       ("1,2,3,4,5", "too many fields"),
                       ("4294967296", "larger than maximum")):  # fmt: skip
        with pytest.raises(InvalidArgument, match=words):
            parse_rate(bad, "inbound")
    xml = interface_xml("network", "default", None, None, InterfaceRate(average=10, peak=20),
                        InterfaceRate(average=5))  # fmt: skip
    nic = build_interface(etree.fromstring(xml), 0)
    assert nic.bandwidth == Bandwidth(Rate(10, 20), Rate(5))
