"""The agent service over the in-process memory:// bus: fast checks of the whole path."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.service import AgentService
from drivers.test import TestDriver
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import EVENTS_EXCHANGE, HOSTS_EXCHANGE
from virtbus.errors import NoSupport, OperationInvalid
from virtbus.protocol import ops
from virtbus.settings import AgentSettings

XML = "<domain type='test'><name>{}</name><memory>65536</memory><os><type>hvm</type></os></domain>"


@pytest.fixture
async def agent(tmp_path: Path):  # type: ignore[no-untyped-def]
    url = f"memory://agent-{tmp_path.name}"
    settings = AgentSettings(host="h1", state_dir=tmp_path, heartbeat_interval=0.05)
    service = AgentService(settings, open_bus(url, src="h1"), TestDriver())
    await service.start()
    client = open_bus(url, src="client")
    await client.connect()
    yield service, client
    await client.close()
    await service.stop()


async def test_calls_events_heartbeats(agent) -> None:  # type: ignore[no-untyped-def]
    service, client = agent
    route = ops.agent_route("h1")
    events = await client.subscribe(EVENTS_EXCHANGE, ["h1.#"])
    beats = await client.subscribe(HOSTS_EXCHANGE, ["*.heartbeat"])
    assert await client.call(route, ops.DOMAIN_DEFINE, {"xml": XML.format("a")}) == {
        "name": "a", "uuid": service.driver.lookup("a").uuid,
    }  # fmt: skip
    assert (await client.call(route, ops.DOMAIN_START, {"domain": "a"}))["state"] == "running"
    with pytest.raises(OperationInvalid):
        await client.call(route, ops.DOMAIN_RESUME, {"domain": "a"})
    with pytest.raises(NoSupport):
        await client.call(route, "domain.frobnicate", {"domain": "a"})
    got = [await asyncio.wait_for(events.__anext__(), 1) for _ in range(2)]
    assert [(e.body["event"], e.body["seq"]) for e in got] == [("defined", 1), ("started", 2)]
    beat = await asyncio.wait_for(beats.__anext__(), 1)
    assert beat.body["host"] == "h1" and beat.body["driver"] == "test"
    info = await client.call(route, ops.HOST_INFO, {})
    assert info["active_domains"] == 1 and info["last_event_seq"] == 2
