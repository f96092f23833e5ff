"""Saved state without QEMU: the test driver's save/restore/managed save (the QEMU
driver's rules and libvirt's events), the save file header, and the QMP event mapping of
a save and a restore. The real QEMU path is tests/e2e/test_qemu_saves.py."""

from __future__ import annotations

import uuid as uuidlib
from pathlib import Path

import pytest

from drivers.base import DriverEvent, SavedState
from drivers.qemu import events as ev
from drivers.qemu.saves import read_header, write_header
from drivers.test import TestDriver
from virtbus.domain import parse_domain_xml
from virtbus.errors import InvalidArgument, OperationInvalid
from virtbus.protocol.events import DomainState

XML = f"""<domain type='test'><name>d</name><uuid>{uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type machine='q35'>hvm</type></os>
</domain>"""


async def test_the_test_driver_saves_and_restores(tmp_path: Path) -> None:
    drv = TestDriver()
    seen: list[DriverEvent] = []
    await drv.open(seen.append)
    assert isinstance(drv, SavedState)
    await drv.define(XML)
    await drv.start("d")
    file = tmp_path / "d.save"
    await drv.save("d", str(file), False, False)
    assert drv.state("d") == (DomainState.SHUTOFF, "saved")
    await drv.restore(str(file), False, False)
    assert drv.state("d") == (DomainState.RUNNING, "restored") and file.exists()
    await drv.managed_save("d", False, True)  # --paused: it comes back paused
    assert (await drv.info("d")).managed_save
    await drv.start("d")
    assert drv.state("d")[0] == DomainState.PAUSED and not (await drv.info("d")).managed_save
    await drv.destroy("d")
    with pytest.raises(OperationInvalid, match="no managed save"):
        await drv.managed_save_remove("d")
    assert [(e.event, e.detail) for e in seen][2:] == [
        ("stopped", "saved"), ("started", "restored"), ("stopped", "saved"),
        ("started", "restored"), ("suspended", "restored"), ("stopped", "destroyed"),
    ]  # fmt: skip
    cut = tmp_path / "cut.save"
    cut.write_bytes(file.read_bytes()[:-5])
    with pytest.raises(InvalidArgument, match="truncated"):
        await drv.restore(str(cut), False, False)
    assert cut.exists() and drv.state("d")[0] == DomainState.SHUTOFF
    (tmp_path / "x.xml").write_text(XML)
    with pytest.raises(InvalidArgument, match="not a virtbus save file"):
        await drv.restore(str(tmp_path / "x.xml"), False, False)


def test_the_qemu_save_header_and_its_bad_files(tmp_path: Path) -> None:
    defn = parse_domain_xml(XML)
    path = tmp_path / "h.save"
    write_header(path, defn, running=True)
    with pytest.raises(InvalidArgument, match="no guest state"):
        read_header(path)  # a header alone: the stream is missing
    with path.open("ab") as fh:
        fh.write(b"QEVM")
    header = read_header(path)
    assert header.running and header.machine == "q35" and "<name>d</name>" in header.xml
    assert path.read_bytes()[header.offset :] == b"QEVM"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(InvalidArgument, match="truncated"):
        read_header(path)
    path.write_text("<domain/>")
    with pytest.raises(InvalidArgument, match="not a virtbus save file"):
        read_header(path)


def test_save_and_restore_events_map_as_libvirt_reports_them() -> None:
    def ctx(state: DomainState, *flags: ev.Pending) -> ev.Context:
        return ev.Context(state, "booted", ev.Lifecycle(), frozenset(flags))

    stop = ev.map_event("STOP", {}, ctx(DomainState.RUNNING, ev.Pending.SAVE))
    assert stop.events == () and stop.state == (DomainState.PAUSED, "save")
    gone = ev.map_exit(ctx(DomainState.PAUSED, ev.Pending.SAVED, ev.Pending.DESTROY))
    assert gone.events == (("stopped", "saved", {}),)
    assert gone.state == (DomainState.SHUTOFF, "saved")
    back = ev.map_event("RESUME", {}, ctx(DomainState.PAUSED, ev.Pending.RESTORE, ev.Pending.START))
    assert back.events == (("started", "restored", {}),)
    assert back.state == (DomainState.RUNNING, "restored")
