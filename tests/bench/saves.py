"""Save and restore of a running 256 MiB TCG guest: virtbus next to libvirt 9.0's
``virsh save`` / ``virsh restore`` (virDomainSave / virDomainRestore), in one run
(issue 16's benchmark: time and file size).

The same guest (tests/bench/snapshots.py's: the test kernel + initramfs ticking on its
serial console, one 64 MiB qcow2 disk) runs under a real ``virtbus-agent --driver qemu``
(Python client over the real RabbitMQ: ``save``, then ``Host.restore``) and under libvirtd
on ``qemu:///system`` (tests/bench/libvirt_saves.py, Debian's python3-libvirt, a process
that lives for the run so that rounds can alternate). The two QEMUs' ``-device`` lists are
compared first and the run refuses to report when they differ. Each round saves (the
guest stops) and restores (it runs again) on each side, which side first alternating.

    .venv/bin/python -m tests.bench.saves [--rounds 5] [--force]

tests/bench/libvirt_setup.sh installs and starts libvirt when absent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.bench.common import device_drivers, qemu_argv_of
from tests.bench.snapshots import WAIT, bench_main, guest_xml, line, ticking
from tests.e2e.test_qemu_snapshots import image
from tests.guests import build_test_guest
from tests.procs import BUS_URL, agent_process, unique_host
from virtbus.client import Client

HERE = Path(__file__).parent


class LibvirtSide:
    """tests/bench/libvirt_saves.py, spoken to a line at a time."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, xml: Path) -> LibvirtSide:
        proc = await asyncio.create_subprocess_exec(
            "/usr/bin/python3", str(HERE / "libvirt_saves.py"), str(xml),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        side = cls(proc)
        ready = await side._answer()
        assert "ready" in ready, ready
        return side

    async def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), WAIT)
        if not line:
            raise RuntimeError("libvirt_saves.py exited (see its traceback above)")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._answer()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ask("quit")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.proc.wait(), WAIT)
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def libvirt_ready() -> None:
    subprocess.run([str(HERE / "libvirt_setup.sh")], check=True, timeout=600)


async def run(rounds: int, base: Path) -> None:
    guest = build_test_guest()
    lv_xml = base / "libvirt.xml"
    lv_xml.write_text(guest_xml(guest, "bench-save-lv", image(base / "lv.qcow2"),
                                base / "lv.serial"))  # fmt: skip
    host = unique_host("savebench")
    state = base / "agent"
    state.mkdir()
    times: dict[str, list[float]] = {f"{side} {what}": [] for what in ("save", "restore")
                                     for side in ("libvirt", "virtbus")}  # fmt: skip
    sizes: dict[str, list[int]] = {"libvirt": [], "virtbus": []}
    lv = await LibvirtSide.start(lv_xml)
    try:
        async with agent_process(host, state, driver="qemu"):
            client = await Client.connect(BUS_URL, timeout=WAIT)
            vb_host = client.host(host)
            dom = None
            try:
                xml = guest_xml(guest, "bench-save-vb", image(base / "vb.qcow2"),
                                base / "vb.serial")  # fmt: skip
                dom = await vb_host.define(xml)
                await dom.start()
                await asyncio.gather(ticking(base / "vb.serial"), ticking(base / "lv.serial"))
                lv_devices = (await lv.ask("devices"))["devices"]
                vb_devices = device_drivers(qemu_argv_of("bench-save-vb"))
                assert lv_devices == vb_devices, f"devices differ: {lv_devices} vs {vb_devices}"
                for i in range(rounds):
                    order = ["virtbus", "libvirt"] if i % 2 == 0 else ["libvirt", "virtbus"]
                    for side in order:
                        file = base / f"{side}-{i}.save"
                        if side == "libvirt":
                            saved = await lv.ask(f"save {file}")
                            times["libvirt save"].append(saved["seconds"])
                            sizes["libvirt"].append(int(saved["size"]))
                            restored = await lv.ask(f"restore {file}")
                            times["libvirt restore"].append(restored["seconds"])
                        else:
                            t0 = time.perf_counter()
                            await dom.save(str(file))
                            times["virtbus save"].append(time.perf_counter() - t0)
                            sizes["virtbus"].append(file.stat().st_size)
                            t0 = time.perf_counter()
                            await vb_host.restore(str(file))
                            times["virtbus restore"].append(time.perf_counter() - t0)
                        file.unlink()
            finally:
                if dom is not None:
                    with contextlib.suppress(Exception):
                        await dom.destroy()
                    with contextlib.suppress(Exception):
                        await dom.undefine()
                await client.close()
    finally:
        await lv.close()
    print(f"# save + restore, running 256 MiB TCG guest, {rounds} rounds, same devices")
    med = {k: line(k, v) for k, v in times.items()}
    for side, got in sizes.items():
        print(f"  {side:8s} save file median {statistics.median(got) / 2**20:7.1f} MiB")
    for what in ("save", "restore"):
        print(f"  virtbus / libvirt {what}: {med[f'virtbus {what}'] / med[f'libvirt {what}']:.3f}")


async def main(argv: list[str] | None = None) -> int:
    return await bench_main(argv, __doc__ or "", 5, run, before=libvirt_ready)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
