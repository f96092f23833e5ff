"""The guests' taps' policing tables are found for a stop without an nft process per stop.

The host side is a fake (it records the commands and keeps the tables an ``nft`` would):
what is checked is which commands :class:`agent.guest_taps.GuestTaps` runs, not nft.
tests/network/test_guest_interfaces.py checks the real tables with real guests.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from agent.guest_taps import GuestTaps, tap_prefix, tap_table
from virtbus.domain.bandwidth import Bandwidth, Rate

A, B, C, D = (f"{n}0000000-0000-4000-8000-000000000000" for n in "abcd")


class FakeHostNet:
    """What GuestTaps uses of drivers.network.host.HostNet, with nft's tables kept."""

    def __init__(self, tables: set[str]) -> None:
        self.tables = set(tables)
        self.commands: list[list[str]] = []
        self.made = 0

    async def run(
        self, argv: Sequence[str], *, what: str, stdin: bytes | None = None,
        ok_codes: tuple[int, ...] = (0,), timeout: float = 0,
    ) -> tuple[int, str]:  # fmt: skip
        argv = list(argv)
        self.commands.append(argv)
        if argv[:4] == ["nft", "-j", "list", "tables"]:
            found = [{"metainfo": {}}, *({"table": {"name": t}} for t in sorted(self.tables))]
            return 0, json.dumps({"nftables": found})
        if argv[:3] == ["nft", "delete", "table"]:
            self.tables.discard(argv[4])
        elif argv[:2] == ["nft", "-f"] and stdin is not None:
            self.tables.add(stdin.decode().split()[2])  # "table netdev NAME ..."
        return 0, ""

    async def delete_links_matching(self, pattern: str) -> list[str]:
        return []

    async def open_tap(self, pattern: str, bridge: str, mac: str) -> tuple[int, str]:
        self.made += 1
        return os.open(os.devnull, os.O_RDONLY), pattern.replace("%d", str(self.made - 1))

    def nft(self, since: int = 0) -> list[list[str]]:
        return [c for c in self.commands[since:] if c[0] == "nft"]


def taps_on(net: FakeHostNet) -> GuestTaps:
    network = SimpleNamespace(name="gn", support=None, active=True,
                              defn=SimpleNamespace(bridge="br0", forward_dev=None))  # fmt: skip
    networks: Any = SimpleNamespace(net=net, get=lambda _name: network, networks=lambda: [])
    return GuestTaps(networks)


async def test_stops_list_the_tables_once_and_drop_each_domains_own() -> None:
    left = tap_table(tap_prefix(A) + "0")  # left by the agent before this one
    net = FakeHostNet({left, "virtbus_nat_gn"})
    taps = taps_on(net)
    await taps.release_taps(B)  # the first stop lists the tables: A's is found
    assert net.nft() == [["nft", "-j", "list", "tables", "netdev"]]
    mark = len(net.commands)
    await taps.release_taps(A)  # no listing again; the table the last agent left goes
    assert net.nft(mark) == [["nft", "delete", "table", "netdev", left]]
    policed = Bandwidth(outbound=Rate(average=100))
    tap = await taps.open_tap("gn", C, "52:54:00:00:00:01", policed)  # made after the listing
    os.close(tap.fd)
    assert tap_table(tap.ifname) in net.tables
    mark = len(net.commands)
    await taps.release_taps(C)
    assert net.nft(mark) == [["nft", "delete", "table", "netdev", tap_table(tap.ifname)]]
    mark = len(net.commands)
    await taps.release_taps(D)  # a domain without a policed NIC: no nft at all
    await taps.release_taps(A)
    assert net.nft(mark) == []
    assert net.tables == {"virtbus_nat_gn"}  # no table of theirs left, nobody else's touched


async def test_a_limit_taken_off_live_is_not_dropped_again_and_one_put_on_is() -> None:
    net = FakeHostNet(set())
    taps = taps_on(net)
    await taps.release_taps(B)  # listed: none
    tap = await taps.open_tap("gn", C, "52:54:00:00:00:01", None)
    os.close(tap.fd)
    table = tap_table(tap.ifname)
    await taps.set_tap_bandwidth(C, tap.ifname, Bandwidth(outbound=Rate(average=64)))
    assert table in net.tables
    await taps.set_tap_bandwidth(C, tap.ifname, Bandwidth(inbound=Rate(average=64)))
    assert table not in net.tables  # an inbound limit alone has no policing table
    mark = len(net.commands)
    await taps.release_taps(C)
    assert net.nft(mark) == []
    await taps.set_tap_bandwidth(C, tap.ifname, Bandwidth(outbound=Rate(average=64)))
    await taps.release_taps(C)
    assert net.tables == set()
