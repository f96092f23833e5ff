"""The guests' taps and their policing tables are found for a stop without an nft process
or a netlink dump per stop.

The host side is a fake (it records the commands and keeps the tables an ``nft`` would):
what is checked is which commands :class:`agent.guest_taps.GuestTaps` runs, not nft.
tests/network/test_guest_interfaces.py checks the real tables with real guests.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from types import SimpleNamespace
from typing import Any

from agent.guest_taps import GuestTaps, tap_prefix, tap_table
from virtbus.domain.bandwidth import Bandwidth, Rate

A, B, C, D = (f"{n}0000000-0000-4000-8000-000000000000" for n in "abcd")


class FakeHostNet:
    """What GuestTaps uses of drivers.network.host.HostNet, with nft's tables kept."""

    def __init__(self, tables: Iterable[str], taps: Iterable[str] = ()) -> None:
        self.tables = set(tables)
        self.taps = set(taps)
        self.commands: list[list[str]] = []
        self.netlink: list[str] = []  # what was asked of netlink: "links", "delete PATTERN"
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

    async def links(self) -> list[Any]:
        self.netlink.append("links")
        return [SimpleNamespace(name=name) for name in sorted(self.taps)]

    async def delete_links_matching(self, pattern: str) -> list[str]:
        self.netlink.append(f"delete {pattern}")
        gone = {name for name in self.taps if re.fullmatch(pattern, name)}
        self.taps -= gone
        return sorted(gone)

    async def open_tap(self, pattern: str, bridge: str, mac: str) -> tuple[int, str]:
        self.made += 1
        name = pattern.replace("%d", str(self.made - 1))
        self.taps.add(name)
        return os.open(os.devnull, os.O_RDONLY), name

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


async def test_stops_dump_the_links_once_and_delete_each_domains_own_taps() -> None:
    stray = tap_prefix(A) + "0"  # a tap of A's that outlived the agent before this one
    net = FakeHostNet(set(), {stray, "br0", "eth0"})
    taps = taps_on(net)
    await taps.release_taps(B)  # the first stop dumps the links: A's tap is found
    assert net.netlink == ["links"]
    await taps.release_taps(A)
    assert net.netlink[1:] == [f"delete {re.escape(tap_prefix(A))}[0-9]+"]
    tap = await taps.open_tap("gn", C, "52:54:00:00:00:01")  # made after the dump
    os.close(tap.fd)
    await taps.release_taps(C)
    assert net.netlink[2:] == [f"delete {re.escape(tap_prefix(C))}[0-9]+"]
    mark = len(net.netlink)
    await taps.release_taps(D)  # a domain with no tap: no netlink at all
    await taps.release_taps(A)
    await taps.release_taps(C)
    assert net.netlink[mark:] == []
    assert net.taps == {"br0", "eth0"}
    tap = await taps.open_tap("gn", D, "52:54:00:00:00:02")
    os.close(tap.fd)
    await taps.release_taps(D, tap.ifname)  # one NIC unplugged: that tap, by its name
    assert net.netlink[mark:] == [f"delete {re.escape(tap.ifname)}"]
    assert net.taps == {"br0", "eth0"}


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
