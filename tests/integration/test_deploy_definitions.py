"""deploy/rabbitmq/definitions.json: generated from the topology, loads into the running
RabbitMQ, and an agent and the CLI work against exactly that topology with its users."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.procs import agent_process, cli
from virtbus.bus.definitions import definitions

pytestmark = pytest.mark.rabbitmq
ROOT = Path(__file__).resolve().parents[2]


def _without_hashes(defs: dict[str, Any]) -> dict[str, Any]:
    return {**defs, "users": [{**u, "password_hash": "-"} for u in defs["users"]]}


def test_committed_definitions_match_the_topology() -> None:
    committed = json.loads((ROOT / "deploy/rabbitmq/definitions.json").read_text())
    assert _without_hashes(committed) == _without_hashes(
        json.loads(json.dumps(definitions("/virtbus", "x")))
    )


def test_generated_definitions_have_no_default_password() -> None:
    """Without --password, every user gets its own random password, printed once."""
    import base64
    import subprocess
    import sys

    from virtbus.bus.definitions import password_hash

    env = {k: v for k, v in os.environ.items() if k != "VIRTBUS_BROKER_PASSWORD"}
    runs = [
        subprocess.run([sys.executable, "-m", "virtbus.bus.definitions"], capture_output=True,
                       text=True, env=env, timeout=60, check=True)
        for _ in range(2)
    ]  # fmt: skip
    secrets = [
        dict(line.strip().split(": ", 1) for line in r.stderr.splitlines()[1:]) for r in runs
    ]
    assert set(secrets[0]) == {"virtbus-agent", "virtbus-scheduler", "virtbus-client"}
    assert len(set(secrets[0].values()) | set(secrets[1].values())) == 6  # all different
    for user in json.loads(runs[0].stdout)["users"]:
        salt = base64.b64decode(user["password_hash"])[:4]
        assert password_hash(secrets[0][user["name"]], salt) == user["password_hash"]
    assert "change-me" not in (ROOT / "virtbus/bus/definitions.py").read_text()


async def rabbitmqctl(*args: str, stdin: bytes | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def test_agent_and_cli_work_on_imported_definitions(
    rabbitmq: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every agent shares the user virtbus-agent here (not its host name): the CLI must be
    # told to believe that user's events for any host.
    monkeypatch.setenv("VIRTBUS_TRUSTED_PUBLISHERS", "virtbus-agent")
    vhost = f"/virtbus-test-{uuid.uuid4().hex[:6]}"
    password = uuid.uuid4().hex
    # rabbitmqctl reads the file as the rabbitmq user, who cannot enter pytest's tmp dirs.
    fd, name = tempfile.mkstemp(prefix="virtbus-defs-", suffix=".json")
    os.write(fd, json.dumps(definitions(vhost, password)).encode())
    os.close(fd)
    os.chmod(name, 0o644)
    try:
        await rabbitmqctl("import_definitions", name)
    finally:
        os.unlink(name)
    quoted = vhost.replace("/", "%2F")
    agent_url = f"amqp://virtbus-agent:{password}@127.0.0.1:5672/{quoted}"
    client_url = f"amqp://virtbus-client:{password}@127.0.0.1:5672/{quoted}"
    try:
        for _ in range(50):  # the import is asynchronous
            if "virtbus.scheduler" in await rabbitmqctl("list_queues", "-p", vhost, "name"):
                break
            await asyncio.sleep(0.2)
        async with agent_process("defs-a", tmp_path, bus=agent_url):
            r = await cli(
                "define",
                str(ROOT / "deploy/examples/minimal.xml"),
                "--host",
                "defs-a",
                bus=client_url,
            )
            assert r.code == 0, r.err
            assert (await cli("start", "minimal", "--host", "defs-a", bus=client_url)).code == 0
            replay = await cli(
                "--json", "event", "--since", "0", "--count", "2", "--timeout", "10", bus=client_url
            )
            assert replay.code == 0, replay.err
            assert [json.loads(line)["event"] for line in replay.out.splitlines()] == [
                "defined", "started",
            ]  # fmt: skip
            queues = await rabbitmqctl("list_queues", "-p", vhost, "name")
            assert "virtbus.agent.defs-a" in queues
    finally:
        await rabbitmqctl("delete_vhost", vhost)
        for user in ("virtbus-agent", "virtbus-scheduler", "virtbus-client"):
            await rabbitmqctl("delete_user", user)
