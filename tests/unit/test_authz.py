"""The authoriser's two modes, migration's scheduler-only rule, whose messages count, and
the memory:// bus carrying its user as RabbitMQ's user_id."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.service import AgentService
from drivers.test import TestDriver
from virtbus.bus.memory import MemoryBus
from virtbus.client import Client
from virtbus.errors import AuthDenied, InvalidArgument
from virtbus.protocol import ops
from virtbus.security.authz import Authorizer, publisher_trusted
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
