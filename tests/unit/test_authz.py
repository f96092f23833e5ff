"""The authoriser's two modes, migration's scheduler-only rule, whose messages count, and
the memory:// bus carrying its user as RabbitMQ's user_id."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.service import AgentService
from drivers.test import TestDriver
from virtbus.bus.memory import MemoryBus
from virtbus.bus.topology import AUDIT_EXCHANGE
from virtbus.client import Client
from virtbus.errors import AuthDenied, InvalidArgument
from virtbus.protocol import ops
from virtbus.protocol.base import to_wire
from virtbus.protocol.envelope import Envelope, Kind
from virtbus.protocol.messages import AUDIT_CALL, AUDIT_CALLS, AuditRecord, audit_records
from virtbus.protocol.registry import Access, Op, Service, Target
from virtbus.protocol.snapshot import SnapshotXmlRequest
from virtbus.security import audit as audit_module
from virtbus.security.audit import AuditTrail, read_log
from virtbus.security.authz import Authorizer
from virtbus.security.trust import publisher_trusted
from virtbus.settings import AgentSettings

POLICY = """
[users]
ann = ["admin"]
sam = ["scheduler"]
"""


def test_without_a_policy_file_every_user_is_admin_but_anonymous_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    authz = Authorizer.load(tmp_path / "absent.toml", own_user="guest")
    assert not authz.enforcing
    assert "development mode" in caplog.text
    assert authz.decide("anyone", ops.MIGRATION_PERFORM, "h").allowed
    with pytest.raises(AuthDenied, match="no user_id"):
        authz.check(None, ops.HOST_PING, "h")
    # Dev mode: the shared dev user speaks for every host; another user only for itself.
    assert authz.speaks_for("guest", "node1") and authz.speaks_for("node1", "node1")
    assert not authz.speaks_for("mallory", "node1") and not authz.speaks_for(None, "node1")


def test_a_policy_file_is_enforced_and_migration_is_the_schedulers(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(POLICY)
    authz = Authorizer.load(tmp_path / "p.toml", own_user="sam")
    assert authz.enforcing
    assert authz.decide("ann", ops.DOMAIN_UNDEFINE, "h", "x").allowed
    denied = authz.decide("ann", ops.MIGRATION_PERFORM, "h", "web-1")
    assert not denied.allowed and "only from the scheduler role" in denied.reason
    assert authz.decide("sam", ops.MIGRATION_PERFORM, "h", "web-1").allowed
    assert not authz.decide("bob", ops.HOST_PING, "h").allowed  # unknown user: nothing
    assert not authz.speaks_for("sam", "node1")  # enforcing: only the host's own user
    assert authz.speaks_for("node1", "node1")


def test_a_broken_policy_file_stops_the_daemon_instead_of_opening_it(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text("[[rules]]\nrole = 'x'\nops = ['@nope']\n")
    with pytest.raises(InvalidArgument, match="unknown access class"):
        Authorizer.load(tmp_path / "p.toml", own_user="x")
    with pytest.raises(InvalidArgument):
        AgentService(
            AgentSettings(host="h", state_dir=tmp_path, policy=tmp_path / "p.toml"),
            MemoryBus("memory://authz-broken", "h"),
            TestDriver(),
        )


def test_publisher_trust() -> None:
    assert publisher_trusted("n1", "n1")
    assert publisher_trusted("shared", "n1", "shared")
    assert not publisher_trusted("n2", "n1", None)
    assert not publisher_trusted("", "n1", "")


async def test_memory_bus_calls_carry_their_user_and_the_agent_enforces(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(POLICY + '\n[[rules]]\nuser = "vic"\nops = ["@read"]\n')
    agent = AgentService(
        AgentSettings(host="m1", state_dir=tmp_path / "s", policy=tmp_path / "p.toml"),
        MemoryBus("memory://h@authz", "m1"),
        TestDriver(),
    )
    await agent.start()
    try:
        vic = Client(MemoryBus("memory://vic@authz", "vic"))
        await vic.bus.connect()
        assert (await vic.host("m1").ping()).host == "m1"
        with pytest.raises(AuthDenied, match=r"'vic' may not call host\.set_draining"):
            await vic.host("m1").set_draining(True)
        await vic.close()
    finally:
        await agent.stop()


async def test_the_audit_log_rotates_and_reads_back_oldest_first(tmp_path: Path) -> None:
    published: list[tuple[str, Envelope]] = []

    async def publish(key: str, env: Envelope) -> None:
        published.append((key, env))

    trail = AuditTrail(tmp_path / "audit.log", "h1", max_bytes=350, keep=2, publish=publish)
    for i in range(12):
        call = Envelope(kind=Kind.CALL, op="domain.start", body={}, user=f"u{i}", id=f"c{i}")
        trail.record(call, f"web-{i}", {"ok": i % 3 != 0, "error": {"code": "NO_DOMAIN"}}, 0.01)
        await trail.flush()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.log", "audit.log.1", "audit.log.2"]  # keep=2: older ones gone
    records = read_log(tmp_path / "audit.log")
    ids = [r.id for r in records]
    assert ids == sorted(ids, key=lambda x: int(x[1:])) and ids[-1] == "c11" and len(ids) < 12
    assert records[-1].code == "OK" and records[-3].code == "NO_DOMAIN"
    assert [k for k, _ in published][:2] == ["h1.u0", "h1.u1"] and len(published) == 12
    assert all(env.kind is Kind.AUDIT for _, env in published)


async def test_memory_bus_agent_audits_denials_on_the_stream(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(POLICY)
    agent = AgentService(
        AgentSettings(host="m2", state_dir=tmp_path / "s", policy=tmp_path / "p.toml"),
        MemoryBus("memory://m2@audit", "m2"),
        TestDriver(),
    )
    await agent.start()
    try:
        ann, bob = (Client(MemoryBus(f"memory://{u}@audit", u)) for u in ("ann", "bob"))
        for c in (ann, bob):
            await c.bus.connect()
        await ann.host("m2").ping()
        with pytest.raises(AuthDenied):
            await bob.host("m2").ping()
        await agent.audit.flush()
        seen = [(r.user, r.code, by) async for r, by in ann.audit(idle=1.0)]
        assert seen == [("ann", "OK", "m2"), ("bob", "AUTH_DENIED", "m2")]
        for c in (ann, bob):
            await c.close()
    finally:
        await agent.stop()


async def test_a_flush_publishes_one_message_per_run_of_one_users_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    published: list[tuple[str, Envelope]] = []

    async def publish(key: str, env: Envelope) -> None:
        published.append((key, env))

    trail = AuditTrail(tmp_path / "audit.log", "h1", max_bytes=1 << 20, keep=2, publish=publish)
    users = ["u1", "u1", "u2", "u2", "u1"]
    for i, user in enumerate(users):
        call = Envelope(kind=Kind.CALL, op="domain.info", body={}, user=user, id=f"c{i}")
        trail.record(call, "web", {"ok": True}, 0.001)
    await trail.flush()
    assert [k for k, _ in published] == ["h1.u1", "h1.u2", "h1.u1"]  # call order kept
    assert {env.op for _, env in published} == {AUDIT_CALLS}
    runs = [[r.id for r in audit_records(env.op, env.body)] for _, env in published]
    assert runs == [["c0", "c1"], ["c2", "c3"], ["c4"]]
    assert [r.id for r in read_log(tmp_path / "audit.log")] == [f"c{i}" for i in range(5)]
    # a run longer than BATCH is cut into messages of at most BATCH records
    monkeypatch.setattr(audit_module, "BATCH", 2)
    published.clear()
    for i in range(5):
        call = Envelope(kind=Kind.CALL, op="domain.info", body={}, user="u1", id=f"d{i}")
        trail.record(call, "web", {"ok": True}, 0.001)
    await trail.flush()
    runs = [[r.id for r in audit_records(env.op, env.body)] for _, env in published]
    assert runs == [["d0", "d1"], ["d2", "d3"], ["d4"]]


async def test_the_client_reads_batched_and_older_single_audit_messages(tmp_path: Path) -> None:
    agent = AgentService(
        AgentSettings(host="m3", state_dir=tmp_path / "s"),
        MemoryBus("memory://m3@audit2", "m3"),
        TestDriver(),
    )
    await agent.start()
    try:
        ann = Client(MemoryBus("memory://ann@audit2", "ann"))
        await ann.bus.connect()
        old = AuditRecord(ts=1.0, daemon="m3", user="ann", op="host.ping", target=None,
                          code="OK", ms=0.1, id="old-1")  # fmt: skip
        await agent.bus.publish(
            AUDIT_EXCHANGE, "m3.ann",
            Envelope(kind=Kind.AUDIT, op=AUDIT_CALL, body=to_wire(old), src="m3"),
        )  # fmt: skip
        for _ in range(3):
            await ann.host("m3").ping()
        await agent.audit.flush()
        seen = [(r.id == "old-1", r.op, by) async for r, by in ann.audit(idle=1.0)]
        assert seen == [(True, "host.ping", "m3")] + [(False, "host.ping", "m3")] * 3
        await ann.close()
    finally:
        await agent.stop()


async def test_the_audit_writer_gathers_the_calls_of_its_window_into_one_write(
    tmp_path: Path,
) -> None:
    trail = AuditTrail(tmp_path / "audit.log", "h1", max_bytes=1 << 20, keep=2)
    writes: list[bytes] = []
    append = trail._append
    trail._append = lambda data: (writes.append(data), append(data))[1]  # type: ignore[method-assign]
    writer = asyncio.create_task(trail.run())
    try:
        for i in range(5):  # calls answered one after another, well within one window
            call = Envelope(kind=Kind.CALL, op="domain.start", body={}, user="u", id=f"c{i}")
            trail.record(call, "web", {"ok": True}, 0.001)
            await asyncio.sleep(0)
        async with asyncio.timeout(5):
            while trail.written < 5:
                await asyncio.sleep(0.005)
        assert len(writes) == 1  # one write (and one thread hop) for the five calls
        trail.record(call, "web", {"ok": True}, 0.001)
        await trail.flush()  # a stop's flush writes at once, not after the window
        assert trail.written == 6 and len(writes) == 2
    finally:
        writer.cancel()
    assert [r.id for r in read_log(tmp_path / "audit.log")] == [f"c{i}" for i in range(5)] + ["c4"]


def test_a_flag_that_needs_another_ops_permission_is_declared_on_a_request_field() -> None:
    """snapshot XML's security_info needs domain.read_secure (what the agent checks too);
    a declaration naming no field of its request is refused when the op is made."""
    op = ops.DOMAIN_SNAPSHOT_XML
    plain = SnapshotXmlRequest(domain="d", snapshot="s")
    secure = SnapshotXmlRequest(domain="d", snapshot="s", security_info=True)
    assert op.required(plain) == [] and op.required(secure) == [ops.DOMAIN_READ_SECURE]
    with pytest.raises(ValueError, match="no request field"):
        Op("x.y", SnapshotXmlRequest, ops.DOMAIN_SNAPSHOT_XML.result, Service.AGENT, "",
           access=Access.READ, target=Target.DOMAIN,
           flag_requires={"secure": ops.DOMAIN_READ_SECURE})  # fmt: skip
