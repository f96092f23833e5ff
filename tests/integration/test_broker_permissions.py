"""Least-privilege broker permissions from the definitions generator, on the real broker:
an agent's credentials for host A cannot consume host B's call queue, nor publish events
or heartbeats under B's name (RabbitMQ topic permissions), while A serves as usual.

A vhost and users of this module's own on the shared RabbitMQ, imported from
``definitions(vhost, ..., hosts=[A, B])`` and deleted afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractIncomingMessage

from tests.procs import agent_process
from virtbus.bus.definitions import definitions
from virtbus.bus.topology import EVENTS_EXCHANGE, HOSTS_EXCHANGE
from virtbus.client import Client

pytestmark = pytest.mark.rabbitmq
TAG = uuid.uuid4().hex[:6]
A, B = f"perm-a-{TAG}", f"perm-b-{TAG}"
VHOST = f"/virtbus-perm-{TAG}"
PASSWORD = uuid.uuid4().hex


def url(user: str) -> str:
    return f"amqp://{user}:{PASSWORD}@127.0.0.1:5672/{VHOST.replace('/', '%2F')}"


@pytest.fixture(scope="module")
def broker() -> Iterator[None]:
    defs = definitions(VHOST, PASSWORD, hosts=[A, B])
    fd, name = tempfile.mkstemp(prefix="virtbus-perm-", suffix=".json")
    os.write(fd, json.dumps(defs).encode())
    os.close(fd)
    os.chmod(name, 0o644)  # rabbitmqctl reads it as the rabbitmq user
    try:
        run = subprocess.run(["rabbitmqctl", "import_definitions", name], capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        yield
    finally:
        os.unlink(name)
        subprocess.run(["rabbitmqctl", "delete_vhost", VHOST], capture_output=True, timeout=120)
        for user in [u["name"] for u in defs["users"]]:
            subprocess.run(["rabbitmqctl", "delete_user", user], capture_output=True, timeout=120)


async def _ignore(message: AbstractIncomingMessage) -> None:
    """A consumer that would steal A's calls."""


async def _refused(user: str, action: str) -> bool:
    """True when the broker refuses ``action`` done with ``user``'s credentials."""
    conn = await aio_pika.connect(url(user))
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        try:
            if action == "consume A's queue":
                queue = await ch.get_queue(f"virtbus.agent.{A}", ensure=False)
                await queue.consume(_ignore, no_ack=True)
            elif action == "event as A":
                x = await ch.get_exchange(EVENTS_EXCHANGE, ensure=False)
                await x.publish(aio_pika.Message(b"x", user_id=user), f"{A}.web.started")
            elif action == "heartbeat as A":
                x = await ch.get_exchange(HOSTS_EXCHANGE, ensure=False)
                await x.publish(aio_pika.Message(b"x", user_id=user), f"{A}.heartbeat")
            elif action == "heartbeat as itself":
                x = await ch.get_exchange(HOSTS_EXCHANGE, ensure=False)
                await x.publish(aio_pika.Message(b"x", user_id=user), f"{user}.heartbeat")
        except aiormq.exceptions.ChannelAccessRefused:
            return True
    return False


async def test_an_agent_user_is_confined_to_its_own_queue_and_name(
    broker: None, tmp_path: Path
) -> None:
    async with agent_process(A, tmp_path, bus=url(A)):
        assert await _refused(B, "consume A's queue")
        assert await _refused(B, "event as A")
        assert await _refused(B, "heartbeat as A")
        assert not await _refused(B, "heartbeat as itself")  # its own name: allowed
        # A still serves, and a client (virtbus-client) reaches it.
        async with await Client.connect(url("virtbus-client"), oneshot=True) as client:
            assert (await client.host(A).ping()).host == A
