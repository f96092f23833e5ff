"""A fleet of N agents against one scheduler on the real RabbitMQ (issue 19, target 4).

N shipped :class:`~agent.service.AgentService` instances on the test driver, each with its
own call queue and consumer, hosted many to an event loop in ``--procs`` worker processes;
one real ``virtbus-scheduler`` process; all in a private vhost of the RabbitMQ at
127.0.0.1:5672, created and deleted by the bench. Each host runs ``--domains`` domains
(defined and started on its driver before its agent starts, as a host that reboots its
agent finds them) and heartbeats every ``--heartbeat`` seconds.

The broker's socket limit (``rabbitmqctl status``: 832 here) is below 1,000 connections,
so the agents of a worker share connections, ``--per-connection`` agents each: every agent
keeps its own channels (calls, confirms, fire-and-forget, its call queue's consumer), only
the TCP connection is shared. The transport is the shipped ``AmqpBus`` given a shared
connection instead of opening its own.

It reports:

- convergence after a cold start: the scheduler is started after every agent is up, and
  the clock runs from its start until ``scheduler.hosts`` lists all N up with their domain
  counts (``hosts``), and until every agent has answered the scheduler's ``domain.list``
  (``domains``: the view placement uses; the list carries each domain's anti-affinity
  groups) and, for a ``--baseline`` scheduler from before that, its ``domain.xml`` of each
  of its domains;
- the CPU share (of one core) at steady state over ``--window`` seconds, from
  /proc/PID/stat, of the scheduler, of the agents' worker processes and of the broker
  (beam.smp);
- the p50/p99 latency of ``scheduler.place`` and of ``scheduler.define`` (placement, a
  claim and the agent's define) through the bus under that load;
- the time to drain ``--drains`` hosts in parallel with the scheduler's limits at their
  defaults (``max_migrations`` 8, ``max_outbound`` 2), until every drain reports done.

Target: the scheduler stays under 25% of one core at steady state with 1,000 hosts.

    python -m tests.bench.fleet [--hosts 1000] [--domains 10] [--heartbeat 2] [--procs 4]
        [--window 30] [--drains 20] [--placements 200] [--profile FILE] [--force]

``--profile FILE`` runs the scheduler under cProfile (CPU time as the clock) and writes
its stats to FILE at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.bench.common import add_force, check_load, compile_tree

CLK_TCK = os.sysconf("SC_CLK_TCK")
GIB_KIB = 1 << 20
if TYPE_CHECKING:
    from virtbus.client import Client

XML = """<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>
<memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>"""


def host_name(i: int) -> str:
    return f"fleet{i:05d}"


# --- the worker: many agents in one event loop ------------------------------------------
async def worker(args: argparse.Namespace) -> None:
    """Run agents ``args.first`` .. ``args.first + args.count - 1``; print ``ready`` when
    all serve and, after a ``watch`` on stdin, ``converged T`` (monotonic) when each has
    answered the scheduler's domain.list (``watch xml``: and its domain.xml of each of its
    domains, as a scheduler that does not read the groups from the list asks); stop them all
    at SIGTERM."""
    import aio_pika

    from agent.service import AgentService
    from drivers.test import TestDriver, TestHostSpec
    from virtbus.aio import configure_logging
    from virtbus.bus.amqp import AmqpBus
    from virtbus.settings import AgentSettings, BusSettings

    configure_logging("WARNING")

    class SharedConnectionBus(AmqpBus):
        """The shipped AMQP transport on a connection shared with other agents: its own
        channels, queue and consumers; closing it closes only its channels."""

        def __init__(self, url: str, src: str, settings: BusSettings, shared: Any) -> None:
            super().__init__(url, src, settings)
            self._shared = shared
            self._checked = False

        async def connect(self) -> None:
            if self._connection is not None:
                return
            self._closing = False
            connection = self._shared
            self._connection = connection
            await self._open_channels(connection)
            connection.close_callbacks.add(self._on_connection_lost)
            connection.reconnect_callbacks.add(self._on_reconnected)
            self._connected = True

        async def _ensure_topology(self, connection: Any) -> None:
            if not getattr(connection, "_fleet_checked", False):  # once per connection
                await super()._ensure_topology(connection)
                connection._fleet_checked = True

        async def _abandon(self) -> None:
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.close_callbacks.discard(self._on_connection_lost)
                connection.reconnect_callbacks.discard(self._on_reconnected)
            for channel in (self._rpc, self._confirm, self._fire):
                if channel is not None and not channel.is_closed:
                    with contextlib.suppress(Exception):
                        await channel.close()
            self._rpc = self._confirm = self._fire = None
            self._rpc_underlay = self._confirm_underlay = self._fire_underlay = None

    base = Path(args.base)
    per = args.per_connection
    n_conn = math.ceil(args.count / per)
    connections = [
        await aio_pika.connect_robust(
            args.url, client_properties={"connection_name": f"fleet:{args.first}:{c}"}
        )
        for c in range(n_conn)
    ]
    xml_answers: dict[str, int] = {}
    listed: set[str] = set()
    agents: list[AgentService] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def observer(host: str) -> Any:
        def seen(op: str, _seconds: float, reply: dict[str, Any]) -> None:
            if reply.get("ok") is False:
                return
            if op == "domain.xml":
                xml_answers[host] = xml_answers.get(host, 0) + 1
            elif op == "domain.list":
                listed.add(host)

        return seen

    async def one(i: int) -> None:
        host = host_name(i)
        bus_settings = BusSettings(url=args.url, call_queue_type=args.queue_type)
        settings = AgentSettings(
            host=host, driver="test", state_dir=base / host, heartbeat_interval=args.heartbeat,
            metrics_interval=args.metrics_interval, bus=bus_settings,
        )  # fmt: skip
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        driver = TestDriver(TestHostSpec(cpus=32, memory_kib=128 * GIB_KIB))
        for d in range(args.domains):
            uuid = str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, f"{host}-{d}"))
            ref = await driver.define(XML.format(name=f"{host}-d{d}", uuid=uuid))
            await driver.start(ref.uuid)
        shared = connections[(i - args.first) // per]
        bus = SharedConnectionBus(args.url, host, bus_settings, shared)
        service = AgentService(settings, bus, driver, bus_settings)
        service.dispatcher.add_observer(observer(host))
        await service.start()
        agents.append(service)

    hosts = list(range(args.first, args.first + args.count))
    for start in range(0, len(hosts), 25):
        await asyncio.gather(*(one(i) for i in hosts[start : start + 25]))
    print(f"ready {len(agents)}", flush=True)

    names = {a.host for a in agents}

    need_xml = args.domains

    def answered() -> int:
        return sum(1 for h in names if h in listed and xml_answers.get(h, 0) >= need_xml)

    async def watch() -> None:
        while answered() < len(names):
            await asyncio.sleep(0.05)
        print(f"converged {time.monotonic():.6f}", flush=True)

    async def commands() -> None:
        """``watch``: count the next scheduler's calls from zero; ``count``: how many of
        this worker's agents it has asked for everything so far."""
        nonlocal need_xml
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        watcher: asyncio.Task[None] | None = None
        while line := (await reader.readline()).decode().strip():
            if line in ("watch", "watch xml"):
                need_xml = args.domains if line == "watch xml" else 0
                if watcher is not None:
                    watcher.cancel()
                xml_answers.clear()
                listed.clear()
                watcher = asyncio.create_task(watch())
            elif line == "count":
                print(f"count {answered()}", flush=True)
        if watcher is not None:
            watcher.cancel()

    reading = asyncio.create_task(commands())
    await stop.wait()
    reading.cancel()
    failed = [a.host for a in agents if a.failed.is_set()]
    for start in range(0, len(agents), 50):
        await asyncio.gather(*(a.stop() for a in agents[start : start + 50]))
    for connection in connections:
        with contextlib.suppress(Exception):
            await connection.close()
    print(f"stopped {len(agents)} failed {len(failed)}", flush=True)


# --- the parent: broker, scheduler, measurements ------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def beam_pid() -> int | None:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if (proc / "comm").read_text().strip() == "beam.smp":
                    return int(proc.name)
    return None


async def probe_connect(url: str) -> float:
    """How long a daemon's connect takes now (the scheduler's allows connect_timeout, 5 s)."""
    from virtbus.bus.amqp import AmqpBus

    bus = AmqpBus(url, "fleet-probe")
    s = time.monotonic()
    await bus.connect()
    took = time.monotonic() - s
    await bus.close()
    return took


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


async def start_worker(
    args: argparse.Namespace, url: str, base: Path, first: int, count: int
) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.bench.fleet", "--worker", "--url", url,
        "--base", str(base), "--first", str(first), "--count", str(count),
        "--domains", str(args.domains), "--heartbeat", str(args.heartbeat),
        "--per-connection", str(args.per_connection), "--queue-type", args.queue_type,
        "--metrics-interval", str(args.metrics_interval),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=open(base / f"worker-{first}.log", "ab"),  # noqa: SIM115
    )  # fmt: skip
    return proc


async def read_line(proc: asyncio.subprocess.Process, word: str, timeout: float) -> str:
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode()
    if not line.startswith(word):
        raise RuntimeError(f"expected {word!r} from a worker, got {line!r}")
    return line


async def start_scheduler(
    url: str, state: Path, profile: str | None, src: str | None = None
) -> tuple[asyncio.subprocess.Process, float]:
    """A real scheduler at its defaults (tests.procs' short timeouts are not wanted here);
    ``src``: the tree its code is imported from (PYTHONPATH), else this one."""
    from tests.procs import SCHEDULER, fresh_journal

    await fresh_journal(url)
    state.mkdir(parents=True, exist_ok=True)
    cmd = (
        [sys.executable, "-m", "tests.bench.cpu_profile", profile, "scheduler"]
        if profile
        else SCHEDULER
    )
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *cmd, "--bus", url, "--state-dir", str(state), "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE, stderr=open(state / "scheduler.log", "ab"),  # noqa: SIM115
        env={**os.environ, "PYTHONPATH": src} if src else None,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    if b"ready" not in line:
        raise RuntimeError(f"scheduler did not start: {line!r} (see {state}/scheduler.log)")
    return proc, started


async def run(args: argparse.Namespace, base: Path) -> None:
    from tests.procs import private_vhost, terminate
    from virtbus.client import Client

    vhost = f"virtbus-fleet-{os.getpid()}"
    n, d = args.hosts, args.domains
    with private_vhost(vhost) as url:
        # Topology first (exchanges, streams), so that workers do not race to declare it;
        # the bench's client connects before the fleet loads the broker.
        client = await Client.connect(url, src="fleet-bench", timeout=60)
        t0 = time.monotonic()
        per_proc = math.ceil(n / args.procs)
        workers = []
        try:
            for first in range(0, n, per_proc):
                count = min(per_proc, n - first)
                workers.append(await start_worker(args, url, base, first, count))
            for w in workers:
                await read_line(w, "ready", 60 + n)
            print(f"{n} agents ({d} domains each, heartbeat {args.heartbeat:g} s) up in"
                  f" {time.monotonic() - t0:.1f} s in {len(workers)} processes,"
                  f" {args.per_connection} agents per connection", flush=True)  # fmt: skip
            await asyncio.sleep(args.heartbeat)  # every agent has beaten at least once
            print(f"a new broker connection (and its topology check) takes"
                  f" {await probe_connect(url):.2f} s now", flush=True)  # fmt: skip
            if args.baseline:
                await measure(args, url, base, workers, client, args.baseline)
            await measure(args, url, base, workers, client)
        finally:
            await client.close()
            for w in workers:
                if w.returncode is None:
                    w.send_signal(signal.SIGTERM)
            for w in workers:
                with contextlib.suppress(TimeoutError, RuntimeError):
                    line = await read_line(w, "stopped", 120)
                    if "failed 0" not in line:
                        print(f"worker: {line.strip()}")
                await terminate(w, 30)


async def converged_hosts(workers: list[asyncio.subprocess.Process]) -> int:
    total = 0
    for w in workers:
        assert w.stdin is not None
        w.stdin.write(b"count\n")
        await w.stdin.drain()
        while not (line := await read_line(w, "", 30)).startswith("count"):
            pass  # a late "converged"
        total += int(line.split()[1])
    return total


async def measure(
    args: argparse.Namespace,
    url: str,
    base: Path,
    workers: list[asyncio.subprocess.Process],
    client: Client,
    src: str | None = None,
) -> None:
    """One scheduler, cold-started against the running fleet: (a) and (b), then (c) and
    (d) unless it is the ``src`` baseline."""
    from tests.procs import terminate

    n, d = args.hosts, args.domains
    label = f"baseline scheduler ({src})" if src else "scheduler (this tree)"
    print(f"--- {label}", flush=True)
    for w in workers:
        assert w.stdin is not None
        w.stdin.write(b"watch xml\n" if src else b"watch\n")
        await w.stdin.drain()
    state = base / ("scheduler-baseline" if src else "scheduler")
    sched_proc, started = await start_scheduler(url, state, None if src else args.profile, src)
    try:
        sched = client.scheduler
        # (a) convergence after a cold start
        converged = [asyncio.create_task(read_line(w, "converged", 3600)) for w in workers]
        hosts_at = None
        async with asyncio.timeout(args.converge_timeout):
            while hosts_at is None:
                rows = await sched.hosts()
                if sum(1 for h in rows if h.up and h.domains == d) >= n:
                    hosts_at = time.monotonic()
                else:
                    await asyncio.sleep(0.2)
        print(f"(a) convergence after a cold start: hosts {hosts_at - started:.2f} s"
              f" (scheduler.hosts lists all {n} up with {d} domains)", flush=True)  # fmt: skip
        left = args.converge_timeout - (time.monotonic() - started)
        done, pending = await asyncio.wait(converged, timeout=max(1.0, left))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            known = await converged_hosts(workers)
            print(f"    domains: NOT converged after {time.monotonic() - started:.0f} s:"
                  f" {n - known} of {n} hosts still have domains the scheduler did not"
                  f" get (its domain.list or domain.xml timed out and was not asked"
                  f" again)", flush=True)  # fmt: skip
        else:
            domains_at = max(float(t.result().split()[1]) for t in done)
            calls = f"and its {d} domain.xml answered: {n * (d + 1)}" if src else f"answered: {n}"
            print(f"    domains {domains_at - started:.2f} s (every host's domain.list {calls}"
                  f" calls)", flush=True)  # fmt: skip

        # (b) CPU at steady state
        await asyncio.sleep(min(5.0, 2 * args.heartbeat))
        beam = beam_pid()
        pids = {"scheduler": [sched_proc.pid], "agents": [w.pid for w in workers]}
        if beam is not None:
            pids["broker"] = [beam]
        before = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        w0 = time.monotonic()
        await asyncio.sleep(args.window)
        wall = time.monotonic() - w0
        after = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        share = {k: (after[k] - before[k]) / wall * 100 for k in pids}
        verdict = "met" if share["scheduler"] < 25 else "MISSED"
        one, five, _ = os.getloadavg()
        print(f"(b) CPU over {wall:.0f} s at steady state ({n / args.heartbeat:.0f}"
              f" heartbeats/s): scheduler {share['scheduler']:.1f}% of one core (target"
              f" < 25%: {verdict}); agents ({len(workers)} processes) {share['agents']:.1f}%;"
              f" broker (beam.smp) {share.get('broker', float('nan')):.1f}%;"
              f" load now {one:.2f} {five:.2f}", flush=True)  # fmt: skip

        if src:
            return
        # (c) placement latency through the bus
        probe = XML.format(name="fleet-probe", uuid=str(uuidlib.uuid4()))
        for _ in range(5):
            await sched.place(probe)
        lat = []
        for _ in range(args.placements):
            s = time.perf_counter()
            await sched.place(probe)
            lat.append(time.perf_counter() - s)
        defines = []
        for i in range(max(1, args.placements // 4)):
            xml = XML.format(name=f"fleet-new{i}", uuid=str(uuidlib.uuid4()))
            s = time.perf_counter()
            await sched.define(xml)
            defines.append(time.perf_counter() - s)
        print(f"(c) scheduler.place over {n} hosts: p50 {statistics.median(lat) * 1000:.2f} ms"
              f" p99 {pct(lat, 0.99):.2f} ms ({len(lat)} calls); scheduler.define (place,"
              f" claim, the agent's define): p50 {statistics.median(defines) * 1000:.2f} ms"
              f" p99 {pct(defines, 0.99):.2f} ms ({len(defines)} calls)",
              flush=True)  # fmt: skip

        # (d) drain hosts in parallel, the limits at their defaults
        if args.drains:
            step = max(1, n // args.drains)
            targets = [host_name(i * step) for i in range(min(args.drains, n))]
            s = time.monotonic()
            await asyncio.gather(*(sched.drain(h) for h in targets))
            async with asyncio.timeout(600):
                while True:
                    statuses = await asyncio.gather(*(sched.drain_status(h) for h in targets))
                    if all(st.done for st in statuses):
                        break
                    await asyncio.sleep(0.2)
            took = time.monotonic() - s
            moved = sum(len(st.domains) for st in statuses)
            bad = [st.host for st in statuses if not st.ok]
            print(f"(d) drain of {len(targets)} hosts in parallel ({moved} running domains,"
                  f" max_migrations 8, max_outbound 2): {took:.2f} s"
                  f" ({moved / took:.1f} migrations/s)"
                  + (f"; NOT ok: {bad}" if bad else "; all ok"), flush=True)  # fmt: skip
    finally:
        code = await terminate(sched_proc, 60)
        if code not in (None, 0):
            print(f"scheduler exited {code} (see {state}/scheduler.log)")
        if args.profile and not src:
            print_profile(args.profile)


def print_profile(path: str) -> None:
    import pstats

    stats = pstats.Stats(path)
    print(f"scheduler profile (CPU time, {path}), top 25 by own time:")
    stats.sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--domains", type=int, default=10, help="running domains per host")
    parser.add_argument("--heartbeat", type=float, default=2.0, help="heartbeat interval (s)")
    parser.add_argument("--procs", type=int, default=4, help="worker processes for the agents")
    parser.add_argument("--window", type=float, default=30.0, help="steady-state window (s)")
    parser.add_argument("--drains", type=int, default=20, help="hosts drained in parallel")
    parser.add_argument("--placements", type=int, default=200, help="scheduler.place calls")
    parser.add_argument("--per-connection", type=int, default=50,
                        help="agents sharing one broker connection")  # fmt: skip
    parser.add_argument("--queue-type", default="classic", choices=("quorum", "classic"),
                        help="the agents' call queues (bus.call_queue_type; quorum queues"
                        " hold file descriptors of the broker)")  # fmt: skip
    parser.add_argument("--metrics-interval", type=float, default=3600.0,
                        help="agents' metrics passes (s; long: metrics off)")  # fmt: skip
    parser.add_argument("--profile", help="run the scheduler under cProfile, stats here")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="first cold-start a scheduler imported from DIR (another"
        " checkout: before a change) against the same fleet: (a), (b)",
    )
    parser.add_argument(
        "--converge-timeout",
        type=float,
        default=300.0,
        help="give up waiting for convergence after this long (s)",
    )
    add_force(parser)
    # the worker's own options (the parent passes them)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(worker(args))
        return
    check_load(args.force)
    compile_tree()
    base = Path(tempfile.mkdtemp(prefix="virtbus-fleet-"))
    try:
        asyncio.run(run(args, base))
    except BaseException:
        for log in sorted(base.glob("worker-*.log")) + sorted(base.glob("scheduler/*.log")):
            tail = log.read_text(errors="replace").splitlines()[-5:]
            if tail:
                print(f"--- {log.name}:", *tail, sep="\n")
        raise
    finally:
        shutil.rmtree(base, ignore_errors=True)
    one, five, _ = os.getloadavg()
    print(f"load average at the end: {one:.2f} {five:.2f}")


if __name__ == "__main__":
    main()
