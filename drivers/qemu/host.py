"""Facts about this host that a command line depends on: hugetlbfs mounts, NUMA nodes,
online CPUs, QEMU firmware descriptors, swtpm's features.

:func:`probe` reads them from ``/proc`` and ``/sys`` (in a worker thread: file I/O stays
off the event loop). The command-line builder checks a definition against them at start
(a hugepage size with no hugetlbfs mount, a NUMA node the host lacks), as libvirt does;
at define there are no host facts (a definition may be meant for another host).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from drivers.qemu.bitmap import parse_bitmap
from drivers.qemu.firmware import Descriptor, load_descriptors

#: QEMU's firmware descriptor search path (docs/interop/firmware.json), highest first
FIRMWARE_DIRS = (
    Path("/etc/qemu/firmware"),
    Path("/usr/share/qemu/firmware"),
)


@dataclass(frozen=True, slots=True)
class HostFacts:
    hugepages: Mapping[int, str]  # page size in KiB -> a hugetlbfs mount point
    default_hugepage_kib: int | None  # the kernel's default huge page size
    numa_nodes: frozenset[int]
    cpus: frozenset[int]  # online CPUs
    page_size_kib: int = 4
    firmware: tuple[Descriptor, ...] = ()
    swtpm_tpm12: bool = True  # swtpm supports TPM 1.2
    swtpm_tpm20: bool = True  # ... and TPM 2.0
    scsi_generic: Mapping[str, str] = field(default_factory=dict)  # "H:B:T:L" -> /dev/sgN
    #: look host devices up (False: a test host, like libvirt's mocked sysfs)
    resolve_devices: bool = True

    def hugepage_mount(self, size_kib: int) -> str | None:
        return self.hugepages.get(size_kib)


def _mounts() -> tuple[dict[int, str], int | None]:
    default: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Hugepagesize:"):
                default = int(line.split()[1])
    except OSError:
        pass
    out: dict[int, str] = {}
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) < 4 or parts[2] != "hugetlbfs":
            continue
        size = default
        for opt in parts[3].split(","):
            if opt.startswith("pagesize="):
                size = _size_kib(opt.split("=", 1)[1])
        if size is not None:
            out.setdefault(size, parts[1])
    return out, default


def _size_kib(text: str) -> int:
    units = {"K": 1, "M": 1024, "G": 1024 * 1024}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text) // 1024


def _online(path: str, fallback: frozenset[int]) -> frozenset[int]:
    try:
        return parse_bitmap(Path(path).read_text().strip(), path)
    except (OSError, ValueError):
        return fallback


def _scsi_generic() -> dict[str, str]:
    out: dict[str, str] = {}
    base = Path("/sys/bus/scsi/devices")
    try:
        entries = list(base.iterdir())
    except OSError:
        return out
    for dev in entries:
        sg = dev / "scsi_generic"
        try:
            names = [p.name for p in sg.iterdir()]
        except OSError:
            continue
        if names and dev.name.count(":") == 3:
            out[dev.name] = f"/dev/{names[0]}"
    return out


def probe_sync(firmware_dirs: tuple[Path, ...] = FIRMWARE_DIRS) -> HostFacts:
    hugepages, default = _mounts()
    cpus = _online("/sys/devices/system/cpu/online", frozenset(range(os.cpu_count() or 1)))
    return HostFacts(
        hugepages=hugepages,
        default_hugepage_kib=default,
        numa_nodes=_online("/sys/devices/system/node/online", frozenset({0})),
        cpus=cpus,
        page_size_kib=os.sysconf("SC_PAGE_SIZE") // 1024,
        firmware=load_descriptors(firmware_dirs),
        scsi_generic=_scsi_generic(),
    )


async def probe(firmware_dirs: tuple[Path, ...] = FIRMWARE_DIRS) -> HostFacts:
    return await asyncio.to_thread(probe_sync, firmware_dirs)
