"""A call retried with the id of its failed attempt is answered from the agent's memory,
not run again (the retry after BUS_UNAVAILABLE or OPERATION_TIMEOUT): over memory://, and
through the same ``call_id`` every transport takes."""

from __future__ import annotations

from pathlib import Path

from agent.service import AgentService
from drivers.test import TestDriver
from virtbus.bus.factory import open_bus
from virtbus.errors import ProtocolError
from virtbus.protocol import ops
from virtbus.protocol.envelope import new_id
from virtbus.settings import AgentSettings

XML = "<domain type='test'><name>{}</name><memory>65536</memory><os><type>hvm</type></os></domain>"


class CountingDriver(TestDriver):
    __test__ = False

    def __init__(self) -> None:
        super().__init__()
        self.defines = 0

    async def define(self, xml: str) -> object:  # type: ignore[override]
        self.defines += 1
        return await super().define(xml)


async def test_a_retry_with_the_same_id_runs_once(tmp_path: Path) -> None:
    url = f"memory://retry-{tmp_path.name}"
    driver = CountingDriver()
    settings = AgentSettings(host="h1", state_dir=tmp_path, heartbeat_interval=60)
    service = AgentService(settings, open_bus(url, src="h1"), driver)
    await service.start()
    client = open_bus(url, src="client")
    await client.connect()
    route = ops.agent_route("h1")
    try:
        call_id = new_id()
        body = {"xml": XML.format("a")}
        first = await client.call(route, ops.DOMAIN_DEFINE, body, call_id=call_id)
        again = await client.call(route, ops.DOMAIN_DEFINE, body, call_id=call_id)
        assert again == first and driver.defines == 1  # answered from memory
        # the same id for another call is refused, never given the first one's answer
        try:
            await client.call(route, ops.DOMAIN_DEFINE, {"xml": XML.format("b")}, call_id=call_id)
        except ProtocolError as exc:
            assert "already used" in exc.message
        else:
            raise AssertionError("a reused id for another call was answered")
        assert driver.defines == 1
        # a fresh id runs (the premise: the driver does count)
        await client.call(route, ops.DOMAIN_DEFINE, {"xml": XML.format("c")})
        assert driver.defines == 2
    finally:
        await client.close()
        await service.stop()
