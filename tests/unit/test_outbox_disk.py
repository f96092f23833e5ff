"""The outbox when its log cannot be written (a full state dir): it keeps publishing from
memory, reports the failure to the StateDisk (the agent's gate for new work), and once
the disk takes writes again it writes what it owes — the events not yet confirmed, and
the ack of those that were — so a restarted outbox republishes nothing confirmed. The
full disk through a real agent and broker: tests/integration/test_state_disk_full.py."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import pytest

from agent.outbox import EventOutbox
from agent.statedisk import StateDisk
from virtbus.errors import OperationFailed
from virtbus.protocol.envelope import Envelope, Kind
from virtbus.settings import Backoff
from virtbus.store import RecordLog

FAST = Backoff(initial=0.01, maximum=0.02)


def event(seq: int) -> Envelope:
    return Envelope(Kind.EVENT, "domain.event", {"seq": seq, "domain": "d", "event": "started"})


class Broker:
    def __init__(self) -> None:
        self.sent: list[int] = []
        self.changed = asyncio.Event()

    async def publish(self, env: Envelope) -> None:
        self.sent.append(env.body["seq"])
        self.changed.set()

    async def until(self, n: int) -> None:
        while len(self.sent) < n:
            self.changed.clear()
            await self.changed.wait()


@pytest.fixture
def full(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """While ``state["full"]`` is set, every RecordLog append fails with ENOSPC, as the
    probe's write does."""
    state: dict[str, Any] = {"full": False}
    append = RecordLog.append

    async def failing(self: RecordLog, *args: Any, **kwargs: Any) -> None:
        if state["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        await append(self, *args, **kwargs)

    def probe(self: StateDisk) -> None:
        if state["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RecordLog, "append", failing)
    monkeypatch.setattr(StateDisk, "_write_probe", probe)
    return state


async def restored(path: Path) -> int:
    again = EventOutbox(Broker().publish, path=path, capacity=100, retry=FAST)
    await again.load()
    return again.restored


async def test_published_from_memory_and_the_owed_writes_follow(
    tmp_path: Path, full: dict[str, Any]
) -> None:
    path = tmp_path / "events.log"
    disk = StateDisk(tmp_path, probe_interval=0.01)
    broker = Broker()
    box = EventOutbox(broker.publish, path=path, capacity=100, retry=FAST, disk=disk)
    await box.load()
    task = asyncio.create_task(box.run())
    try:
        box.put(event(box.next_seq()))
        await broker.until(1)
        assert await box.flush(5)
        full["full"] = True
        for _ in range(3):  # its log cannot take these: they go out all the same
            box.put(event(box.next_seq()))
        await broker.until(4)
        assert await box.flush(5)
        assert broker.sent == [1, 2, 3, 4]
        with pytest.raises(OperationFailed, match="No space left on device"):
            disk.check()
        full["full"] = False  # room again: the probe opens the gate, the outbox writes
        async with asyncio.timeout(5):
            while disk.error is not None:
                await asyncio.sleep(0.01)
        disk.check()
        assert await box.flush(5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await disk.close()
    assert await restored(path) == 0  # nothing confirmed comes back


async def test_an_event_written_but_not_acked_is_acked_after_the_disk_returns(
    tmp_path: Path, full: dict[str, Any]
) -> None:
    """The event reached the log, then the disk filled before its ack: the owed ack is
    written once the disk takes writes again (else a restart republishes it)."""
    path = tmp_path / "events.log"
    disk = StateDisk(tmp_path, probe_interval=0.01)
    held = asyncio.Event()
    sent: list[int] = []

    async def publish(env: Envelope) -> None:
        full["full"] = True  # the event is in the log; its ack will not fit
        await held.wait()
        sent.append(env.body["seq"])

    box = EventOutbox(publish, path=path, capacity=100, retry=FAST, disk=disk)
    await box.load()
    task = asyncio.create_task(box.run())
    try:
        box.put(event(box.next_seq()))
        async with asyncio.timeout(5):
            while not full["full"]:
                await asyncio.sleep(0.01)
        held.set()
        assert await box.flush(5)
        assert sent == [1] and disk.error is not None
        assert await restored(path) == 1  # premise: on disk without its ack
        full["full"] = False
        async with asyncio.timeout(5):
            while await restored(path) != 0:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await disk.close()
