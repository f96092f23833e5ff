"""The libvirt half of tests/bench/saves.py (Debian's python3 + python3-libvirt).

Defines and starts the guest XML given on ``qemu:///system``, then reads commands on
stdin, one a line, and answers each with one JSON line: ``save FILE`` (virDomainSave,
seconds and the file's size), ``restore FILE`` (virDomainRestore, seconds), ``devices``
(the ``-device`` drivers of the QEMU libvirt runs), ``quit`` (destroy and undefine).
A long-lived process, so that the caller can alternate libvirt's rounds with virtbus's.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import libvirt  # type: ignore[import-not-found]

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # Debian's python: the repo's root
from tests.bench.common import device_drivers


def main() -> None:
    xml = Path(sys.argv[1]).read_text()
    conn = libvirt.open("qemu:///system")
    dom = conn.defineXML(xml)
    name = dom.name()
    try:
        dom.create()
        print(json.dumps({"ready": name}), flush=True)
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            out: dict[str, object] = {}
            if cmd == "save":
                t = time.perf_counter()
                dom.save(arg)
                out = {"seconds": time.perf_counter() - t, "size": os.path.getsize(arg)}
            elif cmd == "restore":
                t = time.perf_counter()
                conn.restore(arg)
                out = {"seconds": time.perf_counter() - t}
                dom = conn.lookupByName(name)
            elif cmd == "devices":
                pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                out = {"devices": device_drivers(argv)}
            elif cmd == "quit":
                break
            print(json.dumps(out), flush=True)
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
        conn.close()


if __name__ == "__main__":
    main()
