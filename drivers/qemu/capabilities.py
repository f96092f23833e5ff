"""What the installed QEMU binary offers (devices, machines, accelerators).

The command-line builder is pure; when the driver passes a :class:`QemuCapabilities` it
refuses devices this binary lacks (a Debian QEMU without the spice/qxl modules, say) with a
clear CONFIG_UNSUPPORTED instead of a QEMU start failure. :func:`probe` runs the binary
(asynchronously, bounded by a timeout) to fill one in.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from virtbus.errors import OperationFailed, OperationTimeout

_NAME_RE = re.compile(r'^name "([^"]+)"', re.MULTILINE)
_MACHINE_RE = re.compile(r"^(\S+)\s+.*?(?:\(alias of (\S+)\))?$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    timeout: float = 15.0  # seconds for each `qemu -... help` run


@dataclass(frozen=True, slots=True)
class QemuCapabilities:
    devices: frozenset[str]
    machines: frozenset[str]  # names and aliases (pc, q35, pc-q35-7.2, ...)
    accelerators: frozenset[str]
    chardevs: frozenset[str]
    spice: bool  # `-spice help` works (Debian ships spice as a loadable module)

    def has_device(self, name: str) -> bool:
        return name in self.devices


def parse_device_help(text: str) -> frozenset[str]:
    """Device names (and aliases) from ``-device help`` output."""
    names = set(_NAME_RE.findall(text))
    names |= set(re.findall(r'alias "([^"]+)"', text))
    return frozenset(names)


def parse_machine_help(text: str) -> frozenset[str]:
    out: set[str] = set()
    for line in text.splitlines()[1:]:
        parts = line.split()
        if parts:
            out.add(parts[0])
    return frozenset(out)


def parse_list_help(text: str) -> frozenset[str]:
    """Indented lists such as ``-accel help`` / ``-chardev help``."""
    return frozenset(
        line.strip()
        for line in text.splitlines()
        if line.strip() and ":" not in line and not line.startswith("qemu")
    )


async def _run(
    emulator: str, args: list[str], settings: ProbeSettings, *, check: bool = True
) -> str:
    proc = await asyncio.create_subprocess_exec(
        emulator,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), settings.timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise OperationTimeout(f"{emulator} {' '.join(args)} did not answer") from None
    if check and proc.returncode != 0:
        raise OperationFailed(f"{emulator} {' '.join(args)} failed: {out.decode()[-300:]}")
    return out.decode(errors="replace")


async def probe(
    emulator: str = "qemu-system-x86_64", settings: ProbeSettings = ProbeSettings()
) -> QemuCapabilities:
    """Ask ``emulator`` what it supports (five short ``help`` runs, one after another)."""
    devices = await _run(emulator, ["-nodefaults", "-device", "help"], settings)
    machines = await _run(emulator, ["-machine", "help"], settings)
    accels = await _run(emulator, ["-accel", "help"], settings)
    chardevs = await _run(emulator, ["-chardev", "help"], settings)
    spice = await _run(emulator, ["-spice", "help"], settings, check=False)
    return QemuCapabilities(
        devices=parse_device_help(devices),
        machines=parse_machine_help(machines),
        accelerators=parse_list_help(accels),
        chardevs=parse_list_help(chardevs),
        spice="spice options" in spice,
    )
