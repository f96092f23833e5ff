"""A container's cgroups on cgroup v1, v2 or both (hybrid), and what they say.

Where a container's cgroups are is read from ``/proc/<init>/cgroup`` (lxc may pick
``lxc.payload.NAME-1`` when the plain name is taken), and where each hierarchy is
mounted from ``/proc/self/mountinfo``: nothing assumes ``/sys/fs/cgroup/<controller>``.
A controller is used on v1 when a v1 hierarchy has it, else on v2 when the unified
hierarchy has it enabled; cgroup v2's core files (``cpu.stat``, ``cgroup.events``) are
there even without controllers, so CPU time and the freezer state come from v2 when no
v1 hierarchy provides them.

Everything here reads procfs and cgroupfs (memory-backed files) synchronously; the
driver calls it from a worker thread, one hop per pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

UNLIMITED = 1 << 62  # v1 reports "no limit" as PAGE_COUNTER_MAX * PAGE_SIZE (~2^63)
V1_CONTROLLERS = frozenset({
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "blkio",
    "perf_event", "net_prio", "hugetlb", "pids", "rdma", "misc",
})  # fmt: skip


@dataclass(frozen=True, slots=True)
class CgroupMounts:
    """Mount points: v1 hierarchies by controller, the unified (v2) hierarchy."""

    v1: dict[str, Path] = field(default_factory=dict)  # controller -> mount point
    v2: Path | None = None
    v2_controllers: frozenset[str] = frozenset()  # enabled in the v2 root

    def on_v2(self, controller: str) -> bool:
        """True when ``controller`` is used through cgroup v2 (for lxc.cgroup2.* keys)."""
        return controller not in self.v1 and controller in self.v2_controllers


def parse_mountinfo(text: str) -> tuple[dict[str, Path], Path | None]:
    """cgroup (v1) mounts by controller, and the cgroup2 mount, from a mountinfo."""
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mount_point, fstype, options = Path(_unescape(fields[4])), tail[0], tail[2]
        if fstype == "cgroup2" and v2 is None:
            v2 = mount_point
        elif fstype == "cgroup":
            for opt in options.split(","):
                if opt in V1_CONTROLLERS:
                    v1.setdefault(opt, mount_point)
    return v1, v2


def _unescape(path: str) -> str:
    """mountinfo escapes blanks and backslashes as octal (\\040)."""
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and path[i + 1 : i + 4].isdigit():
            out.append(chr(int(path[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def host_mounts(proc: Path = Path("/proc")) -> CgroupMounts:
    v1, v2 = parse_mountinfo((proc / "self" / "mountinfo").read_text())
    controllers: frozenset[str] = frozenset()
    if v2 is not None:
        controllers = frozenset((_read(v2 / "cgroup.controllers") or "").split())
    return CgroupMounts(v1, v2, controllers)


@dataclass(frozen=True, slots=True)
class ContainerCgroups:
    """One container's cgroup directories: per v1 controller, and its v2 directory."""

    v1: dict[str, Path]
    v2: Path | None

    def dir_for(self, controller: str, mounts: CgroupMounts) -> tuple[Path, bool] | None:
        """(directory, is_v2) where ``controller``'s files are, or None."""
        if controller in self.v1:
            return self.v1[controller], False
        if self.v2 is not None and controller in mounts.v2_controllers:
            return self.v2, True
        return None


def parse_proc_cgroup(text: str, mounts: CgroupMounts) -> ContainerCgroups:
    """``/proc/<pid>/cgroup`` (``id:controllers:path``) resolved against the mounts."""
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        rel = path.lstrip("/")
        if controllers == "":
            if mounts.v2 is not None:
                v2 = mounts.v2 / rel
            continue
        for controller in controllers.split(","):
            base = mounts.v1.get(controller)
            if base is not None:
                v1[controller] = base / rel
    return ContainerCgroups(v1, v2)


def container_cgroups(
    pid: int, mounts: CgroupMounts, proc: Path = Path("/proc")
) -> ContainerCgroups:
    return parse_proc_cgroup((proc / str(pid) / "cgroup").read_text(), mounts)


# --- readers: each returns what it found; a missing file just leaves fields out ----------
def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _keyed(text: str | None) -> dict[str, int]:
    """``key value`` lines (cpu.stat, memory.stat, memory.events, oom_control)."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def _int(text: str | None) -> int | None:
    value = (text or "").strip()
    return int(value) if value.isdigit() else None


def cpu_times(cg: ContainerCgroups, mounts: CgroupMounts, tick_ns: int) -> dict[str, int]:
    """``cpu.time``, ``cpu.user``, ``cpu.system`` in ns (libvirt's cpu-total group)."""
    if "cpuacct" in cg.v1:
        d = cg.v1["cpuacct"]
        out: dict[str, int] = {}
        usage = _int(_read(d / "cpuacct.usage"))
        if usage is not None:
            out["cpu.time"] = usage
        stat = _keyed(_read(d / "cpuacct.stat"))
        if "user" in stat:
            out["cpu.user"] = stat["user"] * tick_ns
        if "system" in stat:
            out["cpu.system"] = stat["system"] * tick_ns
        return out
    if cg.v2 is not None:  # cpu.stat is a core file of every v2 cgroup
        stat = _keyed(_read(cg.v2 / "cpu.stat"))
        names = (("usage_usec", "cpu.time"), ("user_usec", "cpu.user"),
                 ("system_usec", "cpu.system"))  # fmt: skip
        return {field: stat[key] * 1000 for key, field in names if key in stat}
    return {}


@dataclass(frozen=True, slots=True)
class MemoryFigures:
    usage: int | None = None  # bytes
    limit: int | None = None  # bytes; None = unlimited or unknown
    rss: int | None = None  # bytes (anonymous memory)
    oom_kills: int | None = None  # processes the OOM killer ended in this cgroup


def memory(cg: ContainerCgroups, mounts: CgroupMounts) -> MemoryFigures:
    where = cg.dir_for("memory", mounts)
    if where is None:
        return MemoryFigures()
    d, v2 = where
    if v2:
        limit_text = (_read(d / "memory.max") or "").strip()
        stat, events = _keyed(_read(d / "memory.stat")), _keyed(_read(d / "memory.events"))
        return MemoryFigures(
            usage=_int(_read(d / "memory.current")),
            limit=int(limit_text) if limit_text.isdigit() else None,
            rss=stat.get("anon"),
            oom_kills=events.get("oom_kill"),
        )
    limit = _int(_read(d / "memory.limit_in_bytes"))
    stat = _keyed(_read(d / "memory.stat"))
    oom = _keyed(_read(d / "memory.oom_control"))
    return MemoryFigures(
        usage=_int(_read(d / "memory.usage_in_bytes")),
        limit=limit if limit is not None and limit < UNLIMITED else None,
        rss=stat.get("total_rss", stat.get("rss")),
        oom_kills=oom.get("oom_kill"),
    )


def frozen(cg: ContainerCgroups, mounts: CgroupMounts) -> bool | None:
    """Whether the freezer holds the container (None: no freezer to ask)."""
    if "freezer" in cg.v1:
        state = (_read(cg.v1["freezer"] / "freezer.state") or "").strip()
        return state in ("FROZEN", "FREEZING") if state else None
    if cg.v2 is not None:
        events = _keyed(_read(cg.v2 / "cgroup.events"))
        return bool(events["frozen"]) if "frozen" in events else None
    return None


@dataclass(frozen=True, slots=True)
class BlockIO:
    device: str  # MAJ:MIN
    rd_bytes: int = 0
    wr_bytes: int = 0
    rd_reqs: int = 0
    wr_reqs: int = 0


_IO_NAMES = {"rbytes": "rd_bytes", "wbytes": "wr_bytes", "rios": "rd_reqs", "wios": "wr_reqs"}


def block_io(cg: ContainerCgroups, mounts: CgroupMounts) -> list[BlockIO]:
    """Per device I/O of the container (v1 blkio.throttle.*, v2 io.stat)."""
    found: dict[str, dict[str, int]] = {}
    if "blkio" in cg.v1:
        d = cg.v1["blkio"]
        for fname, unit in (("io_service_bytes", "bytes"), ("io_serviced", "ios")):
            for line in (_read(d / f"blkio.throttle.{fname}") or "").splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[1] in ("Read", "Write") and parts[2].isdigit():
                    key = ("r" if parts[1] == "Read" else "w") + unit
                    found.setdefault(parts[0], {})[key] = int(parts[2])
    elif (where := cg.dir_for("io", mounts)) is not None:
        for line in (_read(where[0] / "io.stat") or "").splitlines():
            dev, *pairs = line.split()
            row = found.setdefault(dev, {})
            for pair in pairs:
                key, _, value = pair.partition("=")
                if value.isdigit():
                    row[key] = int(value)
    return [
        BlockIO(dev, **{_IO_NAMES[k]: v for k, v in row.items() if k in _IO_NAMES})
        for dev, row in sorted(found.items())
        if ":" in dev
    ]


NET_FIELDS = ("rx.bytes", "rx.pkts", "rx.errs", "rx.drop", "tx.bytes", "tx.pkts", "tx.errs",
              "tx.drop")  # fmt: skip


def net_dev(pid: int, names: Iterable[str], proc: Path = Path("/proc")) -> dict[str, list[int]]:
    """Counters of the host-side veths ``names`` from ``/proc/<pid>/net/dev``, where
    ``pid`` lives in the veths' network namespace (the container's monitor): this works
    whatever namespace the agent itself is in."""
    wanted = set(names)
    out: dict[str, list[int]] = {}
    for line in (_read(proc / str(pid) / "net" / "dev") or "").splitlines()[2:]:
        name, sep, rest = line.partition(":")
        name = name.strip()
        if not sep or name not in wanted:
            continue
        values = [int(v) for v in rest.split()]
        if len(values) >= 12:  # rx: bytes packets errs drop fifo frame compressed multicast
            out[name] = [*values[0:4], *values[8:12]]
    return out


def process_alive(pid: int, proc: Path = Path("/proc")) -> bool:
    """Alive and not a zombie (PID 1 here reaps nobody, so a dead process may linger)."""
    text = _read(proc / str(pid) / "stat")
    if not text:
        return False
    state = text.rpartition(")")[2].split()
    return bool(state) and state[0] not in ("Z", "X")


def process_start_time(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Field 22 of ``/proc/<pid>/stat``: tells a PID's process from a later one."""
    text = _read(proc / str(pid) / "stat")
    if not text:
        return None
    fields = text.rpartition(")")[2].split()
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def children(pid: int, proc: Path = Path("/proc")) -> list[int]:
    text = _read(proc / str(pid) / "task" / str(pid) / "children") or ""
    return [int(p) for p in text.split() if p.isdigit()]
