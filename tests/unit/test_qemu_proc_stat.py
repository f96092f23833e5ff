"""/proc/<pid>/stat as the QEMU driver reads it (every dominfo): state and CPU time."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from drivers.qemu.process import _stat_fields, cpu_time_ns, pid_alive


def test_this_process_is_alive_and_has_used_cpu() -> None:
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # at least a few clock ticks of CPU
        pass
    user, system = cpu_time_ns(os.getpid())
    assert pid_alive(os.getpid()) and user + system >= 10_000_000
    assert user % (1_000_000_000 // os.sysconf("SC_CLK_TCK")) == 0  # ticks, in ns


def test_a_gone_process_reads_as_dead_with_no_cpu() -> None:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: its PID names nothing now
    assert not pid_alive(child.pid) and cpu_time_ns(child.pid) == (0, 0)
    assert _stat_fields(child.pid) is None


def test_a_zombie_is_not_alive() -> None:
    child = subprocess.Popen(["true"])
    try:
        for _ in range(500):  # exited but not reaped yet: state Z
            fields = _stat_fields(child.pid)
            if fields is not None and fields[0] == "Z":
                break
            time.sleep(0.01)
        assert not pid_alive(child.pid)
    finally:
        child.wait()


def test_a_command_name_with_spaces_and_parens_is_skipped_whole(tmp_path: Path) -> None:
    odd = tmp_path / "x) y (z"
    odd.symlink_to("/bin/sleep")
    child = subprocess.Popen([str(odd), "30"])
    try:
        for _ in range(500):  # until the exec has happened (comm is the new name)
            if "x) y (z" in Path(f"/proc/{child.pid}/stat").read_text():
                break
            time.sleep(0.01)
        fields = _stat_fields(child.pid)
        assert fields is not None and fields[0] in ("S", "R") and int(fields[1]) == os.getpid()
        assert pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()
