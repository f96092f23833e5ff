"""The tour itself: the CLI's own commands, run in order against the demo's cluster.

Each step prints the ``virtbus`` command a user would type and then runs that command's
code (``virtbus.cli``) on the demo's bus, so what the demo shows is exactly what the CLI
prints. The event stream is printed as it arrives, in between.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from virtbus.cli import domain, host
from virtbus.cli.context import Context
from virtbus.cli.event import _line as event_line
from virtbus.cli.migrate import follow_migration
from virtbus.cli.output import table
from virtbus.cli.term import ProgressLine, Style
from virtbus.client.events import EventStream
from virtbus.errors import MigrateFailed, OperationTimeout
from virtbus.protocol.domain import StatsGroup
from virtbus.protocol.messages import DomainEvent

NAME = "demo"
STATS_GROUPS: list[StatsGroup] = ["state", "cpu-total", "balloon", "vcpu"]
STATE_NAMES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown",
               5: "shutoff", 6: "crashed", 7: "pmsuspended"}  # fmt: skip
HOSTS_WAIT = 20.0  # s for the scheduler to see both hosts


class Tour:
    def __init__(self, ctx: Context, hosts: tuple[str, str], xml_file: Path) -> None:
        self.ctx, self.hosts, self.xml_file = ctx, hosts, xml_file
        self.progress = ProgressLine()
        self.style = Style()
        self.events: list[DomainEvent] = []

    def say(self, text: str) -> None:
        self.progress.interrupt()
        print(text, flush=True)

    async def settle(self, quiet: float = 0.15, limit: float = 1.5) -> None:
        """Let the step's events arrive (the agents publish them after replying)."""
        deadline = time.monotonic() + limit
        seen = -1
        while len(self.events) != seen and time.monotonic() < deadline:
            seen = len(self.events)
            await asyncio.sleep(quiet)

    def step(self, command: str, why: str) -> None:
        self.say("")
        self.say(self.style(f"# {why}", "dim"))
        self.say(self.style(f"$ virtbus {command}", "bold", "cyan"))

    async def follow_events(self, events: EventStream) -> None:
        """Print every domain event of the demo's hosts as it arrives (not progress ticks)."""
        try:
            async for ev in events:
                if ev.host not in self.hosts:
                    continue
                self.events.append(ev)
                if ev.event != "migration":
                    self.say(self.style("  event: " + event_line(ev), "magenta"))
        finally:
            await events.aclose()

    async def wait_hosts(self) -> None:
        async with asyncio.timeout(HOSTS_WAIT):
            while True:
                up: set[str] = set()
                if await self.ctx.scheduler_answers():
                    up = {h.host for h in await self.ctx.client.scheduler.hosts() if h.up}
                if set(self.hosts) <= up:
                    return
                await asyncio.sleep(0.2)

    async def stats_table(self, where: str) -> None:
        """A compact ``virtbus domstats`` of the guest, as a table."""
        stats = await self.ctx.client.host(where).stats([NAME], STATS_GROUPS)
        rows = []
        for name, f in stats.items():
            rows.append(
                (
                    where,
                    name,
                    STATE_NAMES.get(int(f.get("state.state", 0)), "?"),
                    f"{float(f.get('cpu.time', 0)) / 1e9:.2f}",
                    f"{int(f.get('balloon.current', 0)) // 1024}",
                    f"{int(f['balloon.rss']) // 1024}" if "balloon.rss" in f else "-",
                    f.get("vcpu.current", "-"),
                )
            )
        headers = ["Host", "Domain", "State", "CPU time (s)", "Memory (MiB)", "RSS (MiB)", "vCPUs"]
        self.say(table(headers, rows))

    async def run(self) -> None:
        a, b = self.hosts
        ns = argparse.Namespace
        self.step("hosts", "two agents and a scheduler are up; the scheduler sees both hosts")
        await self.wait_hosts()
        await host.hosts(self.ctx, ns(wait=1.0))

        self.step(f"define {self.xml_file} --host {a}", "define a guest on the first host")
        await domain.define(self.ctx, ns(file=str(self.xml_file), host=a))
        await self.settle()
        for verb, why in (
            ("start", "boot it"),
            ("suspend", "pause its vCPUs"),
            ("resume", "and let them run again"),
        ):
            self.step(f"{verb} {NAME}", why)
            await domain.lifecycle(self.ctx, ns(verb=verb, domain=NAME, host=a))
            await self.settle()
        self.step(f"dominfo {NAME}", "what the agent knows of it (libvirt's dominfo)")
        await domain.dominfo(self.ctx, ns(domain=NAME, host=a))
        self.step(f"domstats {NAME}", "libvirt's domain statistics, fetched from the agent")
        await self.stats_table(a)

        self.step(f"migrate {NAME} --to {b} --wait", f"live-migrate it from {a} to {b}")
        started = time.monotonic()
        record = await self.ctx.client.scheduler.migrate(NAME, b)
        record = await follow_migration(self.ctx, record, self.progress)
        if record.state != "completed":
            raise MigrateFailed(f"migration {record.state}: {record.error}")
        self.say(
            self.style(f"  migrated in {time.monotonic() - started:.1f} s", "green")
            + f" (downtime {record.progress.get('downtime_ms', '-')} ms)"
        )
        await self.settle()
        self.step("list --all", "the cluster view: the guest now runs on the second host")
        await host.list_domains(self.ctx, ns(all=True, host=None))
        self.step(f"domstats {NAME}", f"statistics now come from {b}")
        await self.stats_table(b)

        for verb, why in (("destroy", "power it off"), ("undefine", "and forget it")):
            self.step(f"{verb} {NAME}", why)
            if verb == "undefine":
                await domain.undefine(self.ctx, ns(domain=NAME, host=b, remove_all_storage=False))
            else:
                await domain.lifecycle(self.ctx, ns(verb=verb, domain=NAME, host=b))
            await self.settle()
        counted = [e for e in self.events if e.event != "migration"]
        self.say("")
        self.say(self.style(f"Tour complete: {len(counted)} events seen.", "bold", "green"))


async def run_tour(ctx: Context, hosts: tuple[str, str], xml_file: Path) -> Tour:
    tour = Tour(ctx, hosts, xml_file)
    events = await ctx.client.subscribe()  # before the first command
    printer = asyncio.create_task(tour.follow_events(events), name="demo:events")
    try:
        await tour.run()
    except TimeoutError:
        raise OperationTimeout("the scheduler did not see both demo hosts in time") from None
    finally:
        printer.cancel()
        await asyncio.wait([printer])
    return tour
