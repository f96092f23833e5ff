"""Metrics over memory://: periodic publishing, the domain.stats op, /metrics, domstats CLI."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.exporter import parse_listen
from agent.metrics import MetricsPublisher
from agent.service import AgentService
from drivers.test import TestDriver
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import METRICS_EXCHANGE
from virtbus.cli import stats as cli_stats
from virtbus.errors import InvalidArgument, NoDomainError
from virtbus.protocol import ops
from virtbus.protocol.envelope import Kind
from virtbus.settings import AgentSettings

XML = (
    "<domain type='test'><name>{}</name><memory>65536</memory><vcpu>2</vcpu>"
    "<os><type>hvm</type></os><devices>"
    "<disk type='file' device='disk'><source file='/tmp/{}.img'/><target dev='vda'/></disk>"
    "<interface type='bridge'><source bridge='br0'/><target dev='tap-{}'/></interface>"
    "</devices></domain>"
)
INTERVAL = 0.2


async def _scrape(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    return await asyncio.to_thread(get)


@pytest.fixture
async def agent(tmp_path: Path):  # type: ignore[no-untyped-def]
    url = f"memory://metrics-{tmp_path.name}"
    settings = AgentSettings(
        host="h1",
        state_dir=tmp_path,
        heartbeat_interval=60,
        metrics_interval=INTERVAL,
        metrics_listen="127.0.0.1:0",
    )
    service = AgentService(settings, open_bus(url, src="h1"), TestDriver())
    await service.start()  # starts its metrics too
    client = open_bus(url, src="client")
    await client.connect()
    yield service, service.metrics, client
    await client.close()
    await service.stop()


async def _define_start(client: Any, name: str) -> None:
    route = ops.agent_route("h1")
    await client.call(route, ops.DOMAIN_DEFINE, {"xml": XML.format(name, name, name)})
    await client.call(route, ops.DOMAIN_START, {"domain": name})


async def test_one_message_per_domain_per_interval(agent) -> None:  # type: ignore[no-untyped-def]
    service, metrics, client = agent
    for name in ("a", "b", "c"):
        await _define_start(client, name)
    sub = await client.subscribe(METRICS_EXCHANGE, ["h1.*"])
    seen: list[tuple[str, float]] = []
    try:
        async with asyncio.timeout(INTERVAL * 5.5):
            async for env in sub:
                assert env.kind == Kind.METRICS
                key = env.body.get("domain", "_host")
                seen.append((key, env.body["ts"]))
    except TimeoutError:
        pass
    finally:
        await sub.close()
    passes = sorted({ts for _, ts in seen})
    assert len(passes) >= 4, seen
    by_pass = Counter(ts for _, ts in seen)
    # every complete pass: a, b, c and the host, exactly once each
    for ts in passes[:-1]:
        assert by_pass[ts] == 4, seen
        assert sorted(k for k, t in seen if t == ts) == ["_host", "a", "b", "c"]
    gaps = [b - a for a, b in itertools.pairwise(passes)]
    assert all(INTERVAL * 0.5 < g < INTERVAL * 1.6 for g in gaps), gaps
    snap = metrics.publisher.last
    assert snap is not None and set(snap.domains) == {"a", "b", "c"}
    assert snap.uuids["a"] == service.driver.lookup("a").uuid


async def test_domain_message_body(agent) -> None:  # type: ignore[no-untyped-def]
    _service, _metrics, client = agent
    await _define_start(client, "web.1")  # a dot: the routing word is sanitised
    sub = await client.subscribe(METRICS_EXCHANGE, ["h1.web_1"])
    try:
        env = await asyncio.wait_for(sub.__anext__(), INTERVAL * 4)
    finally:
        await sub.close()
    body = env.body
    assert env.op == ops.METRICS_DOMAIN and body["domain"] == "web.1" and body["host"] == "h1"
    stats = body["stats"]
    assert stats["state.state"] == 1 and stats["vcpu.current"] == 2
    assert stats["block.count"] == 1 and stats["block.0.name"] == "vda"
    assert stats["net.count"] == 1 and stats["net.0.name"] == "tap-web.1"


async def test_domain_stats_op(agent) -> None:  # type: ignore[no-untyped-def]
    _service, _metrics, client = agent
    route = ops.agent_route("h1")
    await _define_start(client, "a")
    await _define_start(client, "b")
    got = await client.call(route, ops.DOMAIN_STATS, {})
    assert set(got["domains"]) == {"a", "b"}
    got = await client.call(route, ops.DOMAIN_STATS, {"domains": ["a"], "groups": ["state"]})
    assert got == {"domains": {"a": {"state.state": 1, "state.reason": 1}}}
    with pytest.raises(InvalidArgument):
        await client.call(route, ops.DOMAIN_STATS, {"groups": ["bogus"]})
    with pytest.raises(NoDomainError):
        await client.call(route, ops.DOMAIN_STATS, {"domains": ["nope"]})
    assert not ops.DOMAIN_STATS.serial  # never queued behind lifecycle commands


async def test_prometheus_page_series_follow_domains(agent) -> None:  # type: ignore[no-untyped-def]
    _service, metrics, client = agent
    port = metrics.exporter.bound_port
    route = ops.agent_route("h1")
    await _define_start(client, "a")
    await _define_start(client, "b")
    await asyncio.sleep(INTERVAL * 2.5)
    text = await _scrape(port)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    cpu = families["libvirt_domain_info_cpu_time_seconds"]
    assert cpu.type == "counter"
    assert {s.labels["domain"] for s in cpu.samples if s.name.endswith("_total")} == {"a", "b"}
    sample = next(s for s in cpu.samples if s.labels["domain"] == "a")
    assert sample.labels["host"] == "h1" and len(sample.labels["uuid"]) == 36
    reads = families["libvirt_domain_block_stats_read_bytes"].samples
    assert {(s.labels["domain"], s.labels["target_device"]) for s in reads} >= {("a", "vda")}
    rx = families["libvirt_domain_interface_stats_receive_bytes"].samples
    assert {s.labels["target_device"] for s in rx} == {"tap-a", "tap-b"}
    assert families["libvirt_domain_info_memory_usage_bytes"].samples[0].value == 65536 * 1024
    for name in ("virtbus_agent_bus_connected", "virtbus_agent_outbox_depth", "libvirt_up"):
        assert families[name].samples[0].value in (0, 1), name
    assert families["virtbus_agent_bus_connected"].samples[0].value == 1
    latency = families["virtbus_agent_command_duration_seconds"]
    ops_timed = {s.labels["op"] for s in latency.samples if s.name.endswith("_count")}
    assert {ops.DOMAIN_DEFINE, ops.DOMAIN_START} <= ops_timed

    await client.call(route, ops.DOMAIN_DESTROY, {"domain": "b"})
    await client.call(route, ops.DOMAIN_UNDEFINE, {"domain": "b"})
    await asyncio.sleep(INTERVAL * 2.5)
    families = {f.name: f for f in text_string_to_metric_families(await _scrape(port))}
    cpu = families["libvirt_domain_info_cpu_time_seconds"]
    assert {s.labels["domain"] for s in cpu.samples} == {"a"}
    state = families["libvirt_domain_info_state"]
    assert {s.labels["domain"] for s in state.samples} == {"a"}


async def test_promtool_check_metrics(agent) -> None:  # type: ignore[no-untyped-def]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    _service, metrics, client = agent
    await _define_start(client, "a")
    await asyncio.sleep(INTERVAL * 2.5)
    text = await _scrape(metrics.exporter.bound_port)
    proc = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(text.encode()), 30)
    assert proc.returncode == 0, out.decode()


async def test_publishing_survives_a_failing_driver(tmp_path: Path) -> None:
    class Broken(TestDriver):
        async def stats(self, refs=None, groups=None):  # type: ignore[no-untyped-def]
            raise RuntimeError("driver bug")

    url = f"memory://broken-{tmp_path.name}"
    settings = AgentSettings(host="h2", state_dir=tmp_path, metrics_interval=0.05)
    service = AgentService(settings, open_bus(url, src="h2"), Broken())
    await service.start()
    try:
        await asyncio.sleep(0.2)
        assert service.metrics.publisher.counters.failed_passes >= 2
        assert not service.failed.is_set()
    finally:
        await service.stop()


async def test_slow_pass_does_not_overlap(tmp_path: Path) -> None:
    calls: list[float] = []

    class Slow(TestDriver):
        async def stats(self, refs=None, groups=None):  # type: ignore[no-untyped-def]
            calls.append(time.monotonic())
            await asyncio.sleep(0.15)
            return await super().stats(refs, groups)

    bus = open_bus(f"memory://slow-{tmp_path.name}", src="h3")
    await bus.connect()
    publisher = MetricsPublisher(host="h3", driver=Slow(), bus=bus, interval=0.05, timeout=1.0)
    task = asyncio.create_task(publisher.run(), name="test-publisher")
    try:
        await asyncio.sleep(0.5)
    finally:
        task.cancel()
        await asyncio.wait([task])
        await bus.close()
    assert len(calls) >= 3
    assert all(b - a >= 0.14 for a, b in itertools.pairwise(calls)), calls
    assert publisher.counters.overruns >= 2 and publisher.counters.passes >= 2


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9177") == ("127.0.0.1", 9177)
    assert parse_listen(":9177") == ("0.0.0.0", 9177)
    assert parse_listen("[::1]:9177") == ("::1", 9177)
    for bad in ("9177", "host:", "host:99999", "host:abc"):
        with pytest.raises(InvalidArgument):
            parse_listen(bad)


def test_domstats_text_is_virsh_like() -> None:
    text = cli_stats.render({"a": {"state.state": 1, "cpu.time": 5}, "b": {"load.1": 0.25}})
    assert text == "Domain: 'a'\n  state.state=1\n  cpu.time=5\n\nDomain: 'b'\n  load.1=0.25\n"


async def test_dashboard_uses_served_series(agent) -> None:  # type: ignore[no-untyped-def]
    import json
    import re

    _service, metrics, client = agent
    await _define_start(client, "a")
    await asyncio.sleep(INTERVAL * 2.5)
    served = {
        f.name for f in text_string_to_metric_families(await _scrape(metrics.exporter.bound_port))
    }
    served |= {"virtbus_agent_qmp_connections"}  # QEMU driver only
    dashboard = Path(__file__).parents[2] / "deploy" / "grafana-dashboard.json"
    exprs = re.findall(r'"expr": "([^"\\]*(?:\\.[^"\\]*)*)"', dashboard.read_text())
    used = {m for e in exprs for m in re.findall(r"\b((?:libvirt|virtbus)_[a-z0-9_]+)", e)}
    suffixes = ("_total", "_bucket", "_count", "_sum")
    base = {next((u[: -len(s)] for s in suffixes if u.endswith(s)), u) for u in used}
    assert used and base <= served, sorted(base - served)
    json.loads(dashboard.read_text())
