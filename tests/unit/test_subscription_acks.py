"""A subscription's acks: one ``multiple`` ack per burst read, never one held while waiting."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

from virtbus.bus.amqp import AmqpBus
from virtbus.bus.amqp_consumers import AmqpSubscription
from virtbus.protocol.envelope import Envelope, Kind
from virtbus.settings import BusSettings


class FakeChannel:
    """The aiormq channel an ack goes to (``ack_queued``: ``basic_ack`` with wait=False)."""

    def __init__(self, acks: list[tuple[int, bool]]) -> None:
        self._acks = acks

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        assert wait is False  # queued, not drained
        self._acks.append((tag, multiple))


class FakeMessage:
    def __init__(self, tag: int, acks: list[tuple[int, bool]]) -> None:
        self.delivery_tag, self.channel = tag, FakeChannel(acks)


def subscription(buffer: int) -> AmqpSubscription:
    bus = SimpleNamespace(settings=BusSettings(subscription_buffer=buffer))
    return AmqpSubscription(cast(AmqpBus, bus), "virtbus.events", ["#"], cast(Any, None), None)


def push(sub: AmqpSubscription, tags: range, acks: list[tuple[int, bool]]) -> None:
    for tag in tags:
        envelope = Envelope(kind=Kind.EVENT, op="domain.event", body={"n": tag})
        assert sub._buffer.push((cast(Any, FakeMessage(tag, acks)), envelope)) is None


async def test_a_burst_is_acked_every_half_prefetch_and_when_caught_up() -> None:
    acks: list[tuple[int, bool]] = []
    sub = subscription(8)  # an ack at least every 4 reads
    push(sub, range(1, 7), acks)  # as the broker delivers: at most the prefetch count
    got = [(await sub.__anext__()).body["n"] for _ in range(6)]
    assert got == list(range(1, 7))
    # 4 by count, 6 because the buffer ran empty: each covers those read before it
    assert acks == [(4, True), (6, True)]


async def test_a_reader_that_caught_up_holds_no_unacked_message() -> None:
    acks: list[tuple[int, bool]] = []
    sub = subscription(8)
    for tag in (1, 2, 3):  # one at a time: each read empties the buffer
        push(sub, range(tag, tag + 1), acks)
        assert (await sub.__anext__()).body["n"] == tag
        assert acks[-1] == (tag, True)
    waiting = asyncio.ensure_future(sub.__anext__())
    await asyncio.sleep(0)  # the reader now waits: everything it read was acked
    assert acks == [(1, True), (2, True), (3, True)]
    waiting.cancel()
