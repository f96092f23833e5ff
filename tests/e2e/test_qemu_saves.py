"""Issue 16, saved state end to end: save, restore, managedsave, managedsave-remove and a
start that resumes a managed save, through a real ``virtbus-agent --driver qemu``, real
TCG guests, the CLI and RabbitMQ. The guest's tick counter proves it continues where it
stopped: QEMU truncates the serial file when it starts, and the first tick the restored
guest prints follows the last one before the save (a fresh boot would print READY and
count from 0)."""

from __future__ import annotations

import ctypes
import json
import mmap
import re
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.test_qemu_driver import wait_serial
from tests.e2e.test_qemu_snapshots import (
    Host,
    events_host,
    first_tick,
    guest_xml,
    qemu_agent,
    ticks,
    wait_tick,
)
from tests.guests import TestGuest, build_test_guest
from tests.procs import cli

pytestmark = [pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.slow]


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


@pytest.fixture
async def host(e2e_root: Path) -> AsyncIterator[Host]:
    async with events_host(e2e_root) as h:
        yield h


async def _info(h: Host, name: str) -> str:
    return await h.ok("dominfo", name)


def _with_machine(src: Path, dst: Path, machine: str) -> None:
    """A copy of a save file whose header names another machine type."""
    data = src.read_bytes()
    magic_end = data.index(b"\n") + 1
    (size,) = struct.unpack(">I", data[magic_end : magic_end + 4])
    header = json.loads(data[magic_end + 4 : magic_end + 4 + size])
    header["machine"] = machine
    body = json.dumps(header).encode()
    dst.write_bytes(data[:magic_end] + struct.pack(">I", len(body)) + body
                    + data[magic_end + 4 + size :])  # fmt: skip


KPF_DIRTY = 1 << 4  # linux/kernel-page-flags.h
PFN_MASK = (1 << 55) - 1  # /proc/self/pagemap: bits 0-54, when bit 63 (present) is set


def dirty_pages(path: Path) -> tuple[int, int]:
    """(dirty, resident) page-cache pages of ``path``: the file is mapped and each page
    read, its frame found in /proc/self/pagemap and its flags in /proc/kpageflags (root
    only). Dirty pages are written but not yet on disk: a lost host loses them."""
    size = path.stat().st_size
    dirty = resident = 0
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY) as m:
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        with open("/proc/self/pagemap", "rb") as pagemap, open("/proc/kpageflags", "rb") as kf:
            for off in range(0, size, mmap.PAGESIZE):
                m[off]  # a read maps the page-cache page itself (no copy before a write)
                pagemap.seek((base + off) // mmap.PAGESIZE * 8)
                (entry,) = struct.unpack("<Q", pagemap.read(8))
                if not entry >> 63 or not entry & PFN_MASK:
                    continue
                kf.seek((entry & PFN_MASK) * 8)
                (flags,) = struct.unpack("<Q", kf.read(8))
                resident += 1
                dirty += bool(flags & KPF_DIRTY)
    return dirty, resident


async def test_save_restore_and_managed_save_continue_the_guest(
    host: Host, guest: TestGuest
) -> None:
    h, base = host, host.base
    serial = base / "k.serial"
    (base / "k.xml").write_text(guest_xml(guest, "k", serial, ""))
    save = base / "k.save"
    async with qemu_agent(h):
        await h.ok("define", str(base / "k.xml"))
        await h.ok("start", "k")
        await wait_serial(serial, "VIRTBUS-GUEST-READY")
        await wait_tick(serial, 5)
        assert "saved to" in await h.ok("save", "k", str(save))
        await h.events.wait("k", "stopped", "saved")
        assert "shut off (saved)" in await h.ok("domstate", "k", "--reason")
        # durable when "saved": none of the stream is left in the page cache unwritten
        dirty, resident = dirty_pages(save)
        assert resident > (1 << 20) // mmap.PAGESIZE, resident  # premise: pages were seen
        assert dirty == 0, f"{dirty} of {resident} pages of the save file not on disk"
        last = ticks(serial)[-1]
        await h.ok("restore", str(save))
        await h.events.wait("k", "started", "restored")
        first = await first_tick(serial, 0)  # the serial file was truncated by the new QEMU
        assert last <= first <= last + 2, (last, first)
        assert "VIRTBUS-GUEST-READY" not in serial.read_text(errors="replace")
        assert save.exists()  # a restore keeps the file, as libvirt does

        # managedsave: dominfo says so, start resumes it and drops the image
        await h.ok("managedsave", "k")
        assert re.search(r"Managed save:\s+yes", await _info(h, "k"))
        last = ticks(serial)[-1]
        await h.ok("start", "k")
        first = await first_tick(serial, 0)
        assert last <= first <= last + 2, (last, first)
        assert re.search(r"Managed save:\s+no", await _info(h, "k"))
        # managedsave-remove: the next start boots afresh
        await h.ok("managedsave", "k", "--paused")
        await h.fails("OPERATION_INVALID", "undefine", "k")
        await h.ok("managedsave-remove", "k")
        await h.fails("OPERATION_INVALID", "managedsave-remove", "k")
        await h.ok("start", "k")
        await wait_serial(serial, "VIRTBUS-GUEST-READY")
        seen = h.events.of("k")
        assert seen == [
            ("defined", "added"), ("started", "booted"), ("stopped", "saved"),
            ("started", "restored"), ("stopped", "saved"), ("started", "restored"),
            ("stopped", "saved"), ("started", "booted"),
        ], seen  # fmt: skip

        # bad files: clear errors, the file kept, the domain still shut off, the agent serves
        await h.ok("save", "k", str(save))
        whole = save.read_bytes()
        cut = base / "cut.save"
        cut.write_bytes(whole[: len(whole) // 2])
        err = await h.fails("OPERATION_FAILED", "restore", str(cut))
        assert "cut.save" in err and "kept" in err, err
        assert cut.stat().st_size == len(whole) // 2
        assert "shut off" in await h.ok("domstate", "k")
        (base / "head.save").write_bytes(whole[:20])
        err = await h.fails("INVALID_ARG", "restore", str(base / "head.save"))
        assert "truncated" in err
        await h.fails("INVALID_ARG", "restore", str(base / "k.xml"))  # not a save file
        _with_machine(save, base / "i440fx.save", "pc-i440fx-7.2")
        err = await h.fails("INVALID_ARG", "restore", str(base / "i440fx.save"))
        assert "machine type pc-i440fx-7.2" in err
        await h.fails("INVALID_ARG", "save", "k", "relative.save")
        await h.ok("restore", str(save), "--paused")  # the good file still restores
        await h.events.wait("k", "suspended", "restored")
        assert "paused" in await h.ok("domstate", "k")
        listing = (await cli("--json", "list", "--host", h.name)).json()
        assert [d["name"] for d in listing] == ["k"]
        await h.ok("destroy", "k")
