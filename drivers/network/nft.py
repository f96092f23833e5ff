"""A network's firewall: one nftables table of virtbus's own per network.

Each network gets table ``inet virtbus_<uuid>``, written whole with ``nft -f`` (atomic:
all of it or none) and removed whole, so virtbus never edits rules it did not make and
two networks never share a chain. libvirt's rules, per forward mode:

- nat: traffic from the subnet leaving the bridge is accepted and masqueraded (except to
  multicast and broadcast), replies come back (conntrack), anything else to or from the
  bridge is rejected;
- route: the subnet is forwarded both ways, without NAT;
- isolated: only bridge-to-bridge traffic; nothing is forwarded in or out;
- open (and bridge): no table at all.
"""

from __future__ import annotations

from drivers.network.host import HostNet
from virtbus.network import NetworkDefinition


def table_name(defn: NetworkDefinition) -> str:
    return "virtbus_" + defn.uuid.replace("-", "")[:16]


def ruleset(defn: NetworkDefinition, bridge: str) -> str | None:
    """The table's text for ``nft -f``, or None when the mode has no rules (open), nor
    this host (a cluster network's hosts without its gateway only bridge)."""
    mode = defn.forward
    if mode not in (None, "nat", "route") or not defn.gateway:
        return None
    br = f'"{bridge}"'
    out_dev = f' oifname "{defn.forward_dev}"' if defn.forward_dev else ""
    in_dev = f' iifname "{defn.forward_dev}"' if defn.forward_dev else ""
    forward = [f"iifname {br} oifname {br} accept"]
    post: list[str] = []
    for ip in defn.ips:
        fam = "ip" if ip.family == "ipv4" else "ip6"
        net = str(ip.network)
        if mode == "nat":
            forward.append(f"iifname {br}{out_dev} {fam} saddr {net} accept")
            forward.append(
                f"oifname {br}{in_dev} {fam} daddr {net} ct state related,established accept"
            )
            if ip.family == "ipv4":  # libvirt does not NAT IPv6
                post += [
                    f"ip saddr {net} ip daddr 224.0.0.0/24 return",
                    f"ip saddr {net} ip daddr 255.255.255.255 return",
                    f"ip saddr {net} ip daddr != {net}{out_dev} masquerade",
                ]
        elif mode == "route":
            forward.append(f"iifname {br}{out_dev} {fam} saddr {net} accept")
            forward.append(f"oifname {br}{in_dev} {fam} daddr {net} accept")
    forward += [f"iifname {br} reject", f"oifname {br} reject"]
    name = table_name(defn)
    lines = [
        f"table inet {name}",  # declared first, so the delete below never fails
        f"delete table inet {name}",
        f"table inet {name} {{",
        f'  comment "virtbus network {_quote(defn.name)}"',
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        *(f"    {rule}" for rule in forward),
        "  }",
    ]
    if post:
        lines += [
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            *(f"    {rule}" for rule in post),
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return "".join(c for c in text if c.isprintable() and c not in '"\\')[:100]


async def apply(net: HostNet, defn: NetworkDefinition, bridge: str) -> None:
    """Write (or rewrite) the network's table; nothing when its mode has no rules."""
    text = ruleset(defn, bridge)
    if text is not None:
        await net.run(["nft", "-f", "-"], what=f"firewall of network '{defn.name}'",
                      stdin=text.encode())  # fmt: skip


async def present(net: HostNet, defn: NetworkDefinition) -> bool:
    code, _ = await net.run(["nft", "list", "table", "inet", table_name(defn)],
                            what="nft list", ok_codes=(0, 1))  # fmt: skip
    return code == 0


async def remove(net: HostNet, defn: NetworkDefinition) -> None:
    if await present(net, defn):
        await net.run(["nft", "delete", "table", "inet", table_name(defn)],
                      what=f"firewall of network '{defn.name}'")  # fmt: skip
