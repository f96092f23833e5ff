"""The outbox pipelines its publisher confirms: a window of events is on the wire before the
first confirm is awaited, in order; a failure inside a window loses nothing. A bus that
publishes whole windows (AMQP's publish_window) is handed each window at once.

The broker here is a stand-in whose confirms arrive only when the test releases them, so
the tests can see how many publishes are in flight without timing anything (the real
broker: tests/integration/test_outbox_pipeline_amqp.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.outbox import EventOutbox
from agent.service import AgentService
from drivers.test import TestDriver
from virtbus.bus.memory import MemoryBus
from virtbus.errors import BusUnavailable, ProtocolError
from virtbus.protocol import ops
from virtbus.protocol.envelope import Envelope, Kind
from virtbus.settings import AgentSettings, Backoff

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


class WindowBroker(HeldBroker):
    """A publisher of whole windows (the AMQP bus's publish_window): records each window
    it is handed and answers one future per event; ``raise_once``: the next window's call
    itself raises (a bug)."""

    def __init__(self) -> None:
        super().__init__()
        self.windows: list[list[int]] = []
        self.raise_once: Exception | None = None

    async def window(self, batch: list[Envelope]) -> list[asyncio.Future[None]]:
        if self.raise_once is not None:
            exc, self.raise_once = self.raise_once, None
            raise exc
        self.windows.append([e.body["seq"] for e in batch])
        return [asyncio.ensure_future(self.publish(e)) for e in batch]


async def unused(_: Envelope) -> None:
    raise AssertionError("a window publisher's outbox publishes no event alone")


async def test_a_window_publisher_is_handed_each_window_whole_and_a_failure_counts_per_event(
    tmp_path: Path,
) -> None:
    broker = WindowBroker()
    broker.gate.set()
    broker.fail_once[10] = BusUnavailable("the channel went away")
    broker.fail_once[20] = ProtocolError("routing key over the limit")
    box = EventOutbox(unused, path=tmp_path / "e.log", capacity=100, retry=FAST, window=16,
                      publish_window=broker.window)  # fmt: skip
    runner = await run_box(box)
    for _ in range(40):
        box.put(event(box.next_seq()))
    assert await box.flush(5)
    await stop(runner)
    # the first window whole; from the retryable failure on, again in order
    assert broker.windows[0] == list(range(1, 17))
    assert broker.windows[1][0] == 10 and all(w == sorted(w) for w in broker.windows)
    assert set(broker.confirmed) == set(range(1, 41)) - {20}
    assert box.rejected == 1 and box.published == 39 and len(box) == 0


async def test_a_window_publisher_that_raises_sets_that_window_aside_and_goes_on(
    tmp_path: Path,
) -> None:
    """A bug in the window's publish must not wedge the outbox: its events are set aside
    (rejected.log), as each one's own publish raising would, and the next ones go."""
    broker = WindowBroker()
    broker.gate.set()
    broker.raise_once = RuntimeError("a bug")
    box = EventOutbox(unused, path=tmp_path / "e.log", capacity=100, retry=FAST, window=4,
                      publish_window=broker.window)  # fmt: skip
    for _ in range(6):
        box.put(event(box.next_seq()))
    runner = await run_box(box)
    assert await box.flush(5)
    await stop(runner)
    assert box.rejected == 4 and broker.confirmed == [5, 6]
    assert len((tmp_path / "rejected.log").read_text().splitlines()) == 4


async def test_the_agents_window_fails_an_event_without_its_routing_key_fields_alone(
    tmp_path: Path,
) -> None:
    class WindowBus(MemoryBus):
        async def publish_window(
            self, exchange: str, messages: Sequence[tuple[str, Envelope]]
        ) -> list[asyncio.Future[None]]:
            return [
                asyncio.ensure_future(self.publish(exchange, key, env, confirm=True))
                for key, env in messages
            ]

    bus = WindowBus("memory://ann@window", src="h1")
    await bus.connect()
    settings = AgentSettings(host="h1", state_dir=tmp_path, heartbeat_interval=60)
    service = AgentService(settings, bus, TestDriver())
    assert service.outbox._publish_window is not None  # the bus's window is used
    good = Envelope(Kind.EVENT, ops.EVENT_DOMAIN, {"seq": 1, "domain": "d", "event": "x"})
    bad = Envelope(Kind.EVENT, ops.EVENT_DOMAIN, {"seq": 2, "event": "x"})  # no domain
    futures = await service._publish_event_window([good, bad, good])
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], KeyError)
    await bus.close()


async def test_a_windows_ack_is_written_while_the_next_window_is_on_the_wire(
    tmp_path: Path,
) -> None:
    """The ack record (an fsynced append) of a confirmed window is written once the next
    window was handed over, not before: the broker does not wait for the disk."""
    broker = WindowBroker()
    broker.gate.set()
    path = tmp_path / "e.log"
    box = EventOutbox(unused, path=path, capacity=200, retry=FAST, window=64,
                      publish_window=broker.window)  # fmt: skip
    await box.load()
    assert box._log is not None
    disk, blocked = asyncio.Event(), asyncio.Event()
    append = box._log.append

    async def slow_acks(records: Any, **kwargs: Any) -> None:
        records = list(records)
        if any("ack" in r for r in records) and not disk.is_set():
            blocked.set()
            await disk.wait()
        await append(records, **kwargs)

    box._log.append = slow_acks  # type: ignore[method-assign]
    for _ in range(128):  # two windows; the first one's ack crosses a multiple of 64
        box.put(event(box.next_seq()))
    runner = asyncio.create_task(box.run())
    await blocked.wait()  # the first window's ack is being written...
    first, second = list(range(1, 65)), list(range(65, 129))
    assert broker.windows == [first, second]  # ...with the second one on the wire
    disk.set()
    assert await box.flush(5)
    await stop(runner)
    reborn = EventOutbox(unused, path=path, capacity=200, retry=FAST)
    await reborn.load()
    assert reborn.restored == 0 and reborn.last_seq == 128


async def test_an_ack_not_written_when_the_publisher_stops_is_written_by_save_unsent(
    tmp_path: Path,
) -> None:
    """Stopped while handing over the next window, with the last window confirmed but its
    ack not yet written: save_unsent (the agent's stop) writes it, so a restart does not
    publish those events again."""
    broker = WindowBroker()
    broker.gate.set()
    handed, never = asyncio.Event(), asyncio.Event()
    window = broker.window

    async def second_blocks(batch: list[Envelope]) -> list[asyncio.Future[None]]:
        if broker.windows:
            handed.set()
            await never.wait()
        return await window(batch)

    path = tmp_path / "e.log"
    box = EventOutbox(unused, path=path, capacity=100, retry=FAST, window=4,
                      publish_window=second_blocks)  # fmt: skip
    for _ in range(8):
        box.put(event(box.next_seq()))
    runner = await run_box(box)
    await handed.wait()
    await stop(runner)
    assert await box.save_unsent()
    reborn = EventOutbox(unused, path=path, capacity=100, retry=FAST)
    await reborn.load()
    assert [e.body["seq"] for e in reborn._pending] == [5, 6, 7, 8]
