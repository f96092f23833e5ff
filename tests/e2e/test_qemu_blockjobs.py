"""Issue 16, block jobs end to end: a real ``virtbus-agent --driver qemu``, one real TCG
guest, the real CLI and RabbitMQ.

The guest's disk starts as random bytes; an external snapshot puts an overlay on top and
the guest then writes a MiB of zeros at 8 MiB (into the overlay). ``blockcommit --active
--pivot`` must leave the disk running on the base image, which now holds the zeros;
``blockpull`` makes a new overlay standalone with the same content. An active commit left
ready survives an agent restart: the restarted agent finds it (query-jobs), shows it and
pivots it. ``blockcopy --finish`` leaves a copy with the same data, ``--pivot`` moves the
disk onto it, and a copy onto a full file system (a 2 MiB tmpfs) fails while the disk
stays in use and intact. The ``block_job`` events come with the job's progress.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_qemu_driver import wait_serial
from tests.e2e.test_qemu_external_snapshots import MIB, qemu_img, random_qcow2, read_chain
from tests.e2e.test_qemu_snapshots import (
    Host,
    _destroy_all,
    disk_xml,
    events_host,
    guest_xml,
    qemu_agent,
)
from tests.guests import TestGuest, build_test_guest

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]
WRITE_TICK = 15  # the guest writes its zeros at this tick, after the first overlay exists


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


async def backing(path: Path) -> str | None:
    value = json.loads(await qemu_img("info", "-U", "--output=json", str(path))).get(
        "backing-filename"
    )
    return str(value) if value else None


def source_of(xml: str) -> str:
    found = re.search(r"<disk type=.file. device=.disk.>.*?<source file=['\"]([^'\"]+)", xml,
                      re.DOTALL)  # fmt: skip
    assert found, xml
    return found.group(1)


def jobs(h: Host, status: str) -> list[dict[str, Any]]:
    """The data of domain x's ``block_job`` events of ``status``, in order."""
    return [e["data"] for e in h.events.seen if e["domain"] == "x"
            and e["event"] == "block_job" and e["data"].get("status") == status]  # fmt: skip


async def wait_jobs(h: Host, status: str, n: int) -> list[dict[str, Any]]:
    """Until ``n`` block_job events of ``status`` arrived (they follow the reply)."""
    await h.events.until(lambda: len(jobs(h, status)) >= n)
    return jobs(h, status)


async def test_block_jobs_commit_pull_and_survive_a_restart(
    e2e_root: Path, guest: TestGuest
) -> None:
    async with events_host(e2e_root) as h:
        try:
            await _scenario(h, guest)
        except BaseException:
            for log in h.base.rglob("run/*.log"):  # QEMU's own log, when it went away
                print(log, log.read_text(errors="replace")[-3000:])
            raise


async def _scenario(h: Host, guest: TestGuest) -> None:
    base = h.base
    serial, disk = base / "x.serial", base / "x.qcow2"
    data = await asyncio.to_thread(random_qcow2, disk)
    xml = guest_xml(guest, "x", serial, disk_xml(disk)).replace(
        "virtbus.tick=0.2", f"virtbus.tick=0.2 virtbus.cmd=write+1@{WRITE_TICK}"
    )
    (base / "x.xml").write_text(xml)
    written = data[: 8 * MIB] + bytes(MIB) + data[9 * MIB :]
    async with qemu_agent(h):
        await h.ok("define", str(base / "x.xml"))
        await h.ok("start", "x")
        await wait_serial(serial, "VIRTBUS-GUEST-READY")
        await h.ok("snapshot-create-as", "x", "s1", "--disk-only")
        assert "VIRTBUS-DONE write" not in serial.read_text(errors="replace"), "premise"
        await wait_serial(serial, "VIRTBUS-DONE write 1")
        assert await read_chain(disk, base / "r.raw") == data  # premise: the zeros are above

        # bad input first: clear errors, nothing started
        err = await h.fails("INVALID_ARG", "blockcommit", "x", "vda")
        assert "--active" in err
        await h.fails("INVALID_ARG", "blockcommit", "x", "vdz", "--active")
        await h.fails("OPERATION_INVALID", "blockjob", "x", "vda", "--pivot")
        assert "No current block job for vda" in await h.ok("blockjob", "x", "vda", "--info")
        assert "No errors found" in await h.ok("domblkerror", "x")

        # an active commit, pivoted: the disk runs on the base image, which has the zeros
        out = await h.ok("blockcommit", "x", "vda", "--active", "--pivot", "--verbose")
        assert "Successfully pivoted" in out
        assert source_of(await h.ok("dumpxml", "x")) == str(disk)
        assert await read_chain(disk, base / "r.raw") == written
        assert [j["type"] for j in await wait_jobs(h, "completed", 1)] == ["active-commit"]
        assert jobs(h, "ready") and all(j["cur"] == j["end"] for j in jobs(h, "ready"))

        # a pull: a new overlay becomes standalone, with the same content
        await h.ok("snapshot-create-as", "x", "s2", "--disk-only")
        overlay = base / "x.s2"
        assert await backing(overlay) == str(disk)
        assert "Pull complete" in await h.ok("blockpull", "x", "vda", "--wait")
        assert await backing(overlay) is None  # its content is read once QEMU flushed it (below)
        assert source_of(await h.ok("dumpxml", "x")) == str(overlay)
        done = await wait_jobs(h, "completed", 2)
        assert [j["type"] for j in done] == ["active-commit", "pull"]
        await h.fails("INVALID_ARG", "blockpull", "x", "vda")  # nothing left to pull

        # an active commit left ready, then the agent goes away
        await h.ok("snapshot-create-as", "x", "s3", "--disk-only")
        top = base / "x.s3"
        assert "Now in synchronized phase" in await h.ok(
            "blockcommit", "x", "vda", "--active", "--wait"
        )
        await h.fails("OPERATION_INVALID", "blockcommit", "x", "vda", "--active")  # one job

    async with qemu_agent(h):  # the restarted agent finds the job and follows it
        info = await h.ok("blockjob", "x", "vda", "--info")
        assert "Active Block Commit: [100 %]" in info, info
        await h.ok("blockjob", "x", "vda", "--bandwidth", "5")
        assert "5 MiB/s" in await h.ok("blockjob", "x", "vda")
        assert source_of(await h.ok("dumpxml", "x")) == str(top)
        await h.ok("blockjob", "x", "vda", "--pivot")
        assert source_of(await h.ok("dumpxml", "x")) == str(overlay)
        assert "No current block job" in await h.ok("blockjob", "x", "vda")

        # blockcopy --finish: a consistent copy is left, the disk stays where it was
        copy1, copy2 = base / "copy1.qcow2", base / "copy2.raw"
        out = await h.ok("blockcopy", "x", "vda", str(copy1), "--finish", "--verbose")
        assert "Successfully copied" in out
        assert source_of(await h.ok("dumpxml", "x")) == str(overlay)
        # onto a full file system: the job fails, the disk stays in use and intact
        full = base / "full"
        full.mkdir()
        mount = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(full)]
        await asyncio.to_thread(subprocess.run, mount, check=True)
        try:
            err = await h.fails("OPERATION_FAILED", "blockcopy", "x", "vda",
                                str(full / "c.qcow2"), "--pivot")  # fmt: skip
            assert "No space left on device" in err, err
        finally:
            await asyncio.to_thread(subprocess.run, ["umount", str(full)], check=True)
        failed = await wait_jobs(h, "failed", 1)
        assert [j["type"] for j in failed] == ["copy"], failed
        assert source_of(await h.ok("dumpxml", "x")) == str(overlay)
        assert "running" in await h.ok("domstate", "x")
        # --pivot: the disk runs on its raw copy
        out = await h.ok("blockcopy", "x", "vda", str(copy2), "--format", "raw", "--pivot")
        assert "Successfully pivoted" in out
        assert source_of(await h.ok("dumpxml", "x")) == str(copy2)
        await _destroy_all(h)
    # QEMU flushed and closed the images: the pulled overlay, with s3 committed into it,
    # and both copies hold everything the guest saw
    assert await backing(overlay) is None and await read_chain(overlay, base / "r.raw") == written
    assert await read_chain(copy1, base / "r.raw") == written
    assert copy2.read_bytes() == written
