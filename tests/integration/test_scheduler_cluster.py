"""The scheduler with real processes: 3 agents (test driver), virtbus-scheduler, the CLI.

Everything runs in a RabbitMQ vhost of its own, so the scheduler sees only these agents
(not those of other tests sharing the broker) and the scheduler queue is ours alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests import procs
from tests.procs import (
    AgentProc,
    agent_process,
    cli,
    event_listener,
    private_vhost,
    unique_host,
)
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import SCHEDULER_ROUTE
from virtbus.errors import InvalidArgument, NoDomainError, OperationTimeout, RetryableError
from virtbus.protocol import ops

pytestmark = pytest.mark.rabbitmq

VHOST = f"virtbus-sched-{os.getpid()}"
URL = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
XML = """<domain type='test'><name>{name}</name><memory unit='MiB'>{mem}</memory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type></os></domain>"""


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    """A private vhost for this module (created with rabbitmqctl, deleted afterwards)."""
    with private_vhost(VHOST) as url:
        assert url == URL
        yield url


def scheduler_process(
    state_dir: Path, *extra: str, bus: str = URL
) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
    """:func:`tests.procs.scheduler_process` on this module's vhost by default."""
    return procs.scheduler_process(state_dir, *extra, bus=bus)


async def vcli(*args: str, timeout: float = 60) -> Any:
    """``virtbus --json ARGS`` on the private vhost; the parsed output (must succeed)."""
    r = await cli("--json", *args, bus=URL, timeout=timeout)
    assert r.code == 0, (args, r.err)
    return r.json()


async def scheduler_call(op: Any, body: dict[str, Any], timeout: float = 10) -> Any:
    """One call to the scheduler over a bus of the test's own: the helpers below wait
    with it rather than spawning a CLI process for every poll (a process costs about a
    second of CPU on the loaded 2-core machine; the CLI itself is what the tests run)."""
    bus = open_bus(URL, src="sched-test", oneshot=True)
    await bus.connect()
    try:
        return await bus.call(SCHEDULER_ROUTE, op, body, timeout=timeout)
    finally:
        await bus.close()


async def wait_hosts(n: int, timeout: float = 15) -> list[dict[str, Any]]:
    """The scheduler's view once ``n`` hosts are up in it (heartbeats every 0.5 s: a
    poll, there is no change to wait on)."""
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(RetryableError):  # not active yet
                hosts = (await scheduler_call(ops.SCHEDULER_HOSTS, {}, timeout=5))["hosts"]
                if sum(h.get("up", False) for h in hosts) >= n:
                    return sorted(hosts, key=lambda h: h["host"])  # type: ignore[no-any-return]
            await asyncio.sleep(0.3)


STREAMING = ("progress",)  # the source streams (the phase after perform answered)


async def wait_migration(
    domain: str, timeout: float = 30, until: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The domain's latest migration record once it is terminal (or, ``until``, in one
    of these phases): long polls on the scheduler, answered as the record changes."""
    seen: dict[str, Any] | None = None
    async with asyncio.timeout(timeout):
        while True:
            query: dict[str, Any] = {"domain": domain, "wait": 5.0}
            if seen is not None:
                query["seen"] = seen
            try:
                seen = await scheduler_call(ops.SCHEDULER_MIGRATION, query)
            except NoDomainError:  # not known (yet): a restarted scheduler replays
                await asyncio.sleep(0.3)
                continue
            assert seen is not None
            if seen["state"] in ("completed", "failed", "cancelled") or seen["phase"] in until:
                return seen


async def placed(domain: str) -> list[tuple[str, str]]:
    return sorted(
        (d["host"], d["state"]) for d in await vcli("list", "--all") if d["name"] == domain
    )


@asynccontextmanager
async def agents(
    tmp: Path, n: int, *extra: str, driver: str = "test"
) -> AsyncIterator[list[AgentProc]]:
    async with AsyncExitStack() as stack:
        procs = []
        for i in range(n):
            host = unique_host(f"s{i}")
            d = tmp / host
            d.mkdir()
            procs.append(
                await stack.enter_async_context(
                    agent_process(host, d, *extra, driver=driver, bus=URL, keep_queue=True)
                )
            )
        yield procs


async def define_running(tmp: Path, name: str, host: str, mem: int = 128) -> None:
    f = tmp / f"{name}.xml"
    f.write_text(XML.format(name=name, mem=mem))
    await vcli("define", str(f), "--host", host)
    await vcli("start", name, "--host", host)


async def test_cluster_view_placement_and_migration_events(vhost: str, tmp_path: Path) -> None:
    async with (
        agents(tmp_path, 3, "--driver-option", "migration_time=1", "--label", "rack=r1") as ag,
        scheduler_process(tmp_path / "sched"),
    ):
        hosts = await wait_hosts(3)
        names = {a.host for a in ag}
        assert {h["host"] for h in hosts} == names
        assert all(h["labels"] == {"rack": "r1"} and not h["draining"] for h in hosts)
        text = await cli("hosts", bus=URL)
        assert "up" in text.out and "rack=r1" in text.out
        # define without --host: the scheduler places it
        f = tmp_path / "p1.xml"
        f.write_text(XML.format(name="p1", mem=128))
        r = await vcli("define", str(f))
        assert r["host"] in names and r["name"] == "p1"
        src = r["host"]
        await vcli("start", "p1", "--host", src)
        assert await placed("p1") == [(src, "running")]
        dst = sorted(names - {src})[0]
        async with event_listener("--domain", "p1", "--timeout", "8", bus=URL) as ev:
            r = await cli("migrate", "p1", "--to", dst, "--wait", bus=URL, timeout=30)
            assert r.code == 0, r.err
            assert "completed" in r.out and "active" in r.out  # progress was shown
            out, _ = await asyncio.wait_for(ev.communicate(), 15)
        events = [json.loads(line) for line in out.decode().splitlines()]
        lifecycle = {
            h: [
                (e["event"], e["detail"])
                for e in events
                if e["host"] == h and e["event"] != "migration"
            ]
            for h in (src, dst)
        }
        assert lifecycle[src] == [
            ("suspended", "migrated"),
            ("stopped", "migrated"),
            ("undefined", "removed"),
        ]
        assert lifecycle[dst] == [
            ("started", "migrated"),
            ("defined", "added"),
            ("resumed", "migrated"),
        ]
        progress = [e["data"] for e in events if e["event"] == "migration"]
        assert progress[-1]["status"] == "completed" and len(progress) >= 3
        assert await placed("p1") == [(dst, "running")]


async def test_failures_leave_the_guest_in_exactly_one_place(vhost: str, tmp_path: Path) -> None:
    # Every migration here ends early (cancelled, timed out, destination killed): a long
    # migration_time costs nothing and keeps the cancel and the kill mid-stream. The
    # rollback after the kill waits one step timeout for the dead destination: 3 s, not
    # the default 5 (the live agents' steps answer in well under a second).
    async with (
        agents(tmp_path, 2, "--driver-option", "migration_time=10") as ag,
        scheduler_process(tmp_path / "sched", "--step-timeout", "3", "--cleanup-timeout", "3"),
    ):
        a, b = ag
        await wait_hosts(2)
        await define_running(tmp_path, "f1", a.host)
        # cancel, once the source streams
        await vcli("migrate", "f1", "--to", b.host)
        assert (await wait_migration("f1", until=STREAMING))["phase"] == "progress"
        await vcli("migrate-cancel", "f1")
        assert (await wait_migration("f1"))["state"] == "cancelled"
        assert await placed("f1") == [(a.host, "running")]
        # timeout
        r = await cli(
            "migrate", "f1", "--to", b.host, "--timeout", "1", "--wait", bus=URL, timeout=30
        )
        assert r.code != 0 and "MIGRATE_FAILED" in r.err and "timed out" in r.err, r
        assert await placed("f1") == [(a.host, "running")]
        # the destination agent is killed mid-migration
        await vcli("migrate", "f1", "--to", b.host)
        assert (await wait_migration("f1", until=STREAMING))["phase"] == "progress"
        b.proc.kill()
        await b.proc.wait()
        rec = await wait_migration("f1")
        assert rec["state"] == "failed", rec
        assert await placed("f1") == [(a.host, "running")]


async def test_migration_params_the_agents_refuse_are_refused_at_submit(
    vhost: str, tmp_path: Path
) -> None:
    """Issue 11, item 12: the scheduler checks params with the agents' own check."""
    async with agents(tmp_path, 2) as ag, scheduler_process(tmp_path / "sched"):
        a, b = ag
        await wait_hosts(2)
        await define_running(tmp_path, "mp1", a.host)
        bad = [
            (["--bandwidth", "-1"], "bandwidth_mib_s"),
            (["--parallel", "-1"], "parallel"),
            (["--max-downtime", "0"], "max_downtime_ms"),
            (["--postcopy", "--parallel", "2"], "postcopy"),
        ]
        for flags, field in bad:
            r = await cli("migrate", "mp1", "--to", b.host, *flags, bus=URL)
            assert r.code == 1 and r.err.startswith("error: INVALID_ARG: "), (flags, r)
            assert field in r.err and len(r.err.strip().splitlines()) == 1, r.err
        bus = open_bus(URL, src="params-test")
        await bus.connect()
        try:
            # (unknown keys are ignored by design: an older peer serves a newer one)
            for params in ({"listen_address": "127.0.0.1:1,to=9"}, {"parallel": True},
                           {"max_downtime_ms": 2_000_001}):  # fmt: skip
                with pytest.raises(InvalidArgument, match="params"):
                    await bus.call(SCHEDULER_ROUTE, ops.SCHEDULER_MIGRATE,
                                   {"domain": "mp1", "to": b.host, "params": params})  # fmt: skip
            assert (await bus.call(SCHEDULER_ROUTE, ops.SCHEDULER_PING, {}, timeout=5))["active"]
        finally:
            await bus.close()
        assert await vcli("migrations") == []  # nothing was submitted
        assert await placed("mp1") == [(a.host, "running")]
        # and good params still migrate
        r = await cli("migrate", "mp1", "--to", b.host, "--bandwidth", "100", "--wait", bus=URL,
                      timeout=30)  # fmt: skip
        assert r.code == 0, r.err
        assert await placed("mp1") == [(b.host, "running")]


async def test_scheduler_killed_mid_migration_resolves_on_restart(
    vhost: str, tmp_path: Path
) -> None:
    async with agents(tmp_path, 2, "--driver-option", "migration_time=1.5") as ag:
        a, b = ag
        state = tmp_path / "sched"
        async with scheduler_process(state) as sched:
            await wait_hosts(2)
            await define_running(tmp_path, "k1", a.host)
            await vcli("migrate", "k1", "--to", b.host)
            assert (await wait_migration("k1", until=STREAMING))["phase"] == "progress"
            sched.kill()  # SIGKILL: no chance to clean up
            await sched.wait()
        journal = [json.loads(p.read_text()) for p in (state / "migrations").glob("*.json")]
        assert [r["phase"] for r in journal] in (["perform"], ["progress"])
        async with scheduler_process(state):
            rec = await wait_migration("k1")
            assert rec["state"] == "completed", rec
            assert await placed("k1") == [(b.host, "running")]
        assert list((state / "migrations").glob("*.json")) == []


async def test_drain_moves_five_guests_onto_two_others(vhost: str, tmp_path: Path) -> None:
    async with (
        agents(tmp_path, 3, "--driver-option", "migration_time=0.5") as ag,
        scheduler_process(tmp_path / "sched"),
    ):
        a, b, c = ag
        await wait_hosts(3)
        await asyncio.gather(*(define_running(tmp_path, f"dr{i}", a.host) for i in range(5)))
        r = await cli("drain", a.host, bus=URL, timeout=60)
        assert r.code == 0, r.err
        assert all(f"dr{i}: completed" in r.out for i in range(5)), r.out
        listing = await vcli("list", "--all")
        where = {d["name"]: d["host"] for d in listing if d["name"].startswith("dr")}
        assert set(where.values()) == {b.host, c.host}
        hosts = {h["host"]: h for h in await vcli("hosts")}
        assert hosts[a.host]["draining"]
        f = tmp_path / "new.xml"
        f.write_text(XML.format(name="new", mem=64))
        assert (await vcli("define", str(f)))["host"] != a.host
        await vcli("undrain", a.host)
        hosts = {h["host"]: h for h in await vcli("hosts")}
        assert not hosts[a.host]["draining"]


async def ping() -> str:
    bus = open_bus(URL, src="test")
    await bus.connect()
    try:
        return str(
            (await bus.call(SCHEDULER_ROUTE, ops.SCHEDULER_PING, {}, timeout=5))["scheduler"]
        )
    finally:
        await bus.close()


async def test_standby_takes_over(vhost: str, tmp_path: Path) -> None:
    async with agents(tmp_path, 2, "--driver-option", "migration_time=0.5") as ag:
        a, b = ag
        shared = tmp_path / "sched"  # both see the same journal (shared storage)
        async with scheduler_process(shared) as first:
            await wait_hosts(2)
            async with scheduler_process(shared) as second:
                await asyncio.sleep(1.0)
                assert await ping() == first.scheduler_id  # type: ignore[attr-defined]
                first.kill()
                await first.wait()
                async with asyncio.timeout(10):
                    while True:
                        try:
                            if await ping() == second.scheduler_id:  # type: ignore[attr-defined]
                                break
                        except OperationTimeout:
                            pass
                await define_running(tmp_path, "sb1", a.host)
                r = await cli("migrate", "sb1", "--to", b.host, "--wait", bus=URL, timeout=60)
                assert r.code == 0, r.err
                assert await placed("sb1") == [(b.host, "running")]
