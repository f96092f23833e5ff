"""The benchmarks stay fair: every script shows the load and refuses a busy machine, no
script falls back to another driver or patches what it measures, and the side-by-side
helpers read what both sides really run."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from tests.bench import common

BENCH = Path(__file__).resolve().parents[1] / "bench"
# Children run by a parent that checked the load: libvirt's sides (Debian's python3) and
# the profiled agent of command_path.
CHILDREN = {"libvirt_side.py", "libvirt_stats.py", "libvirt_saves.py", "libvirt_net_side.py",
            "cpu_profile.py"}  # fmt: skip
# Shared mains that check the load for the scripts calling them (checked below).
SHARED_MAINS = {"bench_main": "snapshots.py"}


def _scripts() -> list[Path]:
    return sorted(
        p
        for p in BENCH.glob("*.py")
        if p.name not in CHILDREN and 'if __name__ == "__main__"' in p.read_text()
    )


def _called(tree: ast.AST) -> set[str]:
    return {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }


def test_every_benchmark_checks_the_load() -> None:
    scripts = _scripts()
    assert len(scripts) >= 13, [s.name for s in scripts]
    for name, home in SHARED_MAINS.items():
        tree = ast.parse((BENCH / home).read_text())
        functions = (n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef))
        body = next(n for n in functions if n.name == name)
        assert {"check_load", "add_force"} <= _called(body), f"{home}'s {name}"
    for script in scripts:
        called = _called(ast.parse(script.read_text()))
        shared = called & set(SHARED_MAINS)
        assert shared or {"check_load", "add_force"} <= called, (
            f"{script.name} does not check the load"
        )


def test_no_benchmark_patches_or_falls_back() -> None:
    for script in BENCH.glob("*.py"):
        text = script.read_text()
        assert "lazy_qmp_log" not in text, script.name
        assert "memory://" not in text, script.name
    migration = (BENCH / "migration.py").read_text()
    assert '"--driver", "test"' not in migration and '"test"' not in migration


def test_check_load_refuses_a_busy_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common.os, "getloadavg", lambda: (common.LOAD_LIMIT + 0.5, 0.0, 0.0))
    with pytest.raises(SystemExit, match="busy"):
        common.check_load(False)
    common.check_load(True)  # --force runs anyway
    monkeypatch.setattr(common.os, "getloadavg", lambda: (common.LOAD_LIMIT - 0.5, 0.0, 0.0))
    common.check_load(False)


def test_device_drivers_reads_both_command_line_forms() -> None:
    argv = [
        "qemu-system-x86_64",
        "-device",
        json.dumps({"driver": "pcie-root-port", "id": "pci.1"}),
        "-device",
        "qemu-xhci,id=usb,bus=pci.1",
        "-name",
        "guest=x,debug-threads=on",
        "-device",
        "virtio-blk-pci,drive=d",
    ]
    assert common.device_drivers(argv) == ["pcie-root-port", "qemu-xhci", "virtio-blk-pci"]


def test_both_sides_define_the_same_guest() -> None:
    xml = common.firmware_guest_xml("g", "kvm", "00000000-0000-0000-0000-000000000001")
    assert "<controller type='usb' model='none'/>" in xml
    assert "<memballoon model='none'/>" in xml
    for side in ("vs_libvirt.py", "libvirt_side.py"):
        assert "firmware_guest_xml(" in (BENCH / side).read_text(), side


def test_the_fleet_runs_shipped_agents_against_a_real_scheduler() -> None:
    """tests/bench/fleet.py (issue 19's scale target): the shipped AgentService on the
    shipped AMQP transport (connections shared, channels and queues each its own), one
    virtbus-scheduler process, a private vhost of the real broker; no stand-in."""
    text = (BENCH / "fleet.py").read_text()
    tree = ast.parse(text)
    called = _called(tree) | {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    assert {"AgentService", "TestDriver", "private_vhost", "check_load", "add_force"} <= called
    classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    assert [ast.unparse(b) for b in classes["SharedConnectionBus"].bases] == ["AmqpBus"]
    assert set(classes) == {"SharedConnectionBus"}  # no other stand-in
    assert "SchedulerService" not in text and "SCHEDULER" in text  # the daemon, as shipped
    assert "MemoryBus" not in text
