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
interface name checked at define (argv, no shell).
"""

from __future__ import annotations

import zlib

from drivers.network.host import HostNet
from virtbus.network.definition import Bandwidth, Rate

_ABSENT = (0, 1, 2)  # tc/ip: "Cannot find device" (1), "no such qdisc" (2): nothing to clear


def police_table(dev: str) -> str:
    """The nftables table (family netdev) that polices ``dev``'s ingress."""
    return f"virtbus_bw_{zlib.crc32(dev.encode()):08x}"


async def _htb(net: HostNet, dev: str, rate: Rate) -> None:
    what = f"bandwidth of {dev}"
    peak = rate.peak or rate.average
    burst = rate.burst or max(1, rate.average // 8)
    await net.run(["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb",
                   "default", "1"], what=what)  # fmt: skip
    await net.run(["tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
                   "rate", f"{rate.average}kbps", "ceil", f"{peak}kbps", "burst",
                   f"{burst}kb", "quantum", "21444"], what=what)  # fmt: skip
    # libvirt's SFQ leaf (fairness between flows); without sch_sfq HTB's default leaf
    await net.run(["tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle",
                   "2:", "sfq", "perturb", "10"], what=what, ok_codes=(0, 2))  # fmt: skip


async def apply(net: HostNet, dev: str, bandwidth: Bandwidth | None) -> None:
    """Replace the device's shaping by ``bandwidth`` (None: none)."""
    await clear(net, dev)
    if bandwidth is None:
        return
    if bandwidth.inbound is not None:
        await _htb(net, dev, bandwidth.inbound)
    if (rate := bandwidth.outbound) is not None:
        # a GSO packet is up to 64 KiB: a smaller burst would drop every one (libvirt's
        # police has "mtu 64kb" for it)
        burst = max(rate.burst or 0, 2 * 65536 // 1024)
        text = "\n".join([
            f"table netdev {police_table(dev)}",
            f"delete table netdev {police_table(dev)}",
            f"table netdev {police_table(dev)} {{",
            "  chain ingress {",
            f'    type filter hook ingress device "{dev}" priority 0; policy accept;',
            f"    limit rate over {rate.average} kbytes/second burst {burst} kbytes drop",
            "  }",
            "}",
        ]) + "\n"  # fmt: skip
        await net.run(["nft", "-f", "-"], what=f"bandwidth of {dev}", stdin=text.encode())


async def clear(net: HostNet, dev: str) -> None:
    """Remove the device's shaping: its root qdisc and its policing table (absent ones are
    fine; the table outlives a deleted device, so this runs at stop)."""
    what = f"bandwidth of {dev}"
    await net.run(["tc", "qdisc", "del", "dev", dev, "root"], what=what, ok_codes=_ABSENT)
    await net.run(["nft", "delete", "table", "netdev", police_table(dev)], what=what,
                  ok_codes=_ABSENT)  # fmt: skip
