"""Virtual network backends behind the NetworkBackend protocol (libvirt's network driver).

:func:`backend_for` is the only place a forward mode is mapped to its backend:

- isolated, nat, route, open: :class:`ManagedBridge` — virtbus makes the bridge (pyroute2),
  its addresses, its nftables table (:mod:`drivers.network.nft`), its ``<bandwidth>``
  (:mod:`drivers.network.tc`, gone with the bridge at stop) and its dnsmasq;
- bridge: :class:`ExistingBridge` — a bridge someone else made; virtbus only checks it;
- private, vepa, passthrough, hostdev: NO_SUPPORT (macvtap and SR-IOV pools need devices
  this host's tests do not have).

Everything happens in one :class:`~drivers.network.host.HostNet` (the agent's namespace).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from drivers.network import dnsmasq, nft, tc
from drivers.network.dnsmasq import DnsmasqFiles
from drivers.network.host import HostNet, Link
from virtbus.errors import NoSupport, OperationFailed, OperationInvalid
from virtbus.network import NetworkDefinition

UNSUPPORTED = {
    "private": "macvtap networks (forward mode 'private') are not supported by virtbus",
    "vepa": "macvtap networks (forward mode 'vepa') are not supported by virtbus",
    "passthrough": "macvtap passthrough networks are not supported by virtbus",
    "hostdev": "SR-IOV hostdev networks are not supported by virtbus",
}


class NetworkBackend(Protocol):
    """What the agent's network manager asks of a forward mode's backend."""

    def check(self, defn: NetworkDefinition) -> None:
        """NO_SUPPORT when this host cannot run the network."""

    async def start(self, defn: NetworkDefinition) -> int:
        """Make the network's objects; the bridge's ifindex (the owner mark)."""

    async def adopt(self, defn: NetworkDefinition, index: int) -> bool:
        """The objects a previous agent made are still there (bridge ``index``); repair
        what can be repaired without a blip (a missing firewall table). False: gone."""

    async def stop(self, defn: NetworkDefinition) -> None: ...

    async def ports(self, defn: NetworkDefinition) -> list[str]:
        """The interfaces on the network's bridge (what uses it)."""

    def dhcp(self, defn: NetworkDefinition) -> bool:
        """The network wants a dnsmasq."""

    async def flood_peers(self, defn: NetworkDefinition) -> list[str]:
        """A cluster network's VXLAN peers (underlay addresses); [] for others."""

    async def set_flood_peers(self, defn: NetworkDefinition, peers: list[str]) -> None:
        """Make a cluster network's VXLAN peers exactly ``peers``."""


def vxlan_name(defn: NetworkDefinition) -> str:
    """A cluster network's VXLAN device: one per VNI on a host (at most 15 bytes)."""
    assert defn.cluster is not None
    return f"vx{defn.cluster.vni}"


class ManagedBridge:
    """isolated, nat, route and open networks: everything is virtbus's own. A cluster
    network's bridge also gets its VXLAN device (``underlay``: the address it uses), and
    only its gateway host the addresses, the firewall and dnsmasq."""

    def __init__(self, net: HostNet, underlay: str | None = None) -> None:
        self.net = net
        self.underlay = underlay

    def check(self, defn: NetworkDefinition) -> None:
        if defn.cluster is not None and self.underlay is None:
            raise NoSupport(f"cluster network '{defn.name}' needs a VXLAN underlay address:"
                            " this agent has no network.underlay_address")  # fmt: skip

    def _bridge(self, defn: NetworkDefinition) -> str:
        assert defn.bridge is not None, "a managed network gets its bridge name at define"
        return defn.bridge

    async def start(self, defn: NetworkDefinition) -> int:
        bridge = self._bridge(defn)
        if await self.net.link(bridge) is not None:
            raise OperationFailed(
                f"cannot start network '{defn.name}': interface '{bridge}' already exists"
                f" (it belongs to someone else)"
            )
        if defn.forward_dev is not None and await self.net.link(defn.forward_dev) is None:
            raise OperationFailed(
                f"cannot start network '{defn.name}': forward device '{defn.forward_dev}'"
                " does not exist"
            )
        addresses = [
            (str(ip.address), ip.network.prefixlen,
             str(ip.network.broadcast_address) if ip.family == "ipv4" else None)
            for ip in defn.ips if defn.gateway
        ]  # fmt: skip
        if defn.cluster is not None and await self.net.link(vxlan_name(defn)) is not None:
            raise OperationFailed(f"cannot start network '{defn.name}': interface"
                                  f" '{vxlan_name(defn)}' already exists")  # fmt: skip
        index = await self.net.add_bridge(
            bridge, mac=defn.mac, stp=defn.stp, delay=defn.delay, mtu=defn.mtu,
            addresses=addresses,
        )  # fmt: skip
        try:
            if defn.cluster is not None:
                await self._overlay(defn, bridge)
            if defn.forward in ("nat", "route", "open") and defn.gateway:
                if any(ip.family == "ipv4" for ip in defn.ips):
                    await self.net.sysctl("net.ipv4.ip_forward", "1")
                if any(ip.family == "ipv6" for ip in defn.ips):
                    await self.net.sysctl("net.ipv6.conf.all.forwarding", "1")
            await nft.apply(self.net, defn, bridge)
            if defn.bandwidth is not None:
                await tc.apply(self.net, bridge, defn.bandwidth)
        except BaseException:
            await self._teardown(defn)
            raise
        return index

    async def adopt(self, defn: NetworkDefinition, index: int) -> bool:
        link = await self.net.link(self._bridge(defn))
        if link is None or link.index != index or link.kind != "bridge":
            return False
        if nft.ruleset(defn, link.name) is not None and not await nft.present(self.net, defn):
            await nft.apply(self.net, defn, link.name)  # a table added changes no flow
        if defn.cluster is not None and await self.net.link(vxlan_name(defn)) is None:
            await self._overlay(defn, link.name)  # made again; the scheduler sets its peers
        return True

    async def _overlay(self, defn: NetworkDefinition, bridge: str) -> None:
        """A cluster network's VXLAN device on its bridge (no peers yet)."""
        assert defn.cluster is not None
        if self.underlay is None:  # check() refused it at define
            raise NoSupport(f"cluster network '{defn.name}' needs network.underlay_address")
        await self.net.add_vxlan(vxlan_name(defn), vni=defn.cluster.vni, local=self.underlay,
                                 bridge=bridge)  # fmt: skip

    async def stop(self, defn: NetworkDefinition) -> None:
        await self._teardown(defn)

    async def _teardown(self, defn: NetworkDefinition) -> None:
        await nft.remove(self.net, defn)
        if defn.bandwidth is not None:
            await tc.clear(self.net, self._bridge(defn))
        if defn.cluster is not None:  # an enslaved device outlives its bridge
            await self.net.delete_link(vxlan_name(defn))
        await self.net.delete_link(self._bridge(defn))

    async def ports(self, defn: NetworkDefinition) -> list[str]:
        return [p for p in await self.net.ports(self._bridge(defn))
                if defn.cluster is None or p != vxlan_name(defn)]  # fmt: skip

    def dhcp(self, defn: NetworkDefinition) -> bool:
        return dnsmasq.wanted(defn)

    async def flood_peers(self, defn: NetworkDefinition) -> list[str]:
        if defn.cluster is None:
            return []
        return await self.net.flood_peers(vxlan_name(defn))

    async def set_flood_peers(self, defn: NetworkDefinition, peers: list[str]) -> None:
        if defn.cluster is None:
            raise OperationInvalid(f"network '{defn.name}' is no cluster network")
        await self.net.set_flood_peers(vxlan_name(defn), [p for p in peers if p != self.underlay])


class ExistingBridge:
    """forward mode 'bridge': guests go onto a host bridge that virtbus did not make."""

    def __init__(self, net: HostNet) -> None:
        self.net = net

    def check(self, defn: NetworkDefinition) -> None:
        return None

    def _name(self, defn: NetworkDefinition) -> str:
        name = defn.bridge or defn.forward_dev
        assert name is not None
        return name

    async def _existing(self, defn: NetworkDefinition) -> Link:
        link = await self.net.link(self._name(defn))
        if link is None or link.kind != "bridge":
            what = "does not exist" if link is None else f"is a {link.kind or 'device'}, no bridge"
            raise OperationFailed(
                f"cannot start network '{defn.name}': bridge '{self._name(defn)}' {what}"
            )
        return link

    async def start(self, defn: NetworkDefinition) -> int:
        return (await self._existing(defn)).index

    async def adopt(self, defn: NetworkDefinition, index: int) -> bool:
        link = await self.net.link(self._name(defn))
        return link is not None and link.index == index

    async def stop(self, defn: NetworkDefinition) -> None:
        return None  # not ours: it stays

    async def ports(self, defn: NetworkDefinition) -> list[str]:
        return []  # the bridge's own ports are its owner's business

    def dhcp(self, defn: NetworkDefinition) -> bool:
        return False

    async def flood_peers(self, defn: NetworkDefinition) -> list[str]:
        return []

    async def set_flood_peers(self, defn: NetworkDefinition, peers: list[str]) -> None:
        raise OperationInvalid(f"network '{defn.name}' is no cluster network")


class UnsupportedBackend:
    def __init__(self, mode: str) -> None:
        self.reason = UNSUPPORTED[mode]

    def check(self, defn: NetworkDefinition) -> None:
        raise NoSupport(self.reason)

    async def start(self, defn: NetworkDefinition) -> int:
        raise NoSupport(self.reason)

    async def adopt(self, defn: NetworkDefinition, index: int) -> bool:
        return False

    async def stop(self, defn: NetworkDefinition) -> None:
        return None

    async def ports(self, defn: NetworkDefinition) -> list[str]:
        return []

    def dhcp(self, defn: NetworkDefinition) -> bool:
        return False

    async def flood_peers(self, defn: NetworkDefinition) -> list[str]:
        return []

    async def set_flood_peers(self, defn: NetworkDefinition, peers: list[str]) -> None:
        raise NoSupport(self.reason)


def backend_for(
    defn: NetworkDefinition, net: HostNet, underlay: str | None = None
) -> NetworkBackend:
    if defn.managed:
        return ManagedBridge(net, underlay)
    if defn.forward == "bridge":
        return ExistingBridge(net)
    assert defn.forward is not None
    return UnsupportedBackend(defn.forward)


def dnsmasq_files(run_dir: Path, defn: NetworkDefinition) -> DnsmasqFiles:
    return DnsmasqFiles(run_dir / defn.uuid)


__all__ = [
    "DnsmasqFiles",
    "ExistingBridge",
    "HostNet",
    "Link",
    "ManagedBridge",
    "NetworkBackend",
    "backend_for",
    "dnsmasq",
    "dnsmasq_files",
    "nft",
    "tc",
    "vxlan_name",
]
