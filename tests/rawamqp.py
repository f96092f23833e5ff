"""Calls built by hand with aio-pika: the inputs a virtbus client never sends (reused ids,
timestamp ext types, foreign reply queues, headers of the wrong type), as any AMQP client
could send them to a real agent."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import msgpack
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from tests.procs import BUS_URL
from virtbus.bus.base import bus_user
from virtbus.bus.topology import DEADLINE_HEADER, DIRECT_REPLY_TO, RPC_EXCHANGE

REPLY_WAIT = 30.0
BUS_USER = bus_user(BUS_URL)  # the user_id every call carries (the agent refuses none)


def envelope(op: str, body: Any, call_id: str) -> dict[str, Any]:
    return {"v": 1, "id": call_id, "kind": "call", "op": op, "ts": time.time(), "src": "raw",
            "body": body}  # fmt: skip


def new_call_id() -> str:
    return f"raw-{uuid.uuid4().hex}"


@dataclass
class RawCaller:
    """One connection; replies (direct reply-to) collected by correlation id."""

    channel: AbstractChannel
    replies: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        reply = msgpack.unpackb(message.body, raw=False)
        self.replies.setdefault(str(message.correlation_id), []).append(reply)
        self._arrived.set()

    async def send(
        self,
        route: str,
        op: str,
        body: Any,
        *,
        call_id: str | None = None,
        data: bytes | None = None,
        reply_to: str | None = DIRECT_REPLY_TO,
        headers: dict[str, Any] | None = None,
        ttl_ms: int = 60_000,
        user_id: str | None = BUS_USER,
    ) -> str:
        """Publish one call (``data`` replaces the encoded envelope); returns its id."""
        call_id = call_id or new_call_id()
        payload = data if data is not None else msgpack.packb(envelope(op, body, call_id))
        if headers is None:
            headers = {DEADLINE_HEADER: int((time.time() + ttl_ms / 1000) * 1000)}
        exchange = await self.channel.get_exchange(RPC_EXCHANGE, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                payload,
                content_type="application/msgpack",
                correlation_id=call_id,
                message_id=call_id,
                reply_to=reply_to,
                expiration=ttl_ms / 1000,
                headers=headers,
                user_id=user_id,
            ),
            routing_key=route,
        )
        return call_id

    def count(self) -> int:
        return sum(len(v) for v in self.replies.values())

    async def wait_count(self, n: int, timeout: float = REPLY_WAIT) -> None:
        """Until ``n`` replies arrived in all (TimeoutError otherwise)."""
        async with asyncio.timeout(timeout):
            while self.count() < n:
                self._arrived.clear()
                await self._arrived.wait()

    async def reply(self, call_id: str, timeout: float = REPLY_WAIT) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while call_id not in self.replies:
                self._arrived.clear()
                await self._arrived.wait()
        return self.replies[call_id][0]


@asynccontextmanager
async def raw_caller(url: str = BUS_URL) -> AsyncIterator[RawCaller]:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        caller = RawCaller(channel)
        replies = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await replies.consume(caller._on_reply, no_ack=True)
        yield caller


def error_code(reply: dict[str, Any]) -> str | None:
    body = reply.get("body") or {}
    return None if body.get("ok") else body.get("error", {}).get("code")
