"""LXC networking: a veth onto a bridge, inside a network namespace this test makes and
deletes (the host's own interfaces are never touched); the agent runs every lxc command
in it (``--driver-option netns=NAME``) and reads the veth's counters for domstats."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.lxc_support import agent_options, cname, host_events, lxc_agent
from tests.guests.lxc import READY, LxcRootfs
from tests.procs import cli, unique_host

pytestmark = [pytest.mark.lxc, pytest.mark.rabbitmq]
BRIDGE = "vbtbr0"
HOST_IP, GUEST_IP = "10.213.7.1", "10.213.7.2"


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"vbt-{uuid.uuid4().hex[:8]}"
    assert ip("netns", "add", name).returncode == 0
    try:
        for cmd in (["link", "add", BRIDGE, "type", "bridge"],
                    ["addr", "add", f"{HOST_IP}/24", "dev", BRIDGE],
                    ["link", "set", BRIDGE, "up"], ["link", "set", "lo", "up"]):  # fmt: skip
            r = ip("-n", name, *cmd)
            assert r.returncode == 0, r.stderr
        yield name
    finally:
        ip("netns", "del", name)


async def ping(ns: str, address: str, count: int = 3) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, ["ip", "netns", "exec", ns, "busybox", "ping", "-c", str(count), "-W",
                         "1", address], capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def host_side(ns: str, dev: str) -> dict[str, dict[str, int]]:
    """The host side's own counters (``ip -s -j link``), as the kernel keeps them."""
    r = ip("-n", ns, "-s", "-j", "link", "show", dev)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)[0]["stats64"]
    return {"rx": stats["rx"], "tx": stats["tx"]}


async def blast(ns: str, address: str) -> None:
    code = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"for _ in range(40): s.sendto(b'x' * 1400, ('{address}', 9))")  # fmt: skip
    argv = ["ip", "netns", "exec", ns, sys.executable, "-c", code]
    r = await asyncio.to_thread(subprocess.run, argv, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr


async def test_veth_on_a_bridge_in_a_namespace(
    netns: str, lxc_root: Path, lxc_rootfs: LxcRootfs, rabbitmq: None
) -> None:
    host = unique_host("lxcn")
    base = Path(tempfile.mkdtemp(prefix="n", dir=lxc_root))
    c = cname("net")
    options = agent_options(lxc_rootfs, base, f"netns={netns}")
    iface = (f"<interface type='bridge'><source bridge='{BRIDGE}'/>"
             f"<ip address='{GUEST_IP}' family='ipv4' prefix='24'/>"
             f"<route family='ipv4' address='0.0.0.0' gateway='{HOST_IP}'/>"
             "</interface>")  # fmt: skip
    async with host_events(host) as events, lxc_agent(host, base, lxc_rootfs, events,
                                                      options) as h:  # fmt: skip
        assert (await ping(netns, GUEST_IP, 1)).returncode != 0  # the premise: nobody there yet
        await h.define(c, devices=iface, privnet=False)
        await h.ok("start", c)
        await h.wait_console(c, READY)
        xml = await h.ok("dumpxml", c)
        assert "<mac address='52:54:00:" in xml  # generated, written back
        veth = next(line.split("'")[1] for line in xml.splitlines() if "<target dev=" in line)
        link = ip("-n", netns, "-o", "link", "show", veth)
        assert f"master {BRIDGE}" in link.stdout, link.stdout + link.stderr
        assert ip("-o", "link", "show", veth).returncode != 0  # never on the host's own side
        result = await ping(netns, GUEST_IP)
        assert result.returncode == 0, result.stdout + result.stderr
        await blast(netns, GUEST_IP)  # 1400-byte datagrams in, small ICMP errors out
        before = host_side(netns, veth)
        stats = (await cli("--json", "domstats", c, "--group", "interface", "--host",
                           host)).json()[c]  # fmt: skip
        after = host_side(netns, veth)
        assert stats["net.count"] == 1 and stats["net.0.name"] == veth
        # swapped as libvirt does: what the host side sent, the container received
        assert before["tx"]["bytes"] <= stats["net.0.rx.bytes"] <= after["tx"]["bytes"], stats
        assert before["rx"]["bytes"] <= stats["net.0.tx.bytes"] <= after["rx"]["bytes"], stats
        assert stats["net.0.rx.bytes"] > 2 * stats["net.0.tx.bytes"]  # the premise: asymmetric
        assert stats["net.0.rx.pkts"] >= 20 and stats["net.0.tx.pkts"] >= 3, stats
        await h.ok("suspend", c)  # lxc's command socket lives in the namespace: still reached
        await h.ok("resume", c)
        await h.ok("destroy", c)
        await events.wait(c, "stopped", "destroyed")
        assert ip("-n", netns, "link", "show", veth).returncode != 0  # the veth went with it
        await h.ok("undefine", c)
