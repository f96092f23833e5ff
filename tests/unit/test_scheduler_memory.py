"""Scheduler + agents (test driver) in one process over memory://: the whole path, fast."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

import scheduler.service
from agent.service import AgentService
from drivers.test import TestDriver, TestHostSpec
from scheduler.journal import Journal, MigrationRecord
from scheduler.service import SchedulerService
from scheduler.settings import SchedulerSettings
from virtbus.bus.base import Bus
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import HEARTBEAT_KEY_SUFFIX, HOSTS_EXCHANGE, SCHEDULER_ROUTE
from virtbus.errors import NoHostError, OperationInvalid
from virtbus.protocol import ops
from virtbus.protocol.base import to_wire
from virtbus.protocol.envelope import Envelope, Kind
from virtbus.settings import AgentSettings

XML = """<domain type='test'><name>{name}</name><memory unit='MiB'>{mem}</memory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type></os>{meta}</domain>"""
GROUP = (
    "<metadata><virtbus:placement xmlns:virtbus='https://virtbus.dev/xmlns/placement/1' "
    "anti-affinity='{}'/></metadata>"
)
SPEC = TestHostSpec(cpus=8, memory_kib=4 << 20, arch="x86_64")


def xml(name: str, mem: int = 256, group: str | None = None) -> str:
    return XML.format(name=name, mem=mem, meta=GROUP.format(group) if group else "")


@dataclasses.dataclass
class Cluster:
    url: str
    client: Bus
    agents: dict[str, AgentService]
    scheduler: SchedulerService
    state_dir: Path

    async def call(self, op: str, body: dict[str, Any], timeout: float = 10) -> Any:
        return await self.client.call(SCHEDULER_ROUTE, op, body, timeout=timeout)

    async def agent(self, host: str, op: str, body: dict[str, Any]) -> Any:
        return await self.client.call(ops.agent_route(host), op, body, timeout=10)

    async def wait_migration(self, domain: str, timeout: float = 15) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                rec = await self.call(ops.SCHEDULER_MIGRATION, {"domain": domain})
                if rec["state"] in ("completed", "failed", "cancelled"):
                    return rec  # type: ignore[no-any-return]
                await asyncio.sleep(0.05)

    async def wait_phase(self, domain: str, phase: str, timeout: float = 15) -> None:
        """Until the migration of ``domain`` is in ``phase`` (or past it, then it fails)."""
        async with asyncio.timeout(timeout):
            while (rec := await self.call(ops.SCHEDULER_MIGRATION, {"domain": domain}))[
                "phase"
            ] != phase:
                assert rec["state"] not in ("completed", "failed", "cancelled"), rec
                await asyncio.sleep(0.02)

    async def where(self, domain: str) -> list[tuple[str, str]]:
        found = []
        for host, agent in self.agents.items():
            if agent.driver.lookup(domain) is not None:
                info = await agent.driver.info(domain)
                found.append((host, info.state.label))
        return sorted(found)


async def start_agent(url: str, host: str, tmp: Path, migration_time: float) -> AgentService:
    settings = AgentSettings(host=host, state_dir=tmp / host, heartbeat_interval=0.05)
    driver = TestDriver(SPEC, migration_time=migration_time)
    agent = AgentService(settings, open_bus(url, src=host), driver)
    await agent.start()
    return agent


def scheduler_settings(state_dir: Path, **kw: Any) -> SchedulerSettings:
    base = SchedulerSettings(
        state_dir=state_dir,
        host_down_after=0.5,
        progress_poll=0.05,
        step_timeout=2.0,
        cleanup_timeout=2.0,
        cleanup_retry=0.05,
        leader_probe=0.1,
    )
    return dataclasses.replace(base, **kw)


@asynccontextmanager
async def cluster(
    tmp_path: Path, hosts: tuple[str, ...] = ("a", "b", "c"), migration_time: float = 0.2, **kw: Any
) -> AsyncIterator[Cluster]:
    url = f"memory://sched-{tmp_path.name}"
    agents = {h: await start_agent(url, h, tmp_path, migration_time) for h in hosts}
    sched = SchedulerService(scheduler_settings(tmp_path / "sched", **kw), open_bus(url, src="s"))
    await sched.start()
    client = open_bus(url, src="client")
    await client.connect()
    c = Cluster(url, client, agents, sched, tmp_path / "sched")
    try:
        async with asyncio.timeout(5):
            while True:
                if len((await c.call(ops.SCHEDULER_HOSTS, {}))["hosts"]) >= len(hosts):
                    break
                await asyncio.sleep(0.05)
        yield c
    finally:
        await client.close()
        await c.scheduler.stop()
        for agent in c.agents.values():
            await agent.stop()


async def test_define_places_with_spread_and_anti_affinity(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        placed = [
            (await c.call(ops.SCHEDULER_DEFINE, {"xml": xml(f"w{i}", group="web")}))["host"]
            for i in range(3)
        ]
        assert sorted(placed) == ["a", "b", "c"]  # anti-affinity: one per host
        with pytest.raises(NoHostError, match="anti-affinity removed 3"):
            await c.call(ops.SCHEDULER_DEFINE, {"xml": xml("w3", group="web")})
        with pytest.raises(NoHostError, match="memory removed 3"):
            await c.call(ops.SCHEDULER_PLACE, {"xml": xml("huge", mem=64 * 1024)})
        hosts = (await c.call(ops.SCHEDULER_HOSTS, {}))["hosts"]
        assert {h["host"] for h in hosts} == {"a", "b", "c"} and all(h["up"] for h in hosts)


async def test_migrate_moves_the_guest_and_lists_it(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        await c.agent("a", ops.DOMAIN_DEFINE, {"xml": xml("vm1")})
        await c.agent("a", ops.DOMAIN_START, {"domain": "vm1"})
        rec = await c.call(ops.SCHEDULER_MIGRATE, {"domain": "vm1", "to": "b"})
        assert (rec["source"], rec["destination"]) == ("a", "b")
        with pytest.raises(OperationInvalid):
            await c.call(ops.SCHEDULER_MIGRATE, {"domain": "vm1", "to": "c"})
        done = await c.wait_migration("vm1")
        assert done["state"] == "completed", done
        assert await c.where("vm1") == [("b", "running")]
        listing = (await c.call(ops.SCHEDULER_DOMAINS, {"all": True}))["domains"]
        assert [(d["host"], d["name"]) for d in listing] == [("b", "vm1")]
        assert list(c.state_dir.joinpath("migrations").iterdir()) == []
        # and back again, the scheduler choosing the destination (not the source)
        await c.call(ops.SCHEDULER_MIGRATE, {"domain": "vm1"})
        done = await c.wait_migration("vm1")
        assert done["state"] == "completed" and done["destination"] in ("a", "c")


async def test_the_end_is_heard_from_the_status_long_poll_not_a_poll_interval(
    tmp_path: Path,
) -> None:
    """The source's agent answers ``migration.status`` (``wait``) as its stream ends: with
    a poll interval far beyond the test's patience and the source's migration events
    kept from the coordinator, the migration still completes, well within that interval."""
    async with cluster(tmp_path, migration_time=0.5, progress_poll=60.0) as c:
        c.scheduler.coordinator.on_event = lambda _event: None  # type: ignore[method-assign]
        await c.agent("a", ops.DOMAIN_DEFINE, {"xml": xml("vm1")})
        await c.agent("a", ops.DOMAIN_START, {"domain": "vm1"})
        await c.call(ops.SCHEDULER_MIGRATE, {"domain": "vm1", "to": "b"})
        done = await c.wait_migration("vm1", timeout=20)
        assert done["state"] == "completed", done
        assert await c.where("vm1") == [("b", "running")]


async def test_the_source_xml_is_read_while_the_domain_is_located(tmp_path: Path) -> None:
    """One round trip, not two: the source's domain.read_secure goes while its
    domain.info (is it running there?) is on its way."""
    async with cluster(tmp_path) as c:
        await c.agent("a", ops.DOMAIN_DEFINE, {"xml": xml("vm1")})
        await c.agent("a", ops.DOMAIN_START, {"domain": "vm1"})
        async with asyncio.timeout(10):  # the scheduler knows where it runs (a heartbeat)
            while not (await c.call(ops.SCHEDULER_DOMAINS, {"all": True}))["domains"]:
                await asyncio.sleep(0.02)
        calls: list[tuple[str, str]] = []
        agent_call = c.scheduler._agent_call

        async def traced(host: str, op: Any, request: Any, timeout: float) -> Any:
            calls.append(("sent", str(op)))
            try:
                return await agent_call(host, op, request, timeout)
            finally:
                calls.append(("answered", str(op)))

        c.scheduler._agent_call = traced  # type: ignore[method-assign]
        await c.call(ops.SCHEDULER_MIGRATE, {"domain": "vm1", "to": "b"})
        first = calls[: calls.index(("answered", str(ops.DOMAIN_INFO)))]
        assert ("sent", str(ops.DOMAIN_READ_SECURE)) in first, calls
        done = await c.wait_migration("vm1")
        assert done["state"] == "completed", done


async def test_cancel_and_timeout_roll_back_to_the_source(tmp_path: Path) -> None:
    async with cluster(tmp_path, migration_time=3.0) as c:
        await c.agent("a", ops.DOMAIN_DEFINE, {"xml": xml("vm1")})
        await c.agent("a", ops.DOMAIN_START, {"domain": "vm1"})
        await c.call(ops.SCHEDULER_MIGRATE, {"domain": "vm1", "to": "b"})
        await c.wait_phase("vm1", "progress")  # streaming (not a guess at how long it takes)
        await c.call(ops.SCHEDULER_MIGRATE_CANCEL, {"domain": "vm1"})
        done = await c.wait_migration("vm1")
        assert done["state"] == "cancelled", done
        assert await c.where("vm1") == [("a", "running")]
        await c.call(ops.SCHEDULER_MIGRATE, {"domain": "vm1", "to": "b", "timeout": 0.5})
        done = await c.wait_migration("vm1")
        assert done["state"] == "failed" and "timed out" in done["error"], done
        assert await c.where("vm1") == [("a", "running")]


async def test_destination_killed_mid_migration(tmp_path: Path) -> None:
    async with cluster(tmp_path, migration_time=3.0) as c:
        await c.agent("a", ops.DOMAIN_DEFINE, {"xml": xml("vm1")})
        await c.agent("a", ops.DOMAIN_START, {"domain": "vm1"})
        await c.call(ops.SCHEDULER_MIGRATE, {"domain": "vm1", "to": "b"})
        await c.wait_phase("vm1", "progress")
        await c.agents["b"].driver.destroy("vm1")  # the destination's instance dies
        done = await c.wait_migration("vm1")
        assert done["state"] == "failed", done
        assert await c.where("vm1") == [("a", "running")]


async def test_drain_spreads_over_the_others_within_limits(tmp_path: Path) -> None:
    async with cluster(tmp_path, migration_time=0.3) as c:
        for i in range(5):
            await c.agent("a", ops.DOMAIN_DEFINE, {"xml": xml(f"d{i}")})
            await c.agent("a", ops.DOMAIN_START, {"domain": f"d{i}"})
        job = await c.call(ops.SCHEDULER_DRAIN, {"host": "a"})
        assert sorted(job["domains"]) == [f"d{i}" for i in range(5)]
        running = 0
        async with asyncio.timeout(15):
            while not job["done"]:
                job = await c.call(ops.SCHEDULER_DRAIN_STATUS, {"host": "a"})
                running = max(
                    running, sum(d["state"] == "running" for d in job["domains"].values())
                )
                await asyncio.sleep(0.05)
        assert job["ok"], job
        assert running <= 2  # at most 2 outbound migrations per host
        dests = [d["destination"] for d in job["domains"].values()]
        assert set(dests) == {"b", "c"}  # spread by the claims
        hosts = {h["host"]: h for h in (await c.call(ops.SCHEDULER_HOSTS, {}))["hosts"]}
        assert hosts["a"]["draining"]
        with pytest.raises(NoHostError, match="not-draining removed 1"):
            await c.call(ops.SCHEDULER_PLACE, {"xml": xml("x", mem=3840)})
        await c.call(ops.SCHEDULER_UNDRAIN, {"host": "a"})
        assert (await c.call(ops.SCHEDULER_PLACE, {"xml": xml("x", mem=3840)}))["host"] == "a"


async def test_restart_resolves_a_journaled_migration(tmp_path: Path) -> None:
    async with cluster(tmp_path, migration_time=1.5) as c:
        await c.agent("a", ops.DOMAIN_DEFINE, {"xml": xml("vm1")})
        await c.agent("a", ops.DOMAIN_START, {"domain": "vm1"})
        await c.call(ops.SCHEDULER_MIGRATE, {"domain": "vm1", "to": "b"})
        await c.wait_phase("vm1", "progress")
        await c.scheduler.stop()  # "killed" mid-migration: the journal keeps it
        records = await Journal(c.state_dir).load()
        assert [r.phase for r in records] == ["perform"]  # progress is not journaled
        c.scheduler = SchedulerService(scheduler_settings(c.state_dir), open_bus(c.url, src="s2"))
        await c.scheduler.start()
        done = await c.wait_migration("vm1")
        assert done["state"] == "completed", done
        assert await c.where("vm1") == [("b", "running")]


async def test_restart_in_prepare_rolls_back(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        await c.agent("a", ops.DOMAIN_DEFINE, {"xml": xml("vm1")})
        await c.agent("a", ops.DOMAIN_START, {"domain": "vm1"})
        uuid = c.agents["a"].driver.lookup("vm1").uuid  # type: ignore[union-attr]
        await c.scheduler.stop()
        # a journal as a scheduler leaves it when it dies right after preparing
        xml_text = await c.agents["a"].driver.migrate_begin("vm1")
        from drivers.base import MigrationParams

        await c.agents["b"].driver.migrate_prepare(xml_text, MigrationParams())
        rec = MigrationRecord("vm1", uuid, "a", "b", {}, 60.0, state="running", phase="prepare")
        journal = Journal(c.state_dir)
        await journal.open()
        await journal.save(rec)
        c.scheduler = SchedulerService(scheduler_settings(c.state_dir), open_bus(c.url, src="s2"))
        await c.scheduler.start()
        done = await c.wait_migration("vm1")
        assert done["state"] == "failed"
        assert await c.where("vm1") == [("a", "running")]


async def test_a_failed_refresh_is_asked_again_at_the_next_heartbeat(tmp_path: Path) -> None:
    """A host whose domain list the scheduler could not get (a cold start's stampede of
    calls timing out, tests/bench/fleet.py) is asked again: its later heartbeats say
    nothing changed, yet the view must learn its domains and their groups."""
    async with cluster(tmp_path, hosts=()) as c:
        url = c.url
        settings = AgentSettings(host="x", state_dir=tmp_path / "x", heartbeat_interval=0.05)
        driver = TestDriver(SPEC)
        await driver.start((await driver.define(xml("w0", group="web"))).uuid)
        agent = AgentService(settings, open_bus(url, src="x"), driver)
        # The heartbeat the agent will send, before its queue is served: the refresh fails.
        early = open_bus(url, src="x")
        await early.connect()
        inv = await agent.inventory()
        await early.publish(HOSTS_EXCHANGE, f"x.{HEARTBEAT_KEY_SUFFIX}", Envelope(
            kind=Kind.HEARTBEAT, op=ops.HEARTBEAT, body=to_wire(inv), src="x"))  # fmt: skip
        await early.close()
        async with asyncio.timeout(5):
            while "x" not in c.scheduler.view.hosts or "x" in c.scheduler._refreshing:
                await asyncio.sleep(0.01)
        assert not c.scheduler.view.hosts["x"].domains  # that refresh failed
        await agent.start()
        c.agents["x"] = agent  # stopped by the cluster
        async with asyncio.timeout(5):
            while not c.scheduler.view.hosts["x"].domains:
                await asyncio.sleep(0.02)
        with pytest.raises(NoHostError, match="anti-affinity removed 1"):
            await c.call(ops.SCHEDULER_PLACE, {"xml": xml("w1", group="web")})


async def test_refreshes_run_a_bounded_number_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold start asks every host for its domains; only REFRESH_CONCURRENCY at once,
    so that the calls do not queue at the agents past their deadline."""
    monkeypatch.setattr(scheduler.service, "REFRESH_CONCURRENCY", 1)
    async with cluster(tmp_path) as c:
        in_flight, peak = 0, 0
        call = c.scheduler._agent_call

        async def counting(host: str, op: Any, request: Any, timeout: float) -> Any:
            nonlocal in_flight, peak
            if op is not ops.DOMAIN_LIST:
                return await call(host, op, request, timeout)
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                await asyncio.sleep(0.05)  # long enough for the others to overlap
                return await call(host, op, request, timeout)
            finally:
                in_flight -= 1

        c.scheduler._agent_call = counting  # type: ignore[method-assign]
        answer = await c.call(ops.SCHEDULER_DOMAINS, {"all": True})  # refreshes all 3 hosts
        assert answer["unreachable"] == []
        assert peak == 1


async def _seen_ops(c: Cluster, monkeypatch: pytest.MonkeyPatch, strip: bool) -> list[str]:
    """The ops the scheduler sends agents from now on (``strip``: their domain lists come
    back without groups, as from an agent too old to say)."""
    seen: list[str] = []
    call = c.scheduler._agent_call

    async def recording(host: str, op: Any, body: Any, timeout: float) -> Any:
        seen.append(op.name)
        reply = await call(host, op, body, timeout)
        if strip and op is ops.DOMAIN_LIST:
            reply.domains = [msgspec.structs.replace(d, groups=None) for d in reply.domains]
        return reply

    monkeypatch.setattr(c.scheduler, "_agent_call", recording)
    return seen


async def _groups_known(c: Cluster, names: set[str]) -> None:
    async with asyncio.timeout(5):
        while {m.name for m in c.scheduler.view.meta.values() if m.groups} != names:
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("old_agents", [False, True], ids=["lists-say-groups", "old-agents"])
async def test_groups_of_domains_defined_behind_its_back_come_with_the_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old_agents: bool
) -> None:
    """A domain defined on a host directly still counts for anti-affinity: its groups come
    in the host's domain list, with no definition fetched per domain (a cold start of a
    large fleet was 10 ``domain.xml`` calls per host); an agent whose list does not carry
    them is asked for the definition instead."""
    async with cluster(tmp_path) as c:
        seen = await _seen_ops(c, monkeypatch, strip=old_agents)
        await c.agent("a", ops.DOMAIN_DEFINE, {"xml": xml("db1", group="db")})
        await c.agent("b", ops.DOMAIN_DEFINE, {"xml": xml("db2", group="db")})
        await c.agent("b", ops.DOMAIN_DEFINE, {"xml": xml("plain")})
        await _groups_known(c, {"db1", "db2"})
        assert ops.DOMAIN_LIST.name in seen  # the premise: the scheduler refreshed those hosts
        fetched = seen.count(ops.DOMAIN_XML.name)
        assert fetched == (3 if old_agents else 0), seen
        placed = await c.call(ops.SCHEDULER_DEFINE, {"xml": xml("db3", group="db")})
        assert placed["host"] == "c"
        with pytest.raises(NoHostError, match="anti-affinity removed 3"):
            await c.call(ops.SCHEDULER_PLACE, {"xml": xml("db4", group="db")})
