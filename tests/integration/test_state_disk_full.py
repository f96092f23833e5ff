"""Issue 18's full-disk fault: the agent's state dir on a small file system of the test's
own (a 512 KiB tmpfs, mounted and unmounted by the fixture) fills up under a real agent
(test driver) on the real broker.

- The calls it answered before it noticed are kept: each ``define`` it answered has its
  ``defined`` event on the bus, although the outbox could not write it to its log.
- Then it refuses new work with OPERATION_FAILED naming the state dir and the error,
  while read-only calls are still answered; it does not die (it used to: the outbox task
  died with ENOSPC, the agent stopped itself and the call in hand was never answered).
- Once there is room again it accepts work again by itself (its probe); a restarted
  agent on the same state dir republishes no event that was confirmed, and defines
  again. (The ack an outbox owes when the disk filled between an event and its ack:
  tests/unit/test_outbox_disk.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_qemu_durability import host_events
from tests.procs import agent_process, cli, unique_host

pytestmark = [pytest.mark.rabbitmq]
MAX_DEFINES = 300  # a bound: the 512 KiB file system is full long before
ROOM_WAIT = 20.0  # s: bound for the agent to notice the room (it probes every second)
XML = "<domain type='test'><name>{}</name><memory>1024</memory><os><type>hvm</type></os></domain>"


@pytest.fixture
def small_fs() -> Iterator[Path]:
    """A 512 KiB tmpfs of this test's own: nothing else lives on it."""
    mount = Path(tempfile.mkdtemp(prefix="virtbus-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
        mount.rmdir()


def fill(path: Path) -> None:
    """Write ``path`` until the file system has not one byte left."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"x" * chunk)


async def define(host: str, xml_dir: Path, name: str) -> tuple[int, str]:
    f = xml_dir / f"{name}.xml"
    f.write_text(XML.format(name))
    r = await cli("define", str(f), "--host", host)
    return r.code, r.err.strip()


async def autostart(host: str) -> str:
    r = await cli("autostart", "d0", "--host", host)
    assert r.code == 1, r
    return r.err.strip()


async def test_a_full_state_dir_refuses_new_work_and_loses_nothing_accepted(
    small_fs: Path, tmp_path: Path
) -> None:
    host = unique_host("full")
    state = small_fs / "state"
    state.mkdir()
    async with host_events(host) as events:
        async with agent_process(host, state, log_dir=tmp_path):
            assert (await define(host, tmp_path, "d0"))[0] == 0
            await events.wait("d0", "defined")
            await asyncio.to_thread(fill, small_fs / "filler")
            accepted, refusal = [], ""
            for i in range(1, MAX_DEFINES):
                code, err = await define(host, tmp_path, f"d{i}")
                if code != 0:
                    refusal = err
                    break
                accepted.append(f"d{i}")
            assert refusal.startswith("error: OPERATION_FAILED: "), refusal
            assert str(state) in refusal and "No space left on device" in refusal, refusal
            for name in accepted:  # nothing it answered is lost
                await events.wait(name, "defined")
            # read-only calls are served; new work is refused, again and again
            listing = (await cli("--json", "list", "--all", "--host", host)).json()
            assert {d["name"] for d in listing} == {"d0", *accepted}
            assert (await cli("dominfo", "d0", "--host", host)).code == 0
            code, err = await define(host, tmp_path, "late")
            assert code == 1 and "cannot be written" in err, err

            os.unlink(small_fs / "filler")
            # The gate opens by itself (the probe runs every second). The test driver has
            # no autostart: once the gate is open the call gets as far as NO_SUPPORT, an
            # answer with no side effect and no event, so the ack the outbox owed is the
            # only thing left for it to write.
            async with asyncio.timeout(ROOM_WAIT):
                while "cannot be written" in (reply := await autostart(host)):
                    await asyncio.sleep(0.2)
            assert reply.startswith("error: NO_SUPPORT: "), reply
            seen = len(events.seen)
        # a restarted agent finds every event confirmed (the owed ack was written)
        async with agent_process(host, state, log_dir=tmp_path):
            # its outbox publishes what it restored before anything new: the marker's
            # event comes after any republished one
            assert (await define(host, tmp_path, "marker"))[0] == 0
            await events.wait("marker", "defined")
        republished = [e for e in events.seen[seen:] if e["domain"] != "marker"]
        assert republished == [], republished
