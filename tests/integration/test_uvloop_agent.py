"""A real agent process started with --uvloop runs on uvloop's loop and serves the command
path (test driver, the real RabbitMQ): define, start, suspend/resume, dominfo, a bad call
answered with its code, and the agent still serving after it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.procs import BUS_URL, agent_process, unique_host
from virtbus.bus.factory import open_bus
from virtbus.errors import NoDomainError
from virtbus.protocol import ops

pytestmark = pytest.mark.rabbitmq
pytest.importorskip("uvloop")
XML = "<domain type='test'><name>uv</name><memory>131072</memory><os><type>hvm</type></os></domain>"


async def test_an_agent_on_uvloop_serves_the_command_path(rabbitmq: None, tmp_path: Path) -> None:
    host = unique_host("uv")
    async with agent_process(host, tmp_path, "--uvloop") as agent:
        maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
        assert "uvloop/loop" in maps  # the premise: uvloop's extension is loaded
        bus = open_bus(BUS_URL, src="test-uvloop")
        await bus.connect()
        route = ops.agent_route(host)
        try:
            await bus.call(route, ops.DOMAIN_DEFINE, {"xml": XML}, timeout=10)
            await bus.call(route, ops.DOMAIN_START, {"domain": "uv"}, timeout=10)
            paused = await bus.call(route, ops.DOMAIN_SUSPEND, {"domain": "uv"}, timeout=10)
            assert paused["state"] == "paused"
            running = await bus.call(route, ops.DOMAIN_RESUME, {"domain": "uv"}, timeout=10)
            assert running["state"] == "running"
            with pytest.raises(NoDomainError):
                await bus.call(route, ops.DOMAIN_SUSPEND, {"domain": "nope"}, timeout=10)
            info = await bus.call(route, ops.DOMAIN_INFO, {"domain": "uv"}, timeout=10)
            assert info["name"] == "uv" and info["state"] == "running"
        finally:
            await bus.close()
