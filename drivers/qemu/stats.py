"""libvirt's domstats for QEMU domains: QMP for what only QEMU knows, /proc and /sys for the rest.

Field names and units are libvirt's (``virsh domstats``): times in ns, memory in KiB,
block sizes in bytes. Sources, per group:

- ``state``: the driver's state and reason.
- ``cpu-total``: ``/proc/<pid>/stat`` utime/stime (libvirt reads the cgroup; there is
  none here); under KVM, ``query-stats`` halt-polling times where QEMU has them.
- ``balloon``: ``query-balloon`` (current), the definition (maximum), ``VmRSS`` of
  ``/proc/<pid>/status`` (rss) and the guest's own figures via ``qom-get guest-stats``
  on the balloon device when the guest reports them.
- ``vcpu``: ``query-cpus-fast`` thread ids, ``/proc/<pid>/task/<tid>/stat`` (time) and
  ``schedstat`` (delay).
- ``interface``: ``/sys/class/net/<tap>/statistics``, swapped as libvirt does (what the
  host's tap transmits, the guest received). Interfaces without a host device (user
  networking) have no host counters and, as in libvirt, no ``net.<n>.*`` fields.
- ``block``: ``query-blockstats`` matched to the definition's disks through
  ``query-block`` (by source file), ``allocation`` = highest written offset,
  ``capacity``/``physical`` = the image's virtual/actual size.

Thread ids and block geometry rarely change, so they are refreshed every
``StatsSettings.static_refresh`` passes (and at once when a thread disappears): a pass
then costs two or three QMP round trips per running domain. Reads of procfs/sysfs are
synchronous on purpose (served from memory, never a disk). A query that fails or times
out drops its fields for this pass only; a pass never raises for one domain's trouble.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.host import TICK_NS as _TICK_NS
from drivers.host import host_stats
from drivers.memory import has_balloon
from virtbus.domain import DomainDefinition
from virtbus.errors import VirtbusError
from virtbus.protocol.domain import STATS_GROUPS
from virtbus.protocol.events import DomainState, reason_code

log = logging.getLogger(__name__)
__all__ = ["QemuStats", "StatsSettings", "StatsTarget", "host_stats"]

Execute = Callable[[str, dict[str, Any] | None], Awaitable[Any]]

_VCPU_RUNNING = 1  # virVcpuState
_BALLOON_PATH = "/machine/peripheral/balloon0"  # libvirt's alias for the balloon device
# QEMU guest-stats name -> (libvirt balloon field, divisor to KiB or 1 for counts)
_GUEST_STATS = {
    "stat-swap-in": ("swap_in", 1024),
    "stat-swap-out": ("swap_out", 1024),
    "stat-major-faults": ("major_fault", 1),
    "stat-minor-faults": ("minor_fault", 1),
    "stat-free-memory": ("unused", 1024),
    "stat-total-memory": ("available", 1024),
    "stat-available-memory": ("usable", 1024),
    "stat-disk-caches": ("disk_caches", 1024),
    "stat-htlb-pgalloc": ("hugetlb_pgalloc", 1),
    "stat-htlb-pgfail": ("hugetlb_pgfail", 1),
}
# libvirt field -> QEMU blockstats key
_BLOCK_FIELDS = {
    "rd.reqs": "rd_operations",
    "rd.bytes": "rd_bytes",
    "rd.times": "rd_total_time_ns",
    "wr.reqs": "wr_operations",
    "wr.bytes": "wr_bytes",
    "wr.times": "wr_total_time_ns",
    "fl.reqs": "flush_operations",
    "fl.times": "flush_total_time_ns",
}
# libvirt field -> sysfs counter of the host-side tap (swapped: host tx = guest rx)
_NET_FIELDS = {
    "rx.bytes": "tx_bytes",
    "rx.pkts": "tx_packets",
    "rx.errs": "tx_errors",
    "rx.drop": "tx_dropped",
    "tx.bytes": "rx_bytes",
    "tx.pkts": "rx_packets",
    "tx.errs": "rx_errors",
    "tx.drop": "rx_dropped",
}
_HALTPOLL = {
    "halt_poll_success_ns": "cpu.haltpoll.success.time",
    "halt_poll_fail_ns": "cpu.haltpoll.fail.time",
}


@dataclass(frozen=True, slots=True)
class StatsSettings:
    qmp_timeout: float = 2.0  # one stats query: a stuck guest gives partial stats, not a stuck pass
    static_refresh: int = 30  # passes between refreshes of vCPU thread ids and block geometry
    net_sysfs: Path = Path("/sys/class/net")


@dataclass(frozen=True, slots=True)
class StatsTarget:
    """What one domain's stats need; ``pid``/``execute`` are None while it is not running.

    ``execute`` runs one QMP command and raises virtbus errors (as ``Monitor.execute``).
    """

    name: str
    state: DomainState
    reason: str
    defn: DomainDefinition  # the live definition while running
    pid: int | None = None
    execute: Execute | None = None
    kvm: bool = False
    balloon_path: str = _BALLOON_PATH


@dataclass(slots=True)
class _Cache:
    """What a QEMU process rarely changes; one per pid."""

    passes: int = 0
    vcpu_threads: list[tuple[int, int]] | None = None  # (cpu-index, thread-id)
    block: list[dict[str, Any]] | None = None  # query-block
    query_stats: bool = True  # False once query-stats said it has nothing
    guest_stats: bool = True  # False once the balloon had no guest-stats


class QemuStats:
    """Collects libvirt domstats for many domains at once (see module docstring)."""

    def __init__(self, settings: StatsSettings | None = None) -> None:
        self.settings = settings or StatsSettings()
        self._cache: dict[int, _Cache] = {}

    async def collect(
        self, targets: Iterable[StatsTarget], groups: frozenset[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """One pass: every target concurrently; per domain name a flat libvirt field map."""
        want = groups if groups else frozenset(STATS_GROUPS)
        targets = list(targets)
        maps = await asyncio.gather(*(self.domain(t, want) for t in targets))
        live = {t.pid for t in targets if t.pid is not None}
        for pid in [p for p in self._cache if p not in live]:
            if not pid_exists(pid):
                del self._cache[pid]  # forget QEMUs that went away
        return {t.name: m for t, m in zip(targets, maps, strict=True)}

    async def domain(self, t: StatsTarget, want: frozenset[str]) -> dict[str, Any]:
        """One domain: its QMP queries concurrently, then every field in libvirt's order."""
        active = t.pid is not None and t.state != DomainState.SHUTOFF
        cache = _Cache()
        if t.pid is not None:
            cache = self._cache.get(t.pid) or self._cache.setdefault(t.pid, _Cache())
        if active:
            cache.passes += 1
            if cache.passes % max(1, self.settings.static_refresh) == 0:
                cache.vcpu_threads, cache.block, cache.guest_stats = None, None, True
        replies = await self._queries(t, want, cache, active)
        out: dict[str, Any] = {}
        if "state" in want:
            out["state.state"] = int(t.state)
            out["state.reason"] = reason_code(t.state, t.reason)
        if "cpu-total" in want and active:
            self._cpu_total(t, cache, replies, out)
        if "balloon" in want:
            self._balloon(t, cache, active, replies, out)
        if "vcpu" in want:
            await self._vcpu(t, cache, active, replies, out)
        if "interface" in want:
            self._interface(t, active, out)
        if "block" in want:
            self._block(t, cache, active, replies, out)
        return out

    def _has_balloon(self, t: StatsTarget) -> bool:
        return has_balloon(t.defn)

    async def _queries(
        self, t: StatsTarget, want: frozenset[str], cache: _Cache, active: bool
    ) -> dict[str, Any]:
        """Every QMP query this pass needs for the domain, sent at once; name -> reply."""
        if not active or t.execute is None:
            return {}
        plan: dict[str, tuple[str, dict[str, Any] | None]] = {}
        if "cpu-total" in want and t.kvm and cache.query_stats:
            plan["stats"] = (
                "query-stats",
                {
                    "target": "vcpu",
                    "providers": [{"provider": "kvm", "names": list(_HALTPOLL)}],
                },
            )
        if "balloon" in want and self._has_balloon(t):
            plan["balloon"] = ("query-balloon", None)
            if cache.guest_stats:
                plan["guest"] = ("qom-get", {"path": t.balloon_path, "property": "guest-stats"})
        if "vcpu" in want and cache.vcpu_threads is None:
            plan["cpus"] = ("query-cpus-fast", None)
        if "block" in want and t.defn.disks:
            plan["blockstats"] = ("query-blockstats", None)
            if cache.block is None:
                plan["block"] = ("query-block", None)
        replies = await asyncio.gather(*(self._qmp(t, cmd, args) for cmd, args in plan.values()))
        return dict(zip(plan, replies, strict=True))

    async def _qmp(self, t: StatsTarget, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """One query, bounded; None when it failed (the fields are left out this pass)."""
        if t.execute is None:
            return None
        try:
            async with asyncio.timeout(self.settings.qmp_timeout):
                return await t.execute(cmd, args)
        except (VirtbusError, TimeoutError) as exc:
            log.debug("stats of %s: %s failed: %s", t.name, cmd, exc)
            return None

    # --- groups (fields appended to ``out`` in libvirt's order) ----------------------
    def _cpu_total(
        self, t: StatsTarget, cache: _Cache, replies: dict[str, Any], out: dict[str, Any]
    ) -> None:
        ticks = proc_cpu_ticks(f"/proc/{t.pid}/stat")
        if ticks is not None:
            user, system = ticks[0] * _TICK_NS, ticks[1] * _TICK_NS
            out.update({"cpu.time": user + system, "cpu.user": user, "cpu.system": system})
        if "stats" in replies:
            sums = haltpoll_sums(replies["stats"])
            if sums:
                out.update(sums)
            else:
                cache.query_stats = False  # this QEMU/kernel has none: stop asking

    def _balloon(
        self,
        t: StatsTarget,
        cache: _Cache,
        active: bool,
        replies: dict[str, Any],
        out: dict[str, Any],
    ) -> None:
        current = t.defn.current_memory_kib
        reply = replies.get("balloon")
        if isinstance(reply, dict) and "actual" in reply:
            current = int(reply["actual"]) // 1024
        out["balloon.current"] = current
        out["balloon.maximum"] = t.defn.memory_kib
        if active and t.pid is not None:
            rss = proc_status_kib(f"/proc/{t.pid}/status", "VmRSS")
            if rss is not None:
                out["balloon.rss"] = rss
        if "guest" in replies:
            guest = balloon_guest_fields(replies["guest"])
            if guest:
                out.update(guest)
            else:  # no device, or the guest does not report: ask again at the refresh
                cache.guest_stats = False

    async def _vcpu(
        self,
        t: StatsTarget,
        cache: _Cache,
        active: bool,
        replies: dict[str, Any],
        out: dict[str, Any],
    ) -> None:
        out["vcpu.current"] = t.defn.current_vcpus
        out["vcpu.maximum"] = t.defn.vcpus
        if not active or t.pid is None:
            return
        if "cpus" in replies:
            cache.vcpu_threads = vcpu_threads(replies["cpus"])
        fields = vcpu_fields(t.pid, cache.vcpu_threads or [])
        if fields is None:  # a thread went away (hot-unplug): ask again, once
            cache.vcpu_threads = vcpu_threads(await self._qmp(t, "query-cpus-fast"))
            fields = vcpu_fields(t.pid, cache.vcpu_threads)
        out.update(fields or {})

    def _interface(self, t: StatsTarget, active: bool, out: dict[str, Any]) -> None:
        ifaces = t.defn.interfaces if active else ()
        out["net.count"] = len(ifaces)
        for n, iface in enumerate(ifaces):
            dev = iface.target_dev
            if not dev:
                continue  # user networking: no host device, no counters (as libvirt)
            counters = tap_counters(self.settings.net_sysfs / dev / "statistics")
            if counters is None:
                continue
            out[f"net.{n}.name"] = dev
            for name, value in counters.items():
                out[f"net.{n}.{name}"] = value

    def _block(
        self,
        t: StatsTarget,
        cache: _Cache,
        active: bool,
        replies: dict[str, Any],
        out: dict[str, Any],
    ) -> None:
        disks = t.defn.disks
        out["block.count"] = len(disks)
        per_disk: list[dict[str, Any]] = [{} for _ in disks]
        if isinstance(replies.get("block"), list):
            cache.block = replies["block"]
        stats = replies.get("blockstats")
        if active and isinstance(stats, list):
            per_disk = block_fields([d.source_path for d in disks], cache.block or [], stats)
        for n, disk in enumerate(disks):
            out[f"block.{n}.name"] = disk.target_dev
            if disk.source_path:
                out[f"block.{n}.path"] = disk.source_path
            for name, value in per_disk[n].items():
                out[f"block.{n}.{name}"] = value


# --- pure helpers (unit-testable) ----------------------------------------------------
def pid_exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")  # procfs: no disk behind it


def proc_cpu_ticks(path: str) -> tuple[int, int] | None:
    """(utime, stime) clock ticks from a /proc stat file; None when it is gone."""
    try:
        raw = Path(path).read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()  # after comm, which may hold spaces
    return int(fields[11]), int(fields[12])


def proc_status_kib(path: str, key: str) -> int | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def vcpu_threads(reply: Any) -> list[tuple[int, int]]:
    """(cpu-index, thread-id) pairs of ``query-cpus-fast``, by cpu-index."""
    if not isinstance(reply, list):
        return []
    pairs = [
        (int(cpu["cpu-index"]), int(cpu["thread-id"]))
        for cpu in reply
        if isinstance(cpu, dict) and "cpu-index" in cpu and "thread-id" in cpu
    ]
    return sorted(pairs)


def vcpu_fields(pid: int, threads: list[tuple[int, int]]) -> dict[str, Any] | None:
    """vcpu.<n>.state/time/delay; None when a thread is gone (the ids are stale)."""
    out: dict[str, Any] = {}
    for index, tid in threads:
        ticks = proc_cpu_ticks(f"/proc/{pid}/task/{tid}/stat")
        if ticks is None:
            return None
        out[f"vcpu.{index}.state"] = _VCPU_RUNNING
        out[f"vcpu.{index}.time"] = (ticks[0] + ticks[1]) * _TICK_NS
        try:  # schedstat: on-cpu ns, run-queue wait ns, timeslices
            sched = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
            out[f"vcpu.{index}.delay"] = int(sched[1])
        except (OSError, IndexError, ValueError):
            pass
    return out


def tap_counters(statistics: Path) -> dict[str, int] | None:
    """libvirt's net fields of a host tap (swapped view); None when there is no such device."""
    out: dict[str, int] = {}
    for name, counter in _NET_FIELDS.items():
        try:
            out[name] = int((statistics / counter).read_text())
        except (OSError, ValueError):
            return None
    return out


def block_fields(
    paths: list[str | None], block: list[dict[str, Any]], blockstats: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per disk of the definition (in order) its libvirt block fields.

    A disk is matched to QEMU's device by its source file (``query-block``), then to its
    blockstats by qdev, device name or node name; disks left over take the remaining
    devices in order (a definition without paths, e.g. network disks).
    """
    stats_by: dict[str, dict[str, Any]] = {}
    for entry in blockstats:
        for key in ("qdev", "device", "node-name"):
            if entry.get(key):
                stats_by.setdefault(f"{key}:{entry[key]}", entry)

    def stats_of(dev: dict[str, Any]) -> dict[str, Any] | None:
        inserted = dev.get("inserted") or {}
        for key, value in (
            ("qdev", dev.get("qdev")),
            ("device", dev.get("device")),
            ("node-name", inserted.get("node-name")),
        ):
            if value and f"{key}:{value}" in stats_by:
                return stats_by[f"{key}:{value}"]
        return None

    devices = [d for d in block if isinstance(d, dict) and d.get("inserted")]
    by_file = {str(d["inserted"].get("file")): d for d in devices}
    used: set[int] = set()
    chosen: list[dict[str, Any] | None] = []
    for path in paths:
        dev = by_file.get(path) if path else None
        if dev is not None and id(dev) not in used:
            used.add(id(dev))
        else:
            dev = None
        chosen.append(dev)
    spare = iter(d for d in devices if id(d) not in used)
    spare_stats = iter(e for e in blockstats if not block)  # no query-block: by order
    out: list[dict[str, Any]] = []
    for picked in chosen:
        dev = picked if picked is not None else next(spare, None)
        found: dict[str, Any] | None = stats_of(dev) if dev is not None else next(spare_stats, None)
        fields: dict[str, Any] = {}
        if found is not None:
            stats = found.get("stats") or {}
            for name, key in _BLOCK_FIELDS.items():
                fields[name] = int(stats.get(key, 0))
            if "wr_highest_offset" in stats:
                fields["allocation"] = int(stats["wr_highest_offset"])
        image = ((dev or {}).get("inserted") or {}).get("image") or {}
        if "virtual-size" in image:
            fields["capacity"] = int(image["virtual-size"])
        if "actual-size" in image:
            fields["physical"] = int(image["actual-size"])
        out.append(fields)
    return out


def balloon_guest_fields(reply: Any) -> dict[str, Any] | None:
    """The guest's own memory figures; {} while it has not reported; None: no such device."""
    if not isinstance(reply, dict):
        return None
    stats = reply.get("stats")
    if not isinstance(stats, dict):
        return None
    last = int(reply.get("last-update") or 0)
    if not last:
        return {}
    out: dict[str, Any] = {"balloon.last-update": last}
    for key, (name, div) in _GUEST_STATS.items():
        value = stats.get(key)
        if isinstance(value, int) and value >= 0:
            out[f"balloon.{name}"] = value // div
    return out


def haltpoll_sums(reply: Any) -> dict[str, int]:
    """cpu.haltpoll.{success,fail}.time summed over vCPUs from a query-stats reply."""
    sums: dict[str, int] = {}
    if not isinstance(reply, list):
        return sums
    for provider in reply:
        for stat in (provider or {}).get("stats", []):
            name = _HALTPOLL.get(stat.get("name", ""))
            if name and isinstance(stat.get("value"), int):
                sums[name] = sums.get(name, 0) + stat["value"]
    return sums
