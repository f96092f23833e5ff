"""A call is checked alike by every transport before any I/O (virtbus.bus.rpc.outgoing_call):
here through the memory bus, which once skipped the timeout and size checks."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from virtbus.bus.memory import MemoryBus
from virtbus.bus.rpc import outgoing_call
from virtbus.errors import InvalidArgument, ProtocolError
from virtbus.protocol.codec import DecodeLimits
from virtbus.protocol.envelope import Envelope, ok_body
from virtbus.settings import BusSettings


def test_a_retry_keeps_its_call_id_and_the_default_timeout_applies() -> None:
    settings = BusSettings(call_timeout=7.0)
    envelope, data, timeout = outgoing_call(settings, "cli", "agent.h1", "host.ping", {}, None,
                                            "c-1")  # fmt: skip
    assert (envelope.id, envelope.src, timeout) == ("c-1", "cli", 7.0)
    assert b"c-1" in data
    fresh, _, _ = outgoing_call(settings, "cli", "agent.h1", "host.ping", {}, 1.0, None)
    assert fresh.id != "c-1"


async def test_the_memory_bus_refuses_what_amqp_refuses_and_still_serves() -> None:
    url = f"memory://test-{uuid.uuid4().hex[:8]}"
    settings = BusSettings(url=url, stop_grace=0.2, limits=DecodeLimits(max_bytes=2048))
    server, client = MemoryBus(url, "agent", settings), MemoryBus(url, "cli", settings)
    await server.connect()
    await client.connect()
    served: list[str] = []

    async def ping(call: Envelope) -> dict[str, Any]:
        served.append(call.op)
        return ok_body("pong")

    try:
        await server.serve("agent.h1", ping)
        with pytest.raises(InvalidArgument, match="must be positive"):
            await client.call("agent.h1", "host.ping", {}, timeout=0)
        with pytest.raises(ProtocolError, match="exceeds the message limit"):
            await client.call("agent.h1", "host.ping", {"pad": "x" * 4096}, timeout=1)
        assert served == []  # neither reached the server
        assert await client.call("agent.h1", "host.ping", {}, timeout=1) == "pong"
    finally:
        await client.close()
        await server.close()
