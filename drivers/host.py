"""What every driver on a Linux host reports about the host itself (one home for it).

Reads of procfs are synchronous in :func:`host_stats` on purpose (served from memory,
never a disk), as the stats passes of the drivers do.
"""

from __future__ import annotations

import asyncio
import functools
import os
import platform
from pathlib import Path
from typing import Any

from drivers.base import HostResources

_CLK_TCK = os.sysconf("SC_CLK_TCK")
TICK_NS = 1_000_000_000 // _CLK_TCK  # one USER_HZ tick (procfs, cpuacct.stat) in ns


def host_stats(proc: Path = Path("/proc")) -> dict[str, Any]:
    """Host cpu (ns, as ``virsh nodecpustats``), memory (KiB, ``nodememstats``) and load."""
    out: dict[str, Any] = {"cpu.count": os.cpu_count() or 1}
    try:
        first = (proc / "stat").read_text().split("\n", 1)[0].split()
        user, nice, system, idle, iowait, irq, softirq = (int(v) for v in first[1:8])
        out.update(
            {
                "cpu.user": (user + nice) * TICK_NS,
                "cpu.system": (system + irq + softirq) * TICK_NS,
                "cpu.idle": idle * TICK_NS,
                "cpu.iowait": iowait * TICK_NS,
            }
        )
    except (OSError, ValueError, IndexError):
        pass
    try:
        mem = {
            line.split(":")[0]: int(line.split()[1])
            for line in (proc / "meminfo").read_text().splitlines()
            if line.endswith("kB")
        }
        for name, key in (
            ("total", "MemTotal"),
            ("free", "MemFree"),
            ("available", "MemAvailable"),
            ("buffers", "Buffers"),
            ("cached", "Cached"),
        ):
            if key in mem:
                out[f"memory.{name}"] = mem[key]
    except (OSError, ValueError, IndexError):
        pass
    try:
        load = (proc / "loadavg").read_text().split()
        out.update({"load.1": float(load[0]), "load.5": float(load[1]), "load.15": float(load[2])})
    except (OSError, ValueError, IndexError):
        pass
    return out


async def host_resources(hypervisor: str) -> HostResources:
    """CPUs, memory, arch and CPU model of this host, for heartbeats, placement and the
    agent's admission check before every start: one worker-thread hop."""
    return await asyncio.to_thread(_host_resources, hypervisor)


@functools.cache
def _cpu_model() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    return next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
         if line.startswith("model name")),
        platform.processor() or "unknown",
    )  # fmt: skip


def _host_resources(hypervisor: str) -> HostResources:
    try:
        meminfo = Path("/proc/meminfo").read_text(errors="replace")
    except OSError:
        meminfo = ""
    mem = {
        line.split(":")[0]: int(line.split()[1])
        for line in meminfo.splitlines()
        if line.endswith("kB")
    }
    return HostResources(
        cpus=os.cpu_count() or 1,
        memory_total_kib=mem.get("MemTotal", 0),
        memory_free_kib=mem.get("MemAvailable", mem.get("MemFree", 0)),
        arch=platform.machine(),
        cpu_model=_cpu_model(),
        hypervisor=hypervisor,
    )
