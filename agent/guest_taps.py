"""Guests' taps on the host's virtual networks: the :class:`drivers.base.TapProvider` the
agent hands a hypervisor driver, over :class:`agent.network.Networks`.

A tap is made in the agent's network namespace on the network's bridge, named
``vt<10 hex digits of a hash of the domain's uuid><n>`` (the kernel picks ``n``), so the
taps of a domain are found again by name after an agent restart. A hash of the whole uuid,
not its first digits: user-set uuids often share a prefix, and a release by pattern would
then delete another domain's taps. Its MAC is the guest's with
the first byte ``fe`` (as libvirt does), so the bridge never takes the guest's address.
"""

from __future__ import annotations

import hashlib
import re

from agent.network import Networks
from drivers.base import ResolvedTap
from virtbus.errors import NoSupport, OperationInvalid


def tap_prefix(domain: str) -> str:
    """``vt`` and 10 hex digits (40 bits) of the uuid's hash: with ``n`` up to 999 the
    name fits IFNAMSIZ (15 characters)."""
    canonical = domain.replace("-", "").lower().encode()
    return "vt" + hashlib.blake2b(canonical, digest_size=5).hexdigest()


def tap_mac(guest_mac: str) -> str:
    return "fe" + guest_mac[2:]


class GuestTaps:
    """Taps for guest NICs (see module docstring)."""

    def __init__(self, networks: Networks) -> None:
        self._networks = networks

    def has_network(self, name: str) -> bool:
        return any(n.name == name for n in self._networks.networks())

    async def open_tap(self, network: str, domain: str, mac: str) -> ResolvedTap:
        net = self._networks.get(network)  # NO_NETWORK, in libvirt's words
        if net.support is not None:
            raise NoSupport(net.support)
        if not net.active:
            raise OperationInvalid(f"network '{net.name}' is not active")
        bridge = net.defn.bridge or net.defn.forward_dev
        if bridge is None:
            raise NoSupport(f"network '{net.name}' has no bridge for guest interfaces")
        fd, ifname = await self._networks.net.open_tap(f"{tap_prefix(domain)}%d", bridge,
                                                       tap_mac(mac))  # fmt: skip
        return ResolvedTap(network=net.name, bridge=bridge, ifname=ifname, fd=fd)

    async def release_taps(self, domain: str, ifname: str | None = None) -> None:
        prefix = tap_prefix(domain)
        if ifname is not None:
            if not ifname.startswith(prefix):
                return  # not one of this domain's taps: never someone else's link
            pattern = re.escape(ifname)
        else:
            pattern = re.escape(prefix) + r"[0-9]+"
        await self._networks.net.delete_links_matching(pattern)
