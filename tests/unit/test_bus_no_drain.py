"""NO_DRAIN_WAIT (virtbus/bus/amqp_consumers.py): publishes and acks return once their frames
are queued on the connection's writer, not once the socket drained (wait=False); and the
server's view of a delivered call (Delivery)."""

from __future__ import annotations

from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractIncomingMessage
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from virtbus.bus.amqp_consumers import Delivery, ack_queued, message_frames, publish_queued


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


class ServerChannel(FakeChannel):
    def __init__(self) -> None:
        super().__init__()
        self.rejects: list[tuple[int, dict[str, Any]]] = []

    async def basic_reject(self, delivery_tag: int, **kwargs: Any) -> None:
        self.rejects.append((delivery_tag, kwargs))


async def test_a_call_delivery_carries_what_the_server_reads_and_acks_queued() -> None:
    props = Basic.Properties(
        reply_to="amq.rabbitmq.reply-to.abc", correlation_id="c1", message_id="m1",
        headers={"x-deadline": 5}, user_id="ann",
    )  # fmt: skip
    channel = ServerChannel()
    delivered = DeliveredMessage(
        delivery=Basic.Deliver(consumer_tag="t", delivery_tag=9, redelivered=True),
        header=ContentHeader(properties=props, body_size=2),
        body=b"hi",
        channel=cast(aiormq.abc.AbstractChannel, channel),
    )
    call = Delivery(delivered)
    assert (call.body, call.delivery_tag, call.redelivered) == (b"hi", 9, True)
    assert (call.reply_to, call.correlation_id, call.message_id, call.user_id) == (
        "amq.rabbitmq.reply-to.abc", "c1", "m1", "ann",
    )  # fmt: skip
    assert call.headers == {"x-deadline": 5}
    await call.ack()
    await call.reject(requeue=False)
    assert channel.acks == [(9, {"wait": False})]
    assert channel.rejects == [(9, {"requeue": False})]


def test_a_windows_message_is_marshalled_as_aiormq_marshals_a_publish() -> None:
    """ONE WRITE PER WINDOW: message_frames gives the bytes aiormq's basic_publish queues
    (method, header, body cut at the frame size), the method frame from its cache too."""
    channel = object.__new__(aiormq.Channel)
    channel.number, channel.max_content_size = 3, 100
    props = Basic.Properties(delivery_mode=2, message_id="m1", content_type="application/msgpack")
    for body in (b"", b"x" * 99, b"y" * 100, bytes(range(256)) * 2):
        for _twice in range(2):
            ours = message_frames(
                channel, body, exchange="e", routing_key="h.d.x", properties=props
            )
            frames = [
                Basic.Publish(exchange="e", routing_key="h.d.x"),
                ContentHeader(properties=props, body_size=len(body)),
                *channel._split_body(body),
            ]
            assert ours == ChannelFrame.marshall(channel_number=3, frames=frames).payload
