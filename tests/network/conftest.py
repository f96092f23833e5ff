"""Network namespaces for the network tests, made by fixtures and removed after them.

A test "host" is a namespace of its own (the agent's ``network.namespace``), joined by a
veth pair to an "upstream" namespace (198.51.100.1, the host's default route; it has no
route back to the guests' subnets, so only masqueraded traffic gets answers). A "client"
namespace stands in for a guest: a veth pair whose host end is put on a network's bridge,
and busybox's udhcpc, nslookup and ping inside it (iputils is not needed). Nothing here
touches the machine's own interfaces or routes: every link is created inside a namespace
this fixture made, and every process started inside them is ended (by pid) before they are
deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TOOLS = ("ip", "nft", "dnsmasq", "busybox", "virt-xml-validate")
UPSTREAM = "198.51.100.1"
HOST_UPLINK = "198.51.100.2"
_UDHCPC_SCRIPT = """#!/bin/sh
# udhcpc's hook: configure what the lease says (busybox's default script is not installed)
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    echo "$ip" > "$LEASE_OUT"
    ;;
esac
exit 0
"""


def need_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    assert not missing, f"missing tools (run deploy/setup-dev): {', '.join(missing)}"
    assert os.geteuid() == 0, "network tests create namespaces: run them as root"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check:
        assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done


@dataclass
class Client:
    """A namespace standing in for a guest, its ``eth0`` cabled to a bridge's port."""

    ns: str
    port: str  # the host-side end of the veth (what shows on the bridge)
    mac: str
    topo: Topology

    def run(self, *argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.ns, *argv, check=check)

    async def dhcp(self, timeout: int = 10) -> str:
        """A lease through udhcpc (returns once it is bound): the address it got."""
        out = self.topo.dir / f"{self.ns}.lease"
        script = self.topo.dir / "udhcpc.sh"
        env = {**os.environ, "LEASE_OUT": str(out)}
        done = await asyncio.to_thread(
            subprocess.run,
            ["ip", "netns", "exec", self.ns, "busybox", "udhcpc", "-i", "eth0", "-n", "-q",
             "-f", "-t", str(timeout), "-T", "1", "-s", str(script)],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"udhcpc in {self.ns}: {done.stdout}{done.stderr}"
        return out.read_text().strip()

    async def ping(self, address: str, count: int = 1, wait: int = 2) -> bool:
        done = await asyncio.to_thread(
            self.run, "busybox", "ping", "-n", "-c", str(count), "-W", str(wait), address
        )
        return done.returncode == 0

    def unplug(self) -> None:
        self.topo.host_run("ip", "link", "del", self.port)


@dataclass
class Topology:
    """The namespaces of one test (see module docstring)."""

    dir: Path
    tag: str = field(default_factory=lambda: uuidlib.uuid4().hex[:6])
    namespaces: list[str] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)

    @property
    def host(self) -> str:
        return f"vbh-{self.tag}"

    @property
    def upstream(self) -> str:
        return f"vbu-{self.tag}"

    def _add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")

    def upstream_run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.upstream, *argv)

    def host_run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.host, *argv, check=check)

    def up(self) -> None:
        need_tools()
        script = self.dir / "udhcpc.sh"
        script.write_text(_UDHCPC_SCRIPT)
        script.chmod(0o755)
        self._add_ns(self.host)
        self._add_ns(self.upstream)
        a, b = f"up-{self.tag}", f"dn-{self.tag}"
        sh("ip", "link", "add", a, "netns", self.host, "type", "veth", "peer", "name", b,
           "netns", self.upstream)  # fmt: skip
        self.host_run("ip", "link", "set", a, "name", "uplink")
        self.host_run("ip", "addr", "add", f"{HOST_UPLINK}/24", "dev", "uplink")
        self.host_run("ip", "link", "set", "uplink", "up")
        self.host_run("ip", "route", "add", "default", "via", UPSTREAM)
        up = ("ip", "netns", "exec", self.upstream)
        sh(*up, "ip", "link", "set", b, "name", "eth0")
        sh(*up, "ip", "addr", "add", f"{UPSTREAM}/24", "dev", "eth0")
        sh(*up, "ip", "link", "set", "eth0", "up")

    def client(self, bridge: str, mac: str | None = None) -> Client:
        """A new client namespace cabled to ``bridge`` in the host namespace."""
        n = len(self.clients)
        ns = f"vbc{n}-{self.tag}"
        self._add_ns(ns)
        port = f"vc{n}-{self.tag}"
        mac = mac or f"02:00:00:{n:02x}:{self.tag[:2]}:{self.tag[2:4]}"
        sh("ip", "link", "add", port, "netns", self.host, "type", "veth", "peer", "name",
           f"g{n}-{self.tag}", "netns", ns)  # fmt: skip
        inner = ("ip", "netns", "exec", ns)
        sh(*inner, "ip", "link", "set", f"g{n}-{self.tag}", "name", "eth0")
        sh(*inner, "ip", "link", "set", "eth0", "address", mac, "up")
        self.host_run("ip", "link", "set", port, "master", bridge, "up")
        client = Client(ns, port, mac, self)
        self.clients.append(client)
        return client

    def ifindex(self, name: str) -> int | None:
        done = self.host_run("cat", f"/sys/class/net/{name}/ifindex", check=False)
        return int(done.stdout) if done.returncode == 0 else None

    def nft_tables(self) -> list[str]:
        return [line.split()[-1] for line in
                self.host_run("nft", "list", "tables").stdout.splitlines()]  # fmt: skip

    def down(self) -> None:
        for ns in reversed(self.namespaces):
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:  # only processes started inside our own namespaces
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[Topology]:
    t = Topology(tmp_path)
    try:
        t.up()
        yield t
    finally:
        t.down()


def nat_xml(name: str, subnet: str = "10.77.0", *, mode: str | None = "nat",
            bridge: str | None = None, extra: str = "") -> str:  # fmt: skip
    fwd = f"<forward mode='{mode}'/>" if mode else ""
    br = f"<bridge name='{bridge}'/>" if bridge else ""
    return (
        f"<network><name>{name}</name>{fwd}{br}"
        f"<ip address='{subnet}.1' netmask='255.255.255.0'><dhcp>"
        f"<range start='{subnet}.100' end='{subnet}.150'/>"
        f"<host mac='52:54:00:00:00:09' name='fixed' ip='{subnet}.9'/>"
        f"</dhcp></ip><dns><host ip='{subnet}.9'><hostname>fixed.test</hostname></host></dns>"
        f"{extra}</network>"
    )
