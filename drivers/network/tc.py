"""``<bandwidth>`` through tc. ``inbound`` (what goes out of the device towards the
network's guests) is shaped as libvirt's virNetDevBandwidthSet does: an HTB class at the
device's root (with an SFQ leaf where the kernel has sch_sfq). ``outbound`` (what comes in
from them) is policed as libvirt does (dropped above the rate), but by nftables, not tc:
libvirt's u32 filter with act_police needs a module kernels may lack (this test bed's has
no act_police and no act_gact, and act_mirred to an IFB loses the packets' conntrack, so
NAT replies are rejected), while an nftables ``netdev`` table with an ``ingress`` hook on
the device and a ``limit rate over ... drop`` rule is the same policer, in the nf_tables
virtbus already uses. Units are libvirt's and tc's alike: ``kbps`` is
kilobytes per second, ``kb`` kilobytes. Every argument is an int, a fixed word or an
interface name checked at define or made by the agent (argv, no shell).

The same two pieces serve a network's bridge and a guest's tap, as libvirt calls
virNetDevBandwidthSet "swapped" for both: on a bridge ``inbound`` is its egress (towards
the guests) and ``outbound`` its ingress; on a tap the guest's inbound is the tap's
egress (what QEMU reads) and the guest's outbound its ingress (what QEMU writes).
Defaults are libvirt's: HTB's ``ceil`` and ``burst`` only when peak and burst are given
(tc's own otherwise), the policer's burst the average's worth of one second.
"""

from __future__ import annotations

import json
import zlib

from drivers.network.host import HostNet
from virtbus.domain.bandwidth import Bandwidth, Rate

_ABSENT = (0, 1, 2)  # tc/ip: "Cannot find device" (1), "no such qdisc" (2): nothing to clear


def police_table(dev: str) -> str:
    """The nftables table (family netdev) that polices ``dev``'s ingress."""
    return f"virtbus_bw_{zlib.crc32(dev.encode()):08x}"


async def _htb(net: HostNet, dev: str, rate: Rate) -> None:
    what = f"bandwidth of {dev}"
    await net.run(["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb",
                   "default", "1"], what=what)  # fmt: skip
    shape = ["rate", f"{rate.average}kbps"]
    if rate.peak is not None:
        shape += ["ceil", f"{rate.peak}kbps"]
    if rate.burst is not None:
        shape += ["burst", f"{rate.burst}kb"]
    await net.run(["tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
                   *shape, "quantum", "21444"], what=what)  # fmt: skip
    # libvirt's SFQ leaf (fairness between flows); without sch_sfq HTB's default leaf
    await net.run(["tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle",
                   "2:", "sfq", "perturb", "10"], what=what, ok_codes=(0, 2))  # fmt: skip


async def apply(net: HostNet, dev: str, bandwidth: Bandwidth | None,
                table: str | None = None) -> None:  # fmt: skip
    """Replace the device's shaping by ``bandwidth`` (None: none); ``table`` names its
    policing table (default :func:`police_table`)."""
    table = table or police_table(dev)
    await clear(net, dev, table)
    if bandwidth is None:
        return
    if bandwidth.inbound is not None:
        await _htb(net, dev, bandwidth.inbound)
    if (rate := bandwidth.outbound) is not None:
        # libvirt's default burst: the average's worth (capped as tc's 32-bit bytes); a GSO
        # packet is up to 64 KiB, and a smaller burst would drop every one (libvirt's
        # police has "mtu 64kb" for it)
        burst = max(rate.burst or min(rate.average, 2**32 // 1024 - 1), 2 * 65536 // 1024)
        text = "\n".join([
            f"table netdev {table}",
            f"delete table netdev {table}",
            f"table netdev {table} {{",
            "  chain ingress {",
            f'    type filter hook ingress device "{dev}" priority 0; policy accept;',
            f"    limit rate over {rate.average} kbytes/second burst {burst} kbytes drop",
            "  }",
            "}",
        ]) + "\n"  # fmt: skip
        await net.run(["nft", "-f", "-"], what=f"bandwidth of {dev}", stdin=text.encode())


async def clear(net: HostNet, dev: str, table: str | None = None) -> None:
    """Remove the device's shaping: its root qdisc and its policing table (absent ones are
    fine; the table outlives a deleted device, so this runs at stop)."""
    what = f"bandwidth of {dev}"
    await net.run(["tc", "qdisc", "del", "dev", dev, "root"], what=what, ok_codes=_ABSENT)
    await drop_table(net, table or police_table(dev))


async def drop_table(net: HostNet, table: str) -> None:
    """Delete one policing table (absent: fine)."""
    await net.run(["nft", "delete", "table", "netdev", table], what=f"bandwidth table {table}",
                  ok_codes=_ABSENT)  # fmt: skip


async def tables(net: HostNet) -> list[str]:
    """The names of the netdev tables in the namespace (to find those of gone devices)."""
    _, out = await net.run(["nft", "-j", "list", "tables", "netdev"], what="nftables tables")
    found = json.loads(out or "{}").get("nftables", [])
    return [str(t["table"]["name"]) for t in found if "table" in t]
