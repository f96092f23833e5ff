"""``Client(retries=N)`` retries a call that timed out under the same call id, over the real
broker: the agent answers the retry from its call memory, and the command runs once.

The agent (in process, test driver) takes longer to define a domain than one attempt's
deadline, so the first attempt fails with OPERATION_TIMEOUT while the define runs; the
retry (same id) is answered once it is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.service import AgentService
from drivers.test import TestDriver
from tests.procs import BUS_URL, delete_queues, unique_host
from virtbus.bus.amqp import AmqpBus
from virtbus.bus.topology import call_queue_for
from virtbus.client import Client
from virtbus.errors import InvalidArgument, OperationTimeout
from virtbus.protocol import ops
from virtbus.protocol.domain import DomainDefine
from virtbus.settings import AgentSettings, Backoff, BusSettings

pytestmark = pytest.mark.rabbitmq

DEFINE_TIME = 1.0  # s the driver takes per define
ATTEMPT = 0.4  # s: one attempt's deadline, well under DEFINE_TIME


class SlowCountingDriver(TestDriver):
    __test__ = False

    def __init__(self) -> None:
        super().__init__()
        self.defines = 0

    async def define(self, xml: str) -> object:  # type: ignore[override]
        self.defines += 1
        await asyncio.sleep(DEFINE_TIME)
        return await super().define(xml)


def xml(name: str) -> str:
    return (
        f"<domain type='test'><name>{name}</name><memory>65536</memory>"
        "<os><type>hvm</type></os></domain>"
    )


@pytest.fixture
async def agent(rabbitmq: None, tmp_path: Path) -> AsyncIterator[tuple[str, SlowCountingDriver]]:
    host = unique_host("retry")
    driver = SlowCountingDriver()
    settings = AgentSettings(host=host, state_dir=tmp_path, heartbeat_interval=60,
                             metrics_interval=3600)  # fmt: skip
    service = AgentService(settings, AmqpBus(BUS_URL, host, BusSettings(url=BUS_URL)), driver)
    await service.start()
    try:
        yield host, driver
    finally:
        await service.stop()
        await delete_queues(call_queue_for(ops.agent_route(host)).name)


def client_bus(src: str) -> AmqpBus:
    settings = BusSettings(url=BUS_URL, reconnect=Backoff(initial=0.1, maximum=0.2))
    return AmqpBus(BUS_URL, src, settings)


async def test_a_timed_out_call_is_retried_under_its_id_and_runs_once(
    agent: tuple[str, SlowCountingDriver],
) -> None:
    host, driver = agent
    bus = client_bus("retry-client")
    await bus.connect()
    async with Client(bus, timeout=ATTEMPT, retries=10) as client:
        info = await client.agent(host, ops.DOMAIN_DEFINE, DomainDefine(xml=xml("r1")))
        assert info.name == "r1"
        assert driver.defines == 1  # the retries were answered from memory, not run again
        # The agent still serves, and a bad argument is refused before any call.
        with pytest.raises(InvalidArgument):
            await client.agent(host, ops.DOMAIN_DEFINE, DomainDefine(xml=xml("r2")), retries=-1)
        assert driver.defines == 1


async def test_without_retries_the_timeout_is_the_callers(
    agent: tuple[str, SlowCountingDriver],
) -> None:
    host, driver = agent
    bus = client_bus("no-retry-client")
    await bus.connect()
    async with Client(bus, timeout=ATTEMPT) as client:
        with pytest.raises(OperationTimeout):
            await client.agent(host, ops.DOMAIN_DEFINE, DomainDefine(xml=xml("n1")))
    assert driver.defines == 1  # it ran (once); its caller gave up
