"""The agent under cProfile with CPU time as the clock, for tests/bench/command_path.py.

cProfile's default clock is wall time: on a loaded machine a ``send`` that wakes the broker
is charged the neighbours' time slices. ``time.process_time`` charges what this process
itself spent.

    python -m tests.bench.cpu_profile OUT [agent flags...]
"""

from __future__ import annotations

import cProfile
import sys
import time


def main() -> None:
    out = sys.argv[1]
    sys.argv = ["virtbus-agent", *sys.argv[2:]]
    from agent.__main__ import main as agent_main

    profile = cProfile.Profile(time.process_time)
    try:
        profile.runcall(agent_main)
    except SystemExit:
        pass
    finally:
        profile.dump_stats(out)


if __name__ == "__main__":
    main()
