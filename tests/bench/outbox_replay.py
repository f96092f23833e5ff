"""Events per second through the agent's outbox over the real RabbitMQ, next to bare aio-pika.

- **replay**: an agent (test driver, in this process, the shipped AgentService) starts on a
  state dir whose outbox log holds ``-n`` unconfirmed events, as after an outage or a
  restart; timed from the start until the outbox is empty (every event confirmed);
- **live**: the same agent, ``-n`` events from the driver's sink at once;
- **bare**: aio-pika publishing the same bodies with publisher confirms, ``--window`` in
  flight (and one at a time), to the same exchange.

Each round also prints this process's CPU time per event (``time.process_time``), a figure
the neighbours on a shared machine disturb less than the rate; on the agent's side it
includes the subscriber, which runs in the same process and event loop.

A subscriber bound to the host's events counts what arrives: lost, duplicated, out of
order. Both ``event_publish_window`` values (``--window`` and 1, the old one round trip
per event) run, alternating round by round with the bare loop.

    .venv/bin/python -m tests.bench.outbox_replay [-n 20000] [--rounds 3] [--window 256]

Targets (issue 19): replay >= 10,000 events/s; >= 0.7x the bare confirmed-publish loop.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

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
        """One event, in O(1): the reader shares the agent's event loop, and a set of all
        the numbers rebuilt per event (O(n^2), ~10^8 steps a round of 20,000) was timed
        as the agent's."""
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


async def agent_round(n: int, window: int, replay: bool) -> tuple[float, str]:
    """Events/s and the verdict; the verdict ends with this process's CPU per event."""
    host = unique_host("outbox")
    with tempfile.TemporaryDirectory(prefix="vbob") as tmp:
        state = Path(tmp)
        if replay:
            await write_backlog(state, host, n)
        client = open_bus(BUS_URL, src="bench")
        await client.connect()
        sub = await client.subscribe(EVENTS_EXCHANGE, [f"{routing_word(host)}.#"])
        counter = Counter(n)

        async def read() -> None:
            async for env in sub:
                counter.add(int(env.body["seq"]))

        reader = asyncio.create_task(read())
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
                    service._on_driver_event(DriverEvent("bench", UUID, "suspended", "paused", {}))
            assert await service.outbox.flush(600), "the outbox did not empty"
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            await asyncio.wait_for(counter.done.wait(), 120)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await sub.close()
            await client.close()
            await service.stop()
            await delete_queues(f"virtbus.agent.{host}")
    return n / elapsed, f"{counter.verdict()}; CPU {cpu / n * 1e6:.0f} us/event"


async def bare_round(n: int, window: int) -> tuple[float, float]:
    """aio-pika, publisher confirms, ``window`` publishes in flight, same bodies and keys."""
    host = unique_host("bare")
    key = event_routing_key(host, "bench", "suspended")
    bodies = [encode(envelope(host, seq)) for seq in range(1, n + 1)]
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
        return n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1e6


async def main(n: int, rounds: int, window: int) -> int:
    figures: dict[str, list[float]] = {}
    for r in range(rounds):
        for label, coro in (
            (f"replay, window {window}", agent_round(n, window, True)),
            ("replay, window 1", agent_round(min(n, 5000), 1, True)),
            (f"live burst, window {window}", agent_round(n, window, False)),
        ):
            rate, verdict = await coro
            figures.setdefault(label, []).append(rate)
            print(f"round {r + 1} {label}: {rate:,.0f} events/s ({verdict})", flush=True)
        for w in (window, 1):
            rate, cpu = await bare_round(n if w > 1 else min(n, 5000), w)
            figures.setdefault(f"bare aio-pika, window {w}", []).append(rate)
            print(f"round {r + 1} bare aio-pika, window {w}: {rate:,.0f} events/s "
                  f"(CPU {cpu:.0f} us/event)", flush=True)  # fmt: skip
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
    add_force(parser)
    args = parser.parse_args()
    check_load(args.force)
    sys.exit(asyncio.run(main(args.n, args.rounds, args.window)))
