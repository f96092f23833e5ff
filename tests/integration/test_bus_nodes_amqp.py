"""Both transports connect to the first node of a bus URL that answers: here a port where
nothing listens, then the real RabbitMQ on 127.0.0.1:5672."""

from __future__ import annotations

import pytest

from tests.rabbitnode import free_port
from virtbus.bus.factory import open_bus
from virtbus.errors import BusUnavailable
from virtbus.settings import BusSettings

pytestmark = pytest.mark.rabbitmq


@pytest.mark.parametrize("oneshot", [False, True], ids=["aio-pika", "oneshot"])
async def test_a_dead_first_node_is_skipped(rabbitmq: None, oneshot: bool) -> None:
    dead = free_port()  # nothing listens there
    url = f"amqp://guest:guest@127.0.0.1:{dead},127.0.0.1:5672/"
    bus = open_bus(url, "test-nodes", BusSettings(connect_timeout=5.0), oneshot=oneshot)
    await bus.connect()
    try:
        assert bus.connected
    finally:
        await bus.close()


@pytest.mark.parametrize("oneshot", [False, True], ids=["aio-pika", "oneshot"])
async def test_no_node_answering_is_bus_unavailable_naming_each(oneshot: bool) -> None:
    a, b = free_port(), free_port()
    url = f"amqp://guest:secret@127.0.0.1:{a},127.0.0.1:{b}/"
    bus = open_bus(url, "test-nodes", BusSettings(connect_timeout=5.0), oneshot=oneshot)
    with pytest.raises(BusUnavailable) as err:
        await bus.connect()
    assert str(a) in err.value.message and str(b) in err.value.message
    assert "secret" not in err.value.message
