"""What every benchmark does first: show the machine's load, and refuse a busy machine.

These machines are shared and noisy. A figure taken while the load average is above 1 on
two cores says more about the neighbours than about virtbus, so a benchmark refuses to
run then unless ``--force`` is given (and prints the load either way).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

LOAD_LIMIT = 1.0


def add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force", action="store_true", help=f"run even when the load average is above {LOAD_LIMIT}"
    )


def check_load(force: bool) -> None:
    one, five, fifteen = os.getloadavg()
    print(f"load average: {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)")
    if one > LOAD_LIMIT and not force:
        sys.exit(f"the machine is busy (load {one:.2f} > {LOAD_LIMIT}): retry later or --force")


def compile_tree() -> None:
    """Compile virtbus's packages to bytecode, as an install does: this environment sets
    PYTHONDONTWRITEBYTECODE=1, so otherwise every start-up a bench times recompiles them."""
    import compileall

    root = Path(__file__).resolve().parents[2]
    for package in ("virtbus", "agent", "drivers", "scheduler"):
        assert compileall.compile_dir(root / package, quiet=1), f"compileall {package} failed"


def median_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1000


def device_drivers(argv: Sequence[str]) -> list[str]:
    """The sorted ``-device`` drivers of a QEMU command line (``key=value`` or JSON form):
    what a side-by-side benchmark compares to prove both sides run the same device set."""
    out = []
    for flag, value in itertools.pairwise(argv):
        if flag == "-device":
            out.append(
                json.loads(value)["driver"] if value.startswith("{") else value.split(",")[0]
            )
    return sorted(out)


def qemu_argv_of(guest: str) -> list[str]:
    """The command line of the QEMU process running ``guest`` (``-name guest=NAME,...``)."""
    needle = f"guest={guest},".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            raw = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in raw and b"qemu-system" in raw:
            return raw.decode().split("\0")
    raise LookupError(f"no QEMU runs guest {guest}")


def firmware_guest_xml(name: str, hv: str, uuid: str) -> str:
    """vs_libvirt's guest, the same on both sides: firmware only, 128 MiB, 1 vCPU, q35, and
    every device spelled out (no USB controller, no balloon) so neither side adds defaults
    the other lacks; the bench still compares the two QEMUs' ``-device`` lists."""
    return f"""<domain type='{hv}'><name>{name}</name><uuid>{uuid}</uuid>
  <memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices><controller type='usb' model='none'/><memballoon model='none'/></devices></domain>"""
