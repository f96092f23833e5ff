"""The systemd units in deploy/ pass ``systemd-analyze verify`` (where systemd is installed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "deploy/systemd").glob("*.service"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    # Point ExecStart at this checkout's scripts: verify insists that the binary exists.
    bin_dir = Path(sys.executable).parent
    text = unit.read_text().replace("/opt/virtbus/bin/", f"{bin_dir}/")
    copy = tmp_path / unit.name
    copy.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if unit.name in line or "virtbus" in line
    ]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


def test_agent_unit_never_kills_guests() -> None:
    text = (ROOT / "deploy/systemd/virtbus-agent.service").read_text()
    assert "KillMode=process" in text
