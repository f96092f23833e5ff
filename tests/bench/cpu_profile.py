"""A daemon under cProfile with CPU time as the clock, for tests/bench/command_path.py
(the agent) and tests/bench/fleet.py (the scheduler).

cProfile's default clock is wall time: on a loaded machine a ``send`` that wakes the broker
is charged the neighbours' time slices. ``time.process_time`` charges what this process
itself spent.

    python -m tests.bench.cpu_profile OUT [agent flags...]
    python -m tests.bench.cpu_profile OUT scheduler [scheduler flags...]
"""

from __future__ import annotations

import cProfile
import sys
import time
from collections.abc import Callable


def main() -> None:
    out = sys.argv[1]
    daemon_main: Callable[[], None]
    if sys.argv[2:3] == ["scheduler"]:
        sys.argv = ["virtbus-scheduler", *sys.argv[3:]]
        from scheduler.__main__ import main as daemon_main
    else:
        sys.argv = ["virtbus-agent", *sys.argv[2:]]
        from agent.__main__ import main as daemon_main

    profile = cProfile.Profile(time.process_time)
    try:
        profile.runcall(daemon_main)
    except SystemExit:
        pass
    finally:
        profile.dump_stats(out)


if __name__ == "__main__":
    main()
