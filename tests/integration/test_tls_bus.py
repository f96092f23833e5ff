"""Issue 13, items 1-2: identity by certificate, and a topology only the admin configures.

A RabbitMQ node of this module's own (tests/rabbitnode.py) with an amqps listener that
requires a client certificate and makes its CN the user (``rabbitmq_auth_mechanism_ssl``,
SASL EXTERNAL). The certificates are made by ``virtbus pki``; the vhost, topology and
users by ``python -m virtbus.bus.definitions --certificates`` (users without passwords),
imported as an admin would. Then, on the real broker:

- an agent (host certificate) and a client (user certificate; the CLI's one-shot
  transport and the library's aio-pika one) connect with no password, and a call works
  with ``user_id`` = the CN (the agent's audit log names the CN);
- an expired certificate, a certificate of another CA, and a broker certificate we do not
  trust are refused with AUTH_FAILED saying why (CLI: exit 1, one line), and the agent
  still serves;
- neither the client's nor the agent's credentials can delete ``virtbus.rpc`` or the
  history streams, nor even re-declare them (ACCESS_REFUSED): the daemons declare the
  admin's topology passively, and configure only server-named queues of their own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aio_pika
import aiormq
import pytest
import pytest_asyncio

from tests.procs import VIRTBUS, AgentProc, agent_process, cli
from tests.rabbitnode import NodeTls, RabbitNode, rabbit_node
from virtbus.bus.amqp import AmqpBus
from virtbus.bus.definitions import CLIENT_PERMISSIONS
from virtbus.bus.topology import (
    AUDIT_HISTORY_QUEUE,
    EVENT_HISTORY_QUEUE,
    EXCHANGES,
    HOSTS_EXCHANGE,
    RPC_EXCHANGE,
)
from virtbus.client import Client
from virtbus.errors import AuthFailed, BusUnavailable
from virtbus.security import pki
from virtbus.settings import BusSettings

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
]
VHOST = "/virtbus"
HOST = "tls-node1"
USER = "alice"
PY = sys.executable


def run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@dataclass(frozen=True)
class Pki:
    ca: Path  # the cluster's CA directory
    other: Path  # another CA's directory


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Every certificate made with the CLI (`virtbus pki`), as the README does; only the
    expired one through the same module's API (the CLI issues certificates valid from now)."""
    root = tmp_path_factory.mktemp("pki")
    ca, other = root / "ca", root / "other"
    virtbus = (*VIRTBUS,)
    run(*virtbus, "pki", "init", "--dir", str(ca))
    run(*virtbus, "pki", "issue", "server", "localhost", "--alt-name", "127.0.0.1",
        "--dir", str(ca))  # fmt: skip
    run(*virtbus, "pki", "issue", "host", HOST, "--dir", str(ca))
    run(*virtbus, "pki", "issue", "user", USER, "--role", "admin", "--dir", str(ca))
    run(*virtbus, "pki", "init", "--dir", str(other), "--name", "another CA")
    run(*virtbus, "pki", "issue", "user", "mallory", "--dir", str(other))
    run(*virtbus, "pki", "issue", "server", "localhost", "--alt-name", "127.0.0.1",
        "--dir", str(other))  # fmt: skip
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    pki.issue(ca, pki.Kind.USER, "old", role="admin", days=1, not_before=long_ago)
    return Pki(ca, other)


def url(node: RabbitNode, ca: Path, cert: Path, key: Path) -> str:
    return (
        node.tls_url(VHOST)
        + f"?cafile={quote(str(ca))}&certfile={quote(str(cert))}&keyfile={quote(str(key))}"
    )


def user_url(node: RabbitNode, certs: Pki, name: str, *, ca_dir: Path | None = None) -> str:
    issued = (ca_dir or certs.ca) / "users"
    return url(node, certs.ca / "ca.crt", issued / f"{name}.crt", issued / f"{name}.key")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def node(certs: Pki) -> AsyncIterator[RabbitNode]:
    servers = certs.ca / "servers"
    tls = NodeTls(certs.ca / "ca.crt", servers / "localhost.crt", servers / "localhost.key")
    async with rabbit_node(tls=tls) as n:
        defs = await asyncio.to_thread(  # a subprocess: not on the event loop
            run, PY, "-m", "virtbus.bus.definitions", "--vhost", VHOST, "--certificates",
            "--host", HOST, "--client", USER, "--client", "old", "--client", "mallory",
        )  # fmt: skip
        assert all(u["password_hash"] == "" for u in json.loads(defs)["users"])  # no PLAIN
        fd, name = tempfile.mkstemp(prefix="virtbus-tls-", suffix=".json")
        os.write(fd, defs.encode())
        os.close(fd)
        os.chmod(name, 0o644)  # rabbitmqctl reads it as the rabbitmq user
        try:
            await n.ctl("import_definitions", name)
        finally:
            os.unlink(name)
        async with asyncio.timeout(60):  # "this process is asynchronous"
            while HOST not in await n.ctl("list_permissions", "-p", VHOST):
                await asyncio.sleep(0.2)
        yield n


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def agent(
    node: RabbitNode, certs: Pki, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AgentProc]:
    hosts = certs.ca / "hosts"
    bus = url(node, certs.ca / "ca.crt", hosts / f"{HOST}.crt", hosts / f"{HOST}.key")
    async with agent_process(
        HOST, tmp_path_factory.mktemp("agent"), bus=bus, keep_queue=True
    ) as proc:
        yield proc


def audited_users(agent: AgentProc) -> list[str]:
    log = agent.state_dir / "audit" / "audit.log"
    if not log.exists():  # no call served yet
        return []
    return [json.loads(line)["user"] for line in log.read_text().splitlines()]


async def wait_audited(agent: AgentProc, count: int) -> list[str]:
    async with asyncio.timeout(10):  # the worker thread appends after the reply
        while len(users := audited_users(agent)) < count:
            await asyncio.sleep(0.05)
    return users


async def test_agent_and_client_connect_by_certificate_and_calls_carry_the_cn(
    node: RabbitNode, certs: Pki, agent: AgentProc
) -> None:
    bus_url = user_url(node, certs, USER)
    assert "@" not in bus_url  # no user, no password: the certificate is the identity
    listed = await cli("--json", "list", "--all", "--host", HOST, bus=bus_url)
    assert listed.code == 0 and listed.json() == [], listed  # the one-shot transport
    async with await Client.connect(bus_url, src="tls-test") as client:  # aio-pika
        assert client.bus.user == USER
        pong = await client.host(HOST).ping()
        assert pong is not None
        # A subscription: a server-named queue (the only kind a client may configure),
        # bound to the agent's heartbeats, which it publishes under its own name.
        sub = await client.bus.subscribe(HOSTS_EXCHANGE, [f"{HOST}.heartbeat"])
        beat = await asyncio.wait_for(sub.__anext__(), 10)
        assert beat.user == HOST, beat  # the agent logged in as its certificate's CN
        await sub.close()
    assert await wait_audited(agent, 2) == [USER, USER]  # user_id = the CN, both transports


async def test_expired_and_foreign_certificates_are_refused(
    node: RabbitNode, certs: Pki, agent: AgentProc
) -> None:
    before = len(audited_users(agent))
    cases = [
        (user_url(node, certs, "old"), "expired"),
        (user_url(node, certs, "mallory", ca_dir=certs.other), "not signed by a CA"),
        # our own certificate, but the broker's is checked against another CA
        (
            url(node, certs.other / "ca.crt", certs.ca / "users" / f"{USER}.crt",
                certs.ca / "users" / f"{USER}.key"),
            "is not trusted",
        ),
    ]  # fmt: skip
    for bus_url, says in cases:
        r = await cli("list", "--host", HOST, bus=bus_url)
        assert r.code == 1, (bus_url, r)
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: AUTH_FAILED: "), r.err
        assert says in lines[0], (says, lines[0])
        bus = AmqpBus(bus_url, "tls-refused", BusSettings(url=bus_url, connect_timeout=10))
        with pytest.raises(AuthFailed, match=says):
            await bus.connect()
        await bus.close()
    assert len(audited_users(agent)) == before  # no call of theirs reached the agent
    ok = await cli("--json", "list", "--all", "--host", HOST, bus=user_url(node, certs, USER))
    assert ok.code == 0 and ok.json() == [], ok  # the agent still serves


async def _refused(connection: aio_pika.abc.AbstractConnection, action: str, name: str) -> str:
    channel = await connection.channel()
    underlay = await channel.get_underlay_channel()
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused) as refused:
        if action == "exchange_delete":
            await underlay.exchange_delete(name)
        elif action == "queue_delete":
            await underlay.queue_delete(name)
        elif action == "exchange_declare":
            spec = next(e for e in EXCHANGES if e.name == name)
            await underlay.exchange_declare(name, exchange_type=spec.type, durable=True)
    return str(refused.value)


async def test_neither_client_nor_agent_can_delete_or_redeclare_the_topology(
    node: RabbitNode, certs: Pki, agent: AgentProc
) -> None:
    hosts = certs.ca / "hosts"
    identities = {
        USER: user_url(node, certs, USER),
        HOST: url(node, certs.ca / "ca.crt", hosts / f"{HOST}.crt", hosts / f"{HOST}.key"),
    }
    for who, bus_url in identities.items():
        connection = await aio_pika.connect(bus_url + "&auth=external", timeout=10)
        async with connection:
            premise = await connection.channel()  # it is there, and passively visible
            await premise.declare_exchange(RPC_EXCHANGE, passive=True)
            for stream in (EVENT_HISTORY_QUEUE, AUDIT_HISTORY_QUEUE):
                await premise.declare_queue(stream, passive=True)
            for action, name in [
                ("exchange_delete", RPC_EXCHANGE),
                ("queue_delete", EVENT_HISTORY_QUEUE),
                ("queue_delete", AUDIT_HISTORY_QUEUE),
                ("exchange_declare", RPC_EXCHANGE),  # even an identical re-declare
            ]:
                message = await _refused(connection, action, name)
                assert "ACCESS_REFUSED" in message and who in message, (who, action, message)
            still = await connection.channel()
            await still.declare_exchange(RPC_EXCHANGE, passive=True)
            await still.declare_queue(EVENT_HISTORY_QUEUE, passive=True)
    # ... and the bus works: a call reaches the agent, whose server declared passively.
    ok = await cli("--json", "list", "--all", "--host", HOST, bus=identities[USER])
    assert ok.code == 0 and ok.json() == [], ok


async def test_a_missing_topology_is_declared_in_dev_and_refused_with_a_hint_otherwise(
    node: RabbitNode, certs: Pki
) -> None:
    """Dev mode: guest on a vhost without definitions declares what is missing. A user
    that may not configure it (the generated client permissions) is told to import the
    definitions, instead of the channel error of a refused declare."""
    bare = "/bare"
    await node.ctl("add_vhost", bare)
    await node.ctl("set_permissions", "-p", bare, "guest", ".*", ".*", ".*")
    await node.ctl("set_permissions", "-p", bare, USER, *CLIENT_PERMISSIONS)
    plain = f"amqp://guest:guest@127.0.0.1:{node.port}/{quote(bare, safe='')}"
    check = await aio_pika.connect(plain, timeout=10)
    async with check:
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):  # the premise
            await (await check.channel()).declare_exchange(RPC_EXCHANGE, passive=True)
    refused_url = user_url(node, certs, USER).replace("%2Fvirtbus", quote(bare, safe=""))
    refused = AmqpBus(refused_url, "tls-bare", BusSettings(url=refused_url))
    with pytest.raises(BusUnavailable, match="may not declare it: import the definitions"):
        await refused.connect()
    await refused.close()
    dev = AmqpBus(plain, "tls-dev", BusSettings(url=plain))
    await dev.connect()  # declares the topology
    await dev.close()
    check = await aio_pika.connect(plain, timeout=10)
    async with check:
        channel = await check.channel()
        await channel.declare_exchange(RPC_EXCHANGE, passive=True)
        await channel.declare_queue(EVENT_HISTORY_QUEUE, passive=True)
    again = AmqpBus(refused_url, "tls-bare", BusSettings(url=refused_url))
    await again.connect()  # now the client only checks it, passively
    await again.close()
