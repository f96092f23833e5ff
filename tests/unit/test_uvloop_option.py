"""The daemons' ``uvloop`` setting (``--uvloop``): the loop factory it selects, and a clear
exit 2 when uvloop is asked for but not installed. A real agent on uvloop serving calls
is tests/integration/test_uvloop_agent.py."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from agent.__main__ import settings_from as agent_settings
from scheduler.__main__ import settings_from as scheduler_settings
from virtbus.daemon import UVLOOP_MISSING, loop_factory


def test_off_by_default_and_set_by_flag_or_file(tmp_path: Path) -> None:
    assert not agent_settings([]).uvloop and not scheduler_settings([]).uvloop
    assert agent_settings(["--uvloop"]).uvloop and scheduler_settings(["--uvloop"]).uvloop
    cfg = tmp_path / "c.toml"
    cfg.write_text("uvloop = true\n")
    assert agent_settings(["--config", str(cfg)]).uvloop
    assert not agent_settings(["--config", str(cfg), "--no-uvloop"]).uvloop


def test_the_factory_is_uvloops_only_when_asked() -> None:
    uvloop = pytest.importorskip("uvloop")
    assert loop_factory(False) is None
    factory = loop_factory(True)
    assert factory is uvloop.new_event_loop
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_asked_for_without_the_package_exits_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    with pytest.raises(SystemExit) as caught:
        loop_factory(True)
    assert caught.value.code == UVLOOP_MISSING and "virtbus[uvloop]" in UVLOOP_MISSING
    assert loop_factory(False) is None  # without the setting nothing is imported


def test_qemu_spawn_on_uvloop_refuses_a_dac_user_and_starts_without_one(tmp_path: Path) -> None:
    """uvloop's subprocesses take no user/group: a QEMU of the DAC user is refused with a
    clear error, one without a user starts (the keywords are not passed at all)."""
    uvloop = pytest.importorskip("uvloop")
    from drivers.qemu.dac import QemuUser
    from drivers.qemu.process import spawn
    from virtbus.errors import OperationFailed

    async def main() -> None:
        user = QemuUser("nobody", 65534, 65534, ())
        with pytest.raises(OperationFailed, match="--uvloop") as err:
            await spawn(["true"], uuid="u1", logfile=tmp_path / "q1.log", user=user)
        assert err.value.code == "OPERATION_FAILED"
        started = await spawn(["true"], uuid="u2", logfile=tmp_path / "q2.log")
        assert started.proc is not None and await started.proc.wait() == 0

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
