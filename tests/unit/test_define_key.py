"""A define is serialised on its domain's name, read without a full parse (the driver's
parse follows), and refused as safely as a full parse refuses."""

from __future__ import annotations

import pytest

from agent.handlers import serial_key
from drivers.test import TestDriver
from virtbus.domain import domain_name_of, parse_domain_xml
from virtbus.errors import XMLError
from virtbus.protocol import ops
from virtbus.protocol.domain import DomainDefine, DomainTarget

XML = "<domain type='test'><name>web1</name><memory>1024</memory><os><type>hvm</type></os></domain>"


def test_the_name_is_the_full_parse_name() -> None:
    assert domain_name_of(XML) == parse_domain_xml(XML).name == "web1"
    assert domain_name_of(XML.encode()) == "web1"


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<domain type='test'><memory>1</memory></domain>", "missing <name>"),
        ("<!DOCTYPE d [<!ENTITY x 'y'>]><domain><name>&x;</name></domain>", "DOCTYPE"),
        ("<domain><name>a/b</name></domain>", "name"),
        ("<domain><name>", "malformed"),
    ],
)
def test_bad_documents_are_refused_as_by_the_full_parse(xml: str, message: str) -> None:
    with pytest.raises(XMLError, match=message):
        domain_name_of(xml)
    with pytest.raises(XMLError):
        parse_domain_xml(xml)


async def test_define_and_later_ops_share_the_serial_key() -> None:
    driver = TestDriver()
    define_key = serial_key(driver, ops.DOMAIN_DEFINE, DomainDefine(xml=XML))
    await driver.define(XML)
    uuid = driver.lookup("web1").uuid
    for ref in ("web1", uuid):
        assert serial_key(driver, ops.DOMAIN_START, DomainTarget(domain=ref)) == define_key
