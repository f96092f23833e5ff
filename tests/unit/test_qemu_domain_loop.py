"""The per-domain event task outlives an item it cannot handle (a bug, an odd payload)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, cast

import pytest

from drivers.base import DriverEvent
from drivers.qemu import events as ev
from drivers.qemu.domain import Domain, Run, Runtime
from drivers.qemu.monitor import EventQueue, QmpEvent
from drivers.qemu.settings import QemuSettings
from drivers.qemu.state import StateStore
from virtbus.domain import parse_domain_xml
from virtbus.protocol.events import DomainState

XML = """<domain type='kvm'><name>loop</name>
  <uuid>6a1e2f3c-1b2d-4e5f-8a9b-0c1d2e3f4a5b</uuid>
  <memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>"""


class FakeProcess:
    pid = 4242

    def alive(self) -> bool:
        return True


async def test_event_task_skips_a_failing_item_and_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    emitted: list[DriverEvent] = []
    rt = Runtime(QemuSettings(), StateStore(tmp_path / "state", tmp_path / "run"), emitted.append)
    await rt.store.prepare()
    defn = parse_domain_xml(XML)
    dom = Domain(defn, rt)
    run = Run(1, defn, cast(Any, FakeProcess()), tmp_path / "qmp.sock", EventQueue(limit=16))
    dom.run, dom.state, dom.reason = run, DomainState.RUNNING, "booted"
    real = ev.map_event

    def unexpected_payload(name: str, data: dict[str, Any], ctx: ev.Context, **kw: Any) -> Any:
        if name == "BOGUS":
            return real(name, data, ctx, **kw) if data["missing"] else None  # KeyError
        return real(name, data, ctx, **kw)

    monkeypatch.setattr(ev, "map_event", unexpected_payload)
    dom.start_loop(run)
    assert run.task is not None
    with caplog.at_level(logging.ERROR, logger="drivers.qemu.domain"):
        run.queue.put_event(QmpEvent("BOGUS", {}, 0.0))
        run.queue.put_event(QmpEvent("STOP", {}, 0.0))
        async with asyncio.timeout(5):
            while dom.state == DomainState.RUNNING:
                await asyncio.sleep(0.01)
    assert not run.task.done()  # still following the domain
    assert dom.state == DomainState.PAUSED and [e.event for e in emitted] == ["suspended"]
    assert "BOGUS" in caplog.text and "KeyError" in caplog.text
    await dom.close()
    assert run.task.cancelled()  # cancellation is never swallowed
