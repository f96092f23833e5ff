"""Networks: net-start of a NAT network through virtbus next to libvirt 9.0, and the ping
replies a cluster network loses across live migrations.

net-start: the same XML (NAT, bridge ``vbnb0``, 10.97.0.0/24, DHCP range, a reserved host
and a DNS host) started and destroyed in alternating rounds, each side in a network
namespace of its own that holds only ``lo``: virtbus through a real agent whose
``network.namespace`` it is (the ``network.start`` call on the bus, timed in this
process), libvirt through a private libvirtd started inside its namespace with tmpfs over
its state directories (``/run/libvirt``, ``/var/lib/libvirt``, ``/etc/libvirt``, ...) and
its socket in a temp dir, timed around ``virNetworkCreate`` by tests/bench/libvirt_net_side.py.
The machine's libvirtd would put the bridge, its route and its iptables rules in the
machine's own namespace, which nothing here may touch; the private one touches only its
namespace, and is killed at the end (the network undefined first). Each round checks that
both sides did the same work: the bridge up with 10.97.0.1/24 and a dnsmasq running.
libvirt 9.0 writes its firewall with iptables (iptables-nft here), virtbus with nft.

Migration: tests/network/test_cluster_networks.py's underlay (two host namespaces, a real
scheduler, two QEMU agents on a private vhost, a cluster network), one TCG guest migrated
back and forth ``--migrations`` times while two pingers in a namespace on host 0's bridge
send it 1 and 20 echo requests a second (both at once, each with its own ICMP id); a
request counts as lost when it was sent between the migrate call and 1.5 s after it
returned and never got a reply.

Run as root: ``PYTHONPATH=. python -m tests.bench.networks [--rounds 7] [--migrations 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.common import add_force, check_load, compile_tree
from tests.network.conftest import nat_xml, need_tools, sh
from tests.procs import BUS_URL, agent_process, cli, private_vhost, scheduler_process, unique_host
from virtbus.bus.factory import open_bus
from virtbus.protocol import ops

HERE = Path(__file__).resolve().parent
SUBNET = "10.97.0"
BRIDGE = "vbnb0"
NET = "nb"
LIBVIRT_DIRS = ("/run/libvirt", "/var/lib/libvirt", "/etc/libvirt", "/var/cache/libvirt",
                "/var/log/libvirt")  # fmt: skip
VHOST = "virtbus-bench-networks"
CSUBNET = "10.98.0"
GUEST_MAC, GUEST_IP = "52:54:00:98:00:01", f"{CSUBNET}.11"
PROBE_IP = f"{CSUBNET}.99"
# An ICMP pinger that logs when each request left ("S seq t") and each reply came
# ("R seq t"): busybox ping's interval drifts, and the loss window needs send times.
_PINGER = """
import os, socket, struct, sys, threading, time
dst, interval, ident = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)

def checksum(data):
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF

def send():
    seq, due = 0, time.monotonic()
    while True:
        seq += 1
        head = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"vbnb" * 4
        packet = struct.pack("!BBHHH", 8, 0, checksum(head), ident, seq) + head[8:]
        print("S", seq, time.monotonic(), flush=True)
        sock.sendto(packet, (dst, 0))
        due += interval
        time.sleep(max(0.0, due - time.monotonic()))

threading.Thread(target=send, daemon=True).start()
while True:
    packet = sock.recv(65535)
    icmp = packet[(packet[0] & 0x0F) * 4:]
    if icmp[0] == 0 and struct.unpack("!HH", icmp[4:8])[0] == ident:
        print("R", struct.unpack("!HH", icmp[4:8])[1], time.monotonic(), flush=True)
"""


def netns(name: str) -> None:
    sh("ip", "netns", "add", name)
    sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")


def drop_netns(name: str) -> None:
    """SIGKILL what still runs in ``name`` (our namespace: only what we started), delete it."""
    for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    sh("ip", "netns", "del", name, check=False)


def started_in(ns: str) -> None:
    """Both sides must leave the same thing running: the bridge with the gateway, dnsmasq."""
    (link,) = json.loads(sh("ip", "netns", "exec", ns, "ip", "-j", "-4", "addr", "show",
                            "dev", BRIDGE).stdout)  # fmt: skip
    addrs = [f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"]]
    assert addrs == [f"{SUBNET}.1/24"], (ns, addrs)
    comms = []
    for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
        with contextlib.suppress(OSError):
            comms.append(Path(f"/proc/{pid}/comm").read_text().strip())
    assert "dnsmasq" in comms, (ns, comms)


@contextlib.contextmanager
def private_libvirtd(ns: str, root: Path) -> Iterator[str]:
    """A libvirtd of its own inside ``ns`` (tmpfs over its state, socket under ``root``):
    the URI to reach it. Killed by pid, its namespace deleted, on the way out."""
    sock = root / "sock"
    sock.mkdir()
    conf = root / "libvirtd.conf"
    conf.write_text(f'unix_sock_dir = "{sock}"\n')
    mounts = "; ".join(f"mount -t tmpfs tmpfs {d}" for d in LIBVIRT_DIRS)
    netns(ns)
    log = (root / "libvirtd.log").open("wb")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private",
         "sh", "-ec", f'{mounts}; exec /usr/sbin/libvirtd -f "$1" -p "$2"', "sh", str(conf),
         str(root / "libvirtd.pid")],
        stdout=log, stderr=log,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (sock / "libvirt-sock").exists():
            assert proc.poll() is None, f"libvirtd exited: {(root / 'libvirtd.log').read_text()}"
            assert time.monotonic() < deadline, "libvirtd's socket never appeared"
            time.sleep(0.1)
        yield f"qemu:///system?socket={sock}/libvirt-sock"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        drop_netns(ns)


async def net_start_bench(rounds: int, warmup: int) -> dict[str, list[float]]:
    """Alternating rounds of net-start + net-destroy on each side: the seconds each took."""
    tag = uuidlib.uuid4().hex[:6]
    vb_ns, lv_ns = f"vbnb-{tag}", f"vbnl-{tag}"
    xml = nat_xml(NET, SUBNET, bridge=BRIDGE)
    out: dict[str, list[float]] = {k: [] for k in ("vb_start", "vb_destroy", "lv_start",
                                                    "lv_destroy")}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="vbnb") as tmp:
        root = Path(tmp)
        (root / "net.xml").write_text(xml)
        (root / "lv").mkdir()
        (root / "agent").mkdir()
        netns(vb_ns)
        try:
            with private_libvirtd(lv_ns, root / "lv") as uri:
                side = await asyncio.create_subprocess_exec(
                    "/usr/bin/python3", str(HERE / "libvirt_net_side.py"), uri,
                    str(root / "net.xml"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                )  # fmt: skip
                assert side.stdin is not None and side.stdout is not None
                conf = root / "agent.toml"
                conf.write_text(f'[network]\nnamespace = "{vb_ns}"\n')
                try:
                    async with agent_process(
                        unique_host("nb"), root / "agent", "--config", str(conf),
                        "--log-level", "WARNING", driver="qemu",
                    ) as agent:  # fmt: skip
                        bus = open_bus(BUS_URL, src="bench")
                        await bus.connect()
                        route = ops.agent_route(agent.host)
                        await bus.call(route, ops.NETWORK_DEFINE, {"xml": xml})
                        try:
                            for r in range(warmup + rounds):
                                t = time.perf_counter()
                                await bus.call(route, ops.NETWORK_START, {"network": NET})
                                vb_start = time.perf_counter() - t
                                started_in(vb_ns)
                                t = time.perf_counter()
                                await bus.call(route, ops.NETWORK_DESTROY, {"network": NET})
                                vb_destroy = time.perf_counter() - t
                                lv: dict[str, float] = {}
                                for cmd in ("start", "destroy"):
                                    side.stdin.write(cmd.encode() + b"\n")
                                    await side.stdin.drain()
                                    lv.update(json.loads(await side.stdout.readline()))
                                    if cmd == "start":
                                        started_in(lv_ns)
                                if r >= warmup:
                                    out["vb_start"].append(vb_start)
                                    out["vb_destroy"].append(vb_destroy)
                                    out["lv_start"].append(lv["start"])
                                    out["lv_destroy"].append(lv["destroy"])
                        finally:
                            with contextlib.suppress(Exception):
                                await bus.call(route, ops.NETWORK_UNDEFINE, {"network": NET})
                            await bus.close()
                finally:
                    side.stdin.close()  # the side destroys and undefines its network
                    await asyncio.wait_for(side.wait(), 30)
        finally:
            drop_netns(vb_ns)
    return out


@dataclass
class Pinger:
    interval: float
    proc: asyncio.subprocess.Process
    sent: dict[int, float] = field(default_factory=dict)
    answered: set[int] = field(default_factory=set)
    task: asyncio.Task[None] | None = None

    async def collect(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            kind, seq, at = raw.decode().split()
            if kind == "S":
                self.sent[int(seq)] = float(at)
            else:
                self.answered.add(int(seq))

    def lost(self, start: float, end: float) -> int:
        return sum(1 for s, t in self.sent.items() if start <= t <= end and s not in self.answered)


@contextlib.asynccontextmanager
async def pinger(ns: str, interval: float, ident: int) -> AsyncIterator[Pinger]:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, sys.executable, "-c", _PINGER, GUEST_IP, str(interval),
        str(ident), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    p = Pinger(interval, proc)
    p.task = asyncio.create_task(p.collect())
    try:
        yield p
    finally:
        proc.kill()
        await proc.wait()
        p.task.cancel()


async def migration_bench(migrations: int) -> dict[float, list[int]]:
    """Lost ping replies per live migration, for each ping interval."""
    from tests.guests import build_test_guest
    from tests.network import test_cluster_networks as tcn
    from tests.network.test_guest_interfaces import console, guest_xml, kill_qemus_under

    need_tools()
    guest = build_test_guest()
    tag = uuidlib.uuid4().hex[:6]
    lost: dict[float, list[int]] = {1.0: [], 0.05: []}
    with tempfile.TemporaryDirectory(prefix="vbnm") as tmp:
        root = Path(tmp)
        nodes, made = tcn.underlay(root, tag, 2)
        sh("ip", "netns", "exec", made[-1], "ip", "addr", "flush", "dev", "eth0")
        sh("ip", "netns", "exec", made[-1], "ip", "addr", "add", f"{PROBE_IP}/24", "dev", "eth0")
        try:
            with private_vhost(VHOST) as url:
                async with AsyncExitStack() as stack:
                    for node in nodes:
                        (root / node.host).mkdir()
                        conf = root / f"{node.host}.toml"
                        conf.write_text(f'[network]\nnamespace = "{node.ns}"\n'
                                        f'underlay_address = "{node.underlay}"\n')  # fmt: skip
                        await stack.enter_async_context(agent_process(
                            node.host, root / node.host, "--config", str(conf),
                            "--log-level", "WARNING", driver="qemu", bus=url,
                            allowed_dirs=(root, guest.kernel.parent)))  # fmt: skip
                    await stack.enter_async_context(scheduler_process(root / "sched", bus=url))

                    async def ok(*args: str) -> str:
                        r = await cli(*args, bus=url, timeout=120)
                        assert r.code == 0, (args, r.err)
                        return r.out

                    xml = tcn.cluster_xml("nbc", CSUBNET, vni=4200, hosts={GUEST_MAC: GUEST_IP})
                    (root / "nbc.xml").write_text(xml)
                    deadline = time.monotonic() + 30
                    while True:  # both hosts up at the scheduler, then the network on both
                        hosts = json.loads(await ok("--json", "hosts"))
                        if sum(h["up"] for h in hosts) >= 2:
                            break
                        assert time.monotonic() < deadline, hosts
                        await asyncio.sleep(0.3)
                    await ok("net-define", "--cluster", str(root / "nbc.xml"))
                    while True:
                        listed = json.loads(await ok("--json", "net-list", "--cluster"))
                        nets = {n["name"]: n for n in listed}
                        net = nets.get("nbc")
                        if (
                            net
                            and len(net["hosts"]) == 2
                            and all(h["active"] and h["peers"] for h in net["hosts"])
                        ):
                            break
                        assert time.monotonic() < deadline + 30, net
                        await asyncio.sleep(0.3)
                    info = json.loads(await ok("--json", "net-info", "nbc", "--host",
                                               nodes[0].host))  # fmt: skip
                    nodes[0].run("ip", "link", "set", "probe", "master", info["bridge"], "up")
                    uuid = str(uuidlib.uuid4())

                    def dom(i: int) -> Path:
                        serial = root / f"g-{i}.serial"
                        path = root / f"g-{i}.xml"
                        path.write_text(guest_xml(guest, "nbg", uuid, serial, network="nbc",
                                                  mac=GUEST_MAC, peer=f"{CSUBNET}.1"))  # fmt: skip
                        return path

                    await ok("define", str(dom(0)), "--host", nodes[0].host)
                    await ok("start", "nbg", "--host", nodes[0].host)
                    await console(root / "g-0.serial", rf"VIRTBUS-LEASE eth0 {GUEST_IP}")
                    async with (
                        pinger(made[-1], 1.0, 0x4E01) as slow,
                        pinger(made[-1], 0.05, 0x4E02) as fast,
                    ):
                        async with asyncio.timeout(30):  # premise: both answered first
                            while len(slow.answered) < 2 or len(fast.answered) < 20:
                                await asyncio.sleep(0.1)
                        for i in range(1, migrations + 1):
                            to = nodes[i % 2].host
                            t0 = time.monotonic()
                            await ok("migrate", "nbg", "--to", to, "--xml", str(dom(i)), "--wait")
                            t1 = time.monotonic()
                            await asyncio.sleep(3.0)  # replies of the window's last requests
                            for p in (slow, fast):
                                lost[p.interval].append(p.lost(t0, t1 + 1.5))
                            print(
                                f"migration {i}/{migrations} to {to}: {t1 - t0:.2f} s, lost"
                                f" {lost[1.0][-1]} (1/s) {lost[0.05][-1]} (20/s)",
                                flush=True,
                            )
                    for node in nodes:
                        await cli("destroy", "nbg", "--host", node.host, bus=url, timeout=20)
                    await cli("net-undefine", "--cluster", "nbc", bus=url, timeout=30)
        finally:
            kill_qemus_under(root)
            for ns in reversed(made):
                drop_netns(ns)
    return lost


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} ms"


async def main(rounds: int, warmup: int, migrations: int, only: str | None) -> int:
    compile_tree()
    if only in (None, "net-start"):
        if shutil.which("iptables") is None:
            print(
                "libvirt side not measured: libvirt 9.0 needs iptables (apt-get install iptables)"
            )
            return 1
        r = await net_start_bench(rounds, warmup)
        print(f"net-start of a NAT network (bridge, firewall, dnsmasq), each side in its own"
              f" namespace; medians of {rounds} alternating rounds")  # fmt: skip
        print(f"{'figure':<14}{'virtbus':>12}{'libvirt 9.0':>14}{'ratio':>8}")
        for key in ("start", "destroy"):
            vb, lv = r[f"vb_{key}"], r[f"lv_{key}"]
            ratio = statistics.median(vb) / statistics.median(lv)
            print(f"net-{key:<10}{ms(vb):>12}{ms(lv):>14}{ratio:>7.2f}x")
        print(
            "rounds (ms): virtbus start "
            + " ".join(f"{v * 1000:.0f}" for v in r["vb_start"])
            + "; libvirt start "
            + " ".join(f"{v * 1000:.0f}" for v in r["lv_start"])
        )
    if only in (None, "migration"):
        lost = await migration_bench(migrations)
        for interval, counts in lost.items():
            print(
                f"lost ping replies per live migration at {1 / interval:.0f}/s: median"
                f" {statistics.median(counts)} of {migrations} migrations ({counts})"
            )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1, help="unreported rounds of each side")
    parser.add_argument("--migrations", type=int, default=5)
    parser.add_argument("--only", choices=("net-start", "migration"))
    add_force(parser)
    args = parser.parse_args()
    check_load(args.force)
    sys.exit(asyncio.run(main(args.rounds, args.warmup, args.migrations, args.only)))
