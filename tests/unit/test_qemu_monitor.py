"""Monitor.connect against a scripted QMP server: failed attempts never wedge the client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from qemu.qmp import Runstate

from drivers.qemu.monitor import EventQueue, Monitor
from drivers.qemu.settings import QemuSettings
from virtbus.errors import OperationTimeout

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 8}, "package": ""},
                    "capabilities": []}}  # fmt: skip


class FakeQmp:
    """Drops the first ``drop`` connections before the greeting; ``mute``: never greets."""

    def __init__(self, path: Path, drop: int = 0, mute: bool = False) -> None:
        self.path, self.drop, self.mute = path, drop, mute
        self.attempts = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.attempts += 1
        self.writers.append(writer)
        try:
            if self.attempts <= self.drop:
                return
            if self.mute:
                await reader.read()  # until the client gives up
                return
            writer.write(json.dumps(GREETING).encode() + b"\r\n")
            buf, decoder = "", json.JSONDecoder()
            while data := await reader.read(4096):  # QMP is a JSON stream, not lines
                buf = (buf + data.decode()).lstrip()
                while buf:
                    try:
                        msg, end = decoder.raw_decode(buf)
                    except ValueError:
                        break
                    buf = buf[end:].lstrip()
                    reply: dict[str, object] = {"return": {}}
                    if "id" in msg:
                        reply["id"] = msg["id"]
                    writer.write(json.dumps(reply).encode() + b"\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.fixture
async def qmp(tmp_path: Path) -> AsyncIterator[FakeQmp]:
    fake = FakeQmp(tmp_path / "qmp.sock")
    fake.server = await asyncio.start_unix_server(fake._serve, path=str(fake.path))
    yield fake
    for w in fake.writers:
        w.close()
    fake.server.close()
    await fake.server.wait_closed()


async def test_connect_retries_after_failed_attempts(qmp: FakeQmp) -> None:
    qmp.drop = 3  # EOF before the greeting: qemu.qmp is left disconnecting each time
    mon = Monitor("m", qmp.path, QemuSettings(), EventQueue(limit=8))
    await mon.connect(5.0, lambda: True, 0.01)
    try:
        assert mon.connected and qmp.attempts == 4
        assert await mon.execute("query-status") == {}
    finally:
        await mon.close()


async def test_connect_timeout_leaves_the_client_idle(qmp: FakeQmp) -> None:
    qmp.mute = True
    mon = Monitor("m", qmp.path, QemuSettings(), EventQueue(limit=8))
    with pytest.raises(OperationTimeout):
        await mon.connect(0.3, lambda: True, 0.01)
    assert mon._client.runstate == Runstate.IDLE  # nothing left mid-connect


async def test_attempt_cut_short_after_connecting_is_undone_before_retry(
    qmp: FakeQmp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncio.wait_for may time out an attempt that got through (its result lost): the
    client is then left connected, and a bare retry would raise qemu.qmp's StateError."""
    mon = Monitor("m", qmp.path, QemuSettings(), EventQueue(limit=8))
    real = mon._client.connect
    calls = 0

    async def lost_result(address: str) -> None:
        nonlocal calls
        calls += 1
        await real(address)
        if calls == 1:
            raise TimeoutError

    monkeypatch.setattr(mon._client, "connect", lost_result)
    await mon.connect(5.0, lambda: True, 0.01)
    try:
        assert mon.connected and calls == 2 and qmp.attempts == 2
    finally:
        await mon.close()
