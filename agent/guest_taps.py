"""Guests' taps on the host's virtual networks: the :class:`drivers.base.TapProvider` the
agent hands a hypervisor driver, over :class:`agent.network.Networks`.

A tap is made in the agent's network namespace on the network's bridge, named
``vt<10 hex digits of a hash of the domain's uuid><n>`` (the kernel picks ``n``), so the
taps of a domain are found again by name after an agent restart. A hash of the whole uuid,
not its first digits: user-set uuids often share a prefix, and a release by pattern would
then delete another domain's taps. Its MAC is the guest's with
the first byte ``fe`` (as libvirt does), so the bridge never takes the guest's address.

A NIC's ``<bandwidth>`` is put on its tap by drivers/network/tc.py (the networks' own
code) before the descriptor is handed over: HTB on the tap's egress (the guest's inbound),
an nftables policer on its ingress (the guest's outbound). The policing table is named
after the tap (``virtbus_bwtap_<tap>``), so a domain's tables are found by its prefix and
dropped with its taps even when QEMU took the taps with it (the tables outlive them).
Which of those tables, and which taps, exist is listed (``nft list tables``, a netlink
dump) once per agent, at the first release, and then kept up to date by this class, their
only maker: a domain without a NIC on the agent's networks stops without an nft process or
a netlink dump (both were on every stop's path, and a migration's confirm waits for the
source's stop). A tap is not persistent: it is gone with QEMU, and a known one that is
gone only costs a dump that finds nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re

from agent.network import Networks
from drivers.base import ResolvedTap
from drivers.network import tc
from virtbus.domain.bandwidth import Bandwidth
from virtbus.errors import NoSupport, OperationInvalid, VirtbusError

log = logging.getLogger(__name__)


def tap_prefix(domain: str) -> str:
    """``vt`` and 10 hex digits (40 bits) of the uuid's hash: with ``n`` up to 999 the
    name fits IFNAMSIZ (15 characters)."""
    canonical = domain.replace("-", "").lower().encode()
    return "vt" + hashlib.blake2b(canonical, digest_size=5).hexdigest()


def tap_mac(guest_mac: str) -> str:
    return "fe" + guest_mac[2:]


def tap_table(ifname: str) -> str:
    """The nftables table (netdev) that polices tap ``ifname``'s ingress."""
    return f"virtbus_bwtap_{ifname}"


class GuestTaps:
    """Taps for guest NICs (see module docstring)."""

    def __init__(self, networks: Networks) -> None:
        self._networks = networks
        # the taps' policing tables: as listed once (None: not yet) and made since; the
        # union is never short of a table that exists (a dropped one may linger: its drop
        # of an absent table is fine)
        self._listed: set[str] | None = None
        self._made: set[str] = set()
        self._taps_listed: set[str] | None = None  # the same for the taps
        self._taps_made: set[str] = set()

    def _shaped(self, table: str, bandwidth: Bandwidth | None) -> None:
        """``tc.apply`` with ``bandwidth`` made ``table`` (an outbound limit) or dropped it."""
        if bandwidth is not None and bandwidth.outbound is not None:
            self._made.add(table)
        else:
            self._dropped(table)

    def _dropped(self, table: str) -> None:
        self._made.discard(table)
        if self._listed is not None:
            self._listed.discard(table)

    async def _tables(self) -> set[str]:
        if self._listed is None:
            prefix = tap_table("")
            found = await tc.tables(self._networks.net)
            self._listed = {t for t in found if t.startswith(prefix)}
        return self._listed | self._made

    async def _taps(self) -> set[str]:
        if self._taps_listed is None:
            self._taps_listed = {link.name for link in await self._networks.net.links()}
        return self._taps_listed | self._taps_made

    def _taps_gone(self, names: set[str]) -> None:
        self._taps_made -= names
        if self._taps_listed is not None:
            self._taps_listed -= names

    def has_network(self, name: str) -> bool:
        return any(n.name == name for n in self._networks.networks())

    async def open_tap(self, network: str, domain: str, mac: str,
                       bandwidth: Bandwidth | None = None) -> ResolvedTap:  # fmt: skip
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
        self._taps_made.add(ifname)
        if bandwidth is not None:
            table = tap_table(ifname)
            self._made.add(table)  # before nft runs: a failure may leave it half made
            try:
                await tc.apply(self._networks.net, ifname, bandwidth, table)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)  # the tap goes with it
                with contextlib.suppress(VirtbusError):
                    await tc.drop_table(self._networks.net, table)
                    self._dropped(table)
                raise
            self._shaped(table, bandwidth)
        return ResolvedTap(network=net.name, bridge=bridge, ifname=ifname, fd=fd)

    async def set_tap_bandwidth(self, domain: str, ifname: str,
                                bandwidth: Bandwidth | None) -> None:  # fmt: skip
        if not ifname.startswith(tap_prefix(domain)):
            raise OperationInvalid(f"'{ifname}' is not a tap of this domain's")
        table = tap_table(ifname)
        self._made.add(table)
        await tc.apply(self._networks.net, ifname, bandwidth, table)
        self._shaped(table, bandwidth)

    async def release_taps(self, domain: str, ifname: str | None = None) -> None:
        prefix = tap_prefix(domain)
        if ifname is not None:
            if not ifname.startswith(prefix):
                return  # not one of this domain's taps: never someone else's link
            pattern = re.escape(ifname)
        else:
            pattern = re.escape(prefix) + r"[0-9]+"
        wanted_tap = re.compile(pattern)
        if ifname is not None:
            await self._networks.net.delete_links_matching(pattern)
            self._taps_gone({ifname})
        else:
            mine = {name for name in await self._taps() if wanted_tap.fullmatch(name)}
            if mine:
                await self._networks.net.delete_links_matching(pattern)
                self._taps_gone(mine)
        try:
            if ifname is not None:
                await tc.drop_table(self._networks.net, tap_table(ifname))
                self._dropped(tap_table(ifname))
                return
            wanted = re.compile(re.escape(tap_table("")) + pattern)
            for table in sorted(await self._tables()):
                if wanted.fullmatch(table):
                    await tc.drop_table(self._networks.net, table)
                    self._dropped(table)
        except VirtbusError as exc:  # a stale empty table is harmless: never fail a stop
            log.warning("domain %s: its taps' policing tables: %s", domain, exc)
