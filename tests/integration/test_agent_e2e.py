"""Foundation end to end: a real virtbus-agent (test driver), the real CLI, real RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from tests.procs import BUS_URL, agent_process, cli, delete_queues, event_listener, unique_host
from virtbus.bus.factory import open_bus
from virtbus.errors import OperationInvalid, OperationTimeout
from virtbus.protocol import ops

pytestmark = pytest.mark.rabbitmq

DOMAIN_XML = """<domain type='test'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <source file='/tmp/{name}.img'/><target dev='vda' bus='virtio'/>
    </disk>
  </devices>
  <metadata><app xmlns='urn:example'>kept</app></metadata>
</domain>
"""


async def test_lifecycle_through_cli_with_ordered_events(rabbitmq: None, tmp_path: Path) -> None:
    host = unique_host("e2e")
    xml_file = tmp_path / "d1.xml"
    xml_file.write_text(DOMAIN_XML.format(name="d1"))
    async with agent_process(host, tmp_path), event_listener("--host", host, "--count", "9") as ev:
        steps = ["start", "suspend", "resume", "shutdown", "start", "destroy"]
        r = await cli("define", str(xml_file), "--host", host)
        assert r.code == 0, r.err
        assert "Domain 'd1' defined" in r.out
        for step in steps:
            r = await cli(step, "d1", "--host", host)
            assert r.code == 0, (step, r.err)
            if step == "suspend":
                state = (await cli("--json", "domstate", "d1", "--host", host)).json()
                assert (state["state"], state["reason"]) == ("paused", "user")
                info = (await cli("--json", "dominfo", "d1", "--host", host)).json()
                assert info["state"] == "paused" and info["max_memory_kib"] == 131072
                listing = (await cli("list", "--all", "--host", host)).out
                assert "d1" in listing and "paused" in listing
        xml = (await cli("dumpxml", "d1", "--host", host)).out
        assert "<name>d1</name>" in xml and "urn:example" in xml and "<uuid>" in xml
        listing = (await cli("--json", "list", "--all", "--host", host)).json()
        assert [(d["name"], d["state"]) for d in listing] == [("d1", "shutoff")]
        r = await cli("undefine", "d1", "--host", host)
        assert r.code == 0, r.err
        out, _ = await asyncio.wait_for(ev.communicate(), 15)
    events = [json.loads(line) for line in out.decode().splitlines()]
    assert [(e["event"], e["detail"]) for e in events] == [
        ("defined", "added"),
        ("started", "booted"),
        ("suspended", "paused"),
        ("resumed", "unpaused"),
        ("shutdown", "guest"),
        ("stopped", "shutdown"),
        ("started", "booted"),
        ("stopped", "destroyed"),
        ("undefined", "removed"),
    ]
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + 9))
    assert {e["host"] for e in events} == {host}


async def test_cli_errors_have_codes_and_nonzero_exit(rabbitmq: None, tmp_path: Path) -> None:
    host = unique_host("err")
    bad = tmp_path / "bad.xml"
    bad.write_text("<domain><name>x</name>")
    good = tmp_path / "g.xml"
    good.write_text(DOMAIN_XML.format(name="g"))
    async with agent_process(host, tmp_path):
        cases = [
            (("start", "nope", "--host", host), "NO_DOMAIN"),
            (("define", str(bad), "--host", host), "XML_ERROR"),
            (("define", str(tmp_path / "missing.xml"), "--host", host), "INVALID_ARG"),
        ]
        for args, code in cases:
            r = await cli(*args)
            assert r.code != 0 and f"error: {code}:" in r.err, (args, r)
            assert len(r.err.strip().splitlines()) == 1
        assert (await cli("define", str(good), "--host", host)).code == 0
        r = await cli("resume", "g", "--host", host)
        assert r.code != 0 and "OPERATION_INVALID" in r.err, r
        other = tmp_path / "dup.xml"
        other.write_text(
            DOMAIN_XML.format(name="g").replace(
                "<name>g</name>", "<name>g</name><uuid>6c8f43b6-93b7-4b74-b4e1-2a2d1f4b9d11</uuid>"
            )
        )
        r = await cli("define", str(other), "--host", host)
        assert r.code != 0 and "OPERATION_FAILED" in r.err, r
        # the agent still serves after every error
        assert (await cli("start", "g", "--host", host)).code == 0


async def test_call_to_absent_agent_times_out_and_is_never_executed(
    rabbitmq: None, tmp_path: Path
) -> None:
    host = unique_host("late")
    # The host's queue exists (its agent ran before) but nobody consumes it now.
    async with agent_process(host, tmp_path, keep_queue=True):
        pass
    bus = open_bus(BUS_URL, src="test")
    await bus.connect()
    try:
        started = time.monotonic()
        with pytest.raises(OperationTimeout):
            await bus.call(
                ops.agent_route(host),
                ops.DOMAIN_DEFINE,
                {"xml": DOMAIN_XML.format(name="late")},
                timeout=1.0,
            )
        assert time.monotonic() - started < 1.6
        await asyncio.sleep(0.3)
        async with agent_process(host, tmp_path):
            listing = await bus.call(ops.agent_route(host), ops.DOMAIN_LIST, {}, timeout=5)
            assert listing["domains"] == []
    finally:
        await bus.close()
        await delete_queues(f"virtbus.agent.{host}")


async def test_per_domain_order_and_cross_domain_concurrency(
    rabbitmq: None, tmp_path: Path
) -> None:
    host = unique_host("order")
    # 20 running 1-vCPU guests: more than this machine's CPUs x the default overcommit (4)
    extra = ("--driver-option", "delay=0.2", "--cpu-overcommit", "64")
    async with agent_process(host, tmp_path, *extra):
        bus = open_bus(BUS_URL, src="test")
        await bus.connect()
        try:
            route = ops.agent_route(host)
            names = [f"d{i}" for i in range(20)]
            for n in names:
                await bus.call(route, ops.DOMAIN_DEFINE, {"xml": DOMAIN_XML.format(name=n)})
            # 20 domains, each start takes 0.2 s in the driver: concurrent means ~0.2 s, not 4 s.
            t0 = time.monotonic()
            await asyncio.gather(*(bus.call(route, ops.DOMAIN_START, {"domain": n}) for n in names))
            assert time.monotonic() - t0 < 2.0
            # 50 concurrent alternating suspend/resume on one domain: any interleaving or
            # reordering would make one of them hit the wrong state (OPERATION_INVALID).
            ops_seq = [ops.DOMAIN_SUSPEND if i % 2 == 0 else ops.DOMAIN_RESUME for i in range(50)]
            results = await asyncio.gather(
                *(bus.call(route, op, {"domain": "d0"}, timeout=60) for op in ops_seq),
                return_exceptions=True,
            )
            errors = [r for r in results if isinstance(r, OperationInvalid | Exception)]
            assert errors == []
            assert [r["state"] for r in results] == ["paused", "running"] * 25  # type: ignore[index]
        finally:
            await bus.close()
