"""On-disk durability: atomic files, record logs, the event outbox and the call log."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path

import pytest

from agent.calllog import CallLog
from agent.dispatch import Dispatcher, Prepared
from agent.migration import MigrationGuard
from agent.outbox import EventOutbox
from virtbus.errors import BusUnavailable
from virtbus.protocol import ops
from virtbus.protocol.envelope import Envelope, Kind
from virtbus.settings import Backoff
from virtbus.store import RecordLog, atomic_write, quarantine, read_bytes, replace_file

FAST = Backoff(initial=0.01, maximum=0.02)


def event(seq: int) -> Envelope:
    return Envelope(Kind.EVENT, "domain.event", {"seq": seq, "domain": "d", "event": "started"})


class FlakyBroker:
    def __init__(self) -> None:
        self.up = True
        self.got: list[int] = []

    async def publish(self, env: Envelope) -> None:
        if not self.up:
            raise BusUnavailable("down")
        self.got.append(env.body["seq"])


async def test_atomic_write_and_quarantine(tmp_path: Path) -> None:
    target = tmp_path / "d.xml"
    await atomic_write(target, b"one")
    await atomic_write(target, b"two")
    assert await read_bytes(target) == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["d.xml"]  # no temp files left
    moved = await quarantine(target, "garbage")
    assert moved is not None and moved.name.startswith("d.xml.corrupt-")
    assert await read_bytes(target) is None


def test_replace_file_from_threads_at_once(tmp_path: Path) -> None:
    """Threads replacing one file together each write a temp file of their own: with one
    temp name per process, one thread renamed another's away (FileNotFoundError), which
    failed concurrent migration prepares on one destination."""
    target = tmp_path / "f.json"
    start, errors = threading.Barrier(6), []

    def writer(n: int) -> None:
        start.wait()
        try:
            for i in range(100):
                replace_file(target, f"{n}:{i}".encode(), fsync=False)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_text().endswith(":99")
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left


async def test_prepared_migrations_written_together_all_reach_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent prepares on one destination: the file ends holding every one (an older
    snapshot must not replace a newer one). The first write is made slow, so without one
    write at a time it is the last to land."""
    first = threading.Event()

    def slow_first(path: Path, data: bytes, *, fsync: bool = True) -> None:
        if not first.is_set():
            first.set()
            time.sleep(0.2)
        replace_file(path, data, fsync=fsync)

    async def ask(host: str, migration: str) -> str:
        raise AssertionError("not asked")

    monkeypatch.setattr("virtbus.store.replace_file", slow_first)
    guard = MigrationGuard(tmp_path / "prepared.json", ask, strict=True)
    await asyncio.gather(*(guard.record(f"m{i}", f"tcp:127.0.0.1:{4000 + i}") for i in range(20)))
    on_disk = json.loads((tmp_path / "prepared.json").read_text())
    assert on_disk == {f"m{i}": f"tcp:127.0.0.1:{4000 + i}" for i in range(20)}
    again = MigrationGuard(tmp_path / "prepared.json", ask, strict=True)
    again.load()
    assert again.uri_of("m7", "h") == "tcp:127.0.0.1:4007"


async def test_record_log_cuts_a_torn_tail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = RecordLog(tmp_path / "r.log")
    await log.load()
    await log.append([{"n": 1}, {"n": 2}])
    log.close()
    with open(tmp_path / "r.log", "ab") as fh:
        fh.write(b"\x00\x00\x01\x00partial")  # a record header promising more than there is
    again = RecordLog(tmp_path / "r.log")
    with caplog.at_level(logging.WARNING):
        assert await again.load() == [{"n": 1}, {"n": 2}]
    assert "torn" in caplog.text
    await again.append([{"n": 3}])
    assert [r["n"] for r in await RecordLog(tmp_path / "r.log").load()] == [1, 2, 3]


async def test_outbox_keeps_order_through_an_outage_and_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox" / "events.log"
    broker = FlakyBroker()
    box = EventOutbox(broker.publish, path=path, capacity=100, retry=FAST)
    await box.load()
    runner = asyncio.create_task(box.run())
    for _ in range(3):
        box.put(event(box.next_seq()))
    assert await box.flush(2)
    broker.up = False
    for _ in range(4):
        box.put(event(box.next_seq()))
    await asyncio.sleep(0.1)
    assert broker.got == [1, 2, 3] and len(box) == 4
    runner.cancel()  # the agent dies while the broker is away
    await asyncio.gather(runner, return_exceptions=True)
    await box.save_unsent()

    broker.up = True
    reborn = EventOutbox(broker.publish, path=path, capacity=100, retry=FAST)
    await reborn.load()
    assert reborn.restored == 4 and reborn.last_seq == 7
    reborn.put(event(reborn.next_seq()))
    runner = asyncio.create_task(reborn.run())
    assert await reborn.flush(2)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    assert broker.got == [1, 2, 3, 4, 5, 6, 7, 8]  # in order, original numbers, no gap


async def test_outbox_overflow_drops_the_oldest_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = FlakyBroker()
    broker.up = False
    box = EventOutbox(broker.publish, path=tmp_path / "e.log", capacity=3, retry=FAST)
    await box.load()
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            box.put(event(box.next_seq()))
    assert box.dropped == 2 and "dropped the oldest event seq=2" in caplog.text
    broker.up = True
    runner = asyncio.create_task(box.run())
    assert await box.flush(2)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    assert broker.got == [3, 4, 5]  # the gap 1-2 is visible to subscribers


async def test_replies_survive_a_restart_and_redelivery_is_not_rerun(tmp_path: Path) -> None:
    runs: list[str] = []

    async def execute(call: Envelope) -> object:
        runs.append(call.id)
        return {"state": "running"}

    call = Envelope(Kind.CALL, "domain.start", {"domain": "d1"}, id="call-1")
    first_log = CallLog(tmp_path / "calls.log", keep=10)

    def prepare(c: Envelope) -> Prepared:
        return Prepared(ops.DOMAIN_START, "d1", lambda: execute(c))

    first = Dispatcher(prepare, command_timeout=5, call_memory=10, call_log=first_log)
    reply = await first.submit(call)
    await first_log.close()

    second_log = CallLog(tmp_path / "calls.log", keep=10)
    second = Dispatcher(prepare, command_timeout=5, call_memory=10, call_log=second_log)
    second.restore(await second_log.load())
    assert await second.submit(call) == reply  # the redelivery after the "crash"
    assert runs == ["call-1"]


async def test_call_log_compacts_to_the_last_replies(tmp_path: Path) -> None:
    log = CallLog(tmp_path / "calls.log", keep=5)
    await log.load()
    for i in range(40):
        await log.record(f"c{i}", f"op:{i}", {"ok": True, "result": i})
    await log.close()
    kept = await CallLog(tmp_path / "calls.log", keep=5).load()
    assert [cid for cid, _, _ in kept] == [f"c{i}" for i in range(35, 40)]
    assert [fp for _, fp, _ in kept] == [f"op:{i}" for i in range(35, 40)]
