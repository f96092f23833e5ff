"""A call the caller gave up on (no reply within its deadline) and a peer's own
OPERATION_TIMEOUT answer are told apart: only the first asks "is virtbus-agent running?"."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.service import AgentService
from drivers.test import TestDriver
from virtbus.bus.memory import MemoryBus
from virtbus.client import Client
from virtbus.errors import NoReply, OperationTimeout
from virtbus.protocol import ops
from virtbus.protocol.domain import DomainDefine, DomainTarget
from virtbus.settings import AgentSettings

XML = "<domain type='test'><name>{}</name><memory>65536</memory><os><type>hvm</type></os></domain>"


class SlowQmpDriver(TestDriver):
    """``slow`` hangs (the agent never answers in time); ``stuck`` answers that its
    hypervisor timed out, as a QMP command past its deadline does."""

    __test__ = False

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def suspend(self, ref: str) -> None:
        if ref == "slow":
            await self.release.wait()
        if ref == "stuck":
            raise OperationTimeout("QMP 'stop' got no answer within 5 s")
        await super().suspend(ref)


async def test_a_peer_timeout_is_not_reported_as_a_silent_host(tmp_path: Path) -> None:
    url = f"memory://noreply-{tmp_path.name}"
    agent = AgentService(
        AgentSettings(host="n1", state_dir=tmp_path, heartbeat_interval=60),
        MemoryBus(url, "n1"),
        driver := SlowQmpDriver(),
    )
    await agent.start()
    client = Client(MemoryBus(url, "cli"), timeout=5.0, retries=0)
    await client.bus.connect()
    try:
        for name in ("slow", "stuck", "fine"):
            await client.agent("n1", ops.DOMAIN_DEFINE, DomainDefine(xml=XML.format(name)))
        await client.agent("n1", ops.DOMAIN_START, DomainTarget(domain="fine"))
        await client.agent("n1", ops.DOMAIN_SUSPEND, DomainTarget(domain="fine"))  # premise
        with pytest.raises(OperationTimeout) as answered:
            await client.agent("n1", ops.DOMAIN_SUSPEND, DomainTarget(domain="stuck"))
        assert not isinstance(answered.value, NoReply)
        assert "QMP 'stop' got no answer" in answered.value.message
        assert "is virtbus-agent running" not in answered.value.message
        with pytest.raises(NoReply, match=r"host 'n1' did not answer .* is virtbus-agent running"):
            await client.agent("n1", ops.DOMAIN_SUSPEND, DomainTarget(domain="slow"), timeout=0.3)
        assert (await client.host("n1").ping()).host == "n1"  # the agent still serves
    finally:
        driver.release.set()
        await client.close()
        await agent.stop()
