"""Issue 16, external disk-only snapshots end to end: a real ``virtbus-agent --driver
qemu``, one real TCG guest, the real CLI and RabbitMQ.

The guest proves where its writes go: its base image is random bytes; the guest writes a
MiB of zeros at 8 MiB (``virtbus.cmd=write+1@<tick>``) only after the live external
snapshot was taken. The base image must still hold the random bytes there (it holds the
snapshot), the chain through the new overlay must read the zeros. The offline snapshot
then puts a second overlay on top with qemu-img, and the guest boots from the three-layer
chain the definition now names.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_qemu_driver import wait_serial
from tests.e2e.test_qemu_snapshots import (
    Host,
    _destroy_all,
    disk_xml,
    events_host,
    guest_xml,
    qemu_agent,
    ticks,
    validate,
    wait_tick,
)
from tests.guests import TestGuest, build_test_guest

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]
MIB = 1 << 20
WRITE_TICK = 40  # the guest writes its zeros at this tick (0.2 s each): after the snapshot


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


def random_qcow2(path: Path) -> bytes:
    """A 16 MiB qcow2 image of random bytes; the bytes."""
    data = os.urandom(16 * MIB)
    raw = path.with_suffix(".raw")
    raw.write_bytes(data)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(path)], check=True)  # fmt: skip
    raw.unlink()
    return data


async def qemu_img(*args: str) -> str:
    """``qemu-img ARGS`` without blocking the loop the agent's events arrive on; stdout."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, (args, err.decode(errors="replace"))
    return out.decode()


async def read_chain(path: Path, out: Path) -> bytes:
    """What the guest would read through ``path``'s chain (-U: the guest may run)."""
    await qemu_img("convert", "-U", "-q", "-O", "raw", str(path), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


async def backing_chain(path: Path) -> list[str]:
    out = await qemu_img("info", "-U", "--backing-chain", "--output=json", str(path))
    return [layer["filename"] for layer in json.loads(out)]


def on_overlay(xml: str, overlay: Path, image: Path) -> None:
    """The disk's source is ``overlay``, backed by the qcow2 ``image``."""
    assert re.search(rf"<source file=['\"]{overlay}['\"]", xml), xml
    assert re.search(rf"<backingStore type=['\"]file['\"]>\s*<format type=['\"]qcow2['\"]/>"
                     rf"\s*<source file=['\"]{image}['\"]", xml), xml  # fmt: skip


async def test_external_disk_only_snapshots_live_and_offline(
    e2e_root: Path, guest: TestGuest
) -> None:
    async with events_host(e2e_root) as h:
        await _scenario(h, guest)


async def _scenario(h: Host, guest: TestGuest) -> None:
    base = h.base
    serial, disk = base / "x.serial", base / "x.qcow2"
    data = await asyncio.to_thread(random_qcow2, disk)
    xml = guest_xml(guest, "x", serial, disk_xml(disk)).replace(
        "virtbus.tick=0.2", f"virtbus.tick=0.2 virtbus.cmd=write+1@{WRITE_TICK}"
    )
    (base / "x.xml").write_text(xml)
    overlay, overlay2 = base / "x.s1", base / "x.s2"
    async with qemu_agent(h):
        await h.ok("define", str(base / "x.xml"))
        await h.ok("start", "x")
        await wait_serial(serial, "VIRTBUS-GUEST-READY")
        await wait_tick(serial, 2)

        # --quiesce without a guest agent: refused, nothing created
        err = await h.fails("CONFIG_UNSUPPORTED", "snapshot-create-as", "x", "q", "--disk-only",
                            "--quiesce")  # fmt: skip
        assert "guest agent is not configured" in err and not (base / "x.q").exists()
        # a disk the domain does not have: refused, nothing created
        await h.fails("INVALID_ARG", "snapshot-create-as", "x", "s1", "--disk-only",
                      "--diskspec", "vdz,snapshot=external")  # fmt: skip
        assert not overlay.exists()

        out = await h.ok("snapshot-create-as", "x", "s1", "--disk-only", "--description", "ext")
        assert "Domain snapshot s1 created" in out
        assert ticks(serial)[-1] < WRITE_TICK, "premise: the guest had not written yet"
        assert await backing_chain(overlay) == [str(overlay), str(disk)]
        await wait_serial(serial, "VIRTBUS-DONE write 1")
        # the base image holds the snapshot: the guest's write went to the overlay
        assert await read_chain(disk, base / "b.raw") == data
        chain = await read_chain(overlay, base / "o.raw")
        assert chain[8 * MIB : 9 * MIB] == bytes(MIB), "the write is not in the overlay's chain"
        assert chain[: 8 * MIB] == data[: 8 * MIB] and chain[9 * MIB :] == data[9 * MIB :]

        # the live definition names the overlay on top of the base image
        on_overlay(await h.ok("dumpxml", "x"), overlay, disk)
        listed = await h.ok("snapshot-list", "x")
        assert re.search(r"s1\s+.*disk-snapshot", listed), listed
        info = await h.ok("snapshot-info", "x", "s1")
        assert re.search(r"Location:\s+external", info), info
        snap_xml = await h.ok("snapshot-dumpxml", "x", "s1")
        assert f'<source file="{overlay}"/>' in snap_xml or f"file='{overlay}'" in snap_xml
        validate(snap_xml, base)

        # libvirt 9.0 refuses a revert to an external snapshot; its data is not deleted
        err = await h.fails("CONFIG_UNSUPPORTED", "snapshot-revert", "x", "s1")
        assert "revert to external snapshot" in err
        err = await h.fails("CONFIG_UNSUPPORTED", "snapshot-delete", "x", "s1")
        assert "--metadata" in err and overlay.exists()
        assert "running" in await h.ok("domstate", "x")

    # the metadata survives the agent; offline, a second overlay with qemu-img
    async with qemu_agent(h):
        assert (await h.ok("snapshot-list", "x", "--name")).split() == ["s1"]
        await h.ok("destroy", "x")
        on_overlay(await h.ok("dumpxml", "x"), overlay, disk)  # and so does the persistent one
        await h.ok("snapshot-create-as", "x", "s2", "--disk-only")
        assert await backing_chain(overlay2) == [str(overlay2), str(overlay), str(disk)]
        tree = await h.ok("snapshot-list", "x", "--tree")
        assert tree.splitlines() == ["s1", "  |", "  +- s2"], tree
        assert "<state>shutoff</state>" in await h.ok("snapshot-dumpxml", "x", "s2")
        # the guest boots from the three-layer chain, and still reads its disk
        serial.unlink()
        await h.ok("start", "x")
        await wait_serial(serial, "VIRTBUS-GUEST-READY")
        await h.ok("snapshot-delete", "x", "s1", "--children", "--metadata")
        assert (await h.ok("snapshot-list", "x", "--name")).split() == []
        assert overlay.exists() and overlay2.exists()  # --metadata: the images stay
        await _destroy_all(h)
