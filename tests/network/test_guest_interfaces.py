"""Guest NICs on virtual networks, end to end: a real ``virtbus-agent --driver qemu``
whose networks live in a namespace the fixture made, real TCG guests (the busybox test
guest runs udhcpc on eth0 and pings its peer, printing both on its serial console), the
real CLI and RabbitMQ, dnsmasq and the bridge inside the namespace.

One pair of guests serves the whole module (they boot once): their taps on the NAT
network's bridge, their leases from dnsmasq, their pings to each other, ``domifaddr``
and ``domiflist``, ``domif-setlink`` cutting the ping, a NIC attached live that shows up
in the guest and detached again, ``<bandwidth>`` on the taps (HTB and the nftables policer
read back in the namespace, ICMP echoes of 8000 bytes clearly fewer when shaped) and
domiftune changing it live, and the bad inputs (an unknown or inactive network at
start: a clear error, no tap, no QEMU; a network in use is not destroyed unless forced),
each answered by an agent that still serves afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from agent.guest_taps import tap_prefix, tap_table
from drivers.qemu.argv_devices import generated_mac
from tests.guests import TestGuest, build_test_guest
from tests.network.conftest import Topology
from tests.procs import BUS_URL, agent_process, cli, qemu_allowed_dirs, unique_host
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import EVENTS_EXCHANGE
from virtbus.protocol.events import routing_word

pytestmark = [
    pytest.mark.qemu, pytest.mark.rabbitmq, pytest.mark.network, pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
]  # fmt: skip
SUBNET = "10.81.0"
# gn-2's NIC starts shaped: its tap carries these from the moment the agent makes it
G2_BANDWIDTH = ("<bandwidth><inbound average='1000' peak='2000' burst='256'/>"
                "<outbound average='800'/></bandwidth>")  # fmt: skip
WAIT = 60.0  # s: a TCG boot plus DHCP on a loaded 2-core machine


def guest_xml(guest: TestGuest, name: str, uuid: str, serial: Path, *, network: str,
              mac: str | None, peer: str, bandwidth: str = "") -> str:  # fmt: skip
    mac_el = f"<mac address='{mac}'/>" if mac else ""
    cmdline = f"{guest.cmdline} virtbus.dhcp=eth0 virtbus.ping={peer}"
    return f"""<domain type='qemu'>
  <name>{name}</name><uuid>{uuid}</uuid>
  <memory unit='MiB'>192</memory><vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{guest.kernel}</kernel><initrd>{guest.initramfs}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <devices>
    <interface type='network'>{mac_el}<source network='{network}'/><model type='virtio'/>
    {bandwidth}</interface>
    <controller type='pci' model='pcie-root'/>
    <controller type='pci' model='pcie-root-port'/>
    <controller type='pci' model='pcie-root-port'/>
    <controller type='pci' model='pcie-root-port'/>
    <controller type='pci' model='pcie-root-port'/>
    <controller type='pci' model='pcie-root-port'/>
    <controller type='pci' model='pcie-root-port'/>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
  </devices>
</domain>"""


METER_WINDOW = 1.5  # s
_ECHO_METER = """
import os, select, socket, struct, sys, time
dst, window = sys.argv[1], float(sys.argv[2])
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident, payload = os.getpid() & 0xFFFF, b"x" * 8000

def checksum(data):
    data += b"\\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF

got, seq, end = 0, 0, time.monotonic() + window
while time.monotonic() < end:
    seq = (seq + 1) & 0xFFFF
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    try:
        sock.sendto(struct.pack("!BBHHH", 8, 0, checksum(head + payload), ident, seq)
                    + payload, (dst, 0))
    except OSError:  # ENOBUFS: the shaped tap's queue is full, as it should be
        pass
    while select.select([sock], [], [], 0.001)[0]:
        packet = sock.recv(65535)
        icmp = packet[(packet[0] & 0x0F) * 4:]
        if icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
            got += len(icmp) - 8
print(got)
"""


def network_xml(name: str, subnet: str, hosts: dict[str, str]) -> str:
    reserved = "".join(f"<host mac='{mac}' ip='{ip}'/>" for mac, ip in hosts.items())
    return (
        f"<network><name>{name}</name><forward mode='nat'/>"
        f"<ip address='{subnet}.1' netmask='255.255.255.0'><dhcp>"
        f"<range start='{subnet}.100' end='{subnet}.150'/>{reserved}</dhcp></ip></network>"
    )


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


async def console(path: Path, pattern: str, *, after: int = 0, count: int = 1,
                  timeout: float = WAIT) -> str:  # fmt: skip
    """The ``count``-th match of ``pattern`` on a serial console, past offset ``after``."""
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while True:
        text = (await asyncio.to_thread(read, path))[after:]
        found = list(regex.finditer(text))
        if len(found) >= count:
            return found[count - 1].group(0)
        assert time.monotonic() < deadline, f"{pattern!r} not on {path}:\n{text[-1500:]}"
        await asyncio.sleep(0.2)


@dataclass
class Guest:
    name: str
    uuid: str
    mac: str
    ip: str
    serial: Path


@dataclass
class Bed:
    host: str
    base: Path
    topo: Topology
    guests: tuple[Guest, Guest]
    restart: Callable[[], Awaitable[None]]  # the agent (SIGTERM, then a new one)

    async def run(self, *args: str) -> tuple[int, str, str]:
        i = 1 if args[0] != "--json" else 2
        r = await cli(*args[:i], "--host", self.host, *args[i:])
        return r.code, r.out, r.err

    async def ok(self, *args: str) -> str:
        code, out, err = await self.run(*args)
        assert code == 0, (args, err)
        return out

    async def fails(self, code: str, *args: str) -> str:
        rc, _, err = await self.run(*args)
        assert rc == 1 and err.startswith(f"error: {code}: "), (args, rc, err)
        await self.ok("list")  # ... and the agent still serves
        return err

    async def ports(self) -> dict[str, dict[str, Any]]:
        """net-port-list of gn, by MAC."""
        return {p["mac"]: p for p in json.loads(await self.ok("--json", "net-port-list", "gn"))}

    def file(self, name: str, text: str) -> str:
        path = self.base / name
        path.write_text(text)
        return str(path)

    def bridge_ports(self, bridge: str = "") -> list[str]:
        out = self.topo.host_run("ip", "-o", "link", "show", "master", bridge or self.bridge)
        return [line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()]

    def taps(self) -> list[str]:
        out = self.topo.host_run("ip", "-o", "link", "show", "type", "tun").stdout
        return [line.split(":")[1].strip() for line in out.splitlines()]

    def htb(self, tap: str) -> str | None:
        """The tap's HTB class (``rate .. ceil .. burst ..``), or None without an HTB root
        (``tc -j`` for the qdisc; this iproute2 prints HTB classes only as text)."""
        qdiscs = json.loads(self.topo.host_run("tc", "-j", "qdisc", "show", "dev", tap).stdout)
        if not any(q["kind"] == "htb" and q.get("root") for q in qdiscs):
            return None
        out = self.topo.host_run("tc", "class", "show", "dev", tap, "classid", "1:1").stdout
        found = re.search(r"rate \S+ ceil \S+ burst \S+", out)
        assert found, out
        return found.group(0)

    def policer(self, tap: str) -> dict[str, Any] | None:
        """The ``limit`` of the tap's policing table (``nft -j``), or None without one."""
        done = self.topo.host_run("nft", "-j", "list", "table", "netdev", tap_table(tap),
                                  check=False)  # fmt: skip
        if done.returncode != 0:
            return None
        rules = [o["rule"] for o in json.loads(done.stdout)["nftables"] if "rule" in o]
        (limit,) = [e["limit"] for r in rules for e in r["expr"] if "limit" in e]
        assert f'device "{tap}"' in self.topo.host_run("nft", "list", "table", "netdev",
                                                      tap_table(tap)).stdout  # fmt: skip
        return dict(limit)

    def tap_tables(self) -> list[str]:
        out = self.topo.host_run("nft", "-j", "list", "tables", "netdev").stdout
        found = [o["table"]["name"] for o in json.loads(out)["nftables"] if "table" in o]
        return [str(n) for n in found if str(n).startswith(tap_table(""))]

    async def echoes(self, ip: str) -> int:
        """Bytes of ICMP echo replies from ``ip`` in METER_WINDOW, 8000-byte requests sent
        every millisecond from the host namespace (both directions of the guest's NIC)."""
        meter = self.base / "echo_meter.py"
        meter.write_text(_ECHO_METER)
        done = await asyncio.to_thread(self.topo.host_run, sys.executable, str(meter), ip,
                                       str(METER_WINDOW))  # fmt: skip
        return int(done.stdout.strip())

    bridge: str = ""


class Events:
    """One domain's events as a bus subscriber sees them."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    async def wait(self, event: str) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            while True:
                found = [e for e in self.seen if e["event"] == event]
                if found:
                    return found[0]
                self.changed.clear()
                await self.changed.wait()


@asynccontextmanager
async def domain_events(host: str, domain: str) -> AsyncIterator[Events]:
    bus = open_bus(BUS_URL, src="test")
    await bus.connect()
    sub = await bus.subscribe(EVENTS_EXCHANGE, [f"{routing_word(host)}.{routing_word(domain)}.#"])
    events = Events()

    async def pump() -> None:
        async for env in sub:
            events.seen.append(env.body)
            events.changed.set()

    pumping = asyncio.create_task(pump())
    try:
        yield events
    finally:
        pumping.cancel()
        await sub.close()
        await bus.close()


@pytest.fixture(scope="module")
def guest() -> TestGuest:
    return build_test_guest()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bed(guest: TestGuest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Bed]:
    root = tmp_path_factory.mktemp("gnet")
    topo = Topology(root)
    topo.up()
    host = unique_host("gnet")
    base = root / "agent"
    base.mkdir()
    config = root / "agent.toml"
    config.write_text(f'[network]\nnamespace = "{topo.host}"\n')
    u1, u2 = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    g1 = Guest("gn-1", u1, "52:54:00:81:00:01", f"{SUBNET}.11", root / "gn-1.serial")
    # gn-2 names no MAC: the one the agent generates is written back (and reserved here)
    g2 = Guest("gn-2", u2, generated_mac("52:54:00", u2, 0), f"{SUBNET}.12", root / "gn-2.serial")
    running: list[contextlib.AbstractAsyncContextManager[object]] = []

    async def start_agent() -> None:
        agent = agent_process(host, base, "--config", str(config), driver="qemu",
                              allowed_dirs=qemu_allowed_dirs(root))  # fmt: skip
        await agent.__aenter__()
        running.append(agent)

    async def stop_agent() -> None:
        await running.pop().__aexit__(None, None, None)  # SIGTERM: guests keep running

    async def restart() -> None:
        await stop_agent()
        await start_agent()

    bed = Bed(host, root, topo, (g1, g2), restart=restart)
    try:
        await start_agent()
        await bed.ok("net-define", bed.file("gn.xml", network_xml(
            "gn", SUBNET, {g1.mac: g1.ip, g2.mac: g2.ip})))  # fmt: skip
        await bed.ok("net-start", "gn")
        bed.bridge = str(json.loads(await bed.ok("--json", "net-info", "gn"))["bridge"])
        for me, peer in ((g1, g2), (g2, g1)):
            xml = guest_xml(guest, me.name, me.uuid, me.serial, network="gn",
                            mac=me.mac if me is g1 else None, peer=peer.ip,
                            bandwidth=G2_BANDWIDTH if me is g2 else "")  # fmt: skip
            await bed.ok("define", bed.file(f"{me.name}.xml", xml))
            await bed.ok("start", me.name)
        yield bed
    finally:
        try:
            if running:
                for name in ("gn-1", "gn-2", "gn-bad"):
                    await cli("destroy", name, "--host", host)
                await stop_agent()
        finally:
            kill_qemus_under(root)  # what the agent could not reach
            topo.down()


def kill_qemus_under(root: Path) -> None:
    """SIGKILL every QEMU whose command line names ``root`` (ours only)."""
    needle = str(root).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and os.path.basename(cmdline.split(b"\0", 1)[0]).startswith(b"qemu"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)


async def test_two_guests_on_a_nat_network_get_leases_and_ping_each_other(bed: Bed) -> None:
    g1, g2 = bed.guests
    for me, peer in ((g1, g2), (g2, g1)):
        assert await console(me.serial, r"VIRTBUS-LEASE eth0 \S+") == f"VIRTBUS-LEASE eth0 {me.ip}"
        await console(me.serial, rf"VIRTBUS-PING-OK {re.escape(peer.ip)} \d+")
    # each NIC is a tap of the agent's on the network's bridge, handed to QEMU as an fd
    taps = {}
    for g in (g1, g2):
        live = await bed.ok("dumpxml", g.name)
        found = re.search(rf"<target dev='({tap_prefix(g.uuid)}\d+)'/>", live)
        assert found, live
        taps[g.name] = found.group(1)
    assert sorted(bed.bridge_ports()) == sorted(taps.values())
    assert sorted(bed.taps()) == sorted(taps.values())
    # the generated MAC was written back into gn-2's persistent definition
    (saved,) = (bed.base / "agent").rglob(f"domains/{g2.uuid}.xml")
    assert f"<mac address='{g2.mac}'/>" in saved.read_text()
    leases = json.loads(await bed.ok("--json", "net-dhcp-leases", "gn"))
    assert {(x["mac"], x["ip"]) for x in leases} >= {(g1.mac, g1.ip), (g2.mac, g2.ip)}


async def test_bad_networks_at_start_leave_nothing_behind(bed: Bed, guest: TestGuest) -> None:
    serial = bed.base / "gn-bad.serial"
    uuid = str(uuidlib.uuid4())
    before = sorted(bed.taps())
    xml = guest_xml(guest, "gn-bad", uuid, serial, network="nowhere", mac=None, peer="10.0.0.1")
    await bed.ok("define", bed.file("gn-bad.xml", xml))  # libvirt too defines it: start says
    err = await bed.fails("NO_NETWORK", "start", "gn-bad")
    assert "'nowhere'" in err and "gn-bad" in err, err
    assert "shut off" in await bed.ok("domstate", "gn-bad")
    assert sorted(bed.taps()) == before
    await bed.ok("undefine", "gn-bad")
    # an inactive network: OPERATION_INVALID, named
    await bed.ok("net-define", bed.file("off.xml", network_xml("gn-off", "10.82.0", {})))
    xml = guest_xml(guest, "gn-bad", uuid, serial, network="gn-off", mac=None, peer="10.0.0.1")
    await bed.ok("define", bed.file("gn-bad.xml", xml))
    err = await bed.fails("OPERATION_INVALID", "start", "gn-bad")
    assert "network 'gn-off' is not active" in err, err
    assert "shut off" in await bed.ok("domstate", "gn-bad")
    assert sorted(bed.taps()) == before
    await bed.ok("undefine", "gn-bad")
    await bed.ok("net-undefine", "gn-off")
    # a network with running guests is not destroyed unless forced
    err = await bed.fails("OPERATION_INVALID", "net-destroy", "gn")
    assert all(tap in err for tap in bed.taps()), err


async def test_domiflist_domifaddr_and_links(bed: Bed) -> None:
    g1, g2 = bed.guests
    listing = json.loads(await bed.ok("--json", "domiflist", g1.name))
    assert [(r["type"], r["source"], r["model"], r["mac"]) for r in listing] == [
        ("network", "gn", "virtio", g1.mac)
    ]
    tap = listing[0]["interface"]
    assert tap in bed.bridge_ports()
    assert tap in await bed.ok("domiflist", g1.name)
    addrs = json.loads(await bed.ok("--json", "domifaddr", g1.name))
    assert addrs == [{"name": tap, "hwaddr": g1.mac,
                      "addrs": [{"type": "ipv4", "addr": g1.ip, "prefix": 24}]}]  # fmt: skip
    assert f"{g1.ip}/24" in await bed.ok("domifaddr", g1.name)
    err = await bed.fails("NO_SUPPORT", "domifaddr", g1.name, "--source", "agent")
    assert "guest agent" in err
    # the link cut with QMP set_link: the peer's pings fail, then come back
    assert (await bed.ok("domif-getlink", g1.name, tap)).split() == [tap, "up"]
    await bed.ok("domif-setlink", g1.name, tap, "down")
    assert (await bed.ok("domif-getlink", g1.name, g1.mac)).split() == [g1.mac, "down"]
    mark = len(read(g2.serial))
    await console(g2.serial, rf"VIRTBUS-PING-FAIL {re.escape(g1.ip)} \d+", after=mark)
    await bed.ok("domif-setlink", g1.name, tap, "up")
    mark = len(read(g2.serial))
    await console(g2.serial, rf"VIRTBUS-PING-OK {re.escape(g1.ip)} \d+", after=mark)
    await bed.fails("OPERATION_FAILED", "domif-setlink", g1.name, "vnet99", "down")


async def test_a_nic_attached_live_shows_up_in_the_guest_and_detaches(bed: Bed) -> None:
    g1, _ = bed.guests
    before = sorted(bed.bridge_ports())
    async with domain_events(bed.host, g1.name) as events:
        mark = len(read(g1.serial))
        out = await bed.ok("attach-interface", g1.name, "network", "gn", "--model", "virtio",
                           "--live")  # fmt: skip
        assert "Interface attached successfully" in out
        await console(g1.serial, r"VIRTBUS-NICS eth0 eth1", after=mark)
        listing = json.loads(await bed.ok("--json", "domiflist", g1.name))
        assert len(listing) == 2 and listing[1]["source"] == "gn"
        new_tap, new_mac = listing[1]["interface"], listing[1]["mac"]
        assert new_mac.startswith("52:54:00:") and new_mac != g1.mac
        assert sorted(bed.bridge_ports()) == sorted([*before, new_tap])
        added = await events.wait("device_added")
        assert added["data"]["mac"] == new_mac
        # the plugged NIC is a port of gn, owned by gn-1, on gn's bridge
        port = (await bed.ports())[new_mac]
        assert (port["domain"], port["domain_uuid"], port["plug"], port["bridge"]) == (
            g1.name, g1.uuid, "network", bed.bridge)  # fmt: skip
        xml = await bed.ok("net-port-dumpxml", "gn", port["uuid"])
        assert f"<mac address='{new_mac}'/>" in xml and f"<uuid>{g1.uuid}</uuid>" in xml
        assert f"<plug type='network' bridge='{bed.bridge}'/>" in xml
        # --live only: the definition has one NIC still
        (saved,) = (bed.base / "agent").rglob(f"domains/{g1.uuid}.xml")
        assert new_mac not in saved.read_text()
        mark = len(read(g1.serial))
        out = await bed.ok("detach-interface", g1.name, "network", "--mac", new_mac, "--live")
        assert "Interface detached successfully" in out
        await console(g1.serial, r"VIRTBUS-NICS eth0\r?\n", after=mark)
        await events.wait("device_removed")
    assert sorted(bed.bridge_ports()) == before
    assert len(json.loads(await bed.ok("--json", "domiflist", g1.name))) == 1
    assert new_mac not in await bed.ports()  # unplugged: the port is gone
    await bed.fails("NO_NETWORK_PORT", "net-port-dumpxml", "gn", port["uuid"])
    # no NIC of that type: refused, nothing changed
    err = await bed.fails("OPERATION_FAILED", "detach-interface", g1.name, "bridge")
    assert "No interface found whose type is bridge" in err


def tune_values(out: str) -> dict[str, int]:
    """domiftune's listing (virsh's ``%-15s: %s``) as a dict."""
    return {k.strip(): int(v) for k, v in (line.split(":") for line in out.splitlines())}


LIMIT = 32  # kilobytes/s: a few dozen 8000-byte echoes in a window, against hundreds


async def test_bandwidth_on_the_taps_and_domiftune(bed: Bed, guest: TestGuest) -> None:
    g1, g2 = bed.guests
    tap1, tap2 = [json.loads(await bed.ok("--json", "domiflist", g.name))[0]["interface"]
                  for g in (g1, g2)]  # fmt: skip
    # gn-2 started shaped: HTB on its tap's egress (the guest's inbound), a policer on the
    # tap's ingress (its outbound) whose burst is libvirt's default, the average's worth
    assert bed.htb(tap2) == "rate 8Mbit ceil 16Mbit burst 256Kb"
    assert bed.policer(tap2) == {"rate": 800, "burst": 800, "per": "second", "inv": True,
                                 "rate_unit": "kbytes", "burst_unit": "kbytes"}  # fmt: skip
    assert tune_values(await bed.ok("domiftune", g2.name, tap2)) == {
        "inbound.average": 1000, "inbound.peak": 2000, "inbound.burst": 256,
        "inbound.floor": 0, "outbound.average": 800, "outbound.peak": 0, "outbound.burst": 0,
    }  # fmt: skip
    # gn-1 has none; unshaped, a window carries many echoes (the premise)
    assert bed.htb(tap1) is None and bed.policer(tap1) is None
    await console(g1.serial, rf"VIRTBUS-LEASE eth0 {re.escape(g1.ip)}")  # it is up
    fast = await bed.echoes(g1.ip)
    assert fast > 20 * LIMIT * 1024 * METER_WINDOW, fast
    # domiftune --live: the guest's inbound alone, then its outbound alone
    await bed.ok("domiftune", g1.name, tap1, "--inbound", f"{LIMIT},{LIMIT},16", "--live")
    assert bed.htb(tap1) == "rate 256Kbit ceil 256Kbit burst 16Kb"
    assert bed.policer(tap1) is None
    slow_in = await bed.echoes(g1.ip)
    await bed.ok("domiftune", g1.name, g1.mac, "--inbound", "0", "--outbound", str(LIMIT))
    assert bed.htb(tap1) is None
    assert (bed.policer(tap1) or {})["rate"] == LIMIT  # burst: 128 KiB at least (GSO)
    slow_out = await bed.echoes(g1.ip)
    print("echo bytes in a window: unshaped, inbound-, outbound-limited", fast, slow_in, slow_out)
    assert 0 < slow_in * 5 < fast and 0 < slow_out * 5 < fast, (fast, slow_in, slow_out)
    # and roughly the rates asked for (generous: the burst, the window's edges)
    assert slow_in < 3 * LIMIT * 1024 * METER_WINDOW, slow_in
    assert slow_out < 3 * LIMIT * 1024 * METER_WINDOW + 128 * 1024, slow_out
    assert tune_values(await bed.ok("domiftune", g1.name, tap1))["outbound.average"] == LIMIT
    # --live only: the definition has no limits; --config changes only the definition
    config = await bed.ok("domiftune", g1.name, g1.mac, "--config")  # no tap in a definition
    assert set(tune_values(config).values()) == {0}
    await bed.ok("domiftune", g1.name, g1.mac, "--outbound", "500", "--config")
    (saved,) = (bed.base / "agent").rglob(f"domains/{g1.uuid}.xml")
    assert "<outbound average='500'/>" in saved.read_text()
    assert (bed.policer(tap1) or {})["rate"] == LIMIT
    # bad input: clear codes, nothing changed, the agent still serves (fails checks it)
    for code, args, words in (
        ("INVALID_ARG", ("--inbound", "abc"), "malformed rate string 'abc'"),
        ("INVALID_ARG", ("--inbound", "-5"), "malformed rate string"),
        ("INVALID_ARG", ("--inbound", "0,100"), "inbound average"),
        ("INVALID_ARG", ("--outbound", "100,50"), "below its average"),
        ("CONFIG_UNSUPPORTED", ("--inbound", "100,,,10"), "floor"),
    ):
        assert words in await bed.fails(code, "domiftune", g1.name, tap1, *args, "--live")
    err = await bed.fails("INVALID_ARG", "domiftune", g1.name, "vnet99", "--inbound", "100")
    assert "'vnet99' is not a known interface" in err, err
    assert bed.htb(tap1) is None and (bed.policer(tap1) or {})["rate"] == LIMIT
    await bed.ok("domiftune", g1.name, tap1, "--outbound", "0", "--live")
    assert bed.policer(tap1) is None and tap_table(tap1) not in bed.tap_tables()
    # a NIC plugged shaped has its limits from the start; unplugged, its table goes too
    mark = len(read(g1.serial))
    await bed.ok("attach-interface", g1.name, "network", "gn", "--model", "virtio",
                 "--inbound", "64", "--outbound", "48", "--live")  # fmt: skip
    await console(g1.serial, r"VIRTBUS-NICS eth0 eth1", after=mark)
    new = json.loads(await bed.ok("--json", "domiflist", g1.name))[1]
    assert (bed.htb(new["interface"]) or "").startswith("rate 512Kbit ceil 512Kbit")
    assert (bed.policer(new["interface"]) or {})["burst"] == 128
    mark = len(read(g1.serial))
    await bed.ok("detach-interface", g1.name, "network", "--mac", new["mac"], "--live")
    await console(g1.serial, r"VIRTBUS-NICS eth0\r?\n", after=mark)
    assert tap_table(new["interface"]) not in bed.tap_tables()
    # bad <bandwidth> at define: XML_ERROR; on a NIC virtbus has no tap for: refused
    uuid = str(uuidlib.uuid4())
    xml = guest_xml(
        guest,
        "gn-bad",
        uuid,
        bed.base / "gn-bad.serial",
        network="gn",
        mac=None,
        peer="10.0.0.1",
        bandwidth="<bandwidth><inbound average='0'/></bandwidth>",
    )
    await bed.fails("XML_ERROR", "define", bed.file("gn-bad.xml", xml))
    xml = guest_xml(guest, "gn-bad", uuid, bed.base / "gn-bad.serial", network="gn", mac=None,
                    peer="10.0.0.1", bandwidth=G2_BANDWIDTH).replace(
        "type='network'>", "type='user'>").replace("<source network='gn'/>", "")  # fmt: skip
    err = await bed.fails("CONFIG_UNSUPPORTED", "define", bed.file("gn-bad.xml", xml))
    assert "<bandwidth>" in err, err


async def test_an_agent_restart_leaves_the_guests_pinging(bed: Bed) -> None:
    """Last in the module: it ends with gn-2 destroyed by the new agent."""
    g1, g2 = bed.guests
    taps = sorted(bed.taps())
    marks = [len(read(g.serial)) for g in (g1, g2)]
    ports = await bed.ports()
    assert set(ports) == {g1.mac, g2.mac}
    await bed.restart()
    assert sorted(bed.taps()) == taps  # the same taps: nothing was rebuilt
    assert await bed.ports() == ports  # and the same ports, uuids and all
    for g, peer, mark in ((g1, g2, marks[0]), (g2, g1, marks[1])):
        # two answers after the restart's, and no silence at all since the restart began
        await console(g.serial, rf"VIRTBUS-PING-OK {re.escape(peer.ip)} \d+", after=mark, count=3)
        assert "VIRTBUS-PING-FAIL" not in read(g.serial)[mark:]
    # the new agent knows the taps it did not make: destroy removes gn-2's
    (tap2,) = [t for t in taps if t.startswith(tap_prefix(g2.uuid))]
    await bed.ok("destroy", g2.name)
    assert tap2 not in bed.taps() and tap2 not in bed.bridge_ports()
    assert tap_table(tap2) not in bed.tap_tables()  # its policing table went with it
    assert set(await bed.ports()) == {g1.mac}  # gn-2's port went with it
