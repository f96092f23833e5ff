"""Boot the nested-Xen bed in QEMU (TCG) and collect what dom0 reports on the console.

dom0 writes ``VIRTBUS-XEN {json}`` lines (one per check or scenario) and ends with a
``{"done": ...}`` record; everything else on the console is kept as the boot log.
Run ``python -m tests.xen.testbed [scenario ...]`` to boot once by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.xen.build import XenBed, build_xen_bed

MARKER = "VIRTBUS-XEN "


@dataclass(frozen=True)
class BootSettings:
    """The nested machine (see docs/xen-testbed.md for why these values)."""

    qemu: str = "qemu-system-x86_64"
    # One host thread for both nested CPUs (issue 18). With thread=multi, PVH guests
    # triple-faulted early in boot, in the PIT loop of their TSC calibration (some 100,000
    # port reads, each an IOIO exit to Xen through QEMU's SVM emulation): 3 faults in 5
    # quiet runs on 2026-12-04, fewer on a loaded host, where the two vCPU threads seldom
    # run at once. Serialised: none in 4 quiet runs, nor in the full run; boots take about
    # 1.7x as long (docs/xen-testbed.md has the table).
    accel: str = "tcg,thread=single"
    memory_mib: int = 3072
    cpus: int = 2
    dom0_mem: str = "1536M,max:1536M"
    timeout_s: float = 540.0  # the whole boot, all scenarios and power-off
    # guest_loglvl=all: what Xen does to a guest itself (a triple fault: "invoking HVM
    # shutdown action") is logged at info level, which xl dmesg shows only with it; a
    # larger ring (conring_size), or a migration's save/restore lines push it out
    xen_args: str = (
        "console=com1 com1=115200,8n1 dom0_max_vcpus=2 noreboot guest_loglvl=all conring_size=1M"
    )
    dom0_args: str = "console=hvc0 earlyprintk=xen rdinit=/init quiet"


@dataclass
class BootResult:
    records: list[dict[str, Any]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    seconds: float = 0.0
    returncode: int | None = None

    @property
    def done(self) -> bool:
        return any("done" in r for r in self.records)


def qemu_argv(bed: XenBed, initramfs: Path, args: list[str], s: BootSettings) -> list[str]:
    dom0 = f"{bed.vmlinuz} {s.dom0_args}"
    if args:
        # QEMU splits -initrd at commas (the module list) and Xen the command line at
        # spaces, so the runner's arguments travel joined by '+' (dom0_init.sh splits them)
        bad = [a for a in args if not a or any(c in a for c in ", +")]
        if bad:
            raise ValueError(f"dom0 runner arguments cannot hold ',', ' ' or '+': {bad}")
        dom0 += " virtbus.args=" + "+".join(args)
    return [
        s.qemu, "-accel", s.accel, "-cpu", "qemu64,+svm,+npt",
        "-m", str(s.memory_mib), "-smp", str(s.cpus), "-nographic", "-nodefaults",
        "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nic", "none",
        "-kernel", str(bed.xen), "-append", f"{s.xen_args} dom0_mem={s.dom0_mem}",
        "-initrd", f"{dom0},{initramfs}",
    ]  # fmt: skip


async def boot(
    bed: XenBed, args: list[str], settings: BootSettings | None = None, echo: bool = False
) -> BootResult:
    """One boot: run the scenario runner in dom0 with ``args``; always reaps QEMU."""
    s = settings or BootSettings()
    result = BootResult()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="virtbus-xen-") as tmp:
        initramfs = bed.initramfs(Path(tmp) / "dom0.cpio.gz")
        proc = await asyncio.create_subprocess_exec(
            *qemu_argv(bed, initramfs, args, s),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(s.timeout_s):
                while line_b := await proc.stdout.readline():
                    line = line_b.decode(errors="replace").rstrip("\r\n")
                    result.log.append(line)
                    if echo:
                        print(f"[{time.monotonic() - start:6.1f}] {line}", file=sys.stderr)
                    at = line.find(MARKER)
                    if at >= 0:
                        try:
                            result.records.append(json.loads(line[at + len(MARKER) :]))
                        except json.JSONDecodeError:
                            result.log.append(f"(bad record) {line}")
                result.returncode = await proc.wait()
        except TimeoutError:
            result.log.append(f"(timeout after {s.timeout_s} s)")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    result.seconds = time.monotonic() - start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("args", nargs="*", help="scenario runner arguments")
    parser.add_argument("--log", type=Path, default=None, help="write the console log here")
    opts = parser.parse_args(argv)
    bed = build_xen_bed(progress=lambda m: print(m, file=sys.stderr))
    result = asyncio.run(boot(bed, opts.args, echo=bool(os.environ.get("VIRTBUS_ECHO"))))
    if opts.log:
        opts.log.write_text("\n".join(result.log) + "\n")
    for rec in result.records:
        print(json.dumps(rec))
    print(f"boot took {result.seconds:.1f} s, done={result.done}", file=sys.stderr)
    return 0 if result.done else 1


if __name__ == "__main__":
    raise SystemExit(main())
