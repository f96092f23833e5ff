"""define latency of libvirt's largest x86 test input, virtbus next to libvirt 9.0.

The file is the largest input of libvirt's QEMU test corpus (tests/compat fetches it) for
which libvirt builds a command line: ``pci-bridge-many-disks`` (20 KB, 100 disks on PCI
bridges). In the same run, rounds alternating, each with a fresh name and uuid (and
undefined again, untimed), medians of:

- virtbus: ``domain.define`` over the bus to a real agent (QEMU driver), and the
  ``virtbus define FILE --host H`` command;
- libvirt 9.0: ``virConnect.defineXML`` (python3-libvirt, one connection kept open) and
  the ``virsh define FILE`` command, on ``qemu:///system``;
- for the breakdown: the QEMU driver's define in this process (no bus), which completes
  the definition as libvirt does (implicit controllers, PCI addresses), validates it by
  building its command line, and writes it durably; and ``virtbus list --host H`` (the
  CLI's start-up and one call, no XML).

    .venv/bin/python -m tests.bench.define_large [-n 15] [--force]

tests/bench/libvirt_setup.sh starts libvirtd when it is not running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from drivers.qemu import QemuDriver
from drivers.qemu.settings import QemuSettings
from tests.bench.common import add_force, check_load, median_ms
from tests.compat.corpus import ensure_corpus
from tests.procs import BUS_URL, agent_process, unique_host
from virtbus.bus.factory import open_bus
from virtbus.protocol import ops

HERE = Path(__file__).parent
VIRTBUS = str(Path(sys.executable).with_name("virtbus"))
FILE = "pci-bridge-many-disks"
LIBVIRT_SERVER = r"""
import sys, time, libvirt
conn = libvirt.open("qemu:///system")
for line in sys.stdin:
    verb, arg = line.split(" ", 1)
    arg = arg.strip()
    if verb == "define":
        xml = open(arg).read()
        t = time.perf_counter()
        dom = conn.defineXML(xml)
        print(time.perf_counter() - t, flush=True)
    elif verb == "undefine":
        conn.lookupByName(arg).undefine()
        print("ok", flush=True)
"""


def variant(template: str, name: str) -> str:
    xml = re.sub(r"<name>[^<]*</name>", f"<name>{name}</name>", template, count=1)
    return re.sub(r"<uuid>[^<]*</uuid>", f"<uuid>{uuid.uuid4()}</uuid>", xml, count=1)


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    run = subprocess.run(argv, capture_output=True, timeout=120)
    elapsed = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed: {run.stderr.decode()[-400:]}")
    return elapsed


class Libvirt:
    """A python3-libvirt process answering ``define PATH`` with the seconds it took."""

    def __init__(self) -> None:
        subprocess.run([str(HERE / "libvirt_setup.sh")], check=True, timeout=600)
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", "-c", LIBVIRT_SERVER], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def define(self, path: Path) -> float:
        return float(self.ask(f"define {path}"))

    def undefine(self, name: str) -> None:
        assert self.ask(f"undefine {name}") == "ok"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


async def main(n: int) -> None:
    corpus = await asyncio.to_thread(ensure_corpus)
    template = (corpus.data / f"{FILE}.xml").read_text()
    print(f"file: {FILE}.xml ({len(template.encode())} bytes, libvirt {corpus.version} corpus)")
    samples: dict[str, list[float]] = {
        k: [] for k in ("virtbus bus", "virtbus CLI", "libvirt API", "virsh define",
                        "driver in-process", "virtbus list CLI")
    }  # fmt: skip
    libvirt = Libvirt()
    host = unique_host("defbench")
    with tempfile.TemporaryDirectory(prefix="vbd") as tmp:
        work = Path(tmp)
        # libvirt's input names host paths of libvirt's test suite: like the compatibility
        # harness, the bench opts out of path confinement (libvirt's defineXML has none)
        local = QemuDriver(work / "local-state", work / "local-run",
                           QemuSettings(confine_paths=False))  # fmt: skip
        await local.open(lambda _event: None)
        opt_out = ("--driver-option", "confine_paths=false")
        async with agent_process(host, work, "--log-level", "WARNING", *opt_out, driver="qemu"):
            bus = open_bus(BUS_URL, src="bench")
            await bus.connect()
            route = ops.agent_route(host)
            try:
                for i in range(n + 1):  # round 0 warms up (caches, first queue), not counted
                    keep = i > 0
                    name = f"dl-bus-{i}"
                    xml = variant(template, name)
                    t = time.perf_counter()
                    await bus.call(route, ops.DOMAIN_DEFINE, {"xml": xml})
                    elapsed = time.perf_counter() - t
                    await bus.call(route, ops.DOMAIN_UNDEFINE, {"domain": name})
                    if keep:
                        samples["virtbus bus"].append(elapsed)
                    name = f"dl-cli-{i}"
                    path = work / f"{name}.xml"
                    path.write_text(variant(template, name))
                    elapsed = await asyncio.to_thread(
                        timed, [VIRTBUS, "define", str(path), "--host", host]
                    )
                    await bus.call(route, ops.DOMAIN_UNDEFINE, {"domain": name})
                    if keep:
                        samples["virtbus CLI"].append(elapsed)
                    name = f"dl-api-{uuid.uuid4().hex[:6]}"
                    path = work / f"{name}.xml"
                    path.write_text(variant(template, name))
                    elapsed = await asyncio.to_thread(libvirt.define, path)
                    await asyncio.to_thread(libvirt.undefine, name)
                    if keep:
                        samples["libvirt API"].append(elapsed)
                    name = f"dl-virsh-{uuid.uuid4().hex[:6]}"
                    path = work / f"{name}.xml"
                    path.write_text(variant(template, name))
                    elapsed = await asyncio.to_thread(
                        timed, ["virsh", "-q", "-c", "qemu:///system", "define", str(path)]
                    )
                    await asyncio.to_thread(libvirt.undefine, name)
                    if keep:
                        samples["virsh define"].append(elapsed)
                    xml = variant(template, f"dl-local-{i}")
                    t = time.perf_counter()
                    ref = await local.define(xml)
                    elapsed = time.perf_counter() - t
                    await local.undefine(ref.uuid)
                    if keep:
                        samples["driver in-process"].append(elapsed)
                    elapsed = await asyncio.to_thread(
                        timed, [VIRTBUS, "list", "--all", "--host", host]
                    )  # the CLI's own floor: start-up and one call, no XML
                    if keep:
                        samples["virtbus list CLI"].append(elapsed)
            finally:
                await bus.close()
                libvirt.close()
                await local.close()
    med = {k: median_ms(v) for k, v in samples.items()}
    print(f"medians of {n} alternating rounds:")
    for k, v in med.items():
        print(f"  {k:18s} {v:8.1f} ms  (min {min(samples[k]) * 1e3:.1f})")
    print(f"virtbus bus / libvirt API   {med['virtbus bus'] / med['libvirt API']:.2f}x (<= 1.0)")
    print(f"virtbus CLI / virsh define  {med['virtbus CLI'] / med['virsh define']:.2f}x")
    print(json.dumps({k: round(v, 2) for k, v in med.items()}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=15, help="rounds (default %(default)s)")
    add_force(parser)
    args = parser.parse_args()
    check_load(args.force)
    asyncio.run(main(args.n))
