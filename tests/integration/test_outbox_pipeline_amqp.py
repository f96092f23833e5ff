"""The pipelined outbox over the real RabbitMQ: a backlog of unconfirmed events (as after an
outage) and live events behind it reach a subscriber all, once each, in order; the agent
still serves calls afterwards."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.service import AgentService
from drivers.test import TestDriver
from tests.bench.outbox_replay import write_backlog
from tests.procs import BUS_URL, delete_queues, unique_host
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import EVENTS_EXCHANGE
from virtbus.protocol import ops
from virtbus.protocol.events import routing_word
from virtbus.settings import AgentSettings

pytestmark = pytest.mark.usefixtures("rabbitmq")

BACKLOG = 1500
XML = "<domain type='test'><name>d</name><memory>1024</memory><os><type>hvm</type></os></domain>"


async def test_backlog_and_live_events_arrive_all_once_in_order(tmp_path: Path) -> None:
    host = unique_host("pipe")
    await write_backlog(tmp_path, host, BACKLOG)
    client = open_bus(BUS_URL, src="test")
    await client.connect()
    sub = await client.subscribe(EVENTS_EXCHANGE, [f"{routing_word(host)}.#"])
    settings = AgentSettings(host=host, state_dir=tmp_path, heartbeat_interval=60,
                             metrics_interval=3600, event_publish_window=64)  # fmt: skip
    driver = TestDriver()
    service = AgentService(settings, open_bus(BUS_URL, src=host), driver)
    seqs: list[int] = []
    try:
        await service.start()
        route = ops.agent_route(host)
        await client.call(route, ops.DOMAIN_DEFINE, {"xml": XML})
        await client.call(route, ops.DOMAIN_START, {"domain": "d"})
        for _ in range(50):  # live events behind the backlog, through the driver's sink
            await driver.suspend("d")
            await driver.resume("d")
        last = service.last_seq
        assert last > BACKLOG + 100
        async with asyncio.timeout(120):
            async for env in sub:
                seqs.append(int(env.body["seq"]))
                if seqs[-1] == last:
                    break
        assert seqs == list(range(1, last + 1))  # none lost, none twice, in order
        # the subscriber can have the last event before the outbox has its confirm
        assert await service.outbox.flush(30)
        assert service.outbox.published >= last
        info = await client.call(route, ops.DOMAIN_INFO, {"domain": "d"})
        assert info["state"] == "running"  # the agent still serves
    finally:
        await sub.close()
        await client.close()
        await service.stop()
        await delete_queues(f"virtbus.agent.{host}")
