"""Events per second through the agent's outbox over the real RabbitMQ, next to bare aio-pika.

- **replay**: an agent (test driver, in this process, the shipped AgentService) starts on a
  state dir whose outbox log holds ``-n`` unconfirmed events, as after an outage or a
  restart; timed from the start until the outbox is empty (every event confirmed);
- **live**: the same agent, ``-n`` events from the driver's sink at once;
- **bare**: aio-pika publishing the same bodies with publisher confirms, ``--window`` in
  flight (and one at a time), to the same exchange.

A subscriber bound to the round's host counts what arrives: lost, duplicated, out of
order. It runs in a process of its own (``--count``), the same for the agent's rounds and
the bare ones, so both publishers have the broker deliver to a consumer and neither
shares its CPU or event loop with one (a subscriber in the agent's own loop was about a
fifth of the agent's CPU per replayed event, and the bare loop had none).

Each round also prints the publishing process's CPU time per event
(``time.process_time``: the agent or the bare loop, not the subscriber), a figure the
neighbours on a shared machine disturb less than the rate. Both ``event_publish_window``
values (``--window`` and 1, the old one round trip per event) run, alternating round by
round with the bare loop; ``--replay-only``: only the replay and the bare loop at
``--window``.

    .venv/bin/python -m tests.bench.outbox_replay [-n 20000] [--rounds 3] [--window 256]

Targets (issue 19): replay >= 10,000 events/s; >= 0.7x the bare confirmed-publish loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import aio_pika

from agent.outbox import EventOutbox
from agent.service import AgentService
from drivers.base import DriverEvent
from drivers.test import TestDriver
from tests.bench.common import add_force, check_load
from tests.procs import BUS_URL, delete_queues, unique_host
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import EVENTS_EXCHANGE
from virtbus.protocol import ops
from virtbus.protocol.codec import encode
from virtbus.protocol.envelope import Envelope, Kind
from virtbus.protocol.events import event_body, event_routing_key, routing_word
from virtbus.settings import AgentSettings, Backoff

UUID = "00000000-0000-0000-0000-000000000001"


def envelope(host: str, seq: int) -> Envelope:
    body = event_body(host=host, seq=seq, domain="bench", uuid=UUID, event="suspended",
                      detail="paused")  # fmt: skip
    return Envelope(kind=Kind.EVENT, op=ops.EVENT_DOMAIN, body=body, src=host)


async def write_backlog(state: Path, host: str, n: int) -> None:
    """An outbox log with ``n`` unconfirmed events, as an agent leaves it after an outage."""

    async def unreachable(_: Envelope) -> None:
        raise AssertionError("never published")

    box = EventOutbox(unreachable, path=state / "outbox" / "events.log", capacity=n,
                      retry=Backoff())  # fmt: skip
    await box.load()
    for _ in range(n):
        box.put(envelope(host, box.next_seq()))
    await box.save_unsent()


class Counter:
    """The host's events as a subscriber gets them: lost, duplicates, order."""

    def __init__(self, n: int) -> None:
        self.n, self.done = n, asyncio.Event()
        self.seqs: list[int] = []
        self.distinct: set[int] = set()

    def add(self, seq: int) -> None:
        """One event, in O(1) (a set of all the numbers rebuilt per event was O(n^2))."""
        self.seqs.append(seq)
        self.distinct.add(seq)
        if len(self.distinct) >= self.n:
            self.done.set()

    def verdict(self) -> str:
        got = set(self.seqs)
        lost = self.n - len(got & set(range(1, self.n + 1)))
        dups = len(self.seqs) - len(got)
        ordered = all(a < b for a, b in zip(self.seqs, self.seqs[1:], strict=False))
        return f"lost {lost}, duplicates {dups}, {'in order' if ordered else 'OUT OF ORDER'}"


async def count(host: str, n: int, timeout: float) -> None:
    """The subscriber process (``--count HOST N``): says ``ready`` once subscribed, then
    the verdict once ``n`` distinct events came (or ``timeout`` passed)."""
    client = open_bus(BUS_URL, src="bench-counter")
    await client.connect()
    sub = await client.subscribe(EVENTS_EXCHANGE, [f"{routing_word(host)}.#"])
    counter = Counter(n)

    async def read() -> None:
        async for env in sub:
            counter.add(int(env.body["seq"]))

    reader = asyncio.create_task(read())
    print("ready", flush=True)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(counter.done.wait(), timeout)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await sub.close()
        await client.close()
    print(json.dumps({"verdict": counter.verdict()}), flush=True)


class CounterProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def verdict(self) -> str:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 180)
        await self.proc.wait()
        return str(json.loads(line)["verdict"]) if line else "no verdict from the subscriber"


@contextlib.asynccontextmanager
async def counter_process(host: str, n: int) -> AsyncIterator[CounterProcess]:
    """The subscriber of a round, in a process of its own, subscribed once this yields."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.bench.outbox_replay", "--count", host, str(n),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert ready == b"ready\n", f"the subscriber did not start: {ready!r}"
        yield CounterProcess(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def agent_round(n: int, window: int, replay: bool) -> tuple[float, str]:
    """Events/s and the verdict; the verdict ends with this process's CPU per event."""
    host = unique_host("outbox")
    with tempfile.TemporaryDirectory(prefix="vbob") as tmp:
        state = Path(tmp)
        if replay:
            await write_backlog(state, host, n)
        async with counter_process(host, n) as counter:
            settings = AgentSettings(host=host, state_dir=state, heartbeat_interval=60,
                                     metrics_interval=3600, event_buffer=max(n, 100_000),
                                     event_publish_window=window)  # fmt: skip
            driver = TestDriver()
            service = AgentService(settings, open_bus(BUS_URL, src=host), driver)
            try:
                t0, c0 = time.perf_counter(), time.process_time()
                await service.start()
                if not replay:
                    t0, c0 = time.perf_counter(), time.process_time()
                    for _ in range(n):
                        event = DriverEvent("bench", UUID, "suspended", "paused", {})
                        service._on_driver_event(event)
                assert await service.outbox.flush(600), "the outbox did not empty"
                elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
                verdict = await counter.verdict()
            finally:
                await service.stop()
                await delete_queues(f"virtbus.agent.{host}")
    return n / elapsed, f"{verdict}; CPU {cpu / n * 1e6:.0f} us/event"


async def bare_round(n: int, window: int) -> tuple[float, str]:
    """aio-pika, publisher confirms, ``window`` publishes in flight, same bodies and keys;
    the same subscriber process as the agent's rounds counts them."""
    host = unique_host("bare")
    key = event_routing_key(host, "bench", "suspended")
    bodies = [encode(envelope(host, seq)) for seq in range(1, n + 1)]
    async with counter_process(host, n) as counter:
        conn = await aio_pika.connect(BUS_URL)
        async with conn:
            channel = await conn.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(EVENTS_EXCHANGE)
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(0, n, window):
                await asyncio.gather(*(
                    exchange.publish(aio_pika.Message(b, delivery_mode=2), routing_key=key)
                    for b in bodies[i : i + window]
                ))  # fmt: skip
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        verdict = await counter.verdict()
    return n / elapsed, f"{verdict}; CPU {cpu / n * 1e6:.0f} us/event"


async def main(n: int, rounds: int, window: int, replay_only: bool) -> int:
    figures: dict[str, list[float]] = {}
    for r in range(rounds):
        rounds_here: list[tuple[str, Coroutine[Any, Any, tuple[float, str]]]] = [
            (f"replay, window {window}", agent_round(n, window, True))
        ]
        if not replay_only:
            rounds_here += [
                ("replay, window 1", agent_round(min(n, 5000), 1, True)),
                (f"live burst, window {window}", agent_round(n, window, False)),
            ]
        for label, coro in rounds_here:
            rate, verdict = await coro
            figures.setdefault(label, []).append(rate)
            print(f"round {r + 1} {label}: {rate:,.0f} events/s ({verdict})", flush=True)
        for w in (window,) if replay_only else (window, 1):
            rate, verdict = await bare_round(n if w > 1 else min(n, 5000), w)
            figures.setdefault(f"bare aio-pika, window {w}", []).append(rate)
            print(f"round {r + 1} bare aio-pika, window {w}: {rate:,.0f} events/s ({verdict})",
                  flush=True)  # fmt: skip
    print(f"medians of {rounds} rounds, {n} events each (window 1: at most 5000):")
    for label, rates in figures.items():
        print(f"  {label:<28} {statistics.median(rates):>10,.0f} events/s")
    ours = statistics.median(figures[f"replay, window {window}"])
    bare = statistics.median(figures[f"bare aio-pika, window {window}"])
    print(f"replay / bare at the same window: {ours / bare:.2f}x (target >= 0.7); "
          f"replay target >= 10,000 events/s: {'met' if ours >= 10_000 else 'MISSED'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="events per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=256, help="event_publish_window")
    parser.add_argument("--replay-only", action="store_true",
                        help="only the replay and the bare loop at --window")  # fmt: skip
    parser.add_argument("--count", nargs=2, metavar=("HOST", "N"),
                        help="(internal) be a round's subscriber process")  # fmt: skip
    add_force(parser)
    args = parser.parse_args()
    if args.count:
        asyncio.run(count(args.count[0], int(args.count[1]), timeout=300))
        sys.exit(0)
    check_load(args.force)
    sys.exit(asyncio.run(main(args.n, args.rounds, args.window, args.replay_only)))
