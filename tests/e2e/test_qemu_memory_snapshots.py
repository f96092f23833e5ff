"""Issue 16, external snapshots with memory (``--memspec``) end to end: a real
``virtbus-agent --driver qemu``, one real TCG guest, the real CLI and RabbitMQ.

The memory goes to a file as QEMU's migration stream (magic ``QEVM`` after virtbus' save
header), the disk goes on to an overlay while the guest is paused, and the guest goes
on: its tick counter keeps advancing. Its base image is random bytes and the guest writes
a MiB of zeros at 8 MiB only after the snapshot: the base image must still hold the
random bytes, the overlay's chain the zeros. The memory file is a save image: restored
(``virtbus restore FILE``, which boots the disks it names, the snapshot's backing image),
the guest's first tick follows the tick it had printed when the snapshot paused it, not
the later ones it printed before it was destroyed.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from drivers.qemu.saves import read_header
from tests.e2e.test_qemu_driver import wait_serial
from tests.e2e.test_qemu_external_snapshots import backing_chain, random_qcow2, read_chain
from tests.e2e.test_qemu_snapshots import (
    disk_xml,
    events_host,
    first_tick,
    guest_xml,
    qemu_agent,
    ticks,
    validate,
    wait_tick,
)
from tests.guests import TestGuest, build_test_guest

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]
MIB = 1 << 20
WRITE_TICK = 30  # the guest writes its zeros at this tick (0.2 s each): after the snapshot


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


async def test_memspec_snapshot_writes_memory_and_overlays_and_restores(
    e2e_root: Path, guest: TestGuest
) -> None:
    async with events_host(e2e_root) as h:
        base = h.base
        serial, disk = base / "x.serial", base / "x.qcow2"
        data = await asyncio.to_thread(random_qcow2, disk)
        xml = guest_xml(guest, "x", serial, disk_xml(disk)).replace(
            "virtbus.tick=0.2", f"virtbus.tick=0.2 virtbus.cmd=write+1@{WRITE_TICK}"
        )
        (base / "x.xml").write_text(xml)
        mem, overlay = base / "x.mem", base / "x.s1"
        spec = ["--diskspec", f"vda,snapshot=external,file={overlay}"]
        async with qemu_agent(h):
            await h.ok("define", str(base / "x.xml"))
            await h.ok("start", "x")
            await wait_serial(serial, "VIRTBUS-GUEST-READY")
            await wait_tick(serial, 2)

            # bad input, refused before anything is written; the agent serves on
            (base / "taken.mem").write_text("")
            err = await h.fails("CONFIG_UNSUPPORTED", "snapshot-create-as", "x", "b",
                                "--memspec", f"file={base / 'taken.mem'}", *spec)  # fmt: skip
            assert "already exists" in err
            await h.fails("INVALID_ARG", "snapshot-create-as", "x", "b",
                          "--memspec", f"file={base}/nodir/m", *spec)  # fmt: skip
            err = await h.fails("CONFIG_UNSUPPORTED", "snapshot-create-as", "x", "b",
                                "--memspec", f"file={mem}", "--diskspec",
                                "vda,snapshot=internal")  # fmt: skip
            assert "mixing internal and external" in err
            await h.fails("XML_ERROR", "snapshot-create-as", "x", "b", "--disk-only",
                          "--memspec", f"file={mem}")  # fmt: skip
            assert not mem.exists() and not overlay.exists()
            assert not (base / "nodir").exists()

            before = ticks(serial)[-1]
            out = await h.ok("snapshot-create-as", "x", "s1", "--memspec",
                             f"file={mem},snapshot=external", *spec)  # fmt: skip
            after = ticks(serial)[-1]
            assert "Domain snapshot s1 created" in out
            assert after < WRITE_TICK, "premise: the guest had not written yet"
            # the memory: virtbus' save header, then QEMU's migration stream
            header = await asyncio.to_thread(read_header, mem)
            assert header.running and f"<source file='{disk}'" in header.xml
            with mem.open("rb") as fh:
                fh.seek(header.offset)
                assert fh.read(4) == b"QEVM"
            assert await backing_chain(overlay) == [str(overlay), str(disk)]
            # the guest goes on (resumed after the snapshot), and writes into the overlay
            await wait_tick(serial, after + 5)
            assert "running" in await h.ok("domstate", "x")
            await wait_serial(serial, "VIRTBUS-DONE write 1")
            assert await read_chain(disk, base / "b.raw") == data
            chain = await read_chain(overlay, base / "o.raw")
            assert chain[8 * MIB : 9 * MIB] == bytes(MIB), "the write is not in the overlay"
            assert chain[: 8 * MIB] == data[: 8 * MIB]
            assert not [e for e in h.events.of("x") if e[0] in ("suspended", "resumed")]

            snap_xml = await h.ok("snapshot-dumpxml", "x", "s1")
            assert re.search(rf"<memory snapshot=['\"]external['\"] file=['\"]{mem}['\"]/>",
                             snap_xml), snap_xml  # fmt: skip
            assert "<state>running</state>" in snap_xml and f"{overlay}" in snap_xml
            validate(snap_xml, base)
            info = await h.ok("snapshot-info", "x", "s1")
            assert re.search(r"State:\s+running", info) and re.search(r"Location:\s+external", info)
            err = await h.fails("CONFIG_UNSUPPORTED", "snapshot-revert", "x", "s1")
            assert "revert to external snapshot" in err  # libvirt 9.0's answer

            # the memory file is a save image: restored onto the snapshot's backing image
            last = await wait_tick(serial, after + 10)
            await h.ok("destroy", "x")
            err = await h.fails("XML_ERROR", "snapshot-create-as", "x", "off",
                                "--memspec", f"file={base / 'off.mem'}")  # fmt: skip
            assert "offline" in err and not (base / "off.mem").exists()
            await h.ok("restore", str(mem))
            await h.events.wait("x", "started", "restored")
            first = await first_tick(serial, 0)  # QEMU truncated the serial file
            assert before <= first - 1 <= after < last - 5, (before, first, after, last)
            assert "running" in await h.ok("domstate", "x")

            # --live --halt: written while it runs (QEMU pauses it at the end), then stopped
            await h.fails("NO_SUPPORT", "snapshot-create-as", "x", "l", "--live")  # internal
            mem2, overlay2 = base / "x2.mem", base / "x.s2"
            await wait_tick(serial, first + 2)
            spec2 = ["--diskspec", f"vda,snapshot=external,file={overlay2}"]
            await h.ok("snapshot-create-as", "x", "s2", "--memspec", f"file={mem2}", "--live",
                       "--halt", *spec2)  # fmt: skip
            await h.events.wait("x", "stopped", "from_snapshot")
            assert "shut off (from_snapshot)" in await h.ok("domstate", "x", "--reason")
            halted = ticks(serial)[-1]  # halted while paused: the tick of the memory image
            assert await backing_chain(overlay2) == [str(overlay2), str(disk)]
            assert "<state>running</state>" in await h.ok("snapshot-dumpxml", "x", "s2")
            await h.ok("restore", str(mem2))
            await h.events.wait_count("x", "started", "restored", 2)
            # the next tick (or that one again, if its bytes were still in the UART's state)
            assert halted <= await first_tick(serial, 0) <= halted + 1
            await h.ok("destroy", "x")
            await h.ok("snapshot-delete", "x", "s1", "--children", "--metadata")
            assert mem.exists() and overlay.exists()  # --metadata: the files stay
