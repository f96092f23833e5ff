"""The TLS options of a bus URL and settings (virtbus.bus.tls), and certificate users in
the generated definitions; the handshakes themselves: tests/integration/test_tls_bus.py."""

from __future__ import annotations

import asyncio
import re
import ssl
from pathlib import Path

import pytest

from virtbus.bus.definitions import CLIENT_PERMISSIONS, ROLES, definitions, host_permissions
from virtbus.bus.oneshot import OneShotBus
from virtbus.bus.tls import _ssl_error, client_context, login_user, tls_files
from virtbus.bus.topology import (
    DEAD_LETTER,
    EXCHANGES,
    HISTORIES,
    JOURNAL_EXCHANGE,
    JOURNAL_QUEUE,
    SCHEDULER_QUEUE,
)
from virtbus.errors import BusUnavailable, InvalidArgument
from virtbus.security import pki
from virtbus.settings import BusSettings


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ca")
    pki.init_ca(directory)
    pki.issue(directory, pki.Kind.USER, "alice", role="viewer")
    return directory


def test_plain_urls_have_no_tls_and_amqps_takes_files_from_settings_or_query(ca: Path) -> None:
    assert tls_files("amqp://u:p@h/", BusSettings()) is None
    crt, key = ca / "users" / "alice.crt", ca / "users" / "alice.key"
    settings = BusSettings(tls_ca=ca / "ca.crt", tls_cert=crt, tls_key=key)
    files = tls_files("amqps://h/", settings)
    assert files is not None and files.external and files.ca == ca / "ca.crt"
    over = tls_files(f"amqps://h/?cafile=/x/ca.pem&certfile={crt}&keyfile={key}", BusSettings())
    assert over is not None and over.ca == Path("/x/ca.pem") and over.cert == crt
    server_only = tls_files("amqps://u:p@h/", BusSettings(tls_ca=ca / "ca.crt"))
    assert server_only is not None and not server_only.external  # PLAIN over TLS: dev


def test_half_an_identity_and_a_password_with_a_certificate_are_refused(ca: Path) -> None:
    crt = ca / "users" / "alice.crt"
    with pytest.raises(InvalidArgument, match=r"both bus\.tls_cert and bus\.tls_key"):
        tls_files("amqps://h/", BusSettings(tls_cert=crt))
    with pytest.raises(InvalidArgument, match="drop the password"):
        tls_files("amqps://alice:pw@h/", BusSettings(tls_cert=crt, tls_key=crt))


def test_the_certificate_cn_is_the_user(ca: Path) -> None:
    crt, key = ca / "users" / "alice.crt", ca / "users" / "alice.key"
    files = tls_files("amqps://h/", BusSettings(tls_cert=crt, tls_key=key))
    assert files is not None
    assert login_user("amqps://h/", files) == "alice"
    assert login_user("amqps://alice@h/", files) == "alice"
    with pytest.raises(InvalidArgument, match="certificate's CN is the user"):
        login_user("amqps://bob@h/", files)
    assert login_user("amqp://bob:pw@h/", None) == "bob"


def test_unreadable_tls_files_are_invalid_arg_naming_them(ca: Path, tmp_path: Path) -> None:
    crt = ca / "users" / "alice.crt"
    files = tls_files("amqps://h/", BusSettings(tls_ca=tmp_path / "nope.crt"))
    assert files is not None
    with pytest.raises(InvalidArgument, match=r"nope\.crt"):
        client_context(files)
    mismatched = tls_files("amqps://h/", BusSettings(tls_cert=crt, tls_key=ca / "ca.key"))
    assert mismatched is not None
    with pytest.raises(InvalidArgument, match="cannot be loaded"):
        client_context(mismatched)  # the CA's key is not the certificate's


async def test_the_one_shot_transport_logs_in_as_the_cn_and_refuses_bad_files(
    ca: Path, tmp_path: Path
) -> None:
    crt, key = ca / "users" / "alice.crt", ca / "users" / "alice.key"
    closed_port = "amqps://127.0.0.1:1/"
    bus = OneShotBus(closed_port, "t", BusSettings(tls_cert=crt, tls_key=key, connect_timeout=2))
    with pytest.raises(BusUnavailable, match="cannot connect"):
        await bus.connect()
    assert bus.user == "alice"  # read from the certificate before the handshake
    bad = OneShotBus(closed_port, "t", BusSettings(tls_ca=tmp_path / "missing.crt"))
    with pytest.raises(InvalidArgument, match=r"missing\.crt"):
        await bad.connect()


def test_certificate_users_have_no_password_and_clients_configure_only_their_queues() -> None:
    defs = definitions("/v", None, hosts=["node1"], clients=["alice"])
    users = {u["name"]: u for u in defs["users"]}
    assert {"alice", "node1", "virtbus-scheduler"} <= set(users)
    assert all(u["password_hash"] == "" for u in users.values())
    configure, write, read = CLIENT_PERMISSIONS
    # Every shared name from the topology itself, so a newly added one is checked too.
    shared = [e.name for e in EXCHANGES] + [q.name for q in HISTORIES.values()]
    shared += [DEAD_LETTER.name, SCHEDULER_QUEUE]
    assert {"virtbus.dead-letters", "virtbus.scheduler.journal"} <= set(shared)  # premise
    for name in shared:
        assert not re.match(configure, name), name
        assert not re.match(host_permissions("node1")[0], name), name
    scheduler_configure = ROLES["virtbus-scheduler"][0]
    assert [n for n in shared if re.match(scheduler_configure, n)] == [SCHEDULER_QUEUE]
    for who in (CLIENT_PERMISSIONS, host_permissions("node1")):  # the scheduler's journal
        assert not re.match(who[1], JOURNAL_EXCHANGE) and not re.match(who[2], JOURNAL_QUEUE)
    assert re.match(configure, "amq.gen-Xy12")
    assert re.match(write, "virtbus.rpc") and not re.match(write, "virtbus.events")
    assert re.match(read, "virtbus.events.history")
    agent_configure = host_permissions("node1")[0]
    assert re.match(agent_configure, "virtbus.agent.node1")
    assert not re.match(agent_configure, "virtbus.agent.node2")
    with pytest.raises(InvalidArgument):
        definitions("/v", {"alice": "x"}, clients=["alice"])  # others lack passwords
    # A name given twice would get the permissions of whichever came last.
    with pytest.raises(InvalidArgument, match="'node1' is both a host and a client"):
        definitions("/v", None, hosts=["node1"], clients=["node1"])
    with pytest.raises(InvalidArgument, match="'virtbus-scheduler' is both a role and a client"):
        definitions("/v", None, clients=["virtbus-scheduler"])


def test_the_ssl_error_inside_aiormqs_wrapper_is_found_and_cycles_end() -> None:
    inner = ssl.SSLError(1, "[SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] ...")
    wrapped = ConnectionError("Server communication error", inner)
    assert _ssl_error(wrapped) is inner
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a  # a cycle: aiormq's errors have made one
    assert _ssl_error(a) is None


async def test_a_broker_that_never_answers_is_named_with_the_timeout() -> None:
    """A listener that accepts and stays silent (an overloaded or wedged broker): the
    daemon's start-up error says it timed out, not an empty reason."""
    from virtbus.bus.amqp import AmqpBus

    silent: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    bus = AmqpBus(f"amqp://guest:guest@127.0.0.1:{port}/", "t", BusSettings(connect_timeout=0.3))
    try:
        with pytest.raises(BusUnavailable, match=r"127\.0\.0\.1:\d+.*: timed out after 0\.3 s"):
            await bus.connect()
        assert silent, "the premise: the connection was accepted"
    finally:
        for w in silent:
            w.close()
        server.close()
        await server.wait_closed()
