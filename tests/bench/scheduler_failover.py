"""Scheduler failover with migrations in flight (issue 18's benchmark; target ≤ 5 s).

Two agents on the test driver (each migration takes ``--migration-time`` seconds on the
agents), an active scheduler and a standby, each with a state dir of its own (the journal
is on the bus, nothing is shared on disk), all in a private vhost of the real RabbitMQ.
Each round defines N running domains on one host, asks for N migrations to the other,
waits until every one is past ``prepare``, then kills the active scheduler with SIGKILL
and measures, from the kill:

- ``takeover``: until the standby answers ``scheduler.ping`` as the active one;
- ``resolved``: until the standby reports every one of the N migrations finished;
- ``left``: what the agents still had to do at the kill (``migration-time`` minus the
  time since the last migration started), the part of ``resolved`` that is not failover.

Every domain must then be in exactly one place, running on the destination. Rounds move
the domains back and forth; each round starts a fresh pair of schedulers.

    python -m tests.bench.scheduler_failover [-n 10] [--rounds 3] [--migration-time 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from tests.bench.common import add_force, check_load
from tests.procs import agent_process, fresh_journal, private_vhost, scheduler_process, unique_host
from virtbus.client import Client
from virtbus.errors import VirtbusError
from virtbus.protocol import ops
from virtbus.protocol.migration import MigrationDomain

BIN = Path(sys.executable).parent
VHOST = f"virtbus-failover-{os.getpid()}"
URL = f"amqp://guest:guest@127.0.0.1:5672/{VHOST}"
XML = """<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type></os></domain>"""
TERMINAL = ("completed", "failed", "cancelled")


def scheduler(state: Path, n: int) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
    """A scheduler that admits all ``n`` migrations at once; the journal on the bus is kept
    (the standby must find what the active one wrote)."""
    limits = ("--max-migrations", str(n), "--max-outbound", str(n), "--cpu-overcommit", "64")
    return scheduler_process(state, "--step-timeout", "10", *limits, bus=URL, new_cluster=False)


async def wait_for(what: str, check: object, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while not await check():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def one_round(
    client: Client, base: Path, src: str, dst: str, names: list[str], migration_time: float,
    n: int, rnd: int,
) -> dict[str, float]:  # fmt: skip
    sched = client.scheduler
    async with (
        scheduler(base / f"a{rnd}", n) as active,
        scheduler(base / f"b{rnd}", n) as standby,
    ):
        active_id, standby_id = active.scheduler_id, standby.scheduler_id  # type: ignore[attr-defined]

        async def is_active(sid: str) -> bool:
            with contextlib.suppress(VirtbusError):
                return (await sched.ping(timeout=1)).scheduler == sid
            return False

        async def hosts_up() -> bool:
            return sum(h.up for h in await sched.hosts()) >= 2

        await wait_for("active", lambda: is_active(active_id))
        await wait_for("hosts", hosts_up)
        await asyncio.gather(*(sched.migrate(name, dst) for name in names))

        async def performing() -> bool:
            """The source streams every one: its perform was journaled (write-ahead)
            before the scheduler asked for it. (The scheduler's own view moves to perform
            before that entry is confirmed: a kill then rolls the migration back.)"""
            for name in names:
                status = await client.agent(src, ops.MIGRATION_STATUS,
                                            MigrationDomain(domain=name))  # fmt: skip
                if status.status not in ("setup", "active"):
                    return False
            return True

        await wait_for("perform", performing)
        started = max(r.started or r.created for r in await sched.migrations() if r.domain in names)
        active.kill()
        killed = time.monotonic()
        left = max(0.0, migration_time - (time.time() - started))
        await active.wait()
        await wait_for("takeover", lambda: is_active(standby_id))
        takeover = time.monotonic() - killed

        async def all_resolved() -> bool:
            with contextlib.suppress(VirtbusError, TimeoutError):
                async with asyncio.timeout(2):
                    recs = [r for r in await sched.migrations() if r.domain in names]
                latest = {r.domain: r for r in sorted(recs, key=lambda r: r.created)}
                return len(latest) == n and all(r.state.value in TERMINAL for r in latest.values())
            return False

        await wait_for("resolved", all_resolved)
        resolved = time.monotonic() - killed
        recs = {r.domain: r for r in sorted(await sched.migrations(), key=lambda r: r.created)}
        states = sorted({r.state.value for r in recs.values() if r.domain in names})
        domains, _ = await sched.domains(all=True)
        where = {}
        for d in domains:
            if d.name in names:
                assert d.name not in where, f"{d.name} is on two hosts"
                where[d.name] = (d.host, d.state.value)
        errors = {r.domain: r.error for r in recs.values() if r.state.value != "completed"}
        assert where == {name: (dst, "running") for name in names}, (where, states, errors)
    return {"takeover": takeover, "resolved": resolved, "left": left}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10, help="migrations in flight")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--migration-time", type=float, default=2.0)
    add_force(parser)
    args = parser.parse_args()
    check_load(args.force)
    with private_vhost(VHOST):
        await fresh_journal(URL)
        with tempfile.TemporaryDirectory(prefix="failover") as tmp:
            base = Path(tmp)
            async with contextlib.AsyncExitStack() as stack:
                hosts = []
                for i in range(2):
                    host = unique_host(f"fo{i}")
                    (base / host).mkdir()
                    opt = f"migration_time={args.migration_time}"
                    await stack.enter_async_context(agent_process(
                        host, base / host, "--driver-option", opt, "--cpu-overcommit", "64",
                        bus=URL, keep_queue=True,
                    ))  # fmt: skip
                    hosts.append(host)
                client = await Client.connect(URL, src="bench")
                stack.push_async_callback(client.close)
                names = [f"fo{i}" for i in range(args.n)]
                for name in names:
                    f = base / f"{name}.xml"
                    f.write_text(XML.format(name=name))
                    dom = await client.host(hosts[0]).define(f.read_text())
                    await dom.start()
                results = []
                for rnd in range(args.rounds):
                    src, dst = hosts[rnd % 2], hosts[(rnd + 1) % 2]
                    r = await one_round(client, base, src, dst, names, args.migration_time,
                                        args.n, rnd)  # fmt: skip
                    results.append(r)
                    print(f"round {rnd + 1}: takeover {r['takeover']:.2f} s, all {args.n}"
                          f" resolved {r['resolved']:.2f} s after the kill (agents still had"
                          f" {r['left']:.2f} s to go)", flush=True)  # fmt: skip
                for name in names:
                    with contextlib.suppress(VirtbusError):
                        await client.host(hosts[args.rounds % 2]).domain(name).destroy()
    med = {k: statistics.median(r[k] for r in results) for k in ("takeover", "resolved", "left")}
    print(f"median of {args.rounds}: takeover {med['takeover']:.2f} s, resolved"
          f" {med['resolved']:.2f} s (target ≤ 5 s), agents' remaining work"
          f" {med['left']:.2f} s")  # fmt: skip
    check_load(True)


if __name__ == "__main__":
    asyncio.run(main())
