"""A client that knows AMQP and msgpack and nothing of virtbus, against a real agent.

It follows only the README's protocol section: msgpack maps built by hand, published to
``virtbus.rpc`` with ``reply_to = amq.rabbitmq.reply-to``, the ``x-deadline`` header, an
expiration and ``mandatory``. The answers must have exactly the shapes they had before the
typed protocol (the same field names, the same types), so existing clients keep working.
This module imports no virtbus code (checked below); the agent is a real process.
"""

from __future__ import annotations

import ast
import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import msgpack
import pytest
from aio_pika.abc import AbstractIncomingMessage

from tests import procs
from tests.procs import BUS_URL, agent_process, unique_host

pytestmark = pytest.mark.rabbitmq

REPLY_TO = "amq.rabbitmq.reply-to"
BUS_USER = unquote(urlsplit(BUS_URL).username or "guest")
XML = """<domain type='test'><name>raw1</name><memory unit='MiB'>128</memory>
<vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>"""
INFO_FIELDS = {
    "name": str,
    "uuid": str,
    "id": int,
    "state": str,
    "state_code": int,
    "reason": str,
    "max_memory_kib": int,
    "memory_kib": int,
    "vcpus": int,
    "cpu_time_ns": int,
    "persistent": bool,
    "autostart": bool,
    "managed_save": bool,
    "type": str,
    "owner": str,  # who defined it: domain.info says (here the login user), a list says nil
    "groups": list,  # its anti-affinity groups (placement metadata): here none, []
}


class RawClient:
    """Calls as the README describes them; replies matched by correlation id."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel) -> None:
        self.channel = channel
        self.replies: dict[str, asyncio.Future[AbstractIncomingMessage]] = {}
        self.counter = 0

    async def start(self) -> None:
        queue = await self.channel.declare_queue(REPLY_TO, passive=True)
        await queue.consume(self._on_reply, no_ack=True)
        self.rpc = await self.channel.get_exchange("virtbus.rpc", ensure=False)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        waiter = self.replies.pop(message.correlation_id or "", None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message)

    def envelope(self, op: str, body: dict[str, Any]) -> dict[str, Any]:
        self.counter += 1
        return {
            "v": 1,
            "id": f"raw-{os.getpid()}-{self.counter}",
            "kind": "call",
            "op": op,
            "ts": time.time(),
            "src": "raw-client",
            "body": body,
        }

    async def send(
        self,
        host: str,
        op: str,
        body: dict[str, Any],
        *,
        timeout: float = 15.0,
        deadline: Any = None,
    ) -> tuple[dict[str, Any], asyncio.Future[AbstractIncomingMessage]]:
        call = self.envelope(op, body)
        waiter: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()
        self.replies[call["id"]] = waiter
        if deadline is None:
            deadline = int((time.time() + timeout) * 1000)  # epoch ms, an integer
        await self.rpc.publish(
            aio_pika.Message(
                msgpack.packb(call),
                content_type="application/msgpack",
                correlation_id=call["id"],
                reply_to=REPLY_TO,
                expiration=timeout,
                headers={"x-deadline": deadline},
                user_id=BUS_USER,  # the login user: RabbitMQ checks it, the agent requires it
            ),
            routing_key=f"agent.{host}",
            mandatory=True,
        )
        return call, waiter

    async def call(self, host: str, op: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        """The reply's body (``{"ok": ..., ...}``), after checking its envelope."""
        call, waiter = await self.send(host, op, body, **kw)
        async with asyncio.timeout(20):
            message = await waiter
        reply = msgpack.unpackb(message.body)
        assert set(reply) == {"v", "id", "kind", "op", "ts", "src", "body"}, reply
        assert (reply["v"], reply["kind"], reply["id"], reply["op"]) == (1, "reply", call["id"], op)
        assert message.correlation_id == call["id"]
        assert isinstance(reply["ts"], float) and reply["src"] == host
        body_: dict[str, Any] = reply["body"]
        return body_

    async def result(self, host: str, op: str, body: dict[str, Any], **kw: Any) -> Any:
        answer = await self.call(host, op, body, **kw)
        assert set(answer) == {"ok", "result"} and answer["ok"] is True, answer
        return answer["result"]


def assert_info(info: dict[str, Any]) -> None:
    assert set(info) == set(INFO_FIELDS), sorted(info)
    for name, kind in INFO_FIELDS.items():
        if name == "id" and info["state"] == "shutoff":
            assert info["id"] is None
            continue
        if name == "owner" and info["owner"] is None:
            continue
        assert type(info[name]) is kind, (name, info[name])


@pytest.fixture
async def raw(rabbitmq: None) -> AsyncIterator[RawClient]:
    conn = await aio_pika.connect(BUS_URL)
    async with conn:
        channel = await conn.channel(on_return_raises=True)
        client = RawClient(channel)
        await client.start()
        yield client


def test_this_client_imports_no_virtbus() -> None:
    """Premise: the client here (and the process helper it uses) never import virtbus.

    This file is checked whole; the process helper at module level (the functions only QEMU
    tests call import QEMU settings lazily, and this test calls none of them)."""
    for path, whole in ((Path(__file__), True), (Path(procs.__file__), False)):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree) if whole else iter(tree.body):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("virtbus", "agent") for n in names), (path, names)


async def test_hand_built_calls_get_the_documented_answers(raw: RawClient, tmp_path: Path) -> None:
    host = unique_host("raw")
    async with agent_process(host, tmp_path):
        defined = await raw.result(host, "domain.define", {"xml": XML})
        assert set(defined) == {"name", "uuid"} and defined["name"] == "raw1"
        assert len(defined["uuid"]) == 36

        listing = await raw.result(host, "domain.list", {"all": True})
        assert set(listing) == {"domains"} and len(listing["domains"]) == 1
        assert_info(listing["domains"][0])
        assert listing["domains"][0]["state"] == "shutoff"

        assert await raw.result(host, "domain.start", {"domain": "raw1"}) == {
            "state": "running",
            "reason": "booted",
        }
        assert await raw.result(host, "domain.suspend", {"domain": defined["uuid"]}) == {
            "state": "paused",
            "reason": "user",
        }
        info = await raw.result(host, "domain.info", {"domain": "raw1"})
        assert_info(info)
        assert info["owner"] == BUS_USER  # recorded at define from the checked user_id
        assert (info["name"], info["uuid"], info["state"], info["state_code"]) == (
            "raw1",
            defined["uuid"],
            "paused",
            3,
        )
        assert (info["reason"], info["max_memory_kib"], info["vcpus"], info["type"]) == (
            "user",
            131072,
            1,
            "test",
        )
        assert info["persistent"] is True and info["autostart"] is False
        listing = await raw.result(host, "domain.list", {})
        assert set(listing) == {"domains"}
        assert [(d["name"], d["state"]) for d in listing["domains"]] == [("raw1", "paused")]
        assert_info(listing["domains"][0])

        # an x-deadline in integer epoch seconds is understood too
        state = await raw.result(
            host, "domain.state", {"domain": "raw1"}, deadline=int(time.time()) + 30
        )
        assert state == {"state": "paused", "reason": "user"}
        ping = await raw.result(host, "host.ping", {"zz_from_a_newer_client": True})
        assert ping == {"host": host}


async def test_errors_have_the_documented_shape(raw: RawClient, tmp_path: Path) -> None:
    host = unique_host("rawerr")
    async with agent_process(host, tmp_path):
        await raw.result(host, "domain.define", {"xml": XML})
        await raw.result(host, "domain.start", {"domain": "raw1"})
        cases: list[tuple[str, dict[str, Any], str, str]] = [
            ("domain.start", {"domain": "nope"}, "NO_DOMAIN", "nope"),
            ("domain.start", {"domain": 7}, "INVALID_ARG", "'domain'"),
            ("domain.define", {}, "INVALID_ARG", "'xml'"),
            ("domain.frobnicate", {"domain": "raw1"}, "NO_SUPPORT", "domain.frobnicate"),
            ("migration.prepare", {"xml": XML, "params": {"parallel": "4"}}, "INVALID_ARG",
             "'params.parallel'"),
        ]  # fmt: skip
        for op, body, code, words in cases:
            answer = await raw.call(host, op, body)
            assert set(answer) == {"ok", "error"} and answer["ok"] is False, answer
            assert set(answer["error"]) == {"code", "message"}
            assert answer["error"]["code"] == code and words in answer["error"]["message"], answer

        # a call past its x-deadline is dropped unanswered and never executed: the state
        # call published after it (answered in delivery order) still sees the guest running
        late, late_reply = await raw.send(
            host, "domain.destroy", {"domain": "raw1"}, deadline=int(time.time() * 1000) - 1
        )
        state = await raw.result(host, "domain.state", {"domain": "raw1"})
        assert state == {"state": "running", "reason": "booted"}
        assert not late_reply.done() and late["id"] in raw.replies

        # mandatory: the broker returns a call no agent queue takes (NO_CONNECT's cause)
        with pytest.raises(aio_pika.exceptions.DeliveryError):
            await raw.send(unique_host("nobody"), "host.ping", {})
