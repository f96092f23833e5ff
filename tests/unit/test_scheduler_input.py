"""The scheduler never trusts what comes off the bus: bad heartbeats, malformed agent
replies, bad events and bad call bodies are dropped or answered with a typed error, and
the scheduler keeps serving (no dead task, no INTERNAL_ERROR)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiofiles.os
import pytest

from scheduler.inventory import ClusterView
from scheduler.journal import Journal, MigrationRecord
from scheduler.migration import MigrationCoordinator
from scheduler.service import SchedulerService
from tests.unit.test_scheduler_memory import cluster, scheduler_settings, xml
from virtbus.aio import TaskGroup
from virtbus.bus.base import Bus
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import EVENTS_EXCHANGE, HEARTBEAT_KEY_SUFFIX, HOSTS_EXCHANGE
from virtbus.errors import InvalidArgument, ProtocolError
from virtbus.protocol import ops
from virtbus.protocol.base import decode, to_wire
from virtbus.protocol.envelope import Envelope, Kind, ok_body
from virtbus.protocol.host import HostInventory
from virtbus.protocol.migration import MigrationParams
from virtbus.protocol.registry import Op


def parse_heartbeat(body: Any) -> HostInventory | str:
    """What the scheduler does with a heartbeat body: the typed inventory, or why not."""
    try:
        return decode(body, HostInventory)
    except InvalidArgument as exc:
        return exc.message


GOOD: dict[str, Any] = {
    "host": "h1",
    "driver": "test",
    "arch": "x86_64",
    "cpus": 8,
    "memory_total_kib": 4 << 20,
    "memory_free_kib": 4 << 20,
    "allocated_memory_kib": 0,
    "allocated_vcpus": 0,
    "domains": 0,
    "running": [],
    "labels": {"rack": "r1"},
    "draining": False,
    "cpu_model": "qemu64",
    "migration_address": "127.0.0.1",
    "started_at": 1.0,
}
BAD_FIELDS: list[tuple[str, Any]] = [
    ("host", ""),
    ("host", 5),
    ("running", 5),
    ("running", [1]),
    ("cpus", "x"),
    ("cpus", -1),
    ("cpus", True),
    ("memory_total_kib", 1.5),
    ("memory_free_kib", None),
    ("allocated_memory_kib", "0"),
    ("allocated_vcpus", [2]),
    ("domains", {}),
    ("labels", [1]),
    ("labels", {"rack": 1}),
    ("cpu_models", "EPYC"),
    ("driver", 5),
    ("arch", ["x86_64"]),
    ("cpu_model", 1),
    ("migration_address", 0),
    ("draining", "yes"),
    ("started_at", "x"),
]


# --- heartbeats -----------------------------------------------------------------------
def test_a_good_heartbeat_parses_into_typed_fields() -> None:
    inv = parse_heartbeat({**GOOD, "running": ["g"], "cpu_models": ["EPYC"], "extra": 1})
    assert isinstance(inv, HostInventory)
    assert (inv.host, inv.cpus, inv.running, inv.labels) == ("h1", 8, ["g"], {"rack": "r1"})
    assert inv.cpu_models == ["EPYC"]
    minimal = parse_heartbeat({"host": "h2"})  # missing fields: defaults, as before
    assert isinstance(minimal, HostInventory) and minimal.cpus == 0 and minimal.labels == {}


@pytest.mark.parametrize(("key", "value"), BAD_FIELDS)
def test_a_bad_heartbeat_field_is_named(key: str, value: Any) -> None:
    why = parse_heartbeat({**GOOD, key: value})
    assert isinstance(why, str) and f"'{key}" in why


def test_a_heartbeat_that_is_not_a_map_is_refused() -> None:
    assert isinstance(parse_heartbeat([1, 2]), str)
    assert "'host'" in str(parse_heartbeat({"cpus": 1}))


def test_the_view_places_from_a_typed_inventory() -> None:
    view = ClusterView(host_down_after=5)
    inv = parse_heartbeat(GOOD)
    assert isinstance(inv, HostInventory)
    assert view.observe_heartbeat(inv, now=0.0)
    assert not view.observe_heartbeat(inv, now=1.0)  # nothing changed: no refresh
    (cand,) = view.candidates(now=1.0)
    assert (cand.cpus, cand.labels, cand.up) == (8, {"rack": "r1"}, True)
    row = view.host_view("h1", now=1.0)
    assert row is not None and row.labels == {"rack": "r1"}


def _heartbeat(body: dict[str, Any]) -> Envelope:
    """As it arrives from the host's own user (the AMQP user_id RabbitMQ checked)."""
    user = body.get("host") if isinstance(body, dict) else None
    return Envelope(kind=Kind.HEARTBEAT, op=ops.HEARTBEAT, body=body, src="evil", user=user or "x")


async def test_bad_heartbeats_are_dropped_and_the_scheduler_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="scheduler.service")
    async with cluster(tmp_path, hosts=("a", "b")) as c:
        for key, value in BAD_FIELDS:
            host = value if key == "host" else "evil"
            body = {**GOOD, "host": host, key: value}
            await c.client.publish(HOSTS_EXCHANGE, f"evil.{HEARTBEAT_KEY_SUFFIX}", _heartbeat(body))
        await asyncio.sleep(0.3)
        assert not c.scheduler.failed.is_set()
        hosts = (await c.call(ops.SCHEDULER_HOSTS, {}))["hosts"]
        assert sorted(h["host"] for h in hosts) == ["a", "b"]  # "evil" was never stored
        placed = await c.call(ops.SCHEDULER_DEFINE, {"xml": xml("web1")})
        assert placed["host"] in ("a", "b")
        for key, _ in BAD_FIELDS:
            assert any(f"'{key}'" in r.getMessage() for r in caplog.records), key
        assert any("'evil'" in r.getMessage() for r in caplog.records)


# --- agent replies ----------------------------------------------------------------------
Replies = dict[str, Any]


async def fake_agent(url: str, host: str, replies: Replies) -> Bus:
    """An 'agent' on the bus answering each op with ``replies[op]`` (shape not checked)."""
    bus = open_bus(url, src=host)
    await bus.connect()

    async def handle(call: Envelope) -> dict[str, Any]:
        return ok_body(replies.get(call.op, {}))

    await bus.serve(ops.agent_route(host), handle)
    await bus.publish(
        HOSTS_EXCHANGE,
        f"{host}.{HEARTBEAT_KEY_SUFFIX}",
        Envelope(kind=Kind.HEARTBEAT, op=ops.HEARTBEAT, body={**GOOD, "host": host}, src=host),
    )
    return bus


RUNNING = {"name": "g", "uuid": "u-1", "state": "running", "persistent": True}
BAD_REPLIES: list[Replies] = [
    {ops.DOMAIN_LIST: {"domains": 5}},
    {ops.DOMAIN_LIST: []},
    {ops.DOMAIN_LIST: {"domains": [1]}},
    {ops.DOMAIN_LIST: {"domains": [{"name": "g"}]}},  # no uuid
    {ops.DOMAIN_LIST: {"domains": [{**RUNNING, "state": 3}]}},
    {ops.DOMAIN_LIST: {"domains": [RUNNING]}, ops.DOMAIN_XML: {}},
    {ops.DOMAIN_LIST: {"domains": [RUNNING]}, ops.DOMAIN_XML: {"xml": 7}},
    {ops.DOMAIN_LIST: {"domains": [RUNNING]}, ops.DOMAIN_XML: "x"},
]


@pytest.mark.parametrize("replies", BAD_REPLIES)
async def test_malformed_agent_replies_make_the_host_unreachable_not_a_crash(
    tmp_path: Path, replies: Replies
) -> None:
    async with cluster(tmp_path, hosts=("a",)) as c:
        bad = await fake_agent(c.url, "bad", replies)
        try:
            await asyncio.sleep(0.2)  # its heartbeat triggered a refresh
            answer = await c.call(ops.SCHEDULER_DOMAINS, {"all": True})
            assert answer["unreachable"] == ["bad"]
            if ops.DOMAIN_XML in replies:  # the list is fine: that domain stays, with why
                job = await c.call(ops.SCHEDULER_DRAIN, {"host": "bad"})
                assert job["domains"]["g"]["state"] == "failed"
                assert "RPC_ERROR" in job["domains"]["g"]["error"]
            else:
                with pytest.raises(ProtocolError):  # RPC_ERROR, not INTERNAL_ERROR
                    await c.call(ops.SCHEDULER_DRAIN, {"host": "bad"})
            assert not c.scheduler.failed.is_set()
        finally:
            await bad.close()


@pytest.mark.parametrize("info", [[], {"state": "running"}, {**RUNNING, "name": 5}])
async def test_a_malformed_domain_info_answers_rpc_error(tmp_path: Path, info: Any) -> None:
    good_xml = xml("g").replace("<name>", "<uuid>00000000-0000-0000-0000-000000000001</uuid><name>")
    replies = {
        ops.DOMAIN_LIST: {"domains": [RUNNING]},
        ops.DOMAIN_XML: {"xml": good_xml},
        ops.DOMAIN_INFO: info,
    }
    async with cluster(tmp_path, hosts=("a",)) as c:
        bad = await fake_agent(c.url, "bad", replies)
        try:
            await asyncio.sleep(0.2)
            with pytest.raises(ProtocolError):
                await c.call(ops.SCHEDULER_MIGRATE, {"domain": "g"})
            assert not c.scheduler.failed.is_set()
        finally:
            await bad.close()


async def test_a_malformed_prepare_answer_rolls_back(tmp_path: Path) -> None:
    """A destination answering prepare without a string 'uri' is a failed step: rollback."""
    calls: list[tuple[str, str, dict[str, Any]]] = []

    async def call(host: str, op: Op[Any, Any], request: Any, timeout: float) -> Any:
        calls.append((host, op, to_wire(request)))
        if op == ops.MIGRATION_PREPARE:
            return op.decode_result({"uri": 5})  # RPC_ERROR, as a real call would raise
        source = {"xml": "<domain/>", "name": "g", "uuid": "u-1", "state": "running"}
        return op.decode_result(source if op == ops.MIGRATION_BEGIN else {"state": "absent"})

    settings = scheduler_settings(tmp_path)
    crashed: list[str] = []
    tasks = TaskGroup("t", on_crash=lambda name, exc: crashed.append(name))
    journal = Journal(tmp_path)
    await journal.open()
    coordinator = MigrationCoordinator(call, ClusterView(1.0), journal, settings, tasks)
    record = MigrationRecord("g", "u-1", "src", "dst", MigrationParams(), timeout=5.0)
    await coordinator.submit(record, "<domain/>")
    async with asyncio.timeout(5):
        while not record.terminal:
            await asyncio.sleep(0.01)
    assert record.state == "failed" and "uri" in (record.error or "")
    assert ("dst", ops.MIGRATION_FINISH) in [(h, o) for h, o, _ in calls]
    assert ("src", ops.MIGRATION_CONFIRM) in [(h, o) for h, o, _ in calls]
    assert not crashed
    await tasks.cancel_all()


async def test_bad_migration_events_do_not_stop_the_event_loop(tmp_path: Path) -> None:
    async with cluster(tmp_path, hosts=("a", "b"), migration_time=0.5) as c:
        await c.agent("a", ops.DOMAIN_DEFINE, {"xml": xml("m1")})
        await c.agent("a", ops.DOMAIN_START, {"domain": "m1"})
        rec = await c.call(ops.SCHEDULER_MIGRATE, {"domain": "m1", "to": "b"})
        for data in (5, ["x"], "s", [[1, 2, 3]]):
            body = {"event": "migration", "host": rec["source"], "uuid": rec["uuid"], "data": data}
            env = Envelope(kind=Kind.EVENT, op="event", body=body, src="evil")
            await c.client.publish(EVENTS_EXCHANGE, f"{rec['source']}.m1.migration", env)
        done = await c.wait_migration("m1")
        assert done["state"] == "completed"
        assert not c.scheduler.failed.is_set()


# --- call bodies ------------------------------------------------------------------------
@pytest.mark.parametrize("timeout", ["x", True, -1, [1]])
async def test_bad_timeouts_are_invalid_arguments(tmp_path: Path, timeout: Any) -> None:
    async with cluster(tmp_path, hosts=("a", "b")) as c:
        with pytest.raises(InvalidArgument):
            await c.call(ops.SCHEDULER_DRAIN, {"host": "a", "timeout": timeout})
        with pytest.raises(InvalidArgument):
            await c.call(ops.SCHEDULER_MIGRATE, {"domain": "x", "timeout": timeout})


# --- drain flag -------------------------------------------------------------------------
async def test_one_drain_flag_call_in_flight_per_host(tmp_path: Path) -> None:
    sched = SchedulerService(scheduler_settings(tmp_path), open_bus("memory://flag", src="s"))
    release = asyncio.Event()
    flags: list[str] = []

    async def agent_call(host: str, op: Op[Any, Any], request: Any, timeout: float) -> Any:
        if op == ops.HOST_SET_DRAINING:
            flags.append(host)
            await release.wait()
        return op.decode_result({"domains": [], "host": host, "draining": True})

    sched._agent_call = agent_call  # type: ignore[method-assign]
    sched.active = True
    sched.view.set_draining("h1", True)

    async def beats(n: int) -> AsyncIterator[Envelope]:
        for _ in range(n):
            yield _heartbeat(GOOD)
            await asyncio.sleep(0)

    loop: Callable[[Any], Awaitable[None]] = sched._heartbeat_loop
    await loop(beats(5))
    await asyncio.sleep(0.01)
    assert flags == ["h1"]  # five heartbeats, one call
    release.set()
    await asyncio.sleep(0.01)
    await loop(beats(1))  # the first one ended: the next heartbeat may try again
    await asyncio.sleep(0.01)
    assert flags == ["h1", "h1"]
    await sched._tasks.cancel_all()
    assert not sched.failed.is_set()


# --- journal ----------------------------------------------------------------------------
async def test_corrupt_journal_files_are_quarantined(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    await journal.open()
    good = MigrationRecord("g", "u-1", "a", "b", {}, timeout=5.0)
    await journal.save(good)
    (journal.dir / "bad1.json").write_text("{not json")
    (journal.dir / "bad2.json").write_text("[1, 2]")
    records = await journal.load()
    assert [r.id for r in records] == [good.id]
    names = sorted(p.name for p in journal.dir.iterdir())
    assert not any(n.startswith("bad") and n.endswith(".json") for n in names)
    assert sum(".corrupt-" in n for n in names) == 2


async def test_a_journal_file_that_cannot_be_set_aside_is_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path)
    await journal.open()
    good = MigrationRecord("g", "u-1", "a", "b", {}, timeout=5.0)
    await journal.save(good)
    (journal.dir / "bad.json").write_text("{not json")

    async def refuse(src: Any, dst: Any) -> None:
        raise PermissionError(13, "read-only", str(src))

    monkeypatch.setattr(aiofiles.os, "replace", refuse)
    records = await journal.load()
    assert [r.id for r in records] == [good.id]
    assert (journal.dir / "bad.json").exists()
