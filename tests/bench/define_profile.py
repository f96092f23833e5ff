"""Where the QEMU driver's define of libvirt's largest test input spends its instructions.

In this process, no bus: ``QemuDriver.define`` of ``pci-bridge-many-disks`` (define_large's
file) ``-n`` times, each with a fresh name and uuid, after one warm-up define. The parts
(parse, complete, validate/argv build, store) are timed with CPU time per define; the
Python function calls one define makes (cProfile's count over ``-n`` defines: the same on a
busy machine as on a quiet one) are printed too, and:

- ``--callgrind``: this script runs twice under valgrind's callgrind, with no define after
  the warm-up and with ``-n``; the difference of the two instruction totals divided by
  ``-n`` is the instructions one define costs (load-independent: the figure to compare
  before and after a change);
- ``--profile FILE``: cProfile with CPU time as its clock over the ``-n`` defines.

    .venv/bin/python -m tests.bench.define_profile [-n 20] [--callgrind] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tests.bench.common import add_force, check_load

FILE = "pci-bridge-many-disks"


def variant(template: str, name: str) -> str:
    xml = re.sub(r"<name>[^<]*</name>", f"<name>{name}</name>", template, count=1)
    return re.sub(r"<uuid>[^<]*</uuid>", f"<uuid>{uuid.uuid4()}</uuid>", xml, count=1)


async def defines(n: int, profile: str | None, parts: bool) -> None:
    from drivers.qemu import QemuDriver
    from drivers.qemu.settings import QemuSettings
    from tests.compat.corpus import ensure_corpus
    from virtbus.domain import parse_domain_xml

    template = (ensure_corpus().data / f"{FILE}.xml").read_text()
    with tempfile.TemporaryDirectory(prefix="vbdp") as tmp:
        # libvirt's input names libvirt's test paths: opted out of path confinement, as
        # define_large and the compatibility harness are
        driver = QemuDriver(Path(tmp) / "state", Path(tmp) / "run",
                            QemuSettings(confine_paths=False))  # fmt: skip
        await driver.open(lambda _e: None)
        await driver.define(variant(template, "warm"))
        xmls = [variant(template, f"d{i}") for i in range(n)]
        prof = cProfile.Profile(time.process_time) if profile else None
        c0 = time.process_time()
        if prof is not None:
            prof.enable()
        for xml in xmls:
            await driver.define(xml)
        if prof is not None:
            prof.disable()
            prof.dump_stats(str(profile))
        total = (time.process_time() - c0) / max(n, 1)
        if n and prof is None:  # a second, counted pass: calls do not depend on the load
            prof = cProfile.Profile()
            prof.enable()
            for i in range(n):
                await driver.define(variant(template, f"c{i}"))
            prof.disable()
            calls = pstats.Stats(prof).total_calls  # type: ignore[attr-defined]
            print(f"Python function calls per define: {calls / n:,.0f}")
        if parts and n:
            launcher = driver._launcher
            split: dict[str, float] = {"parse": 0.0, "complete": 0.0, "validate": 0.0}
            for i in range(n):
                xml = variant(template, f"p{i}")
                t = time.process_time()
                defn = parse_domain_xml(xml)
                split["parse"] += time.process_time() - t
                t = time.process_time()
                await launcher.complete(defn)
                split["complete"] += time.process_time() - t
                t = time.process_time()
                launcher.validate(defn)
                split["validate"] += time.process_time() - t
            rest = total - sum(split.values()) / n
            text = ", ".join(f"{k} {v / n * 1e3:.1f}" for k, v in split.items())
            print(f"define CPU {total * 1e3:.1f} ms ({text}, store+registry {rest * 1e3:.1f})")
        await driver.close()


def callgrind_total(n: int, out: Path) -> int:
    subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
         "-m", "tests.bench.define_profile", "-n", str(n), "--force", "--quiet"],
        check=True, capture_output=True, timeout=3600,
    )  # fmt: skip
    match = re.search(r"^(?:totals|summary): (\d+)", out.read_text(), re.M)
    assert match, "no totals in the callgrind output"
    return int(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="defines measured")
    parser.add_argument("--callgrind", action="store_true", help="instructions per define")
    parser.add_argument("--profile", metavar="FILE", help="cProfile (CPU clock) of the defines")
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    add_force(parser)
    args = parser.parse_args()
    if not args.quiet:
        check_load(args.force)
    if args.callgrind:
        with tempfile.TemporaryDirectory(prefix="vbcg") as tmp:
            base = callgrind_total(0, Path(tmp) / "zero.out")
            full = callgrind_total(args.n, Path(tmp) / "n.out")
        print(f"instructions per define: {(full - base) / args.n:,.0f} "
              f"(callgrind, {args.n} defines minus none)")  # fmt: skip
        return 0
    asyncio.run(defines(args.n, args.profile, not args.quiet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
