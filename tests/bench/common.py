"""What every benchmark does first: show the machine's load, and refuse a busy machine.

These machines are shared and noisy. A figure taken while the load average is above 1 on
two cores says more about the neighbours than about virtbus, so a benchmark refuses to
run then unless ``--force`` is given (and prints the load either way).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Sequence

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


def median_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1000
