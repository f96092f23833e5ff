"""Virtual networks through a real agent process, the real CLI and the real RabbitMQ, with
real bridges, nftables and dnsmasq inside namespaces the fixtures make: virsh's net-*
verbs end to end, DHCP leases and DNS answered by dnsmasq to a client namespace,
masquerade to an upstream namespace (and isolation from it), lifecycle events on the bus,
an agent restart that adopts a running network without a lost ping, a dnsmasq that dies
and is restarted, and every bad input answered with its code by an agent that still
serves afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.network.conftest import UPSTREAM, Topology, nat_xml
from tests.procs import BUS_URL, agent_process, cli, unique_host
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import EVENTS_EXCHANGE
from virtbus.protocol import ops
from virtbus.protocol.envelope import Envelope
from virtbus.settings import BusSettings

pytestmark = [pytest.mark.rabbitmq, pytest.mark.network]


@dataclass
class Env:
    host: str
    base: Path
    topo: Topology

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
        await self.ok("net-list", "--all")  # ... and the agent still serves
        return err

    def file(self, name: str, text: str) -> str:
        path = self.base / name
        path.write_text(text)
        return str(path)

    async def info(self, net: str) -> dict[str, object]:
        return dict(json.loads(await self.ok("--json", "net-info", net)))

    def dnsmasq_pid(self, uuid: str) -> int:
        return int((self.base / "run" / "networks" / uuid / "dnsmasq.pid").read_text())


@asynccontextmanager
async def agent(host: str, base: Path, topo: Topology) -> AsyncIterator[None]:
    config = base / "agent.toml"
    config.write_text(f'[network]\nnamespace = "{topo.host}"\n')
    async with agent_process(host, base, "--config", str(config)):
        yield


@pytest.fixture
async def env(rabbitmq: None, topo: Topology, tmp_path: Path) -> AsyncIterator[Env]:
    host = unique_host("net")
    async with agent(host, tmp_path, topo):
        yield Env(host, tmp_path, topo)


async def events_of(host: str) -> tuple[object, object]:
    listener = open_bus(BUS_URL, src="test", settings=BusSettings(url=BUS_URL))
    await listener.connect()
    sub = await listener.subscribe(EVENTS_EXCHANGE, [f"{host}.network.*.*"])
    return listener, sub


async def next_events(sub: object, count: int, timeout: float = 20.0) -> list[tuple[str, str]]:
    got: list[tuple[str, str]] = []
    async with asyncio.timeout(timeout):
        async for env in sub:  # type: ignore[attr-defined]
            assert isinstance(env, Envelope) and env.op == ops.EVENT_NETWORK
            got.append((env.body["network"], env.body["event"]))
            if len(got) == count:
                return got
    return got


async def leases(env: Env, net: str, want: int) -> list[dict[str, object]]:
    """net-dhcp-leases once ``want`` leases are in (dnsmasq writes its file after the ACK;
    the agent's inotify watch picks it up at once)."""
    async with asyncio.timeout(10):
        while True:
            got = json.loads(await env.ok("--json", "net-dhcp-leases", net))
            if len(got) >= want:
                return list(got)
            await asyncio.sleep(0.05)


async def validates(path: str) -> bool:
    done = await asyncio.to_thread(subprocess.run, ["virt-xml-validate", path, "network"],
                                   capture_output=True)  # fmt: skip
    return done.returncode == 0


async def test_nat_network_verbs_dhcp_dns_masquerade_and_events(env: Env) -> None:
    listener, sub = await events_of(env.host)
    try:
        out = await env.ok("net-define", env.file("nat.xml", nat_xml("nat1")))
        assert out.strip() == f"Network nat1 defined from {env.base / 'nat.xml'}"
        listed = await env.ok("net-list", "--all")
        assert "nat1" in listed and "inactive" in listed
        assert "nat1" not in await env.ok("net-list")  # active ones only
        xml = await env.ok("net-dumpxml", "nat1")
        assert "<bridge name='virbr0'" in xml and "<mac address='52:54:00:" in xml
        assert await validates(env.file("dump.xml", xml)), xml
        uuid = (await env.ok("net-uuid", "nat1")).strip()
        assert (await env.ok("net-name", uuid)).strip() == "nat1"
        assert (await env.ok("net-start", uuid)).strip() == f"Network {uuid} started"
        assert "Network nat1 marked as autostarted" in await env.ok("net-autostart", "nat1")
        info = await env.info("nat1")
        assert info["active"] and info["autostart"] and info["bridge"] == "virbr0"
        text = await env.ok("net-info", "nat1")
        assert "Active:" in text and "Bridge:" in text and "virbr0" in text

        assert f"virtbus_{uuid.replace('-', '')[:16]}" in env.topo.nft_tables()
        guest = env.topo.client("virbr0")
        fixed = env.topo.client("virbr0", mac="52:54:00:00:00:09")
        ip = await guest.dhcp()
        assert ip.startswith("10.77.0.") and 100 <= int(ip.rsplit(".", 1)[1]) <= 150
        assert await fixed.dhcp() == "10.77.0.9"  # the <host> reservation
        got = await leases(env, "nat1", 2)
        assert {(g["mac"], g["ip"]) for g in got} == {(guest.mac, ip), (fixed.mac, "10.77.0.9")}
        only = json.loads(await env.ok("--json", "net-dhcp-leases", "nat1", "--mac", guest.mac))
        assert [g["ip"] for g in only] == [ip]
        assert "10.77.0.9/24" in await env.ok("net-dhcp-leases", "nat1")
        # DNS from dnsmasq on the bridge: the <dns><host> entry
        answer = guest.run("busybox", "nslookup", "fixed.test", "10.77.0.1").stdout
        assert "10.77.0.9" in answer, answer
        # guests reach each other over the bridge, and upstream through the masquerade
        assert await guest.ping("10.77.0.9")
        assert await guest.ping(UPSTREAM)
        # in use: refused, named; forced: stopped and everything gone
        err = await env.fails("OPERATION_INVALID", "net-destroy", "nat1")
        assert guest.port in err and fixed.port in err
        assert "destroyed" in await env.ok("net-destroy", "nat1", "--force")
        assert env.topo.ifindex("virbr0") is None
        assert not any(t.startswith("virtbus_") for t in env.topo.nft_tables())
        assert not (await env.info("nat1"))["active"]
        await env.fails("OPERATION_INVALID", "net-dhcp-leases", "nat1")
        assert "undefined" in await env.ok("net-undefine", "nat1")
        await env.fails("NO_NETWORK", "net-info", "nat1")
        events = await next_events(sub, 4)
        assert events == [("nat1", "defined"), ("nat1", "started"), ("nat1", "stopped"),
                          ("nat1", "undefined")]  # fmt: skip
    finally:
        await listener.close()  # type: ignore[attr-defined]


async def test_isolated_network_does_not_reach_upstream(env: Env) -> None:
    await env.ok("net-create", env.file("iso.xml", nat_xml("iso", "10.78.0", mode=None)))
    info = await env.info("iso")
    assert info["active"] and not info["persistent"] and info["forward"] == "isolated"
    a, b = env.topo.client(str(info["bridge"])), env.topo.client(str(info["bridge"]))
    await a.dhcp()
    await b.dhcp()
    (lease_b,) = [g for g in await leases(env, "iso", 2) if g["mac"] == b.mac]
    assert await a.ping(str(lease_b["ip"]))  # neighbours on the bridge
    assert await a.ping("10.78.0.1")  # the host's own address on it
    assert not await a.ping(UPSTREAM)  # nothing forwarded out
    a.unplug()
    b.unplug()
    await env.ok("net-destroy", "iso")  # nothing on the bridge any more: no force needed
    await env.fails("NO_NETWORK", "net-info", "iso")  # transient: gone with it


async def test_route_open_and_bridge_modes(env: Env) -> None:
    topo = env.topo
    # route: no NAT, so upstream needs a route back to the subnet
    await env.ok("net-create", env.file("r.xml", nat_xml("routed", "10.79.0", mode="route")))
    topo.upstream_run("ip", "route", "add", "10.79.0.0/24", "via", "198.51.100.2")
    # plugged now, leased after the other modes: its bridge port's STP listening/learning
    # (2 x 2 s) passes while they run
    c = topo.client(str((await env.info("routed"))["bridge"]))
    # open: a bridge with its address and DHCP, and no firewall table of ours
    await env.ok("net-create", env.file("o.xml", nat_xml("opened", "10.80.0", mode="open")))
    tables = topo.nft_tables()
    assert len([t for t in tables if t.startswith("virtbus_")]) == 1, tables  # routed's only
    # bridge: an existing bridge, left alone by destroy; a missing one refused at start
    topo.host_run("ip", "link", "add", "br-ext", "type", "bridge")
    index = topo.ifindex("br-ext")
    xml = "<network><name>ext</name><forward mode='bridge'/><bridge name='br-ext'/></network>"
    await env.ok("net-define", env.file("b.xml", xml))
    assert await validates(env.file("bd.xml", await env.ok("net-dumpxml", "ext")))
    await env.ok("net-start", "ext")
    await env.ok("net-destroy", "ext")
    assert topo.ifindex("br-ext") == index
    missing = xml.replace("br-ext", "br-none").replace(">ext<", ">ext2<")
    await env.ok("net-define", env.file("m.xml", missing))
    err = await env.fails("OPERATION_FAILED", "net-start", "ext2")
    assert "br-none" in err and "does not exist" in err
    await c.dhcp()
    assert await c.ping(UPSTREAM)  # routed, with no NAT
    c.unplug()
    for name in ("routed", "opened"):
        await env.ok("net-destroy", name)


async def test_bad_input_is_refused_with_its_code(env: Env) -> None:
    await env.ok("net-define", env.file("a.xml", nat_xml("first", "10.81.0", bridge="vbfirst")))
    # a subnet overlapping another network's, named
    err = await env.fails("OPERATION_FAILED", "net-define",
                          env.file("o.xml", nat_xml("second", "10.81.0")))  # fmt: skip
    assert "'first'" in err and "10.81.0.0/24" in err
    # a bridge name longer than 15 bytes
    err = await env.fails("XML_ERROR", "net-define", env.file(
        "l.xml", nat_xml("long", "10.82.0", bridge="a-very-long-bridge")))  # fmt: skip
    assert "15" in err
    # a bridge name another network has
    err = await env.fails(
        "OPERATION_FAILED",
        "net-define",
        env.file("b.xml", nat_xml("dup", "10.83.0", bridge="vbfirst")),
    )
    assert "'first'" in err
    # a bridge name that exists already, someone else's: refused at start, and left alone
    env.topo.host_run("ip", "link", "add", "vbtaken", "type", "bridge")
    await env.ok("net-define", env.file("t.xml", nat_xml("taken", "10.84.0", bridge="vbtaken")))
    err = await env.fails("OPERATION_FAILED", "net-start", "taken")
    assert "vbtaken" in err and "already exists" in err
    assert env.topo.ifindex("vbtaken") is not None
    # a DHCP range outside its subnet
    outside = nat_xml("out", "10.85.0").replace("10.85.0.150", "10.86.0.150")
    err = await env.fails("XML_ERROR", "net-define", env.file("r.xml", outside))
    assert "outside its subnet 10.85.0.0/24" in err
    # a reserved host outside, a bad address, a bad MAC, an unknown mode, not XML
    for bad in (
        nat_xml("h", "10.87.0").replace("ip='10.87.0.9'", "ip='10.99.0.9'", 1),
        nat_xml("a", "10.87.0").replace("address='10.87.0.1'", "address='10.87.0.300'"),
        nat_xml("m", "10.87.0").replace("52:54:00:00:00:09", "01:00:00:00:00:09"),
        nat_xml("f", "10.87.0", mode="sideways"),
        "<network><name>x</name",
    ):
        await env.fails("XML_ERROR", "net-define", env.file("bad.xml", bad))
    await env.fails("NO_NETWORK", "net-start", "nosuch")
    await env.fails("OPERATION_INVALID", "net-destroy", "first")  # not active
    await env.fails("INVALID_ARG", "net-dhcp-leases", "first", "--mac", "zz")
    private = "<network><name>p</name><forward mode='private' dev='eth0'/></network>"
    await env.ok("net-define", env.file("p.xml", private))
    assert not (await env.info("p"))["supported"]
    await env.fails("NO_SUPPORT", "net-start", "p")


async def test_restart_adopts_a_running_network_and_dnsmasq_is_supervised(
    rabbitmq: None, topo: Topology, tmp_path: Path
) -> None:
    host = unique_host("netr")
    async with agent(host, tmp_path, topo):
        e = Env(host, tmp_path, topo)
        await e.ok("net-define", e.file("n.xml", nat_xml("keep", "10.90.0")))
        await e.ok("net-autostart", "keep")
        await e.ok("net-start", "keep")
        uuid = (await e.ok("net-uuid", "keep")).strip()
        before = (topo.ifindex("virbr0"), e.dnsmasq_pid(uuid))
        guest = topo.client("virbr0")
        # plugged now, leased after dnsmasq's restart: its bridge port's STP
        # listening/learning (2 x 2 s) passes while the agent is restarted
        other = topo.client("virbr0")
        await guest.dhcp()
    # no agent now: the network still carries traffic; a ping runs across the restart
    pinger = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", guest.ns, "busybox", "ping", "-n", "-i", "0.05", "-W", "1", UPSTREAM,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with agent(host, tmp_path, topo):
            e = Env(host, tmp_path, topo)
            assert (await e.info("keep"))["active"]
            assert (topo.ifindex("virbr0"), e.dnsmasq_pid(uuid)) == before  # adopted, untouched
            assert len(await leases(e, "keep", 1)) == 1
            # dnsmasq dies: the agent starts it again and says so on the bus
            listener, sub = await events_of(host)
            try:
                os.kill(before[1], signal.SIGKILL)
                assert await next_events(sub, 1) == [("keep", "dhcp-restarted")]
            finally:
                await listener.close()  # type: ignore[attr-defined]
            assert e.dnsmasq_pid(uuid) != before[1]
            assert (await other.dhcp()).startswith("10.90.0.")  # the new one serves
    finally:
        pinger.send_signal(signal.SIGINT)
        out, _ = await pinger.communicate()
    summary = out.decode().splitlines()
    stats = next(line for line in summary if "packets transmitted" in line)
    sent, received = (int(stats.split()[i]) for i in (0, 3))
    assert sent > 20 and received == sent, stats  # not one reply lost across the restart
