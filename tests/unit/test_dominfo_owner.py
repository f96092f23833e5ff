"""dominfo's owner comes from the driver's definition tree, not from an XML round trip.

dominfo is a hot read-only call; it used to serialise the whole live definition (a deep
copy of the tree and dumpxml) and parse it again, with every typed view, only to read the
``<virtbus:owner>`` element. The owner now travels in the driver's DomainInfo.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

import agent.handlers  # noqa: F401 - registers the domain handlers
from agent.table import HANDLERS, AgentContext
from drivers.test import TestDriver, TestHostSpec
from virtbus.domain import owner_of, parse_domain_xml, with_owner
from virtbus.protocol import ops
from virtbus.protocol.domain import DomainInfo, DomainList, DomainListRequest, DomainTarget

XML = "<domain type='test'><name>d1</name><memory>131072</memory><os><type>hvm</type></os></domain>"


def test_owner_is_read_from_the_tree() -> None:
    owned = with_owner(XML, "alice")
    assert parse_domain_xml(owned).owner == "alice" == owner_of(owned)
    assert parse_domain_xml(XML).owner is None and owner_of(XML) is None
    # a redefine by another user replaces the owner element, never adds a second one
    assert parse_domain_xml(with_owner(owned, "bob")).owner == "bob"


@pytest.fixture
async def ctx() -> AgentContext:
    drv = TestDriver(TestHostSpec(cpus=8, memory_kib=16 << 20))
    await drv.open(lambda _event: None)
    return cast(AgentContext, SimpleNamespace(driver=drv))


async def test_dominfo_shows_the_owner_without_serialising_the_xml(
    ctx: AgentContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ctx.driver.define(with_owner(XML, "alice"))
    await ctx.driver.start("d1")

    async def no_xml(_ref: str) -> Any:
        raise AssertionError("dominfo serialised the domain XML")

    monkeypatch.setattr(ctx.driver, "xml", no_xml)
    info = await HANDLERS[ops.DOMAIN_INFO](ctx, DomainTarget(domain="d1"))
    assert isinstance(info, DomainInfo)
    assert (info.name, info.owner, info.state) == ("d1", "alice", "running")
    listed = await HANDLERS[ops.DOMAIN_LIST](ctx, DomainListRequest(all=True))
    assert isinstance(listed, DomainList)
    assert [d.owner for d in listed.domains] == [None]  # a list says nil, as before


async def test_dominfo_of_a_domain_without_owner(ctx: AgentContext) -> None:
    await ctx.driver.define(XML)
    info = await HANDLERS[ops.DOMAIN_INFO](ctx, DomainTarget(domain="d1"))
    assert isinstance(info, DomainInfo) and info.owner is None
