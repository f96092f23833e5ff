"""Cluster networks end to end: ``net-define --cluster`` through a real virtbus-scheduler,
two real QEMU agents whose networks live in namespaces of their own ("hosts"), joined by
veth pairs to an underlay namespace (a bridge; 192.0.2.0/24), real TCG guests.

The network is defined while only host 0 is up; host 1 joins later and gets it from its
heartbeats. Proven here: each host's bridge has a kernel VXLAN device whose head-end
replication list (bridge fdb ``00:00:00:00:00:00 dst PEER``) is the other host; host 0
alone has the gateway address and dnsmasq, yet the guest on host 1 gets its reserved
lease across the overlay; the two guests ping each other across it; one is live-migrated
to the other host while a pinger on host 0's bridge sends it 20 echo requests a second,
and the replies go on (the lost ones are printed), as does a TCP connection from there
into it (busybox nc echoing numbered lines): the same connection, opened and carrying
data before, is echoed on by the destination, nothing lost. Bad input (a VNI clash, a subnet
overlapping a host's network, a malformed definition) is refused with its code, and the
scheduler still serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.guests import TestGuest, build_test_guest
from tests.network.conftest import need_tools, sh
from tests.network.test_guest_interfaces import (
    WAIT,
    console,
    guest_xml,
    kill_qemus_under,
    read,
)
from tests.procs import (
    AgentProc,
    agent_process,
    cli,
    private_vhost,
    scheduler_process,
    terminate,
    unique_host,
)

pytestmark = [
    pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.network, pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
]  # fmt: skip
VHOST = "virtbus-test-clusternet"
SUBNET = "10.91.0"
VNI = 4100
NS = "https://virtbus.dev/xmlns/network/cluster/1"
PROBE_IP = f"{SUBNET}.99"
PROBE_INTERVAL = 0.05  # s: 20 echo requests a second across the migration
ECHO_PORT = 7000  # cg-1's TCP echo server (virtbus.echo=)
STREAM_INTERVAL = 0.02  # s: a numbered line every 20 ms on the one TCP connection
# A TCP client in the pinger's namespace: one connection to cg-1's echo server, a numbered
# line every STREAM_INTERVAL, each echoed line printed with its arrival time; never
# reconnects (a broken connection prints END and exits), so every echo is the same stream.
_STREAM = """
import socket, sys, threading, time
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
sock.settimeout(None)
print("CONNECTED", sock.getsockname()[1], flush=True)

def send():
    n = 0
    try:
        while True:
            n += 1
            sock.sendall(b"%d\\n" % n)
            time.sleep(float(sys.argv[3]))
    except OSError as e:
        print("END send", e, flush=True)

threading.Thread(target=send, daemon=True).start()
buf = b""
try:
    while data := sock.recv(4096):
        *lines, buf = (buf + data).split(b"\\n")
        for line in lines:
            print(line.decode(), time.monotonic(), flush=True)
    print("END eof", flush=True)
except OSError as e:
    print("END recv", e, flush=True)
"""


def cluster_xml(name: str, subnet: str, *, vni: int | None = None,
                hosts: dict[str, str] | None = None, forward: str = "") -> str:  # fmt: skip
    reserved = "".join(f"<host mac='{m}' ip='{ip}'/>" for m, ip in (hosts or {}).items())
    cluster = f"<vb:cluster vni='{vni}'/>" if vni is not None else ""
    return (
        f"<network xmlns:vb='{NS}'><name>{name}</name>{forward}"
        f"<ip address='{subnet}.1' netmask='255.255.255.0'><dhcp>"
        f"<range start='{subnet}.100' end='{subnet}.150'/>{reserved}</dhcp></ip>"
        f"{cluster}</network>"
    )


@dataclass
class Node:
    host: str
    ns: str
    underlay: str

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.ns, *argv, check=check)

    def flood_peers(self, dev: str) -> list[str]:
        out = self.run("bridge", "fdb", "show", "dev", dev, check=False).stdout
        return sorted(re.findall(r"^00:00:00:00:00:00 dst (\S+)", out, re.M))

    def addresses(self, dev: str) -> list[str]:
        out = json.loads(self.run("ip", "-j", "-4", "addr", "show", "dev", dev).stdout)
        return [f"{a['local']}/{a['prefixlen']}" for i in out for a in i["addr_info"]]

    def dnsmasqs(self) -> list[int]:
        pids = sh("ip", "netns", "pids", self.ns, check=False).stdout.split()
        found = []
        for pid in pids:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "dnsmasq":
                    found.append(int(pid))
        return found


@dataclass
class Bed:
    url: str
    root: Path
    nodes: list[Node]
    probe: str  # the pinger's namespace
    guest: TestGuest
    start_agent: Callable[[Node], Awaitable[None]]
    agents: dict[str, AgentProc]  # the newest agent process of each host

    async def run(self, *args: str) -> tuple[int, str, str]:
        r = await cli(*args, bus=self.url, timeout=60)
        return r.code, r.out, r.err

    async def ok(self, *args: str) -> str:
        code, out, err = await self.run(*args)
        assert code == 0, (args, err)
        return out

    async def fails(self, code: str, *args: str) -> str:
        rc, _, err = await self.run(*args)
        assert rc == 1 and err.startswith(f"error: {code}: "), (args, rc, err)
        await self.ok("net-list", "--cluster")  # ... and the scheduler still serves
        return err

    def file(self, name: str, text: str) -> str:
        path = self.root / name
        path.write_text(text)
        return str(path)

    async def up(self, n: int) -> list[dict[str, Any]]:
        """The scheduler's hosts once ``n`` are up (it knows them from heartbeats)."""
        async with asyncio.timeout(15):
            while True:
                hosts = json.loads(await self.ok("--json", "hosts"))
                if sum(h["up"] for h in hosts) >= n:
                    return list(hosts)
                await asyncio.sleep(0.3)

    def others(self, host: str, hosts: list[dict[str, Any]]) -> list[str]:
        """The underlay addresses of the network's hosts other than ``host``."""
        names = {h["host"] for h in hosts} - {host}
        return sorted(n.underlay for n in self.nodes if n.host in names)

    async def cluster(self) -> dict[str, Any]:
        return {n["name"]: n for n in json.loads(await self.ok("--json", "net-list", "--cluster"))}

    async def settled(self, name: str, hosts: int) -> dict[str, Any]:
        """The cluster network once ``hosts`` hosts run it, each flooding to the others."""
        deadline = time.monotonic() + 20
        while True:
            net = (await self.cluster()).get(name)
            if (
                net is not None
                and len(net["hosts"]) == hosts
                and all(
                    h["active"] and sorted(h["peers"]) == self.others(h["host"], net["hosts"])
                    for h in net["hosts"]
                )
            ):
                return net
            assert time.monotonic() < deadline, net
            await asyncio.sleep(0.3)

    async def bridge(self, node: Node, name: str) -> str:
        info = json.loads(await self.ok("--json", "net-info", name, "--host", node.host))
        return str(info["bridge"])


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


def underlay(root: Path, tag: str, n: int) -> tuple[list[Node], list[str]]:
    """``n`` host namespaces, each with ``underlay`` (192.0.2.i+1/24) cabled to a bridge in
    the underlay namespace. Only links inside namespaces made here."""
    need_tools()
    under = f"vbx-{tag}"
    made = [under]
    sh("ip", "netns", "add", under)
    sh("ip", "netns", "exec", under, "ip", "link", "add", "ul", "type", "bridge")
    sh("ip", "netns", "exec", under, "ip", "link", "set", "ul", "up")
    nodes = []
    for i in range(n):
        ns = f"vbh{i}-{tag}"
        sh("ip", "netns", "add", ns)
        made.append(ns)
        node = Node(unique_host(f"cn{i}"), ns, f"192.0.2.{i + 1}")
        sh("ip", "link", "add", f"u{i}-{tag}", "netns", ns, "type", "veth", "peer", "name",
           f"x{i}-{tag}", "netns", under)  # fmt: skip
        node.run("ip", "link", "set", "lo", "up")
        node.run("ip", "link", "set", f"u{i}-{tag}", "name", "underlay")
        node.run("ip", "addr", "add", f"{node.underlay}/24", "dev", "underlay")
        node.run("ip", "link", "set", "underlay", "up")
        sh("ip", "netns", "exec", under, "ip", "link", "set", f"x{i}-{tag}", "master", "ul", "up")
        nodes.append(node)
    probe = f"vbp-{tag}"  # a pinger cabled to host 0's bridge (by the test)
    sh("ip", "netns", "add", probe)
    made.append(probe)
    sh("ip", "link", "add", f"p-{tag}", "netns", nodes[0].ns, "type", "veth", "peer", "name",
       f"q-{tag}", "netns", probe)  # fmt: skip
    nodes[0].run("ip", "link", "set", f"p-{tag}", "name", "probe")
    inner = ("ip", "netns", "exec", probe)
    sh(*inner, "ip", "link", "set", f"q-{tag}", "name", "eth0")
    sh(*inner, "ip", "addr", "add", f"{PROBE_IP}/24", "dev", "eth0")
    sh(*inner, "ip", "link", "set", "eth0", "up")
    return nodes, made


def agent_starter(stack: AsyncExitStack, root: Path, url: str, guest: TestGuest,
                  agents: dict[str, AgentProc], driver: str = "qemu",
                  ) -> Callable[[Node], Awaitable[None]]:  # fmt: skip
    """Starts (or restarts, same state dir) a host's agent in its namespace, on ``url``."""

    async def agent(node: Node) -> None:
        base = root / node.host
        base.mkdir(exist_ok=True)
        conf = root / f"{node.host}.toml"
        conf.write_text(f'[network]\nnamespace = "{node.ns}"\n'
                        f'underlay_address = "{node.underlay}"\n')  # fmt: skip
        agents[node.host] = await stack.enter_async_context(agent_process(
            node.host, base, "--config", str(conf), driver=driver, bus=url,
            allowed_dirs=(root, guest.kernel.parent)))  # fmt: skip

    return agent


@contextlib.contextmanager
def namespaces(root: Path, n: int) -> Iterator[tuple[list[Node], list[str]]]:
    """:func:`underlay`, and every process left in its namespaces killed, them deleted."""
    nodes, made = underlay(root, uuidlib.uuid4().hex[:6], n)
    try:
        yield nodes, made
    finally:
        kill_qemus_under(root)
        for ns in reversed(made):
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bed(guest: TestGuest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Bed]:
    root = tmp_path_factory.mktemp("cnet")
    with namespaces(root, 2) as (nodes, made), private_vhost(VHOST) as url:
        async with AsyncExitStack() as stack:
            agents: dict[str, AgentProc] = {}
            agent = agent_starter(stack, root, url, guest, agents)
            bed = Bed(url, root, nodes, made[-1], guest, agent, agents)
            await agent(nodes[0])  # host 1 joins later (first test)
            await stack.enter_async_context(scheduler_process(root / "sched", bus=url))
            try:
                yield bed
            finally:  # while every agent still serves (host 1's joined the stack last)
                await _destroy_guests(bed)


async def _destroy_guests(bed: Bed) -> None:
    for node in bed.nodes:
        for name in ("cg-1", "cg-2"):
            await cli("destroy", name, "--host", node.host, bus=bed.url, timeout=10)


@dataclass
class G:
    name: str
    uuid: str
    mac: str
    ip: str
    serial: Path


def with_echo(xml: str) -> str:
    """The guest's XML with its TCP echo server asked for on the kernel command line."""
    return xml.replace("virtbus.ping=", f"virtbus.echo={ECHO_PORT} virtbus.ping=", 1)


G1 = G("cg-1", str(uuidlib.uuid4()), "52:54:00:91:00:01", f"{SUBNET}.11", Path())
G2 = G("cg-2", str(uuidlib.uuid4()), "52:54:00:91:00:02", f"{SUBNET}.12", Path())


async def test_a_cluster_network_spans_hosts_and_guests_ping_across_a_migration(
    bed: Bed,
) -> None:
    a, b = bed.nodes
    xml = cluster_xml("cn", SUBNET, vni=VNI, hosts={G1.mac: G1.ip, G2.mac: G2.ip})
    await bed.up(1)
    out = await bed.ok("net-define", "--cluster", bed.file("cn.xml", xml))
    assert f"VNI {VNI}" in out and f"DHCP on {a.host}" in out, out
    await bed.settled("cn", 1)
    await bed.start_agent(b)  # joins later: heartbeats bring it
    net = await bed.settled("cn", 2)
    assert net["vni"] == VNI and net["dhcp_host"] == a.host
    assert {h["host"]: h["dhcp"] for h in net["hosts"]} == {a.host: True, b.host: False}
    # the overlay: VXLAN on each bridge, flooding to the other host
    dev = f"vx{VNI}"
    for node, peer in ((a, b), (b, a)):
        assert node.flood_peers(dev) == [peer.underlay]
        assert dev in node.run("ip", "-o", "link", "show", "master",
                               await bed.bridge(node, "cn")).stdout  # fmt: skip
    # no STP on the overlay's bridges: a migrated guest's new tap forwards at once
    # (with it, listening and learning cost 2 ping replies of 3 across the migration)
    for node in (a, b):
        (link,) = json.loads(node.run("ip", "-j", "-d", "link", "show", "dev",
                                      await bed.bridge(node, "cn")).stdout)  # fmt: skip
        assert link["linkinfo"]["info_data"]["stp_state"] == 0
    # DHCP once: host 0 has the gateway address and dnsmasq, host 1 only bridges
    assert a.addresses(await bed.bridge(a, "cn")) == [f"{SUBNET}.1/24"]
    assert b.addresses(await bed.bridge(b, "cn")) == []
    assert len(a.dnsmasqs()) == 1 and b.dnsmasqs() == []
    # a guest on each host; each pings the other across the overlay
    for g, node, peer in ((G1, a, G2), (G2, b, G1)):
        g.serial = bed.root / f"{g.name}-0.serial"
        xml = guest_xml(bed.guest, g.name, g.uuid, g.serial, network="cn", mac=g.mac,
                        peer=peer.ip)  # fmt: skip
        if g is G1:
            xml = with_echo(xml)
        await bed.ok("define", bed.file(f"{g.name}.xml", xml), "--host", node.host)
        await bed.ok("start", g.name, "--host", node.host)
    for g, peer in ((G1, G2), (G2, G1)):
        assert await console(g.serial, r"VIRTBUS-LEASE eth0 \S+") == f"VIRTBUS-LEASE eth0 {g.ip}"
        await console(g.serial, rf"VIRTBUS-PING-OK {re.escape(peer.ip)} \d+")
    await console(G1.serial, f"VIRTBUS-ECHO {ECHO_PORT}")
    # live-migrate cg-1 to host 1, pinged 20 times a second from host 0 across the overlay
    a.run("ip", "link", "set", "probe", "master", await bed.bridge(a, "cn"), "up")
    pinger = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", bed.probe, "busybox", "ping", "-n", "-i", str(PROBE_INTERVAL),
        G1.ip, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    replies: list[int] = []  # icmp_seq of each reply, as they come

    async def collect() -> None:
        assert pinger.stdout is not None
        async for line in pinger.stdout:
            if found := re.search(rb"seq=(\d+)", line):
                replies.append(int(found.group(1)))

    collecting = asyncio.create_task(collect())
    # ... and one TCP connection from the pinger's namespace to cg-1 streams through it
    streamer = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", bed.probe, sys.executable, "-c", _STREAM, G1.ip,
        str(ECHO_PORT), str(STREAM_INTERVAL), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    echoes: list[tuple[int, float]] = []  # (line number, arrival time) of each echoed line
    ends: list[str] = []

    async def stream() -> None:
        assert streamer.stdout is not None
        async for raw in streamer.stdout:
            line = raw.decode().strip()
            if line.startswith(("CONNECTED", "END")):
                ends.append(line)
            else:
                n, at = line.split()
                echoes.append((int(n), float(at)))

    streaming = asyncio.create_task(stream())
    try:
        async with asyncio.timeout(WAIT):
            # premise: answered, and the connection carrying data, before the migration
            while len(replies) < 10 or len(echoes) < 10:
                await asyncio.sleep(0.05)
        before = len(replies)
        flowed = len(echoes)
        dst_serial = bed.root / f"{G1.name}-1.serial"
        dst_xml = with_echo(guest_xml(bed.guest, G1.name, G1.uuid, dst_serial, network="cn",
                                      mac=G1.mac, peer=G2.ip))  # fmt: skip
        await bed.ok("migrate", G1.name, "--to", b.host, "--xml",
                     bed.file("cg-1-dst.xml", dst_xml), "--wait")  # fmt: skip
        after, switched = len(replies), len(echoes)
        async with asyncio.timeout(WAIT):
            while len(replies) < after + 20:  # answered at its new host
                await asyncio.sleep(0.05)
        # the same connection flows on, echoed by host 1 (asserted below, with what came)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(15):
                while len(echoes) < switched + 50 and not ends[1:]:
                    await asyncio.sleep(0.05)
    finally:
        pinger.send_signal(signal.SIGINT)
        streamer.kill()
        await pinger.wait()
        await streamer.wait()
        collecting.cancel()
        streaming.cancel()
    assert ends[:1] and ends[0].startswith("CONNECTED") and not ends[1:], ends
    numbers = [n for n, _ in echoes]
    assert numbers == list(range(1, len(numbers) + 1)), numbers  # one stream, nothing lost
    assert len(numbers) >= switched + 50, (
        f"{flowed} before, {switched} by the switchover, {len(numbers)} in all"
    )
    stall = max(b - a for (_, a), (_, b) in itertools.pairwise(echoes[flowed - 1 :]))
    print(f"\nTCP stream across the live migration: {flowed} lines echoed before,"
          f" {len(numbers) - switched} after it on the same connection; longest gap"
          f" {stall * 1000:.0f} ms")  # fmt: skip
    window = replies[before - 1 :]
    lost = (window[-1] - window[0] + 1) - len(set(window))
    print(f"\nlost ping replies across the live migration: {lost} of"
          f" {window[-1] - window[0] + 1} (one every {PROBE_INTERVAL * 1000:.0f} ms)")  # fmt: skip
    assert lost <= 20, window  # loose (1 s): a loaded 2-core machine
    # the guests ping each other on host 1 now, cg-1 from its new QEMU
    mark = len(read(G2.serial))
    await console(G2.serial, rf"VIRTBUS-PING-OK {re.escape(G1.ip)} \d+", after=mark)
    await console(dst_serial, rf"VIRTBUS-PING-OK {re.escape(G2.ip)} \d+")


async def test_bad_cluster_definitions_are_refused(bed: Bed) -> None:
    a, b = bed.nodes
    if "cn" not in await bed.cluster():
        pytest.skip("needs the cluster network of the first test")
    # a VNI another cluster network uses
    clash = bed.file("clash.xml", cluster_xml("cn-clash", "10.92.0", vni=VNI))
    err = await bed.fails("OPERATION_FAILED", "net-define", "--cluster", clash)
    assert f"VNI {VNI}" in err and "'cn'" in err, err
    # a subnet overlapping a network of one host (refused before any host is touched)
    await bed.ok("net-define", bed.file("local.xml", cluster_xml("local", "10.93.0")),
                 "--host", b.host)  # fmt: skip
    async with asyncio.timeout(10):  # the scheduler knows it from b's heartbeat
        while not any(n["name"] == "local" for h in await bed.up(2) if h["host"] == b.host
                      for n in h["networks"]):  # fmt: skip
            await asyncio.sleep(0.3)
    err = await bed.fails("OPERATION_FAILED", "net-define", "--cluster",
                          bed.file("overlap.xml", cluster_xml("cn-over", "10.93.0")))  # fmt: skip
    assert "network 'local'" in err and f"host '{b.host}'" in err and "10.93.0.0/24" in err, err
    names = [n["name"] for n in json.loads(await bed.ok("--json", "net-list", "--all",
                                                        "--host", a.host))]  # fmt: skip
    assert "cn-over" not in names, names
    # malformed definitions
    await bed.fails("XML_ERROR", "net-define", "--cluster", bed.file("bad1.xml", "<network><na"))
    await bed.fails("XML_ERROR", "net-define", "--cluster",
                    bed.file("bad2.xml", cluster_xml("cn-bad", "10.94.0", vni=0)))  # fmt: skip
    bridged = "<network><name>cn-bad</name><forward mode='bridge'/><bridge name='br9'/></network>"
    err = await bed.fails("XML_ERROR", "net-define", "--cluster", bed.file("bad3.xml", bridged))
    assert "'cn-bad' (bridge) must be a network whose bridge virtbus makes" in err, err
    assert set(await bed.cluster()) == {"cn"}
    # a VNI allocated when the definition names none; undefine --cluster removes it everywhere
    out = await bed.ok(
        "net-define", "--cluster", bed.file("cn2.xml", cluster_xml("cn2", "10.95.0"))
    )
    net = await bed.settled("cn2", 2)
    assert net["vni"] not in (VNI, 0), out
    await bed.ok("net-undefine", "--cluster", "cn2")
    for node in (a, b):
        names = [n["name"] for n in json.loads(await bed.ok("--json", "net-list", "--all",
                                                            "--host", node.host))]  # fmt: skip
        assert "cn2" not in names and node.flood_peers(f"vx{net['vni']}") == []
    assert set(await bed.cluster()) == {"cn"}


async def probe_reaches(bed: Bed, ip: str, *, timeout: float = 20) -> bool:
    """Whether the pinger on host 0's bridge gets an echo reply from ``ip`` in ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", bed.probe, "busybox", "ping", "-n", "-c", "1", "-W", "1", ip,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        if await proc.wait() == 0:
            return True
    return False


async def test_restarted_agents_keep_the_overlay_and_rebuild_a_lost_vxlan(bed: Bed) -> None:
    """Commit 5b5fc98: an agent restarted while its VXLAN device is gone makes it again on
    the same bridge (adopted: the same dnsmasq), and a restart leaves the overlay as it was."""
    a, b = bed.nodes
    if "cn" not in await bed.cluster():
        pytest.skip("needs the cluster network and guests of the first test")
    dev = f"vx{VNI}"
    bridges = {n.host: await bed.bridge(n, "cn") for n in (a, b)}
    # premise: cg-1 (on host 1 since the migration) answers host 0's pinger over the overlay
    assert await probe_reaches(bed, G1.ip)
    # host 1 (both guests) restarted: the guests ping on, its overlay is untouched
    marks = {g.name: len(read(g.serial)) for g in (G2,)}
    cg1_serial = bed.root / f"{G1.name}-1.serial"
    cg1_mark = len(read(cg1_serial))
    assert await terminate(bed.agents[b.host].proc) == 0
    await bed.start_agent(b)
    await bed.settled("cn", 2)
    assert b.flood_peers(dev) == [a.underlay]
    assert dev in b.run("ip", "-o", "link", "show", "master", bridges[b.host]).stdout
    await console(G2.serial, rf"VIRTBUS-PING-OK {re.escape(G1.ip)} \d+", after=marks[G2.name])
    await console(cg1_serial, rf"VIRTBUS-PING-OK {re.escape(G2.ip)} \d+", after=cg1_mark)
    assert await probe_reaches(bed, G1.ip)
    # host 0 (the DHCP host) stopped, its VXLAN device deleted meanwhile: no overlay
    dnsmasq = a.dnsmasqs()
    assert len(dnsmasq) == 1
    assert await terminate(bed.agents[a.host].proc) == 0
    a.run("ip", "link", "del", dev)
    assert not await probe_reaches(bed, G1.ip, timeout=1)
    await bed.start_agent(a)  # adopts the network and makes vx4100 again; peers follow
    await bed.settled("cn", 2)
    assert a.flood_peers(dev) == [b.underlay] and b.flood_peers(dev) == [a.underlay]
    assert await bed.bridge(a, "cn") == bridges[a.host]
    assert dev in a.run("ip", "-o", "link", "show", "master", bridges[a.host]).stdout
    assert a.dnsmasqs() == dnsmasq  # adopted, not stopped and started again
    assert await probe_reaches(bed, G1.ip)


async def test_a_standby_that_takes_over_knows_the_cluster_networks(
    guest: TestGuest, tmp_path: Path
) -> None:
    """The cluster networks are in the journal on the bus: a standby with a state dir of
    its own that takes over lists them, brings them to a host that joins afterwards and
    refuses a VNI clash with them. Test-driver agents: only their networks matter here."""
    with namespaces(tmp_path, 2) as (nodes, made), private_vhost(f"{VHOST}-failover") as url:
        async with AsyncExitStack() as stack:
            agents: dict[str, AgentProc] = {}
            agent = agent_starter(stack, tmp_path, url, guest, agents, driver="test")
            bed = Bed(url, tmp_path, nodes, made[-1], guest, agent, agents)
            a, b = nodes
            await agent(a)
            first = await stack.enter_async_context(scheduler_process(tmp_path / "s1", bus=url))
            await bed.up(1)
            vni = VNI + 100
            await bed.ok("net-define", "--cluster",
                         bed.file("cf.xml", cluster_xml("cf", "10.96.0", vni=vni)))  # fmt: skip
            await bed.settled("cf", 1)
            await stack.enter_async_context(
                scheduler_process(tmp_path / "s2", bus=url, new_cluster=False)
            )
            first.kill()  # the active scheduler and its state dir are gone
            await first.wait()
            net = (await bed.cluster())["cf"]  # answered by the standby, now active
            assert (net["vni"], net["dhcp_host"]) == (vni, a.host)
            await agent(b)  # joins after the failover
            await bed.settled("cf", 2)
            assert b.flood_peers(f"vx{vni}") == [a.underlay]
            assert a.flood_peers(f"vx{vni}") == [b.underlay]
            clash = bed.file("clash.xml", cluster_xml("cf-clash", "10.97.0", vni=vni))
            err = await bed.fails("OPERATION_FAILED", "net-define", "--cluster", clash)
            assert f"VNI {vni}" in err and "cluster network 'cf'" in err, err
