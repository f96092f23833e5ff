"""Issue 16, checkpoints and push-mode backups end to end: a real ``virtbus-agent --driver
qemu``, one real TCG guest, the real CLI and RabbitMQ.

The guest's disk starts as random bytes; the guest writes a MiB of zeros at 8 MiB
(``write+1``), later two MiB there (``write+2``). A full backup taken after the first
write with checkpoint c1 must read as the disk then (random, zeros at 8-9 MiB); an
incremental backup from c1 after the second write holds only what changed (nothing
below 8 MiB) and, rebased onto the full one, reads as the guest's disk (zeros at 8-10
MiB). An aborted backup ends cancelled, its image removed. A backup left running by an agent
that stopped is followed (and aborted) by the restarted one. The checkpoints survive an
agent restart, a deleted one's bitmap is gone from the image and the other's is in it
once QEMU closed it. Each bad input gets its code and the agent serves on. The agent
caps backups at 4 MiB/s (``backup_bandwidth``) so that the full backup (4 s) still runs
when the second ``backup-begin`` and ``domjobinfo`` come.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_qemu_agent import EVENT_WAIT
from tests.e2e.test_qemu_driver import wait_serial
from tests.e2e.test_qemu_external_snapshots import MIB, random_qcow2
from tests.e2e.test_qemu_snapshots import (
    Host,
    _destroy_all,
    disk_xml,
    events_host,
    guest_xml,
    ticks,
)
from tests.guests import TestGuest, build_test_guest
from tests.procs import agent_process

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]
WRITE1, WRITE2 = 5, 75  # ticks (0.2 s) of the guest's two writes


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


async def run(*argv: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, (argv, err.decode(errors="replace"))
    return out


async def read_image(path: Path, out: Path) -> bytes:
    """What a guest would read through ``path`` (-U: the guest may run)."""
    await run("qemu-img", "convert", "-U", "-q", "-O", "raw", str(path), str(out))
    data = await asyncio.to_thread(out.read_bytes)
    out.unlink()
    return data


async def bitmaps(path: Path) -> list[str]:
    info = json.loads(await run("qemu-img", "info", "-U", "--output=json", str(path)))
    found = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return [b["name"] for b in found]


def completed(h: Host) -> list[dict[str, Any]]:
    return [e["data"] for e in h.events.seen
            if e["domain"] == "x" and e["event"] == "job_completed"]  # fmt: skip


async def wait_completed(h: Host, n: int) -> dict[str, Any]:
    async with asyncio.timeout(EVENT_WAIT):
        while len(completed(h)) < n:
            await asyncio.sleep(0.05)
    return completed(h)[n - 1]


@asynccontextmanager
async def agent(h: Host, bandwidth: int = 4) -> AsyncIterator[None]:
    async with agent_process(h.name, h.base, "--driver-option", f"backup_bandwidth={bandwidth}",
                             driver="qemu", keep_queue=True):  # fmt: skip
        try:
            yield
        except BaseException:
            await _destroy_all(h)
            log = h.base / f"agent-{h.name}.log"
            print(log.read_text(errors="replace")[-6000:] if log.exists() else "no agent log")
            raise


def backup_xml(target: Path, incremental: str | None = None) -> str:
    inc = f"<incremental>{incremental}</incremental>" if incremental else ""
    return (f"<domainbackup mode='push'>{inc}<disks>"
            f"<disk name='vda' type='file'><driver type='qcow2'/><target file='{target}'/></disk>"
            "<disk name='vdb' backup='no'/></disks></domainbackup>")  # fmt: skip


def checkpoint_xml(name: str) -> str:
    return (f"<domaincheckpoint><name>{name}</name><disks><disk name='vda'/>"
            "<disk name='vdb' checkpoint='no'/></disks></domaincheckpoint>")  # fmt: skip


async def test_full_and_incremental_backups_with_checkpoints(
    e2e_root: Path, guest: TestGuest
) -> None:
    async with events_host(e2e_root) as h:
        await _scenario(h, guest)


async def _scenario(h: Host, guest: TestGuest) -> None:
    base = h.base
    serial, disk, raw = base / "x.serial", base / "x.qcow2", base / "y.raw"
    data = await asyncio.to_thread(random_qcow2, disk)
    await run("qemu-img", "create", "-q", "-f", "raw", str(raw), "4M")
    cmds = f"virtbus.cmd=write+1@{WRITE1},write+2@{WRITE2}"
    xml = guest_xml(guest, "x", serial, disk_xml(disk) + disk_xml(raw, "raw", "vdb"))
    (base / "x.xml").write_text(xml.replace("virtbus.tick=0.2", f"virtbus.tick=0.2 {cmds}"))
    full, inc = base / "full.qcow2", base / "inc.qcow2"
    files = {}
    for name, text in (("full", backup_xml(full)), ("inc", backup_xml(inc, "c1")),
                       ("c1", checkpoint_xml("c1")), ("c2", checkpoint_xml("c2")),
                       ("abort", backup_xml(base / "abort.qcow2")),
                       ("slow", backup_xml(base / "slow.qcow2")),
                       ("outside", backup_xml(Path("/etc/virtbus-backup.qcow2"))),
                       ("unknown", backup_xml(base / "u.qcow2", "nope")),
                       ("rawinc", backup_xml(base / "r.qcow2", "c1").replace(
                           "<disk name='vdb' backup='no'/>", ""))):  # fmt: skip
        files[name] = base / f"{name}.xml"
        files[name].write_text(text)
    one_mib_zeros = data[: 8 * MIB] + bytes(MIB) + data[9 * MIB :]
    two_mib_zeros = data[: 8 * MIB] + bytes(2 * MIB) + data[10 * MIB :]

    async with agent(h):
        await h.ok("define", str(base / "x.xml"))
        await h.ok("start", "x")
        await wait_serial(serial, "VIRTBUS-DONE write 1")

        # bad input: each with its code, nothing created
        err = await h.fails("CONFIG_UNSUPPORTED", "checkpoint-create-as", "x", "bad")
        assert "'vdb'" in err and "qcow2" in err, err
        await h.fails("NO_DOMAIN_CHECKPOINT", "checkpoint-info", "x", "nope")
        await h.fails("NO_DOMAIN_CHECKPOINT", "backup-begin", "x", str(files["unknown"]))
        err = await h.fails("AUTH_DENIED", "backup-begin", "x", str(files["outside"]))
        assert not Path("/etc/virtbus-backup.qcow2").exists()
        await h.fails("OPERATION_INVALID", "domjobabort", "x")
        assert (await h.ok("checkpoint-list", "x", "--name")).strip() == ""

        # the full backup, checkpoint c1 at its instant
        out = await h.ok("backup-begin", "x", str(files["full"]), str(files["c1"]))
        assert "Backup started" in out
        err = await h.fails("OPERATION_INVALID", "backup-begin", "x", str(files["inc"]))
        assert "active backup job" in err
        assert not inc.exists()
        info = await h.ok("domjobinfo", "x")
        assert "Unbounded" in info and "Backup" in info, info
        assert str(full) in await h.ok("backup-dumpxml", "x")
        assert ticks(serial)[-1] < WRITE2, "premise: the guest had not written again yet"
        end = await wait_completed(h, 1)
        assert end["status"] == "completed" and end["operation"] == "backup", end
        assert "Completed" in await h.ok("domjobinfo", "x", "--completed")
        assert await read_image(full, base / "f.raw") == one_mib_zeros

        # c1 cannot cover the raw disk: an incremental backup of it is refused
        err = await h.fails("CONFIG_UNSUPPORTED", "backup-begin", "x", str(files["rawinc"]))
        assert "vdb" in err

        await wait_serial(serial, "VIRTBUS-DONE write 2")
        await h.ok("backup-begin", "x", str(files["inc"]), str(files["c2"]))
        end = await wait_completed(h, 2)
        assert end["status"] == "completed", end
        alone = await read_image(inc, base / "i.raw")
        assert alone[: 8 * MIB] == bytes(8 * MIB), "the incremental backup copied old data"
        await run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(full), "-F", "qcow2",
                  str(inc))  # fmt: skip
        restored = await read_image(inc, base / "r.raw")
        assert restored == two_mib_zeros
        assert restored == await read_image(disk, base / "d.raw")

        # an aborted backup: cancelled, its image removed
        await h.ok("backup-begin", "x", str(files["abort"]))
        await h.ok("domjobabort", "x")
        end = await wait_completed(h, 3)
        assert end["status"] == "cancelled", end
        assert not (base / "abort.qcow2").exists()
        assert "Cancelled" in await h.ok("domjobinfo", "x", "--completed")

        listing = json.loads(await h.ok("--json", "checkpoint-list", "x"))
        assert [(c["name"], c["parent"]) for c in listing] == [("c1", None), ("c2", "c1")]
        assert "<name>c1</name>" in await h.ok("checkpoint-dumpxml", "x", "c2")

    async with agent(h, bandwidth=1):  # a backup that takes 16 s, left running at a stop
        await h.ok("backup-begin", "x", str(files["slow"]))
        assert "Unbounded" in await h.ok("domjobinfo", "x")

    async with agent(h):  # a restarted agent follows the backup, knows the checkpoints
        assert "Unbounded" in await h.ok("domjobinfo", "x")
        assert str(base / "slow.qcow2") in await h.ok("backup-dumpxml", "x")
        await h.ok("domjobabort", "x")
        end = await wait_completed(h, 4)
        assert end["status"] == "cancelled" and len(completed(h)) == 4, completed(h)
        assert not (base / "slow.qcow2").exists()
        assert "Parent:" in (info := await h.ok("checkpoint-info", "x", "c2")) and "c1" in info
        await h.ok("checkpoint-delete", "x", "c1")
        listing = json.loads(await h.ok("--json", "checkpoint-list", "x"))
        assert [(c["name"], c["parent"]) for c in listing] == [("c2", None)]
        await h.fails("NO_DOMAIN_CHECKPOINT", "checkpoint-delete", "x", "c1")
        await h.ok("destroy", "x")  # QEMU writes the persistent bitmaps as it closes
        assert await bitmaps(disk) == ["c2"]
        await h.fails("OPERATION_INVALID", "undefine", "x")  # it has a checkpoint
        await h.ok("checkpoint-delete", "x", "c2")  # offline: qemu-img bitmap --remove
        assert await bitmaps(disk) == []
        await h.ok("undefine", "x")
