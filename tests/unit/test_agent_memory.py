"""The agent service over the in-process memory:// bus: fast checks of the whole path."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.service import AgentService
from drivers.base import EventSink
from drivers.test import TestDriver
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import EVENTS_EXCHANGE, HOSTS_EXCHANGE
from virtbus.daemon import serve
from virtbus.errors import BusUnavailable, NoSupport, OperationInvalid
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


class SlowOpen(TestDriver):
    """A driver whose open (a reattach) goes on for a while after the bus was refused."""

    def __init__(self, refused: asyncio.Event) -> None:
        super().__init__()
        self.refused = refused
        self.log: list[str] = []

    async def open(self, sink: EventSink) -> None:
        await asyncio.wait_for(self.refused.wait(), 10)  # the bus is tried meanwhile
        for _ in range(20):  # loop turns: more than a failure takes to reach start()
            await asyncio.sleep(0)
        await super().open(sink)
        self.log.append("opened")

    async def close(self) -> None:
        self.log.append("closed")
        await super().close()


async def test_a_refused_bus_fails_the_start_once_the_driver_has_opened(tmp_path: Path) -> None:
    """The bus connects while the driver opens: a refused connection is raised only once
    the open is over, so the daemon's stop never closes a driver in mid-reattach; the agent
    exits 1 having served nothing."""
    refused = asyncio.Event()
    bus = open_bus(f"memory://agent-{tmp_path.name}", src="h1")

    async def refuse() -> None:
        refused.set()
        raise BusUnavailable("cannot connect to memory: refused by the test")

    bus.connect = refuse  # type: ignore[method-assign]
    driver = SlowOpen(refused)
    service = AgentService(AgentSettings(host="h1", state_dir=tmp_path), bus, driver)
    assert await serve(service, "agent", lambda: "ready") == 1
    assert driver.log == ["opened", "closed"]
