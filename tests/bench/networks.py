"""Networks: net-start of a NAT network through virtbus next to libvirt 9.0, guest-to-guest
TCP throughput on a NAT and a cluster network next to a bare bridge + tap, and the ping
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

Throughput: TCG guests of the same NIC model (virtio-net-pci on a tap fd, no vhost) in
pairs: two on a NAT network of host 0, one on each host of a cluster network (the VXLAN
overlay through the underlay namespace), and two QEMUs started by hand on a bridge with
two taps in a namespace of their own (static addresses); the sender's ``send`` command
(ttyS1) pipes ``--mib`` MiB of zeros into busybox nc, the sink answers the byte count
(checked); the rounds rotate which setup goes first. TCG guests are CPU-bound far below
what the bridges carry, so the figures compare setups, not line rates.

Migration: tests/network/test_cluster_networks.py's underlay (two host namespaces, a real
scheduler, two QEMU agents on a private vhost, a cluster network), one TCG guest migrated
back and forth ``--migrations`` times while two pingers in a namespace on host 0's bridge
send it 1 and 20 echo requests a second (both at once, each with its own ICMP id); a
request counts as lost when it was sent between the migrate call and 1.5 s after it
returned and never got a reply.

Run as root: ``PYTHONPATH=. python -m tests.bench.networks [--rounds 7] [--migrations 5]``
(``--only net-start`` or ``--only cluster``: throughput and migration).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
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

from tests.bench.common import add_force, check_load, compile_tree, qemu_argv_of
from tests.network.conftest import nat_xml, need_tools, sh
from tests.procs import BUS_URL, agent_process, cli, private_vhost, scheduler_process, unique_host
from virtbus.bus.factory import open_bus
from virtbus.guests.build import TestGuest
from virtbus.protocol import ops

HERE = Path(__file__).resolve().parent
SUBNET = "10.97.0"
BRIDGE = "vbnb0"
NET = "nb"
LIBVIRT_DIRS = ("/run/libvirt", "/var/lib/libvirt", "/etc/libvirt", "/var/cache/libvirt",
                "/var/log/libvirt")  # fmt: skip
VHOST = "virtbus-bench-networks"
CSUBNET = "10.98.0"  # the cluster network
NSUBNET = "10.96.0"  # the NAT network (host 0)
BSUBNET = "10.95.0"  # the bare bridge (static addresses)
GUEST_MAC, GUEST_IP = "52:54:00:98:00:01", f"{CSUBNET}.11"
SEND_MAC, SINK_MAC = "52:54:00:98:00:21", "52:54:00:98:00:22"
SINK_PORT = 7001
# the agent hands QEMU its tap as an fd, no vhost: the bare side opens a tap by name, no vhost
BARE_NETDEV = "tap,id=hostnet0,ifname={tap},script=no,downscript=no"
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


@dataclass
class Pair:
    """Two guests on one setup: ``sender`` streams to ``sink`` through its control socket."""

    setup: str
    control: Path
    sink_ip: str


def bench_guest_xml(guest: TestGuest, name: str, root: Path, *, network: str, mac: str,
                    cmdline: str) -> str:  # fmt: skip
    """The throughput guest: the network tests' TCG guest (192 MiB, q35, virtio NIC), a
    console file and its command serial port (ttyS1) on a socket QEMU listens on."""
    return f"""<domain type='qemu'><name>{name}</name><uuid>{uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>192</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{guest.kernel}</kernel><initrd>{guest.initramfs}</initrd>
    <cmdline>{guest.cmdline} {cmdline}</cmdline></os>
  <features><acpi/></features>
  <devices>
    <interface type='network'><mac address='{mac}'/><source network='{network}'/>
      <model type='virtio'/></interface>
    <serial type='file'><source path='{root / name}.serial'/><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path='{root / name}.ctl'/><target port='1'/>
    </serial>
  </devices>
</domain>"""


async def send(pair: Pair, mib: int) -> float:
    """Seconds for ``mib`` MiB from the pair's sender to its sink (the sink's count checked)."""
    reader, writer = await asyncio.open_unix_connection(str(pair.control))
    try:
        t = time.perf_counter()
        writer.write(f"send {pair.sink_ip} {SINK_PORT} {mib}\n".encode())
        await writer.drain()
        async with asyncio.timeout(300):
            while not (line := (await reader.readline()).decode()).startswith("VIRTBUS-SENT"):
                pass
        took = time.perf_counter() - t
    finally:
        writer.close()
    assert line.split()[1] == str(mib << 20), (pair.setup, line)
    return took


def nic_args(argv: list[str]) -> list[str]:
    """The NIC's -netdev and its -device of a QEMU command line (compared across setups)."""
    out = []
    for flag, value in itertools.pairwise(argv):
        if flag == "-netdev" or (flag == "-device" and "virtio-net" in value):
            out.append(f"{flag} {value}")
    return out


async def cluster_bench(
    migrations: int, rounds: int, mib: int
) -> tuple[dict[str, list[float]], dict[float, list[int]], list[str]]:
    """Guest-to-guest seconds per transfer on each setup, in rounds that alternate the
    setups, then the ping replies lost per live migration for each ping interval."""
    from tests.guests import build_test_guest
    from tests.network import test_cluster_networks as tcn
    from tests.network.test_guest_interfaces import console, guest_xml, kill_qemus_under

    need_tools()
    guest = build_test_guest()
    tag = uuidlib.uuid4().hex[:6]
    lost: dict[float, list[int]] = {1.0: [], 0.05: []}
    took: dict[str, list[float]] = {"bare bridge+tap": [], "NAT network": [],
                                    "cluster network": []}  # fmt: skip
    nics: list[str] = []
    bare_ns = f"vbnt-{tag}"
    qemus: list[asyncio.subprocess.Process] = []
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

                    hosts = {
                        GUEST_MAC: GUEST_IP,
                        SEND_MAC: f"{CSUBNET}.21",
                        SINK_MAC: f"{CSUBNET}.22",
                    }
                    xml = tcn.cluster_xml("nbc", CSUBNET, vni=4200, hosts=hosts)
                    (root / "nbc.xml").write_text(xml)
                    nat = tcn.cluster_xml(
                        "nbn", NSUBNET, hosts={SEND_MAC: f"{NSUBNET}.21", SINK_MAC: f"{NSUBNET}.22"}
                    )
                    (root / "nbn.xml").write_text(
                        nat.replace("<name>nbn</name>", "<name>nbn</name><forward mode='nat'/>")
                    )
                    deadline = time.monotonic() + 30
                    while True:  # both hosts up at the scheduler, then the network on both
                        listed = json.loads(await ok("--json", "hosts"))
                        if sum(h["up"] for h in listed) >= 2:
                            break
                        assert time.monotonic() < deadline, listed
                        await asyncio.sleep(0.3)
                    await ok("net-define", "--cluster", str(root / "nbc.xml"))
                    await ok("net-define", str(root / "nbn.xml"), "--host", nodes[0].host)
                    await ok("net-start", "nbn", "--host", nodes[0].host)
                    while True:
                        listed = json.loads(await ok("--json", "net-list", "--cluster"))
                        net = {n["name"]: n for n in listed}.get("nbc")
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
                    # throughput pairs: NAT (both on host 0), cluster (host 0 -> host 1)
                    pairs = []
                    for setup, net_name, sub, hs in (
                        ("NAT network", "nbn", NSUBNET, (nodes[0], nodes[0])),
                        ("cluster network", "nbc", CSUBNET, (nodes[0], nodes[1])),
                    ):
                        for role, mac, node in (("tx", SEND_MAC, hs[0]), ("rx", SINK_MAC, hs[1])):
                            name = f"{net_name}-{role}"
                            extra = "virtbus.dhcp=eth0" + (
                                f" virtbus.sink={SINK_PORT}" if role == "rx" else ""
                            )
                            (root / f"{name}.xml").write_text(
                                bench_guest_xml(
                                    guest, name, root, network=net_name, mac=mac, cmdline=extra
                                )
                            )
                            await ok("define", str(root / f"{name}.xml"), "--host", node.host)
                            await ok("start", name, "--host", node.host)
                        pairs.append(Pair(setup, root / f"{net_name}-tx.ctl", f"{sub}.22"))
                    # the bare pair: a bridge and two taps in a namespace, QEMU by hand
                    netns(bare_ns)
                    bare = ("ip", "netns", "exec", bare_ns)
                    sh(*bare, "ip", "link", "add", "br0", "type", "bridge", "stp_state", "0")
                    sh(*bare, "ip", "link", "set", "br0", "up")
                    for i, (mac, extra) in enumerate((
                        (SEND_MAC, f"virtbus.ip={BSUBNET}.21/24"),
                        (SINK_MAC, f"virtbus.ip={BSUBNET}.22/24 virtbus.sink={SINK_PORT}"),
                    )):  # fmt: skip
                        tap = f"tap{i}"
                        sh(*bare, "ip", "tuntap", "add", "dev", tap, "mode", "tap")
                        sh(*bare, "ip", "link", "set", tap, "master", "br0", "up")
                        ctl = root / f"bare-{i}.ctl"
                        qemus.append(await asyncio.create_subprocess_exec(
                            *bare, "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35",
                            "-nodefaults", "-no-user-config", "-display", "none", "-m", "192",
                            "-smp", "1", "-name", f"guest=bare-{i},debug-threads=on",
                            "-kernel", str(guest.kernel), "-initrd", str(guest.initramfs),
                            "-append", f"{guest.cmdline} {extra}",
                            "-serial", f"file:{root}/bare-{i}.serial",
                            "-chardev", f"socket,id=ctl,path={ctl},server=on,wait=off",
                            "-device", "isa-serial,chardev=ctl",
                            "-netdev", BARE_NETDEV.format(tap=tap),
                            "-device", f"virtio-net-pci,netdev=hostnet0,mac={mac}",
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
                    pairs.insert(0, Pair("bare bridge+tap", root / "bare-0.ctl", f"{BSUBNET}.22"))
                    await console(root / "bare-1.serial", f"VIRTBUS-SINK {SINK_PORT}")
                    await console(root / "bare-0.serial", f"VIRTBUS-IP eth0 {BSUBNET}.21")
                    for name, sub in (("nbn", NSUBNET), ("nbc", CSUBNET)):
                        await console(root / f"{name}-rx.serial", rf"VIRTBUS-LEASE eth0 {sub}.22")
                        await console(root / f"{name}-tx.serial", rf"VIRTBUS-LEASE eth0 {sub}.21")
                    nics.extend(
                        " ".join(nic_args(qemu_argv_of(n))) for n in ("bare-0", "nbn-tx", "nbc-tx")
                    )
                    for pair in pairs:  # warm-up (ARP, TCP's first slow start)
                        await send(pair, 4)
                    for r in range(rounds):
                        order = pairs[r % 3 :] + pairs[: r % 3]
                        for pair in order:
                            took[pair.setup].append(await send(pair, mib))
                        print(f"throughput round {r + 1}/{rounds} done", flush=True)
                    for name in ("nbn-tx", "nbn-rx", "nbc-tx", "nbc-rx"):
                        for node in nodes:
                            await cli("destroy", name, "--host", node.host, bus=url, timeout=20)
                    # the migration: one guest back and forth under two pingers
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
            for q in qemus:
                with contextlib.suppress(ProcessLookupError):
                    q.kill()
                await q.wait()
            kill_qemus_under(root)
            for ns in [*reversed(made), bare_ns]:
                drop_netns(ns)
    return took, lost, nics


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} ms"


async def main(rounds: int, warmup: int, migrations: int, mib: int, only: str | None) -> int:
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
    if only in (None, "cluster"):
        took, lost, nics = await cluster_bench(migrations, rounds, mib)
        print(f"guest-to-guest TCP, {mib} MiB per transfer (busybox dd | nc to nc -e wc -c),"
              f" TCG guests, medians of {rounds} rounds alternating the setups")  # fmt: skip
        for setup, nic in zip(took, nics, strict=True):
            print(f"  NIC on {setup}: {nic}")
        base = statistics.median(took["bare bridge+tap"])
        for setup, times in took.items():
            mbit = mib * 8 * 1.048576 / statistics.median(times)
            print(f"{setup:<18}{mbit:>8.0f} Mbit/s  {statistics.median(times) / base:.2f}x the"
                  f" bare side's time  (s: {' '.join(f'{t:.2f}' for t in times)})")  # fmt: skip
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
    parser.add_argument("--mib", type=int, default=32, help="MiB per throughput transfer")
    parser.add_argument("--only", choices=("net-start", "cluster"))
    add_force(parser)
    args = parser.parse_args()
    check_load(args.force)
    sys.exit(asyncio.run(main(args.rounds, args.warmup, args.migrations, args.mib, args.only)))
