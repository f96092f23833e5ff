"""Issue 11, item 13: a login the broker refuses is AUTH_FAILED naming credentials and
vhost, not BUS_UNAVAILABLE "is RabbitMQ running?". Against the real RabbitMQ, with a
user and a vhost of this test's own (rabbitmqctl; unique names, deleted afterwards)."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import AGENT, BUS_URL, agent_process, cli, unique_host

pytestmark = pytest.mark.rabbitmq


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def stranger() -> Iterator[tuple[str, str, str]]:
    """(user, password, vhost): the user exists but has no permission on the vhost."""
    tag = uuid.uuid4().hex[:8]
    user, password, vhost = f"vb-auth-{tag}", f"pw-{tag}", f"vb-auth-vhost-{tag}"
    _ctl("add_user", user, password)
    _ctl("add_vhost", vhost)
    try:
        yield user, password, vhost
    finally:
        _ctl("delete_user", user)
        _ctl("delete_vhost", vhost)


def _one_line_auth_failed(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: AUTH_FAILED: "), err
    assert "is RabbitMQ running" not in err
    return lines[0]


async def test_refused_logins_are_auth_failed(
    rabbitmq: None, tmp_path: Path, stranger: tuple[str, str, str]
) -> None:
    user, password, vhost = stranger
    host = unique_host("auth")
    cases = [
        (f"amqp://guest:wrong-{user}@127.0.0.1:5672/", ("user 'guest'", "password", "vhost '/'")),
        (f"amqp://nobody-{user}:x@127.0.0.1:5672/", (f"user 'nobody-{user}'", "password")),
        (f"amqp://{user}:{password}@127.0.0.1:5672/{vhost}", (f"vhost '{vhost}'", "permission")),
    ]
    async with agent_process(host, tmp_path):
        for url, words in cases:
            r = await cli("list", "--host", host, bus=url)
            assert r.code == 1, (url, r)
            line = _one_line_auth_failed(r.err)
            assert all(w in line for w in words), (words, line)
            assert "wrong-" not in line and f":{password}@" not in line  # password redacted
        ok = await cli("--json", "list", "--all", "--host", host, bus=BUS_URL)
        assert ok.code == 0 and ok.json() == [], ok  # the right credentials still work


async def test_an_agent_with_refused_credentials_says_auth_failed(
    rabbitmq: None, tmp_path: Path, stranger: tuple[str, str, str]
) -> None:
    user, password, vhost = stranger
    log = tmp_path / "agent.log"
    with open(log, "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *AGENT, "--host", unique_host("auth"), "--state-dir", str(tmp_path),
            "--bus", f"amqp://{user}:{password}@127.0.0.1:5672/{vhost}",
            stdout=asyncio.subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
        assert await asyncio.wait_for(proc.wait(), 30) == 1
    text = log.read_text()
    assert "AUTH_FAILED" in text and f"vhost '{vhost}'" in text, text
