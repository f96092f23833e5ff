"""dnsmasq for a network's DHCP and DNS, as libvirt runs it: one daemon per network,
bound to the bridge only (``bind-dynamic``, ``interface=``, never ``lo``), its ranges,
its reserved hosts (``dhcp-hostsfile``), its DNS hosts (``addn-hosts``), a lease file.

dnsmasq daemonizes and writes its pid file, so it outlives the agent that started it: a
restarted agent finds it by the pid file and checks the pid is still this network's
dnsmasq (its command line names this network's config file, and it is no zombie) before
adopting it. The agent watches it through a pidfd (:mod:`drivers.network.watch`) and
starts it again when it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from drivers.network.host import HostNet
from virtbus.errors import OperationFailed
from virtbus.network import NetworkDefinition
from virtbus.store import atomic_write

STOP_TIMEOUT = 5.0  # s a dnsmasq has to exit after SIGTERM


@dataclass(frozen=True, slots=True)
class DnsmasqFiles:
    """Where one network's dnsmasq keeps its files (``run`` is per network)."""

    run: Path

    @property
    def conf(self) -> Path:
        return self.run / "dnsmasq.conf"

    @property
    def pid(self) -> Path:
        return self.run / "dnsmasq.pid"

    @property
    def hosts(self) -> Path:
        return self.run / "dhcp-hosts"

    @property
    def addn_hosts(self) -> Path:
        return self.run / "dns-hosts"

    @property
    def leases(self) -> Path:
        return self.run / "dnsmasq.leases"


def wanted(defn: NetworkDefinition) -> bool:
    """libvirt runs dnsmasq for a managed network with an IPv4 address (DNS, and DHCP
    when it has ranges or hosts); open networks too, route ones too."""
    return defn.managed and defn.gateway and any(ip.family == "ipv4" for ip in defn.ips)


def config(defn: NetworkDefinition, bridge: str, files: DnsmasqFiles) -> str:
    lines = [
        f"##virtbus network {defn.name} {defn.uuid}",
        "strict-order",
        f"pid-file={files.pid}",
        "except-interface=lo",
        "bind-dynamic",
        f"interface={bridge}",
        "user=root",  # the lease file and pid file stay writable in the agent's state dir
        f"addn-hosts={files.addn_hosts}",
    ]
    if defn.domain:
        lines += [f"domain={defn.domain}", f"local=/{defn.domain}/", "expand-hosts"]
    v4 = next((ip for ip in defn.ips if ip.family == "ipv4" and (ip.ranges or ip.hosts)), None)
    if v4 is not None:
        assert isinstance(v4.network, ipaddress.IPv4Network)
        mask = v4.network.netmask
        size = 0
        for rng in v4.ranges:
            lines.append(f"dhcp-range={rng.start},{rng.end},{mask}")
            size += int(rng.end) - int(rng.start) + 1
        if not v4.ranges:  # reservations only: a static range, as libvirt writes it
            lines.append(f"dhcp-range={v4.network.network_address},static,{mask}")
        lines += [
            "dhcp-no-override",
            "dhcp-authoritative",
            f"dhcp-lease-max={max(size, 1) + len(v4.hosts)}",
            f"dhcp-hostsfile={files.hosts}",
            f"dhcp-leasefile={files.leases}",
        ]
    return "\n".join(lines) + "\n"


def hosts_file(defn: NetworkDefinition) -> str:
    out = []
    for ip in defn.ips:
        for host in ip.hosts:
            out.append(",".join(w for w in (host.mac, str(host.ip), host.name) if w))
    return "".join(f"{line}\n" for line in out)


def addn_hosts_file(defn: NetworkDefinition) -> str:
    return "".join(f"{h.ip} {' '.join(h.hostnames)}\n" for h in defn.dns_hosts)


def pid_alive(pid: int, files: DnsmasqFiles) -> bool:
    """``pid`` is a live dnsmasq of this network (not a zombie, not a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X"):
        return False
    return f"--conf-file={files.conf}".encode() in cmdline


def read_pid(files: DnsmasqFiles) -> int | None:
    """The pid of this network's running dnsmasq, or None."""
    try:
        pid = int(files.pid.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid, files) else None


async def start(
    net: HostNet, defn: NetworkDefinition, bridge: str, files: DnsmasqFiles, *, timeout: float
) -> int:
    """Write the config and start dnsmasq in the namespace; its pid. The first process
    exits once the daemon is set up (within ``timeout``), after it wrote its pid file."""
    await asyncio.to_thread(files.run.mkdir, parents=True, exist_ok=True)
    await atomic_write(files.hosts, hosts_file(defn).encode(), fsync=False)
    await atomic_write(files.addn_hosts, addn_hosts_file(defn).encode(), fsync=False)
    await atomic_write(files.conf, config(defn, bridge, files).encode(), fsync=False)
    with contextlib.suppress(FileNotFoundError):
        await asyncio.to_thread(files.pid.unlink)
    if not files.leases.exists():
        await atomic_write(files.leases, b"", fsync=False)
    await net.run(["dnsmasq", f"--conf-file={files.conf}"],
                  what=f"dnsmasq of network '{defn.name}'", timeout=timeout)  # fmt: skip
    pid = read_pid(files)
    if pid is None:
        raise OperationFailed(f"dnsmasq of network '{defn.name}' did not stay up")
    return pid


def needs_restart(old: NetworkDefinition, new: NetworkDefinition, bridge: str,
                  files: DnsmasqFiles) -> bool:  # fmt: skip
    """A change from ``old`` to ``new`` needs dnsmasq started again (its config changes:
    a range, DHCP turned on); else a SIGHUP that re-reads the hosts files is enough.
    ``dhcp-lease-max`` counts the hosts, but like libvirt a host added does not restart
    dnsmasq for it (the next start writes the new count)."""

    def significant(defn: NetworkDefinition) -> list[str]:
        return [line for line in config(defn, bridge, files).splitlines()
                if not line.startswith("dhcp-lease-max=")]  # fmt: skip

    return significant(old) != significant(new)


async def write_hosts(defn: NetworkDefinition, files: DnsmasqFiles) -> None:
    await atomic_write(files.hosts, hosts_file(defn).encode(), fsync=False)
    await atomic_write(files.addn_hosts, addn_hosts_file(defn).encode(), fsync=False)


async def refresh(defn: NetworkDefinition, files: DnsmasqFiles, pid: int) -> None:
    """Write the hosts files of ``defn`` and have dnsmasq ``pid`` re-read them (SIGHUP:
    dhcp-hostsfile and addn-hosts; its leases and its sockets stay)."""
    await write_hosts(defn, files)
    if not pid_alive(pid, files):
        raise OperationFailed(f"dnsmasq of network '{defn.name}' (pid {pid}) is not running")
    os.kill(pid, signal.SIGHUP)


async def stop(files: DnsmasqFiles) -> None:
    """Stop this network's dnsmasq if it runs (SIGTERM, SIGKILL after STOP_TIMEOUT)."""
    pid = read_pid(files)
    if pid is None:
        return
    from drivers.network.watch import wait_exit

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not await wait_exit(pid, STOP_TIMEOUT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await wait_exit(pid, STOP_TIMEOUT)
    with contextlib.suppress(FileNotFoundError):
        await asyncio.to_thread(files.pid.unlink)
