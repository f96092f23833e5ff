"""``virtbus domstats`` end to end over memory:// (agent and CLI in one process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.service import AgentService
from drivers.test import TestDriver
from virtbus.bus.factory import open_bus
from virtbus.cli.main import build_parser, run
from virtbus.errors import InvalidArgument
from virtbus.protocol import ops
from virtbus.settings import AgentSettings

XML = (
    "<domain type='test'><name>{}</name><memory>65536</memory><os><type>hvm</type></os>"
    "<devices><disk type='file' device='disk'><source file='/tmp/x.img'/>"
    "<target dev='vda'/></disk></devices></domain>"
)


@pytest.fixture
async def url(tmp_path: Path):  # type: ignore[no-untyped-def]
    url = f"memory://cli-{tmp_path.name}"
    settings = AgentSettings(host="h1", state_dir=tmp_path, heartbeat_interval=0.05)
    service = AgentService(settings, open_bus(url, src="h1"), TestDriver())
    await service.start()
    client = open_bus(url, src="setup")
    await client.connect()
    for name in ("a", "b"):
        await client.call(ops.agent_route("h1"), ops.DOMAIN_DEFINE, {"xml": XML.format(name)})
    await client.call(ops.agent_route("h1"), ops.DOMAIN_START, {"domain": "a"})
    await client.close()
    yield url
    await service.stop()


async def _cli(url: str, *argv: str) -> int:
    return await run(build_parser().parse_args(["--bus", url, *argv]))


async def test_domstats_text(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert await _cli(url, "domstats", "a", "--host", "h1", "--state", "--block") == 0
    out = capsys.readouterr().out
    assert out.startswith("Domain: 'a'\n  state.state=1\n  state.reason=1\n  block.count=1\n")
    assert "  block.0.name=vda\n" in out and "cpu.time" not in out


async def test_domstats_json_all_hosts(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert await _cli(url, "domstats", "--json") == 0  # hosts found by their heartbeats
    got = json.loads(capsys.readouterr().out)
    assert set(got) == {"a", "b"}
    assert got["a"]["state.state"] == 1 and got["b"]["state.state"] == 5
    assert got["a"]["cpu.time"] >= 0 and "cpu.time" not in got["b"]


async def test_domstats_finds_the_domains_host(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _cli(url, "--json", "domstats", "b", "--group", "balloon") == 0
    got = json.loads(capsys.readouterr().out)
    assert got == {"b": {"balloon.current": 65536, "balloon.maximum": 65536}}


async def test_domstats_bad_group_is_rejected_by_the_agent(url: str) -> None:
    from virtbus.cli import stats

    args = build_parser().parse_args(["--bus", url, "domstats", "--host", "h1"])
    args.groups = ["bogus"]
    assert args.func is stats.domstats
    with pytest.raises(InvalidArgument):
        await run(args)
