"""CPU placement of a domain's threads: ``<vcpu cpuset>``, ``<cputune>`` pins and
scheduler policies, and the ``<iothreads>`` a definition asks for.

Pinning is not on QEMU's command line. libvirt applies it to the threads once QEMU runs,
and so does :func:`apply`: the QEMU process starts with the emulator's CPU set (so every
thread it spawns inherits it), then, while the guest is still paused, each vCPU thread
(``query-cpus-fast``) and I/O thread (``query-iothreads``) gets its own set and policy.
CPU bandwidth (``<shares>``, ``<period>``, ``<quota>``...) and cache/memory bandwidth
allocation need cgroup and resctrl management, which virtbus does not do: those are
refused by name, never dropped.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from drivers.qemu.argv_common import BuildContext, json_arg, unsupported
from drivers.qemu.bitmap import format_bitmap, parse_bitmap
from drivers.qemu.xmlnum import num, num_text
from virtbus.domain import parse_int
from virtbus.domain.model import Element
from virtbus.errors import ConfigUnsupported, OperationFailed, XMLError

SCHEDULERS = {"fifo": os.SCHED_FIFO, "rr": os.SCHED_RR, "batch": os.SCHED_BATCH,
              "idle": os.SCHED_IDLE, "other": os.SCHED_OTHER}  # fmt: skip
_BANDWIDTH = ("shares", "period", "quota", "global_period", "global_quota", "emulator_period",
              "emulator_quota", "iothread_period", "iothread_quota")  # fmt: skip
_CPUTUNE = frozenset({*_BANDWIDTH, "vcpupin", "emulatorpin", "iothreadpin", "vcpusched",
                      "iothreadsched", "emulatorsched", "cachetune", "memorytune"})  # fmt: skip

MAX_IOTHREADS = 4096  # bounds <iothreads> (each is a thread of QEMU)


@dataclass(frozen=True, slots=True)
class Sched:
    policy: str
    priority: int | None


@dataclass(frozen=True, slots=True)
class CpuTuning:
    """Where each thread of a domain may run (None: anywhere)."""

    emulator: frozenset[int] | None = None
    vcpus: dict[int, frozenset[int]] = field(default_factory=dict)
    iothreads: dict[int, frozenset[int]] = field(default_factory=dict)
    vcpu_sched: dict[int, Sched] = field(default_factory=dict)
    iothread_sched: dict[int, Sched] = field(default_factory=dict)
    emulator_sched: Sched | None = None
    auto_placement: bool = False  # <vcpu placement='auto'>: numad advises

    @property
    def empty(self) -> bool:
        return not (
            self.emulator
            or self.vcpus
            or self.iothreads
            or self.vcpu_sched
            or self.iothread_sched
            or self.emulator_sched
            or self.auto_placement
        )

    def all_cpus(self) -> frozenset[int]:
        out: set[int] = set(self.emulator or ())
        for s in (*self.vcpus.values(), *self.iothreads.values()):
            out |= s
        return frozenset(out)


def iothread_ids(root: Element) -> list[int]:
    """``<iothreads>`` count completed by ``<iothreadids>`` (listed ids first, then the
    lowest unused ids), libvirt's ``virDomainIOThreadIDDefArrayInit``."""
    count_el = root.find("iothreads")
    listed = [num(t, "id", "0") for t in root.findall("iothreadids/iothread")]
    for tid in listed:
        if tid <= 0:
            raise XMLError(f"invalid iothread id '{tid}' (must be > 0)")
    if len(set(listed)) != len(listed):
        raise XMLError("duplicate iothread id in <iothreadids>")
    count = num_text(count_el, "0", maximum=MAX_IOTHREADS) if count_el is not None else 0
    count = max(count, len(listed))
    ids = list(listed)
    nxt = 1
    while len(ids) < count:
        if nxt not in ids:
            ids.append(nxt)
        nxt += 1
    return ids


def _sched(el: Element, what: str) -> Sched:
    policy = el.get("scheduler", "")
    if policy not in SCHEDULERS:
        raise XMLError(f"invalid scheduler '{policy}' in <{what}>")
    prio = el.get("priority")
    if policy in ("fifo", "rr"):
        if prio is None:
            raise XMLError(f"<{what}> with scheduler '{policy}' needs a priority")
        return Sched(policy, parse_int(prio, f"<{what} priority", minimum=1, maximum=99))
    return Sched(policy, None)


def plan(ctx: BuildContext) -> CpuTuning:
    root = ctx.defn.root
    vcpu = root.find("vcpu")
    default = None
    if vcpu is not None and vcpu.get("cpuset"):
        default = parse_bitmap(str(vcpu.get("cpuset")), "<vcpu cpuset>")
    auto = vcpu is not None and vcpu.get("placement") == "auto"
    maxv = ctx.defn.vcpus
    threads = iothread_ids(root)
    vcpus: dict[int, frozenset[int]] = {}
    iothreads: dict[int, frozenset[int]] = {}
    vsched: dict[int, Sched] = {}
    isched: dict[int, Sched] = {}
    esched = None
    emulator = default
    ct = root.find("cputune")
    if ct is not None:
        for child in ct:
            if not isinstance(child.tag, str):
                continue
            if child.tag not in _CPUTUNE:
                raise unsupported(f"<cputune><{child.tag}>")
            if child.tag in _BANDWIDTH or child.tag in ("cachetune", "memorytune"):
                raise unsupported(
                    f"<cputune><{child.tag}> (CPU bandwidth and cache allocation need cgroup "
                    "and resctrl management, which virtbus does not do)"
                )
        for pin in ct.findall("vcpupin"):
            vid = num(pin, "vcpu", "-1", minimum=-1)
            if not 0 <= vid < maxv:
                raise XMLError(f"vcpupin vcpu id '{vid}' must be lower than <vcpu> ({maxv})")
            if vid in vcpus:
                raise XMLError(f"duplicate vcpupin for vcpu '{vid}'")
            vcpus[vid] = parse_bitmap(pin.get("cpuset", ""), "<vcpupin cpuset>")
        ep = ct.find("emulatorpin")
        if ep is not None:
            emulator = parse_bitmap(ep.get("cpuset", ""), "<emulatorpin cpuset>")
        for pin in ct.findall("iothreadpin"):
            tid = num(pin, "iothread", "0")
            if tid not in threads:
                raise XMLError(f"Cannot find 'iothread' : {tid}")
            iothreads[tid] = parse_bitmap(pin.get("cpuset", ""), "<iothreadpin cpuset>")
        for vs in ct.findall("vcpusched"):
            ids = parse_bitmap(vs.get("vcpus", ""), "<vcpusched vcpus>")
            if ids & vsched.keys():
                raise XMLError("'vcpusched' attributes 'vcpus' must not overlap")
            s = _sched(vs, "vcpusched")
            vsched |= dict.fromkeys(ids, s)
        for ts in ct.findall("iothreadsched"):
            ids = parse_bitmap(ts.get("iothreads", ""), "<iothreadsched iothreads>")
            for tid in ids:
                if tid not in threads:
                    raise ConfigUnsupported(f"Cannot find 'iothread' : {tid}")
            if ids & isched.keys():
                raise XMLError("'iothreadsched' attributes 'iothreads' must not overlap")
            s = _sched(ts, "iothreadsched")
            isched |= dict.fromkeys(ids, s)
        es = ct.find("emulatorsched")
        if es is not None:
            esched = _sched(es, "emulatorsched")
    if default is not None:
        for v in range(maxv):
            vcpus.setdefault(v, default)
        for tid in threads:
            iothreads.setdefault(tid, default)
    return CpuTuning(emulator, vcpus, iothreads, vsched, isched, esched, auto)


def build_iothreads(ctx: BuildContext) -> None:
    root = ctx.defn.root
    by_id = {num(t, "id", "0"): t for t in root.findall("iothreadids/iothread")}
    for tid in iothread_ids(root):
        props: dict[str, Any] = {"qom-type": "iothread", "id": f"iothread{tid}"}
        el = by_id.get(tid)
        if el is not None:
            for attr, prop in (("thread_pool_min", "thread-pool-min"),
                               ("thread_pool_max", "thread-pool-max")):  # fmt: skip
                if el.get(attr) is not None:
                    props[prop] = num(el, attr)
            poll = el.find("poll")
            if poll is not None:
                for attr, prop in (("max", "poll-max-ns"), ("grow", "poll-grow"),
                                   ("shrink", "poll-shrink")):  # fmt: skip
                    if poll.get(attr) is not None:
                        props[prop] = num(poll, attr)
        ctx.add("-object", json_arg(props))
        ctx.iothreads.add(tid)
    default = root.find("defaultiothread")
    if default is not None:
        props = {"qom-type": "main-loop", "id": "main-loop"}
        for attr, prop in (("thread_pool_min", "thread-pool-min"),
                           ("thread_pool_max", "thread-pool-max")):  # fmt: skip
            if default.get(attr) is not None:
                props[prop] = num(default, attr)
        ctx.add("-object", json_arg(props))


def check_iothread_refs(ctx: BuildContext) -> None:
    """Disks and controllers may only name iothreads the domain has."""
    for el in ctx.defn.elements("devices/*/driver[@iothread]"):
        tid = num(el, "iothread")
        if tid not in ctx.iothreads:
            raise ConfigUnsupported(f"Disk iothread '{tid}' not defined in iothreadid")


# ---------------------------------------------------------------------------- runtime


def check_host(tuning: CpuTuning, host_cpus: frozenset[int]) -> None:
    """Refuse sets naming CPUs this host does not have (libvirt: at start)."""
    missing = tuning.all_cpus() - host_cpus
    if missing:
        raise OperationFailed(
            f"CPU pinning names CPUs {format_bitmap(missing)} that this host does not have "
            f"(online: {format_bitmap(host_cpus)})"
        )


def _set(tid: int, cpus: frozenset[int] | None, sched: Sched | None) -> None:
    if cpus is not None:
        os.sched_setaffinity(tid, cpus)
    if sched is not None:
        param = os.sched_param(sched.priority or 0)
        os.sched_setscheduler(tid, SCHEDULERS[sched.policy], param)


async def apply(tuning: CpuTuning, pid: int,
                execute: Callable[[str], Awaitable[Any]]) -> None:  # fmt: skip
    """Pin the threads of a started (still paused) QEMU; ``execute`` runs a QMP command."""
    if tuning.empty:
        return
    try:
        if tuning.vcpus or tuning.vcpu_sched:
            cpus = await execute("query-cpus-fast")
            for entry in cpus or []:
                index, tid = int(entry["cpu-index"]), int(entry["thread-id"])
                await asyncio.to_thread(
                    _set, tid, tuning.vcpus.get(index), tuning.vcpu_sched.get(index)
                )
        if tuning.iothreads or tuning.iothread_sched:
            threads = await execute("query-iothreads")
            for entry in threads or []:
                name = str(entry.get("id", ""))
                if not name.startswith("iothread"):
                    continue
                tid_n = int(name.removeprefix("iothread"))
                await asyncio.to_thread(
                    _set, int(entry["thread-id"]), tuning.iothreads.get(tid_n),
                    tuning.iothread_sched.get(tid_n),
                )  # fmt: skip
        if tuning.emulator_sched is not None:
            await asyncio.to_thread(_set, pid, None, tuning.emulator_sched)
    except OSError as exc:
        raise OperationFailed(f"cannot apply CPU tuning to QEMU pid {pid}: {exc}") from exc


def preexec_affinity(tuning: CpuTuning) -> frozenset[int] | None:
    """The CPU set the QEMU process starts with (its emulator threads keep it)."""
    return tuning.emulator
