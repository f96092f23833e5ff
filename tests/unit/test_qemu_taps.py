"""NICs on the agent's networks: the command line names the tap the agent opened (an
inherited fd, never a tap QEMU makes), unknown names at define wait for start, and the
tap names and MACs the agent gives them."""

from __future__ import annotations

import asyncio
import json

from agent.guest_taps import tap_mac, tap_prefix
from drivers.base import ResolvedTap
from drivers.qemu.argv_common import ArgvSettings
from drivers.qemu.taps import TapLeases
from tests.unit.test_qemu_argv import build, domain, values
from virtbus.domain import parse_domain_xml
from virtbus.domain.bandwidth import Bandwidth

NIC = "<interface type='network'><source network='{}'/><model type='virtio'/></interface>"


class Provider:
    """Stands in for the agent's networks (the real ones: tests/network)."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.released: list[tuple[str, str | None]] = []

    def has_network(self, name: str) -> bool:
        return name in self.names

    async def open_tap(self, network: str, domain: str, mac: str,
                       bandwidth: Bandwidth | None = None) -> ResolvedTap:  # fmt: skip
        return ResolvedTap(network, "virbr0", tap_prefix(domain) + "0", 42)

    async def set_tap_bandwidth(self, domain: str, ifname: str,
                                bandwidth: Bandwidth | None) -> None:  # fmt: skip
        return None

    async def release_taps(self, domain: str, ifname: str | None = None) -> None:
        self.released.append((domain, ifname))


def test_a_nic_on_an_agent_network_is_the_tap_fd_it_was_given() -> None:
    xml = domain(NIC.format("lab"))
    argv = build(xml, taps={0: ResolvedTap("lab", "virbr0", "vt01234567", 42)}).argv
    (netdev,) = [json.loads(v) for v in values(argv, "-netdev")]
    assert netdev == {"type": "tap", "fd": "42", "id": "hostnet0"}


def test_which_nics_get_taps_default_stays_user_mode_unless_defined() -> None:
    taps = TapLeases(ArgvSettings())
    defn = parse_domain_xml(domain(NIC.format("default") + NIC.format("lab")))
    assert taps.placeholders(defn) == {}  # no agent networks: the old mapping decides
    taps.provider = Provider(set())
    assert list(taps.placeholders(defn)) == [1]  # 'lab' is unknown: NO_NETWORK at start
    taps.provider = Provider({"default", "lab"})
    assert list(taps.placeholders(defn)) == [0, 1]  # libvirt's default network is defined


def test_acquire_opens_each_tap_and_hands_its_fd_on() -> None:
    from drivers.qemu.launch import LaunchPlan

    taps = TapLeases(ArgvSettings())
    provider = Provider({"lab"})
    taps.provider = provider
    defn = parse_domain_xml(domain(NIC.format("lab")))
    plan = LaunchPlan(defn)
    asyncio.run(taps.acquire(plan))
    assert plan.pass_fds == [42] and plan.taps is not None and plan.taps[0].network == "lab"
    asyncio.run(taps.release(defn.uuid))
    assert provider.released == [(defn.uuid, None)]


def test_tap_names_and_macs() -> None:
    one = tap_prefix("0123ABCD-0000-4000-8000-000000000000")
    assert one == tap_prefix("0123abcd00004000800000000000000" + "0")  # case and dashes
    assert one.startswith("vt") and len(one + "999") <= 15  # IFNAMSIZ - 1
    # uuids that share their first digits (user-set ones often do) never share taps
    assert one != tap_prefix("0123abcd-0000-4000-8000-000000000001")
    assert tap_mac("52:54:00:12:34:56") == "fe:54:00:12:34:56"
