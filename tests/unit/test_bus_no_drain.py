"""NO_DRAIN_WAIT (virtbus/bus/amqp_consumers.py): publishes and acks return once their frames
are queued on the connection's writer, not once the socket drained (wait=False)."""

from __future__ import annotations

from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractIncomingMessage
from pamqp.commands import Basic

from virtbus.bus.amqp_consumers import ack_queued, publish_queued


class FakeChannel:
    def __init__(self) -> None:
        self.acks: list[tuple[int, dict[str, Any]]] = []

    async def basic_ack(self, delivery_tag: int, **kwargs: Any) -> None:
        self.acks.append((delivery_tag, kwargs))


class FakeMessage:
    def __init__(self, delivery_tag: int | None) -> None:
        self.delivery_tag = delivery_tag
        self.channel = FakeChannel()


async def test_an_ack_is_queued_not_drained() -> None:
    message = FakeMessage(7)
    await ack_queued(cast(AbstractIncomingMessage, message))
    await ack_queued(cast(AbstractIncomingMessage, message), multiple=True)
    assert message.channel.acks == [
        (7, {"multiple": False, "wait": False}),
        (7, {"multiple": True, "wait": False}),
    ]


async def test_a_no_ack_delivery_is_not_acked() -> None:
    message = FakeMessage(None)
    await ack_queued(cast(AbstractIncomingMessage, message))
    assert message.channel.acks == []


class RecordingChannel(aiormq.Channel):
    """An aiormq channel that records its publishes (never opened: no __init__)."""

    published: list[dict[str, Any]]

    async def basic_publish(self, body: bytes, **kwargs: Any) -> None:
        self.published.append({"body": body, **kwargs})


async def test_a_publish_is_queued_not_drained() -> None:
    channel = object.__new__(RecordingChannel)
    channel.published = []
    props = Basic.Properties(delivery_mode=1)
    await publish_queued(channel, b"x", exchange="e", routing_key="k", properties=props)
    assert channel.published == [
        {"body": b"x", "exchange": "e", "routing_key": "k", "properties": props,
         "mandatory": False, "wait": False},
    ]  # fmt: skip
