"""libvirt's side of the metrics benchmark: virConnectGetAllDomainStats over N guests.

Run by ``tests.bench.stats_cost --libvirt`` with Debian's ``/usr/bin/python3`` (where
``python3-libvirt`` lives; only the standard library and libvirt are used). It defines
and starts N firmware-only guests on ``qemu:///system`` (names ``vbbench-<pid>-<n>``),
times passes of ``getAllDomainStats`` for the same six groups virtbus collects, and
prints one JSON line: per pass the client's CPU, libvirtd's CPU (from /proc) and wall
time, in ms. Its guests are destroyed and undefined at the end, whatever happens.

    /usr/bin/python3 tests/bench/libvirt_stats.py -n 50 --passes 20 --workdir DIR
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time

import libvirt  # type: ignore[import-not-found]

CLK_TCK = os.sysconf("SC_CLK_TCK")
GROUPS = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
    | libvirt.VIR_DOMAIN_STATS_BALLOON
    | libvirt.VIR_DOMAIN_STATS_VCPU
    | libvirt.VIR_DOMAIN_STATS_INTERFACE
    | libvirt.VIR_DOMAIN_STATS_BLOCK
)
START_PARALLEL = 8
WARMUP = 3


def libvirtd_pid() -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as fh:
                    if fh.read().strip() == "libvirtd":
                        return int(entry)
            except OSError:
                continue
    raise SystemExit("libvirtd is not running")


def cpu_ms(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / CLK_TCK


def xml(name: str, disk: str, kvm: bool, memory_mib: int) -> str:
    return (
        f"<domain type='{'kvm' if kvm else 'qemu'}'><name>{name}</name>"
        f"<memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>"
        "<emulator>/usr/bin/qemu-system-x86_64</emulator>"
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>"
        "<memballoon model='virtio'/></devices></domain>"
    )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("-n", type=int, default=50)
    p.add_argument("--passes", type=int, default=20)
    p.add_argument("--workdir", required=True)
    p.add_argument("--kvm", action="store_true")
    p.add_argument("--memory-mib", type=int, default=32)
    args = p.parse_args()
    conn = libvirt.open("qemu:///system")
    daemon = libvirtd_pid()
    names = [f"vbbench-{os.getpid()}-{i:03d}" for i in range(args.n)]

    def start(name: str) -> libvirt.virDomain:
        disk = os.path.join(args.workdir, f"{name}.raw")
        with open(disk, "wb") as fh:
            fh.truncate(1024 * 1024)
        dom = conn.defineXML(xml(name, disk, args.kvm, args.memory_mib))
        dom.create()
        return dom

    try:
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(START_PARALLEL) as pool:
            list(pool.map(start, names))
        up_s = time.perf_counter() - t0
        time.sleep(1.0)
        flags = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
        fields = len(conn.getAllDomainStats(GROUPS, flags)[0][1])
        for _ in range(WARMUP):
            conn.getAllDomainStats(GROUPS, flags)
        client, server, wall = [], [], []
        for _ in range(args.passes):
            c0, d0, w0 = time.process_time(), cpu_ms(daemon), time.perf_counter()
            conn.getAllDomainStats(GROUPS, flags)
            client.append((time.process_time() - c0) * 1000)
            server.append(cpu_ms(daemon) - d0)
            wall.append((time.perf_counter() - w0) * 1000)
        print(json.dumps({"up_s": up_s, "fields": fields, "client_ms": client,
                          "libvirtd_ms": server, "wall_ms": wall}))  # fmt: skip
    finally:
        for name in names:
            try:
                dom = conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            try:
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            except libvirt.libvirtError as exc:
                print(f"cleanup of {name}: {exc}", file=sys.stderr)
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
