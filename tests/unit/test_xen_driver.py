"""XenDriver plumbing without a hypervisor: a fake ``xl`` and no xenstored.

The lifecycle itself runs against real Xen in tests/xen; these cover what must hold on
any host: a corrupt definition is set aside, and a background loop that dies is restarted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from drivers.base import DriverEvent
from drivers.xen.driver import XenDriver
from drivers.xen.settings import XenSettings, XenStoreSettings
from drivers.xen.xl import XlDomain
from virtbus.errors import OperationTimeout
from virtbus.protocol.events import DomainState
from virtbus.settings import Backoff

UUID = "0b5e3c1a-2d4f-4a6b-8c9d-1e2f3a4b5c6d"
XML = f"""<domain type='xen'><name>good</name><uuid>{UUID}</uuid>
  <memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type>linux</type><kernel>/boot/vmlinuz</kernel></os></domain>"""


class FakeXl:
    """``xl list -v`` with nothing running; ``bugs`` calls fail with a non-virtbus error,
    ``slow`` calls time out (xl under a starved dom0); ``create`` makes the domain run."""

    def __init__(self) -> None:
        self.calls = 0
        self.bugs = 0
        self.slow = 0
        self.rows: list[XlDomain] = []
        self.events: list[DriverEvent] = []  # what the driver emitted (the fixture's sink)

    async def list_verbose(self, timeout: float) -> list[Any]:
        self.calls += 1
        if self.bugs:
            self.bugs -= 1
            raise KeyError("unexpected xl output")
        if self.slow:
            self.slow -= 1
            raise OperationTimeout(f"xl list -v timed out after {timeout} s")
        return list(self.rows)

    async def create(self, config_path: str) -> None:
        self.rows.append(XlDomain("good", 3, 128, 1, "------", 0.4, UUID, None))
        self.slow = 2  # the passes right after the create time out


def make_settings(tmp_path: Path) -> XenSettings:
    return XenSettings(
        state_dir=tmp_path / "xen",
        reconcile_interval=0.02,
        debounce=0.0,
        loop_restart=Backoff(initial=0.02, maximum=0.1),
        xenstore=XenStoreSettings(
            path=str(tmp_path / "no-xenstored"), reconnect=Backoff(0.05, 0.2)
        ),
    )


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[tuple[XenDriver, FakeXl]]:
    drv = XenDriver(make_settings(tmp_path))
    xl = FakeXl()
    drv.xl = xl  # type: ignore[assignment]
    drv.settings.state_dir.mkdir(parents=True)
    (drv.settings.state_dir / f"{UUID}.xml").write_text(XML)
    (drv.settings.state_dir / "1c9d0e8f-0000-4000-8000-000000000001.xml").write_text("<domain")
    await drv.open(xl.events.append)
    yield drv, xl
    await drv.close()


async def test_corrupt_definition_is_set_aside_and_the_rest_load(
    driver: tuple[XenDriver, FakeXl],
) -> None:
    drv, _ = driver
    assert drv.lookup("good") is not None and drv.lookup(UUID) is not None
    names = sorted(p.name for p in drv.settings.state_dir.iterdir())
    assert names[0] == f"{UUID}.xml" and len(names) == 2
    assert names[1].startswith("1c9d0e8f-0000-4000-8000-000000000001.xml.corrupt-")


async def test_a_dead_reconcile_loop_is_restarted(
    driver: tuple[XenDriver, FakeXl], caplog: pytest.LogCaptureFixture
) -> None:
    drv, xl = driver
    with caplog.at_level(logging.ERROR, logger="drivers.xen.driver"):
        xl.bugs = 2  # the loop dies twice
        async with asyncio.timeout(5):
            while xl.bugs:
                await asyncio.sleep(0.01)
            passes = drv.passes
            while drv.passes < passes + 2:  # and then reconciles again
                await asyncio.sleep(0.01)
    assert caplog.text.count("reconcile loop died") == 2
    assert len(drv._tasks) == 2  # xenstore + reconcile, nothing leaked


async def test_close_stops_a_pending_restart(tmp_path: Path) -> None:
    drv = XenDriver(make_settings(tmp_path))
    xl = FakeXl()
    drv.xl = xl  # type: ignore[assignment]
    await drv.open(lambda _e: None)
    xl.bugs = 1
    async with asyncio.timeout(5):
        while xl.bugs:
            await asyncio.sleep(0.01)
    await drv.close()
    assert len(drv._tasks) == 0
    calls = xl.calls
    await asyncio.sleep(0.2)
    assert xl.calls == calls  # nothing restarted after close


async def test_a_created_domain_is_started_though_a_list_times_out(
    driver: tuple[XenDriver, FakeXl],
) -> None:
    """`xl create` succeeded: a pass that fails after it (xl list -v timing out in a
    starved dom0) is retried by the loop, it does not turn the start into a failure."""
    drv, xl = driver
    await drv.start("good")
    assert xl.slow == 0 and drv.state("good") == (DomainState.RUNNING, "booted")
    assert [(e.event, e.detail) for e in xl.events] == [("started", "booted")]


async def test_a_waiting_start_does_not_run_passes_back_to_back(tmp_path: Path) -> None:
    """Waiting asks for one fresh pass; the periodic tick does the rest (it used to ask
    for a new pass after every pass: `xl list -v` back to back in dom0 for the whole wait)."""
    settings = replace(make_settings(tmp_path), reconcile_interval=0.2, start_timeout=1.0)
    drv = XenDriver(settings)
    xl = FakeXl()
    xl.create = _create_nothing  # type: ignore[method-assign]
    drv.xl = xl  # type: ignore[assignment]
    await drv.open(xl.events.append)
    try:
        await drv.define(XML)
        before = xl.calls
        with pytest.raises(OperationTimeout):
            await drv.start("good")  # the domain never shows up
        assert xl.calls - before <= 8, xl.calls - before  # ~1 s / 0.2 s, plus a few
    finally:
        await drv.close()


async def _create_nothing(config_path: str) -> None:
    return None


async def test_the_periodic_pass_idles_longer_when_passes_are_slow(tmp_path: Path) -> None:
    """A 0.1 s `xl list -v` with the idle factor 4: at most one pass per ~0.5 s."""
    settings = replace(make_settings(tmp_path), reconcile_interval=0.01)
    drv = XenDriver(settings)
    xl = FakeXl()
    plain = xl.list_verbose

    async def slow_list(timeout: float) -> list[Any]:
        await asyncio.sleep(0.1)
        return await plain(timeout)

    xl.list_verbose = slow_list  # type: ignore[method-assign]
    drv.xl = xl  # type: ignore[assignment]
    await drv.open(xl.events.append)
    try:
        start = xl.calls
        await asyncio.sleep(1.6)
        assert 2 <= xl.calls - start <= 5, xl.calls - start  # 0.01 s idle would give ~14
    finally:
        await drv.close()
