"""Issue 18 part 4: the fault matrix. Each fault is driven under load, with real agent
processes (test driver) and real schedulers on the real broker (a vhost of this module's
own), and must end with no event lost, no call executed twice and every domain in exactly
one place.

The load, per fault: 5 ``domain.define`` calls a second (each a fresh name with its own
uuid, retried on a retryable error under its *own* call id) and 200 events a second (the
test driver's ``event_rate`` option: rtc_change from a running ``tick`` domain on each
host). What is counted:

- executed twice: a second ``defined`` event of a name (a redefinition of the same uuid
  is ``defined updated``, an event like the first), or any of a refused call;
- lost: a gap in a host's sequence numbers in the history stream, or a call answered
  without its ``defined`` event (events are read from the stream and deduplicated by
  ``(host, seq)``; duplicates are counted and printed);
- misplaced: a domain answered as defined that its host does not list, or another host
  does; a migrated domain not running on exactly one host. Not comparable (n/a) after an
  agent's kill -9: the test driver's domains live in its process and die with it.

Each test ends with a marker (``tick`` destroyed: its ``stopped`` event comes after every
earlier event of the host, the outbox publishing in order), so the checks are made on
everything the host published. The table (``-s``) is written to
``<pytest basetemp>/fault-matrix.txt`` too.

Faults: kill -9 of an agent between a define's reply and its ack (restarted; the
redelivered call is answered from the reply log); the scheduler killed in each migration
phase (``VIRTBUS_FAULT_SCHEDULER_EXIT_AT``, virtbus/faults.py; restarted, the migration
resolves); a RabbitMQ node of a 3-node cluster of the test's own stopped and started
(tests/rabbitnode.py); a network cut between an agent (and a client beside it) and the
broker (tests.faults.TcpProxy); a full state dir (a loop-mounted ext4 of the test's own).

The issue asks for 60 s of load; each fault here runs about 4-15 s of it (the suite's
30-minute budget): the duration per fault is cut, not the faults.
``VIRTBUS_FAULT_LOAD_SECONDS=60`` runs the issue's 60 s of calls per fault (about 12 min).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.faults import TcpProxy
from tests.integration.test_rabbit_cluster import queue_members
from tests.procs import agent_process, private_vhost, scheduler_process, unique_host
from tests.rabbitnode import RabbitCluster
from virtbus.bus.amqp import AmqpBus
from virtbus.bus.topology import SCHEDULER_ROUTE, call_queue_for
from virtbus.errors import RetryableError, VirtbusError
from virtbus.protocol import ops
from virtbus.protocol.envelope import new_id
from virtbus.settings import Backoff, BusSettings

pytestmark = pytest.mark.rabbitmq

VHOST = f"virtbus-faults-{os.getpid()}"
CALL_RATE = 5.0  # calls a second
EVENT_RATE = 200  # events a second, per host
ATTEMPT = 1.5  # s: one attempt's deadline (shorter than an agent's restart)
LINK_ATTEMPT = 8.0  # s: ... longer than a cut link's return (the first attempt still counts)
CALL_DEADLINE = 60.0  # s a call may take, retries included (a bound, not a figure)
#: the issue's 60 s of load per fault: VIRTBUS_FAULT_LOAD_SECONDS=60 (the suite runs ~4 s)
LOAD_SECONDS = float(os.environ.get("VIRTBUS_FAULT_LOAD_SECONDS", "0"))
HALF = round(LOAD_SECONDS * CALL_RATE / 2) if LOAD_SECONDS > 0 else 10
BEFORE = HALF  # calls answered before the fault
AFTER = HALF  # calls answered after the recovery, then the load stops
WAIT = 60.0  # s: a bound for anything awaited, not a figure (2 shared cores)
#: s a simulated migration streams: four of the seven scheduler kills wait for its end
MIGRATION_TIME = 0.5
PHASES = ("prepare", "perform", "progress", "finish", "confirm", "done", "rollback")
ROWS: list[Row] = []


def xml(name: str, mem_mib: int = 16) -> str:
    return (
        f"<domain type='test'><name>{name}</name><uuid>{uuid.uuid5(uuid.NAMESPACE_DNS, name)}"
        f"</uuid><memory unit='MiB'>{mem_mib}</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64'>hvm</type></os></domain>"
    )


@dataclass
class Row:
    fault: str
    calls: int = 0
    retried: int = 0
    refused: int = 0
    twice: int = 0
    published: int = 0
    lost: int = 0
    duplicates: int = 0
    gap: float = 0.0
    misplaced: int | None = 0

    def cells(self) -> list[str]:
        where = "n/a" if self.misplaced is None else str(self.misplaced)
        return [self.fault, str(self.calls), str(self.retried), str(self.refused), str(self.twice),
                str(self.published), str(self.lost), str(self.duplicates),
                f"{self.gap:.2f} s", where]  # fmt: skip


HEADER = ["fault", "calls made", "retried", "refused", "executed twice", "events published", "lost",
          "duplicates", "longest delivery gap", "domains misplaced"]  # fmt: skip


def table(rows: list[Row]) -> str:
    cells = [HEADER, *(r.cells() for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


@pytest.fixture(scope="module")
def vhost(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The module's vhost; at the end the matrix is printed and written to a file."""
    with private_vhost(VHOST) as url:
        yield url
    if ROWS:
        text = table(ROWS)
        out = tmp_path_factory.getbasetemp() / "fault-matrix.txt"
        out.write_text(text + "\n")
        print(f"\n\nfault matrix ({out}):\n{text}")


def client_bus(url: str, src: str) -> AmqpBus:
    settings = BusSettings(url=url, connect_timeout=5, reconnect=Backoff(initial=0.1, maximum=1))
    return AmqpBus(url, src, settings)


@contextlib.asynccontextmanager
async def connected(url: str, src: str) -> AsyncIterator[AmqpBus]:
    bus = client_bus(url, src)
    await bus.connect()
    try:
        yield bus
    finally:
        await bus.close()


async def until(
    check: Callable[[], bool], changed: asyncio.Event, what: str, within: float = WAIT
) -> None:
    """Wait (on ``changed``, set by whoever changes what ``check`` reads) until ``check``."""
    try:
        async with asyncio.timeout(within):
            while not check():
                changed.clear()
                await changed.wait()
    except TimeoutError:
        raise AssertionError(f"not within {within:g} s: {what}") from None


class Load:
    """``CALL_RATE`` defines a second over ``hosts``, each call retried on a retryable
    error under its own id: the client side of "no call executed twice"."""

    def __init__(
        self, bus: AmqpBus, hosts: list[str], prefix: str, attempt: float = ATTEMPT
    ) -> None:
        self.bus, self.hosts, self.prefix, self.attempt = bus, hosts, prefix, attempt
        self.answered: dict[str, str] = {}  # name -> the host that defined it
        self.refused: dict[str, str] = {}  # name -> the error code
        self.retried: Counter[str] = Counter()  # error code -> retries
        self.changed = asyncio.Event()
        self._calls: set[asyncio.Task[None]] = set()
        self._names = (f"{prefix}-{i}" for i in itertools.count())
        self._stop = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self.paused = False  # no new calls meanwhile (the rate's slots are skipped)

    @property
    def made(self) -> int:
        return len(self.answered) + len(self.refused) + len(self._calls)

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="fault-matrix:load")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in itertools.count():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, started + i / CALL_RATE - loop.time())):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            if self.paused:
                continue
            host = self.hosts[i % len(self.hosts)]
            task = asyncio.create_task(self._call(next(self._names), host))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
            self.changed.set()

    async def _call(self, name: str, host: str) -> None:
        call_id = new_id()
        deadline = time.monotonic() + CALL_DEADLINE
        try:
            while True:
                try:
                    await self.bus.call(
                        ops.agent_route(host), ops.DOMAIN_DEFINE, {"xml": xml(name)},
                        timeout=self.attempt, call_id=call_id,
                    )  # fmt: skip
                except RetryableError as exc:
                    if time.monotonic() > deadline:
                        raise
                    self.retried[exc.code] += 1
                    self.changed.set()
                    await asyncio.sleep(0.2)
                    continue
                except VirtbusError as exc:
                    self.refused[name] = f"{exc.code}: {exc}"
                else:
                    self.answered[name] = host
                return
        finally:
            self.changed.set()

    async def pause(self) -> None:
        """No new calls, and none in flight, until ``paused`` is False again."""
        self.paused = True
        async with asyncio.timeout(CALL_DEADLINE + WAIT):
            await asyncio.gather(*self._calls)

    async def answered_more(self, n: int) -> None:
        target = len(self.answered) + n
        await until(lambda: len(self.answered) >= target, self.changed, f"{n} more calls answered")

    async def stop(self) -> None:
        """No new calls; every call made is answered (or refused) first."""
        self._stop.set()
        if self._runner is not None:
            await self._runner
        async with asyncio.timeout(CALL_DEADLINE + WAIT):
            await asyncio.gather(*self._calls)


@dataclass
class HostEvents:
    by_seq: dict[int, dict[str, Any]] = field(default_factory=dict)
    deliveries: int = 0
    last: float | None = None  # when the last event arrived (monotonic)
    gap: float = 0.0  # the longest wait between two events


class Events:
    """The history stream, as a subscriber reads it, for the hosts of one test."""

    def __init__(self, hosts: list[str]) -> None:
        self.hosts = {h: HostEvents() for h in hosts}
        self.changed = asyncio.Event()

    def add(self, body: dict[str, Any]) -> None:
        seen = self.hosts.get(body.get("host", ""))
        if seen is None:
            return
        now = time.monotonic()
        if seen.last is not None:
            seen.gap = max(seen.gap, now - seen.last)
        seen.last = now
        seen.deliveries += 1
        seen.by_seq.setdefault(int(body["seq"]), body)
        self.changed.set()

    def has(self, host: str, domain: str, event: str, since: int = 0) -> bool:
        return any(
            seq > since and b.get("domain") == domain and b.get("event") == event
            for seq, b in self.hosts[host].by_seq.items()
        )

    async def wait(
        self, host: str, domain: str, event: str, since: int = 0, within: float = WAIT
    ) -> None:
        await until(lambda: self.has(host, domain, event, since), self.changed,
                    f"{host}: {domain} {event}", within)  # fmt: skip

    def last_seq(self, host: str) -> int:
        return max(self.hosts[host].by_seq, default=0)


@contextlib.asynccontextmanager
async def history(url: str, hosts: list[str]) -> AsyncIterator[Events]:
    events = Events(hosts)
    async with connected(url, "fault-matrix-events") as bus:
        sub = await bus.history("first")

        async def pump() -> None:
            async for env in sub:
                events.add(env.body)

        pumping = asyncio.create_task(pump(), name="fault-matrix:events")
        try:
            yield events
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumping
            await sub.close()


async def call(bus: AmqpBus, host: str, op: Any, body: dict[str, Any]) -> Any:
    return await bus.call(ops.agent_route(host), op, body, timeout=WAIT)


async def start_tick(bus: AmqpBus, host: str) -> None:
    """The host's event source: a running domain of the test driver's ``event_rate``."""
    await call(bus, host, ops.DOMAIN_DEFINE, {"xml": xml(f"tick-{host}")})
    await call(bus, host, ops.DOMAIN_START, {"domain": f"tick-{host}"})


async def end_marker(bus: AmqpBus, events: Events, host: str) -> None:
    """Stop the host's events with a marker, and wait until the stream has it."""
    since = events.last_seq(host)
    await call(bus, host, ops.DOMAIN_DESTROY, {"domain": f"tick-{host}"})
    # behind the marker: what the outbox and the reader still hold of the load's events
    # (minutes of them at 200/s on a loaded machine with VIRTBUS_FAULT_LOAD_SECONDS)
    await events.wait(host, f"tick-{host}", "stopped", since, WAIT + 3 * LOAD_SECONDS)


async def listings(bus: AmqpBus, hosts: list[str]) -> dict[str, dict[str, str]]:
    """host -> {domain: state}."""
    out = {}
    for host in hosts:
        result = await call(bus, host, ops.DOMAIN_LIST, {"all": True})
        out[host] = {d["name"]: d["state"] for d in result["domains"]}
    return out


def judge(
    fault: str,
    load: Load,
    events: Events,
    where: dict[str, dict[str, str]] | None,
    moved: dict[str, str] | None = None,
) -> Row:
    """The row of one fault; ``where``: the hosts' listings (None: not comparable, see the
    caller); ``moved``: migrated domain -> the one host it must run on."""
    defined: Counter[str] = Counter()
    row = Row(fault, calls=load.made, retried=sum(load.retried.values()), refused=len(load.refused))
    for seen in events.hosts.values():
        last = max(seen.by_seq, default=0)
        row.published += len(seen.by_seq)
        row.lost += len(set(range(1, last + 1)) - set(seen.by_seq))
        row.duplicates += seen.deliveries - len(seen.by_seq)
        row.gap = max(row.gap, seen.gap)
        for body in seen.by_seq.values():
            if body.get("event") == "defined" and body["domain"].startswith(load.prefix):
                defined[body["domain"]] += 1
    row.twice = sum(1 for n in load.answered if defined[n] > 1)
    row.twice += sum(1 for n in load.refused if defined[n] > 0)
    row.lost += sum(1 for n in load.answered if defined[n] == 0)
    if where is None:
        row.misplaced = None
    else:
        row.misplaced = 0
        for name, host in load.answered.items():
            holders = [h for h, doms in where.items() if name in doms]
            row.misplaced += holders != [host]
        for name, host in (moved or {}).items():
            holders = [h for h, doms in where.items() if name in doms]
            row.misplaced += holders != [host] or where[host][name] != "running"
    ROWS.append(row)
    print(f"\n{fault}: {row}; retries {dict(load.retried)}")
    return row


def assert_clean(row: Row) -> None:
    assert (row.twice, row.lost) == (0, 0), row
    assert row.misplaced in (0, None), row


def agent_options() -> tuple[str, ...]:
    return ("--driver-option", f"event_rate={EVENT_RATE}",
            "--driver-option", f"migration_time={MIGRATION_TIME}")  # fmt: skip


def proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


async def stopped(pid: int) -> None:
    """Until the process is stopped (SIGSTOP): another process's state, nothing to await."""
    async with asyncio.timeout(WAIT):
        while proc_state(pid) != "T":
            await asyncio.sleep(0.02)


async def test_agent_kill9_under_load(vhost: str, tmp_path: Path) -> None:
    host = unique_host("fk")
    state = tmp_path / host
    state.mkdir()
    log = tmp_path / f"agent-{host}.log"
    # the agent stops itself after a define's reply is recorded, before its ack: kill -9
    # there, and RabbitMQ redelivers an executed call (the tick's define is the first, the
    # load's BEFORE next, then "held", made while the load pauses, so it is that call)
    fault = {"VIRTBUS_FAULT_STOP_BEFORE_ACK": f"domain.define@{BEFORE + 2}"}
    async with history(vhost, [host]) as events, connected(vhost, "fault-matrix") as bus:
        load = Load(bus, [host], "k")
        async with agent_process(host, state, *agent_options(), bus=vhost, keep_queue=True,
                                 log_dir=tmp_path, env=fault) as first:  # fmt: skip
            await start_tick(bus, host)
            load.start()
            await load.answered_more(BEFORE)
            await load.pause()
            # a deadline that outlives the restart: its redelivery still counts
            await bus.call(ops.agent_route(host), ops.DOMAIN_DEFINE, {"xml": xml("k-held")},
                           timeout=WAIT)  # fmt: skip
            load.answered["k-held"] = host
            await stopped(first.proc.pid)
            load.paused = False
            # the calls made meanwhile time out and are retried under their ids
            await until(lambda: sum(load.retried.values()) >= 2, load.changed, "retries")
            first.proc.kill()  # kill -9
            await first.proc.wait()
        mark = log.stat().st_size
        async with agent_process(host, state, *agent_options(), bus=vhost, log_dir=tmp_path):
            # the test driver keeps its domains in memory: the killed agent's are gone
            # with it, so the new agent gets a tick of its own (events, the end marker)
            await start_tick(bus, host)
            await load.answered_more(AFTER)
            await load.stop()
            await end_marker(bus, events, host)
            row = judge("agent kill -9", load, events, None)
    assert_clean(row)
    assert load.retried["OPERATION_TIMEOUT"] >= 1, load.retried  # the premises
    assert b"(domain.define) redelivered: answering from memory" in log.read_bytes()[mark:]


async def test_network_cut_between_agent_and_broker(vhost: str, tmp_path: Path) -> None:
    host = unique_host("fn")
    state = tmp_path / host
    state.mkdir()
    proxy = TcpProxy()
    await proxy.start()
    try:
        async with (
            history(vhost, [host]) as events,
            connected(vhost, "fault-matrix") as bus,
            # the load's client is on the agent's side of the cut: its calls in flight
            # fail (BUS_UNAVAILABLE) and are retried while the first attempts still count
            connected(proxy.url() + VHOST, "fault-matrix-near") as near,
            agent_process(host, state, *agent_options(), bus=proxy.url() + VHOST,
                          log_dir=tmp_path),
        ):  # fmt: skip
            load = Load(near, [host], "n", attempt=LINK_ATTEMPT)
            await start_tick(bus, host)
            load.start()
            await load.answered_more(BEFORE)
            proxy.cut()
            cut_at = events.last_seq(host)
            await until(lambda: sum(load.retried.values()) >= 10, load.changed, "retries")
            proxy.restore()
            await load.answered_more(AFTER)
            await load.stop()
            await end_marker(bus, events, host)
            # the premise: events were made while the link was cut, and came later
            assert events.last_seq(host) > cut_at
            row = judge("network cut agent-broker", load, events, await listings(bus, [host]))
    finally:
        await proxy.close()
    assert_clean(row)


@pytest.fixture
def loop_fs() -> Iterator[Path]:
    """A 16 MiB ext4 on a loop device of this test's own (a file under a temp dir),
    mounted in a temp dir; unmounted, detached and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="virtbus-fullfs-"))
    image, mount = root / "fs.img", root / "mnt"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(16 << 20)

    def run(*args: str) -> str:
        return subprocess.run(args, check=True, capture_output=True, text=True).stdout

    run("mkfs.ext4", "-q", "-m", "0", str(image))
    device = run("losetup", "--find", "--show", str(image)).strip()
    try:
        run("mount", device, str(mount))
        try:
            yield mount
        finally:
            run("umount", str(mount))
    finally:
        run("losetup", "-d", device)
        image.unlink()
        mount.rmdir()
        root.rmdir()


def fill(path: Path) -> None:
    """Write ``path`` until the file system has not one byte left."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"x" * chunk)


async def test_full_state_disk_refuses_new_work_and_loses_nothing(
    vhost: str, tmp_path: Path, loop_fs: Path
) -> None:
    host = unique_host("fd")
    state = loop_fs / "state"
    state.mkdir()
    async with (
        history(vhost, [host]) as events,
        connected(vhost, "fault-matrix") as bus,
        agent_process(host, state, *agent_options(), bus=vhost, log_dir=tmp_path),
    ):
        load = Load(bus, [host], "f")
        await start_tick(bus, host)
        load.start()
        await load.answered_more(BEFORE)
        await asyncio.to_thread(fill, loop_fs / "filler")
        await until(lambda: len(load.refused) >= 3, load.changed, "calls refused")
        os.unlink(loop_fs / "filler")
        await load.answered_more(AFTER)  # it serves again by itself
        await load.stop()
        await end_marker(bus, events, host)
        codes = {r.split(":", 1)[0] for r in load.refused.values()}
        assert codes == {"OPERATION_FAILED"}, load.refused
        assert all("cannot be written" in r for r in load.refused.values()), load.refused
        row = judge("state disk full", load, events, await listings(bus, [host]))
    assert_clean(row)


async def scheduler_call(bus: AmqpBus, op: Any, body: dict[str, Any]) -> Any:
    return await bus.call(SCHEDULER_ROUTE, op, body, timeout=WAIT)


async def hosts_up(bus: AmqpBus, hosts: list[str]) -> None:
    async with asyncio.timeout(WAIT):
        while True:
            with contextlib.suppress(RetryableError):
                view = await scheduler_call(bus, ops.SCHEDULER_HOSTS, {})
                if {h["host"] for h in view["hosts"] if h["up"]} >= set(hosts):
                    return
            await asyncio.sleep(0.3)  # heartbeats every 0.5 s: nothing to wait on


async def resolved(bus: AmqpBus, domain: str) -> dict[str, Any]:
    """The migration's record once it is terminal (long polls on the scheduler)."""
    seen: dict[str, Any] | None = None
    async with asyncio.timeout(WAIT):
        while True:
            query: dict[str, Any] = {"domain": domain, "wait": 5.0}
            if seen is not None:
                query["seen"] = seen
            with contextlib.suppress(RetryableError):
                seen = await scheduler_call(bus, ops.SCHEDULER_MIGRATION, query)
                if seen["state"] in ("completed", "failed", "cancelled"):
                    return seen


async def test_scheduler_killed_in_each_migration_phase(vhost: str, tmp_path: Path) -> None:
    a, b = unique_host("fsa"), unique_host("fsb")
    for h in (a, b):
        (tmp_path / h).mkdir()
    moved: dict[str, str] = {}
    async with (
        history(vhost, [a, b]) as events,
        connected(vhost, "fault-matrix") as bus,
        agent_process(a, tmp_path / a, *agent_options(), bus=vhost, log_dir=tmp_path),
        agent_process(b, tmp_path / b, *agent_options(), bus=vhost, log_dir=tmp_path),
    ):
        load = Load(bus, [a, b], "s")
        for h in (a, b):
            await start_tick(bus, h)
        load.start()
        outcomes = {}
        for phase in PHASES:
            dom = f"m-{phase}"
            await call(bus, a, ops.DOMAIN_DEFINE, {"xml": xml(dom)})
            await call(bus, a, ops.DOMAIN_START, {"domain": dom})
            state = tmp_path / f"sched-{phase}"
            fault = {"VIRTBUS_FAULT_SCHEDULER_EXIT_AT": phase}
            async with scheduler_process(state, bus=vhost, env=fault) as sched:
                await hosts_up(bus, [a, b])
                request: dict[str, Any] = {"domain": dom, "to": b}
                if phase == "rollback":  # a migration that times out (mid-stream) rolls back
                    request["timeout"] = MIGRATION_TIME / 2
                await scheduler_call(bus, ops.SCHEDULER_MIGRATE, request)
                assert await asyncio.wait_for(sched.wait(), WAIT) == 137  # it died there
            async with scheduler_process(state, bus=vhost, new_cluster=False):
                record = await resolved(bus, dom)
            outcomes[phase] = record["state"]
            moved[dom] = b if record["state"] == "completed" else a
            await load.answered_more(1)
        if LOAD_SECONDS > 0:  # the rest of the load's calls, after the seven kills
            await load.answered_more(max(0, BEFORE + AFTER - len(PHASES)))
        await load.stop()
        for h in (a, b):
            await end_marker(bus, events, h)
        print(f"\nmigrations after a scheduler kill, by phase: {outcomes}")
        row = judge("scheduler kill, 7 phases", load, events, await listings(bus, [a, b]),
                    moved)  # fmt: skip
    assert_clean(row)
    # before ``perform`` nothing was streamed: rolled back; from ``progress`` on: forward
    # (``perform`` is journaled before its step: the source never streamed; ``progress``
    # is entered once the source streams, so the source's status sends it forward)
    assert all(outcomes[p] == "failed" for p in ("prepare", "perform", "rollback")), outcomes
    forward = ("progress", "finish", "confirm", "done")
    assert all(outcomes[p] == "completed" for p in forward), outcomes
    assert set(outcomes) == set(PHASES), outcomes


@pytest.mark.asyncio(loop_scope="session")  # the shared cluster's (conftest.py)
async def test_a_broker_node_stopped_and_started(tmp_path: Path, cluster: RabbitCluster) -> None:
    """Three nodes of the tests' own (shared with test_rabbit_cluster.py); the agent on
    node 1 (its call queue's leader, and the first node of its URL), the load's client on
    node 2, the reader on node 3."""
    host = unique_host("fb")
    state = tmp_path / host
    state.mkdir()
    n1, n2, n3 = cluster.nodes
    async with (
        history(cluster.url_from(n3), [host]) as events,
        connected(cluster.url_from(n2), "fault-matrix") as bus,
        agent_process(host, state, *agent_options(), bus=cluster.url_from(n1),
                      log_dir=tmp_path),
    ):  # fmt: skip
        queue = call_queue_for(ops.agent_route(host)).name
        kind, leader, _members = await queue_members(cluster, queue)
        assert (kind, leader) == ("quorum", n1.name)  # the premise
        load = Load(bus, [host], "b")
        await start_tick(bus, host)
        load.start()
        await load.answered_more(BEFORE)
        cut_at = events.last_seq(host)
        await n1.stop_app()  # its connections go; the queue elects another leader
        await load.answered_more(AFTER)  # served through the other nodes
        await n1.start_app()
        await load.answered_more(AFTER)
        await load.stop()
        await end_marker(bus, events, host)
        assert events.last_seq(host) > cut_at
        row = judge("broker node stop/start", load, events, await listings(bus, [host]))
        _kind, leader, _members = await queue_members(cluster, queue)
    assert_clean(row)
    assert leader != n1.name  # the agent moved with its queue's leader
    assert b"bus: the next attempt goes to" in (tmp_path / f"agent-{host}.log").read_bytes()
