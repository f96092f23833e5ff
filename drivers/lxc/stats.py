"""libvirt's domstats for containers, from their cgroups and their veths' host side.

- ``state``: the driver's state and reason.
- ``cpu-total``: ``cpuacct.usage`` and ``cpuacct.stat`` (v1), else ``cpu.stat`` (v2).
- ``balloon``: ``current`` = memory usage, ``maximum`` = the memory cgroup's limit (the
  definition's memory when unlimited), ``rss`` = anonymous memory, and ``oom_kill``
  (virtbus: processes the OOM killer ended in the container; libvirt has no field).
- ``vcpu``: the definition's vcpu count (a container has no virtual CPUs of its own).
- ``interface``: each veth's host side, from ``/proc/<monitor>/net/dev`` (the monitor is
  in the veth's namespace), swapped as libvirt does: what the host side sent, the
  container received.
- ``block``: per device from blkio (``blkio.throttle.*``, v1) or ``io.stat`` (v2), when
  the container did I/O that the block layer saw.

:func:`collect` runs in a worker thread (cgroupfs and procfs are memory-backed); it never
raises for one container's trouble: a file that cannot be read leaves its fields out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.host import TICK_NS
from drivers.lxc import cgroups as cg
from virtbus.domain import DomainDefinition
from virtbus.protocol.domain import STATS_GROUPS
from virtbus.protocol.events import DomainState, reason_code


@dataclass(frozen=True, slots=True)
class StatsTarget:
    """What one container's statistics need (a snapshot taken on the event loop)."""

    name: str
    state: DomainState
    reason: str
    defn: DomainDefinition  # the live definition while active
    cgroups: cg.ContainerCgroups | None = None  # None while shut off
    monitor_pid: int | None = None


def _device_name(device: str, sys: Path = Path("/sys")) -> str:
    """``8:0`` -> ``sda`` (the kernel's name), else the numbers themselves."""
    try:
        for line in (sys / "dev" / "block" / device / "uevent").read_text().splitlines():
            if line.startswith("DEVNAME="):
                return line.split("=", 1)[1]
    except OSError:
        pass
    return device


def _block_paths(defn: DomainDefinition) -> dict[str, str]:
    """MAJ:MIN of block-device filesystems -> their source, to fill ``block.<n>.path``."""
    import os

    out = {}
    for fs in defn.filesystems:
        if fs.type == "block" and fs.source_dev:
            try:
                rdev = os.stat(fs.source_dev).st_rdev
            except OSError:
                continue
            out[f"{os.major(rdev)}:{os.minor(rdev)}"] = fs.source_dev
    return out


def collect_one(t: StatsTarget, want: frozenset[str], mounts: cg.CgroupMounts) -> dict[str, Any]:
    out: dict[str, Any] = {}
    defn = t.defn
    active = t.cgroups is not None and t.state != DomainState.SHUTOFF
    if "state" in want:
        out["state.state"] = int(t.state)
        out["state.reason"] = reason_code(t.state, t.reason)
    if "cpu-total" in want and active and t.cgroups is not None:
        out.update(cg.cpu_times(t.cgroups, mounts, TICK_NS))
    if "balloon" in want:
        out["balloon.maximum"] = defn.memory_kib
        if active and t.cgroups is not None:
            mem = cg.memory(t.cgroups, mounts)
            if mem.limit is not None:
                out["balloon.maximum"] = mem.limit // 1024
            if mem.usage is not None:
                out["balloon.current"] = mem.usage // 1024
            if mem.rss is not None:
                out["balloon.rss"] = mem.rss // 1024
            if mem.oom_kills is not None:
                out["balloon.oom_kill"] = mem.oom_kills
    if "vcpu" in want:
        out["vcpu.current"] = defn.current_vcpus
        out["vcpu.maximum"] = defn.vcpus
    if "interface" in want:
        out.update(_interfaces(t, active))
    if "block" in want and active and t.cgroups is not None:
        devices = cg.block_io(t.cgroups, mounts)
        paths = _block_paths(defn)
        out["block.count"] = len(devices)
        for n, io in enumerate(devices):
            out[f"block.{n}.name"] = _device_name(io.device)
            if io.device in paths:
                out[f"block.{n}.path"] = paths[io.device]
            out[f"block.{n}.rd.bytes"] = io.rd_bytes
            out[f"block.{n}.rd.reqs"] = io.rd_reqs
            out[f"block.{n}.wr.bytes"] = io.wr_bytes
            out[f"block.{n}.wr.reqs"] = io.wr_reqs
    return out


def _interfaces(t: StatsTarget, active: bool) -> dict[str, Any]:
    ifaces = t.defn.interfaces
    out: dict[str, Any] = {"net.count": len(ifaces) if active else 0}
    if not active:
        return out
    names = [i.target_dev or "" for i in ifaces]
    counters = cg.net_dev(t.monitor_pid, names) if t.monitor_pid else {}
    for n, name in enumerate(names):
        out[f"net.{n}.name"] = name
        values = counters.get(name)
        if values is None:
            continue
        rx, tx = values[4:], values[:4]  # swapped: the host side's tx is the container's rx
        for prefix, group in (("rx", rx), ("tx", tx)):
            for key, value in zip(("bytes", "pkts", "errs", "drop"), group, strict=True):
                out[f"net.{n}.{prefix}.{key}"] = value
    return out


def collect(
    targets: list[StatsTarget], groups: frozenset[str] | None, mounts: cg.CgroupMounts
) -> dict[str, dict[str, Any]]:
    want = groups or frozenset(STATS_GROUPS)
    return {t.name: collect_one(t, want, mounts) for t in targets}
