"""The examples of docs/examples, run as users run them, against real daemons.

Each runs as a subprocess (``python docs/examples/X.py``) with ``VIRTBUS_BUS_URL`` set to a
RabbitMQ vhost of this module's own, against real ``virtbus-agent`` processes (test
driver) and, for the migration, a real ``virtbus-scheduler``. The README's client examples
must be these files, verbatim.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import agent_process, private_vhost, scheduler_process, unique_host
from virtbus.client import Client

pytestmark = pytest.mark.rabbitmq

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def bus_url() -> Iterator[str]:
    with private_vhost(f"virtbus-examples-{os.getpid()}") as url:
        yield url


@dataclass
class Ran:
    code: int
    out: str
    err: str


def example_env(bus: str, host: str) -> dict[str, str]:
    return {**os.environ, "VIRTBUS_BUS_URL": bus, "VIRTBUS_HOST": host}


async def run_example(name: str, *args: str, bus: str, host: str = "", timeout: float = 60) -> Ran:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / name),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=example_env(bus, host),
        cwd=ROOT,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return Ran(proc.returncode or 0, out.decode(), err.decode())


@asynccontextmanager
async def agents(tmp: Path, bus: str, n: int) -> AsyncIterator[list[str]]:
    async with AsyncExitStack() as stack:
        hosts = []
        for i in range(n):
            host = unique_host(f"ex{i}")
            state = tmp / host
            state.mkdir()
            await stack.enter_async_context(
                agent_process(
                    host, state, "--driver-option", "migration_time=1", bus=bus, keep_queue=True
                )
            )
            hosts.append(host)
        yield hosts


def test_the_readme_shows_the_example_files_verbatim() -> None:
    text = README.read_text(encoding="utf-8")
    shown = re.findall(r"<!-- example: (\S+) -->\n```python\n(.*?)```\n", text, re.DOTALL)
    assert {path for path, _ in shown} == {
        "docs/examples/quickstart.py",
        "docs/examples/quickstart_sync.py",
    }
    for path, block in shown:
        assert block == (ROOT / path).read_text(encoding="utf-8"), f"README's copy of {path}"
    for example in EXAMPLES.glob("*.py"):  # every example is at least named in the README
        assert f"docs/examples/{example.name}" in text, example.name


async def test_the_readme_quickstart_runs(bus_url: str, tmp_path: Path) -> None:
    async with agents(tmp_path, bus_url, 1) as (host,):
        ran = await run_example("quickstart.py", bus=bus_url, host=host)
    assert ran.code == 0, ran.err
    lines = ran.out.splitlines()
    assert lines[0] == "quickstart: paused (user)", lines
    assert re.fullmatch(r"uuid [0-9a-f-]{36}, 1 vCPU, 65536 KiB", lines[1]), lines
    events = [re.fullmatch(r"event #(\d+): (\w+) \((\w+)\)", line) for line in lines[2:7]]
    assert all(events), lines
    assert [(m[2], m[3]) for m in events if m] == [
        ("defined", "added"),
        ("started", "booted"),
        ("suspended", "paused"),
        ("stopped", "destroyed"),
        ("undefined", "removed"),
    ]
    seqs = [int(m[1]) for m in events if m]
    assert seqs == list(range(seqs[0], seqs[0] + 5))
    assert lines[7:] == ["gone: NO_DOMAIN"]


async def test_the_readme_sync_example_runs(bus_url: str, tmp_path: Path) -> None:
    async with agents(tmp_path, bus_url, 1) as (host,):
        ran = await run_example("quickstart_sync.py", bus=bus_url, host=host)
        async with await Client.connect(bus_url) as c:
            left = await c.host(host).domains()
    assert ran.code == 0, ran.err
    assert f"host {host}: test, 0 domains" in ran.out.splitlines(), ran.out
    assert "running" in ran.out.splitlines()
    assert re.search(r"^sync1 +running$", ran.out, re.MULTILINE), ran.out
    assert left == []  # it cleaned up after itself


async def test_the_event_subscriber_follows_and_replays(bus_url: str, tmp_path: Path) -> None:
    """Live: it is subscribed once it says "listening" and prints the quickstart's five
    events as JSON; with --since it replays the same ones from the history."""
    async with agents(tmp_path, bus_url, 1) as (host,):
        watcher = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLES / "watch_events.py"),
            "--host",
            host,
            "--count",
            "5",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=example_env(bus_url, host),
        )
        try:
            assert watcher.stderr is not None
            line = await asyncio.wait_for(watcher.stderr.readline(), 30)
            assert line == b"listening\n", line
            driven = await run_example("quickstart.py", bus=bus_url, host=host)
            assert driven.code == 0, driven.err
            out, err = await asyncio.wait_for(watcher.communicate(), 30)
        finally:
            if watcher.returncode is None:
                watcher.kill()
                await watcher.wait()
        assert watcher.returncode == 0, err
        live = [json.loads(line) for line in out.decode().splitlines()]
        replayed = await run_example(
            "watch_events.py", "--host", host, "--since", "0", "--count", "5", bus=bus_url
        )
    assert [(e["event"], e["detail"]) for e in live] == [
        ("defined", "added"),
        ("started", "booted"),
        ("suspended", "paused"),
        ("stopped", "destroyed"),
        ("undefined", "removed"),
    ]
    assert {e["host"] for e in live} == {host} and {e["domain"] for e in live} == {"quickstart"}
    assert set(live[0]) >= {"host", "seq", "domain", "uuid", "event", "detail", "data", "ts"}
    assert replayed.code == 0, replayed.err
    assert [json.loads(line) for line in replayed.out.splitlines()] == live


async def test_the_migration_script_defines_starts_and_migrates(
    bus_url: str, tmp_path: Path
) -> None:
    async with (
        agents(tmp_path, bus_url, 2) as hosts,
        scheduler_process(tmp_path / "sched", bus=bus_url),
        await Client.connect(bus_url) as c,
    ):
        async with asyncio.timeout(30):  # premise: the scheduler has heard both agents
            while sum(h.up for h in await c.scheduler.hosts() if h.host in hosts) < 2:
                await asyncio.sleep(0.2)
        ran = await run_example("migrate_guest.py", "--name", "mover", bus=bus_url)
        assert ran.code == 0, ran.out + ran.err
        left = {h: await c.host(h).domains() for h in hosts}
        (record,) = [r for r in await c.scheduler.migrations() if r.domain == "mover"]
    lines = ran.out.splitlines()
    source = re.fullmatch(r"defined mover on (\S+)", lines[0])
    assert source and source[1] in hosts, lines
    (destination,) = set(hosts) - {source[1]}
    assert re.fullmatch(rf"migration \S+: {source[1]} -> {destination}", lines[1]), lines
    phases = [line.split()[1] for line in lines[2:-1]]
    assert phases[-1] == "done" and lines[-2].split()[0] == "completed", lines
    assert lines[-1] == f"mover is running on {destination}", lines
    assert (record.source, record.destination, record.state) == (
        source[1],
        destination,
        "completed",
    )
    assert left == {source[1]: [], destination: []}  # it cleaned up on the destination
