"""Storage inside a real agent on the real RabbitMQ: pool and job events on the bus (their
routing keys, numbered with the domain events), pools in the heartbeat inventory, autostart
at agent start, and volume disks of the test driver resolved through the pools."""

from __future__ import annotations

import asyncio
import uuid as uuidlib
from pathlib import Path

import pytest

from agent.service import AgentService
from drivers.test import TestDriver
from tests.procs import BUS_URL, delete_queues, unique_host
from tests.storage.conftest import dir_pool_xml, need_tools
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import EVENTS_EXCHANGE
from virtbus.errors import NoStorageVol, OperationInvalid
from virtbus.protocol import ops
from virtbus.protocol.envelope import Envelope
from virtbus.settings import AgentSettings, BusSettings, StorageSettings
from virtbus.storage import volume_xml

pytestmark = pytest.mark.rabbitmq
MiB = 1 << 20


def make_agent(host: str, base: Path, driver: TestDriver | None = None) -> AgentService:
    settings = AgentSettings(
        host=host, state_dir=base / "state", heartbeat_interval=30.0,
        storage=StorageSettings(roots=(base / "images",)),
    )  # fmt: skip
    bus = open_bus(BUS_URL, src=host, settings=BusSettings(url=BUS_URL))
    return AgentService(settings, bus, driver or TestDriver(), BusSettings(url=BUS_URL))


async def collect_until(sub: object, last_domain: str, timeout: float = 20.0) -> list[Envelope]:
    """Events until the ``defined`` event of ``last_domain`` (everything before it is in)."""
    got: list[Envelope] = []
    async with asyncio.timeout(timeout):
        async for env in sub:  # type: ignore[attr-defined]
            got.append(env)
            if env.op == ops.EVENT_DOMAIN and env.body["domain"] == last_domain:
                return got
    return got


def domain_xml(name: str, pool: str, volume: str) -> str:
    return (
        f"<domain type='test'><name>{name}</name><uuid>{uuidlib.uuid4()}</uuid>"
        "<memory unit='MiB'>64</memory><os><type>hvm</type></os><devices>"
        f"<disk type='volume'><source pool='{pool}' volume='{volume}'/>"
        "<target dev='vda'/></disk></devices></domain>"
    )


async def test_pool_and_job_events_heartbeat_and_restart(rabbitmq: None, tmp_path: Path) -> None:
    need_tools()
    (tmp_path / "images").mkdir()
    host = unique_host("stor")
    listener = open_bus(BUS_URL, src="test", settings=BusSettings(url=BUS_URL))
    await listener.connect()
    sub = await listener.subscribe(
        EVENTS_EXCHANGE, [f"{host}.pool.*.*", f"{host}.job.*.*", f"{host}.*.*"]
    )
    agent = make_agent(host, tmp_path)
    await agent.start()
    try:
        pools = agent.storage
        await pools.define(dir_pool_xml("p", tmp_path / "images" / "p"))
        await pools.start("p", build=True)
        await pools.set_autostart("p", True)
        src = await pools.create_volume("p", volume_xml("a.raw", 4 * MiB, format="raw"))
        job = await pools.clone_volume(
            "p", volume_xml("b.qcow2", None, format="qcow2"), "p", "a.raw"
        )
        await agent.jobs.wait(job.id, 60)
        inv = await agent.inventory()
        (pool,) = inv.pools
        assert pool.name == "p" and pool.state == "running" and pool.volumes == 2
        assert pool.capacity > pool.available > 0
        # a test-driver domain whose disk is a volume: resolved at start, leased while it runs
        ref = await agent.driver.define(domain_xml("vm", "p", "b.qcow2"))
        await agent.driver.start(ref.name)
        with pytest.raises(OperationInvalid, match="in use by domain"):
            await pools.delete_volume("p", "b.qcow2")
        await agent.driver.destroy(ref.name)
        await pools.delete_volume("p", "b.qcow2")
        await agent.driver.define(domain_xml("vm2", "p", "gone.qcow2"))
        with pytest.raises(NoStorageVol, match=r"'gone\.qcow2' not found in pool 'p'"):
            await agent.driver.start("vm2")
        assert src.path
        events = await collect_until(sub, "vm2")
    finally:
        await agent.stop()
    pool_events = [(e.body["event"], e.body["pool"]) for e in events if e.op == ops.EVENT_POOL]
    assert pool_events == [("defined", "p"), ("started", "p")]
    job_events = [e.body["event"] for e in events if e.op == ops.EVENT_JOB]
    assert job_events[0] == "started" and job_events[-1] == "completed"
    domain_events = [e.body["event"] for e in events if e.op == ops.EVENT_DOMAIN]
    assert domain_events[:4] == ["defined", "started", "stopped", "defined"]
    seqs = [e.body["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # one sequence for all
    # restarted: the pool is still there, so it stays active without a new event
    again = make_agent(host, tmp_path)
    await again.start()
    try:
        assert again.storage.get("p").active
        assert [v.name for v in again.storage.volumes("p")] == ["a.raw"]
    finally:
        await again.stop()
        await sub.close()
        await listener.close()
        await delete_queues(f"virtbus.agent.{host}")


async def test_a_restarted_agent_leases_the_volumes_of_running_domains_again(
    rabbitmq: None, tmp_path: Path
) -> None:
    """A domain found running at agent start holds its volumes again (the start reads the
    running domains' XML for that only when a pool is defined)."""
    need_tools()
    (tmp_path / "images").mkdir()
    host = unique_host("lease")
    driver = TestDriver()  # its domains outlive the first agent, as QEMUs do
    agent = make_agent(host, tmp_path, driver)
    await agent.start()
    try:
        await agent.storage.define(dir_pool_xml("p", tmp_path / "images" / "p"))
        await agent.storage.start("p", build=True)
        await agent.storage.set_autostart("p", True)
        await agent.storage.create_volume("p", volume_xml("a.raw", 4 * MiB, format="raw"))
        await driver.define(domain_xml("vm", "p", "a.raw"))
        await driver.start("vm")
    finally:
        await agent.stop()
    again = make_agent(host, tmp_path, driver)
    await again.start()
    try:
        with pytest.raises(OperationInvalid, match="in use by domain"):
            await again.storage.delete_volume("p", "a.raw")
        await driver.destroy("vm")  # the lease goes with the run
        await again.storage.delete_volume("p", "a.raw")
        assert again.storage.volumes("p") == []
    finally:
        await again.stop()
        await delete_queues(f"virtbus.agent.{host}")
