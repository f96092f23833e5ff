"""`virtbus demo` runs to completion and leaves no process behind (test driver, QEMU, AMQP)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import VIRTBUS

TOUR_STEPS = ("$ virtbus define", "$ virtbus start demo", "$ virtbus suspend demo",
              "$ virtbus resume demo", "$ virtbus migrate demo --to host-b --wait",
              "$ virtbus list --all", "$ virtbus undefine demo", "Tour complete")  # fmt: skip


def _our_leftovers(before: set[int]) -> list[str]:
    """New qemu/agent/scheduler processes under a /tmp/vb- demo dir."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in before:
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "/tmp/vb-" in cmd:
            found.append(f"{entry}: {cmd[:120]}")
    return found


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    before = {int(p) for p in os.listdir("/proc") if p.isdigit()}
    yield
    time.sleep(0.2)
    assert _our_leftovers(before) == []


def run_demo(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1"}
    started = time.monotonic()
    run = subprocess.run(
        [*VIRTBUS, "demo", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    run.elapsed = time.monotonic() - started  # type: ignore[attr-defined]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for step in TOUR_STEPS:
        assert step in run.stdout, (step, run.stdout[-2000:])
    assert "\033[" not in run.stdout  # no colour in a pipe
    return run


def test_demo_with_the_test_driver(no_leftovers: None) -> None:
    run = run_demo("--driver", "test", timeout=60)
    assert "test driver" in run.stdout
    assert "event 'resumed' for domain 'demo' (migrated)" in run.stdout
    assert "completed [done]" in run.stdout
    print(f"demo (test driver): {run.elapsed:.1f} s")  # type: ignore[attr-defined]  # a figure


@pytest.mark.qemu
@pytest.mark.slow
def test_demo_with_qemu_and_the_tcg_guest(no_leftovers: None) -> None:
    run = run_demo("--driver", "qemu", timeout=180)
    assert "QEMU driver" in run.stdout and "test guest:" in run.stdout
    assert " qemu " in run.stdout  # `hosts` shows the qemu driver
    print(f"demo (QEMU): {run.elapsed:.1f} s")  # type: ignore[attr-defined]  # a figure


@pytest.mark.rabbitmq
def test_demo_over_rabbitmq_with_separate_processes(rabbitmq: None, no_leftovers: None) -> None:
    vhost = f"virtbus-demo-{os.getpid()}"
    ctl = ["rabbitmqctl", "-q"]
    subprocess.run([*ctl, "add_vhost", vhost], check=True, capture_output=True, timeout=60)
    try:
        subprocess.run([*ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        run = run_demo(
            "--driver", "test", "--bus", f"amqp://guest:guest@127.0.0.1:5672/{vhost}", timeout=90
        )
        assert "separate processes" in run.stdout
        queues = subprocess.run([*ctl, "list_queues", "-p", vhost, "name"], check=True,
                                capture_output=True, text=True, timeout=60).stdout  # fmt: skip
        assert "virtbus.agent.host-a" not in queues  # the demo removed its agents' queues
    finally:
        subprocess.run([*ctl, "delete_vhost", vhost], capture_output=True, timeout=60)
    assert sys.executable
