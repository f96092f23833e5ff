"""The outbox pipelines its publisher confirms: a window of events is on the wire before the
first confirm is awaited, in order; a failure inside a window loses nothing.

The broker here is a stand-in whose confirms arrive only when the test releases them, so
the tests can see how many publishes are in flight without timing anything (the real
broker: tests/integration/test_outbox_pipeline_amqp.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.outbox import EventOutbox
from virtbus.errors import BusUnavailable, ProtocolError
from virtbus.protocol.envelope import Envelope, Kind
from virtbus.settings import Backoff

FAST = Backoff(initial=0.01, maximum=0.02)


def event(seq: int) -> Envelope:
    return Envelope(Kind.EVENT, "domain.event", {"seq": seq, "domain": "d", "event": "started"})


class HeldBroker:
    """Publishes are recorded in the order they are made; each confirm waits for ``release``."""

    def __init__(self) -> None:
        self.sent: list[int] = []  # publish order, as the channel would write it
        self.confirmed: list[int] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.gate = asyncio.Event()
        self.fail_once: dict[int, Exception] = {}
        self.grown = asyncio.Event()

    async def publish(self, env: Envelope) -> None:
        seq = env.body["seq"]
        if seq in self.fail_once:
            raise self.fail_once.pop(seq)
        self.sent.append(seq)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.grown.set()
        try:
            await self.gate.wait()
        finally:
            self.in_flight -= 1
        self.confirmed.append(seq)


async def run_box(box: EventOutbox) -> asyncio.Task[None]:
    await box.load()
    return asyncio.create_task(box.run())


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_window_of_events_is_in_flight_before_any_confirm(tmp_path: Path) -> None:
    broker = HeldBroker()
    box = EventOutbox(broker.publish, path=tmp_path / "e.log", capacity=1000, retry=FAST,
                      window=64)  # fmt: skip
    runner = await run_box(box)
    for _ in range(200):
        box.put(event(box.next_seq()))
    while broker.in_flight < 64:  # wait for the window to fill (each publish signals)
        broker.grown.clear()
        await broker.grown.wait()
    assert broker.confirmed == [] and broker.sent == list(range(1, 65))
    broker.gate.set()
    assert await box.flush(5)
    await stop(runner)
    assert broker.most_in_flight == 64
    assert broker.sent == list(range(1, 201)) == broker.confirmed
    assert box.published == 200 and len(box) == 0


async def test_window_one_is_one_round_trip_per_event(tmp_path: Path) -> None:
    broker = HeldBroker()
    broker.gate.set()
    box = EventOutbox(broker.publish, path=tmp_path / "e.log", capacity=100, retry=FAST, window=1)
    runner = await run_box(box)
    for _ in range(20):
        box.put(event(box.next_seq()))
    assert await box.flush(5)
    await stop(runner)
    assert broker.most_in_flight == 1 and broker.sent == list(range(1, 21))


async def test_a_retryable_failure_in_a_window_republishes_from_there_in_order(
    tmp_path: Path,
) -> None:
    broker = HeldBroker()
    broker.gate.set()
    broker.fail_once[10] = BusUnavailable("the channel went away")
    path = tmp_path / "e.log"
    box = EventOutbox(broker.publish, path=path, capacity=100, retry=FAST, window=16)
    runner = await run_box(box)
    for _ in range(40):
        box.put(event(box.next_seq()))
    assert await box.flush(5)
    await stop(runner)
    assert set(broker.confirmed) == set(range(1, 41))  # nothing lost
    retry_from = broker.sent.index(10)
    assert broker.sent[:9] == list(range(1, 10))
    assert broker.sent[retry_from:] == list(range(10, 41))  # again in order from the failed one
    # Nothing unconfirmed is left in the log for a restart to publish again.
    reborn = EventOutbox(broker.publish, path=path, capacity=100, retry=FAST)
    await reborn.load()
    assert reborn.restored == 0 and reborn.last_seq == 40


async def test_a_poisonous_event_inside_a_window_is_set_aside_and_the_rest_go_on(
    tmp_path: Path,
) -> None:
    broker = HeldBroker()
    broker.gate.set()
    broker.fail_once[5] = ProtocolError("routing key over the limit")
    box = EventOutbox(broker.publish, path=tmp_path / "e.log", capacity=100, retry=FAST, window=8)
    runner = await run_box(box)
    for _ in range(20):
        box.put(event(box.next_seq()))
    assert await box.flush(5)
    await stop(runner)
    assert broker.sent == [s for s in range(1, 21) if s != 5]
    assert box.rejected == 1 and box.published == 19
    assert len((tmp_path / "rejected.log").read_text().splitlines()) == 1


async def test_durable_writes_new_events_while_a_window_waits_for_its_confirms(
    tmp_path: Path,
) -> None:
    """What a killed agent keeps is the log. A call's events stamped while a window waits
    for its confirms are written only after it, unless the call's ack asks (durable()):
    an answered, acked call must not lose its events to a kill -9 then."""
    broker = HeldBroker()
    path = tmp_path / "e.log"
    box = EventOutbox(broker.publish, path=path, capacity=1000, retry=FAST, window=64)
    runner = await run_box(box)
    box.put(event(box.next_seq()))
    while broker.in_flight < 1:  # seq 1 is on the wire, its confirm held
        broker.grown.clear()
        await broker.grown.wait()
    box.put(event(box.next_seq()))  # the call's event, stamped meanwhile
    for _ in range(100):  # the publisher does not write it: it waits for the window
        await asyncio.sleep(0)

    async def on_disk() -> list[int]:
        after_kill = EventOutbox(broker.publish, path=path, capacity=1000, retry=FAST)
        await after_kill.load()
        return [e.body["seq"] for e in after_kill._pending]

    assert await on_disk() == [1]  # the premise: a kill here would lose seq 2
    await box.durable()  # what the call's ack waits for
    assert await on_disk() == [1, 2]
    await box.durable()  # nothing new: at once
    broker.gate.set()
    assert await box.flush(5)
    await stop(runner)
    assert broker.confirmed == [1, 2]
