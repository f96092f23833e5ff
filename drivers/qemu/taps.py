"""The launch step of ``<interface type='network'>`` NICs on the agent's networks.

Each NIC whose ``<source network=...>`` names a network the agent has (or any network
the host's ``ArgvSettings.networks`` does not map, when the agent has networks: that is
NO_NETWORK at start) gets a tap from the agent's :class:`drivers.base.TapProvider`; its
descriptor joins the plan's ``pass_fds`` and the command line says ``-netdev
tap,fd=N``, so QEMU needs no CAP_NET_ADMIN. ``default`` is libvirt's default network when
one is defined on this host, else what the settings map it to (user-mode NAT). The taps
are removed when the run ends (also after an agent restart: they are found by name).
A NIC's ``<bandwidth>`` goes onto its tap as the agent makes it (the provider shapes it
with the networks' tc code), so the guest never runs unshaped.
"""

from __future__ import annotations

import contextlib
import os

from drivers.base import ResolvedTap, TapProvider
from drivers.qemu.argv_common import ArgvSettings
from drivers.qemu.argv_devices import generated_mac
from drivers.qemu.launch import LaunchPlan
from virtbus.domain import DomainDefinition
from virtbus.domain.bandwidth import Bandwidth
from virtbus.domain.model import Interface
from virtbus.errors import VirtbusError

PLACEHOLDER_FD = 1_000  # what a validated (never spawned) command line names


class TapLeases:
    """Taps for a launch (see module docstring)."""

    def __init__(self, argv: ArgvSettings) -> None:
        self._argv = argv
        self.provider: TapProvider | None = None  # the agent hands its networks in

    def wants_tap(self, iface: Interface) -> bool:
        """This NIC goes onto one of the agent's networks (not a mapped name)."""
        if iface.type != "network" or self.provider is None:
            return False
        name = iface.source_network or ""
        return self.provider.has_network(name) or name not in self._argv.networks

    def mac(self, defn: DomainDefinition, iface: Interface) -> str:
        """The guest's MAC: its own, else the one the command line will generate."""
        return iface.mac or generated_mac(self._argv.mac_prefix, defn.uuid, iface.index)

    def placeholders(self, defn: DomainDefinition) -> dict[int, ResolvedTap]:
        """Stand-ins for a definition being validated: the network may start later."""
        return {
            i.index: ResolvedTap(i.source_network or "", "", "", PLACEHOLDER_FD)
            for i in defn.interfaces if self.wants_tap(i)
        }  # fmt: skip

    async def open(self, defn: DomainDefinition, iface: Interface) -> ResolvedTap:
        """One NIC's tap, shaped by its ``<bandwidth>``; the error names the domain and
        says what is wrong."""
        assert self.provider is not None
        try:
            return await self.provider.open_tap(iface.source_network or "", defn.uuid,
                                                self.mac(defn, iface), iface.bandwidth)  # fmt: skip
        except VirtbusError as exc:
            raise type(exc)(
                f"cannot start domain '{defn.name}': interface #{iface.index}: {exc.message}"
            ) from None

    async def acquire(self, plan: LaunchPlan) -> None:
        taps: dict[int, ResolvedTap] = {}
        for iface in plan.live.interfaces:
            if self.wants_tap(iface):
                tap = await self.open(plan.live, iface)
                plan.pass_fds.append(tap.fd)  # closed by the launch, whatever happens
                taps[iface.index] = tap
        plan.taps = taps

    async def set_bandwidth(self, uuid: str, ifname: str, bandwidth: Bandwidth | None) -> None:
        """Change the shaping of a running NIC's tap (domiftune --live)."""
        assert self.provider is not None
        await self.provider.set_tap_bandwidth(uuid, ifname, bandwidth)

    async def release(self, uuid: str) -> None:
        if self.provider is not None:
            await self.provider.release_taps(uuid)

    async def release_one(self, uuid: str, ifname: str) -> None:
        if self.provider is not None:
            await self.provider.release_taps(uuid, ifname)


def close_tap(tap: ResolvedTap) -> None:
    with contextlib.suppress(OSError):
        os.close(tap.fd)
