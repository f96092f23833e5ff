"""NIC verbs under virsh's names: attach-interface, detach-interface (with ``--live``,
``--config``, ``--persistent``, ``--current``), domiflist, domif-getlink, domif-setlink,
domifaddr and domiftune. attach-device/detach-device with an ``<interface>`` are in disk.py.

domiflist and domif-getlink read the domain's XML (the live one while it runs), as virsh
does; the others are calls."""

from __future__ import annotations

import argparse
import sys

from lxml import etree

from virtbus.cli.context import Context
from virtbus.cli.disk import _change, _flags, _said, _target
from virtbus.cli.output import emit_json, table
from virtbus.client import Domain
from virtbus.domain.serialize import dumps
from virtbus.errors import InvalidArgument, OperationFailed
from virtbus.protocol.base import to_wire
from virtbus.protocol.network import InterfaceRate

TYPES = ("network", "bridge", "user")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("attach-interface", help="attach a NIC to a domain")
    _target(p)
    p.add_argument("type", choices=TYPES, help="network, bridge or user")
    p.add_argument("source", nargs="?", help="the network or bridge name")
    p.add_argument("--model", help="NIC model (virtio, e1000, rtl8139, ...)")
    p.add_argument("--mac", help="MAC address (default: generated, 52:54:00:...)")
    p.add_argument("--inbound", help="average,peak,burst,floor: the guest's incoming traffic")
    p.add_argument("--outbound", help="average,peak,burst: the guest's outgoing traffic")
    p.add_argument("--print-xml", action="store_true", help="print the XML, attach nothing")
    _flags(p)
    p.set_defaults(func=attach_interface)
    p = sub.add_parser("detach-interface", help="detach a NIC from a domain")
    _target(p)
    p.add_argument("type", choices=TYPES, help="network, bridge or user")
    p.add_argument("--mac", help="the NIC's MAC (needed when several NICs have the type)")
    _flags(p)
    p.set_defaults(func=detach_interface)
    p = sub.add_parser("domiflist", help="list a domain's NICs")
    _target(p)
    p.set_defaults(func=domiflist)
    p = sub.add_parser("domif-getlink", help="a NIC's link state")
    _target(p)
    p.add_argument("interface", help="target dev (the tap) or MAC")
    p.set_defaults(func=domif_getlink)
    p = sub.add_parser("domif-setlink", help="set a NIC's link up or down")
    _target(p)
    p.add_argument("interface", help="target dev (the tap) or MAC")
    p.add_argument("state", choices=("up", "down"))
    p.add_argument("--config", action="store_true", help="the definition (next boot) too")
    p.set_defaults(func=domif_setlink)
    p = sub.add_parser("domifaddr", help="a running domain's NIC addresses")
    _target(p)
    p.add_argument("interface", nargs="?", help="only this NIC (target dev or MAC)")
    p.add_argument(
        "--source",
        choices=("lease", "agent"),
        default="lease",
        help="lease: the networks' DHCP leases (default); agent: the guest agent",
    )
    p.set_defaults(func=domifaddr)
    p = sub.add_parser("domiftune", help="get/set a NIC's bandwidth limits")
    _target(p)
    p.add_argument("interface", help="target dev (the tap) or MAC")
    p.add_argument("--inbound", help="average,peak,burst,floor (KiB/s, KiB): the guest's"
                   " incoming traffic; an average of 0 removes the limit")  # fmt: skip
    p.add_argument("--outbound", help="average,peak,burst: the guest's outgoing traffic")
    p.add_argument("--config", action="store_true", help="affect the next boot")
    p.add_argument("--live", action="store_true", help="affect the running domain")
    p.add_argument("--current", action="store_true", help="live if running, else the next boot")
    p.set_defaults(func=domiftune)


RATE_FIELDS = ("average", "peak", "burst", "floor")
UINT_MAX = 2**32 - 1


def parse_rate(text: str, direction: str) -> InterfaceRate:
    """virsh's ``average,peak,burst,floor`` (empty fields: 0); INVALID_ARG as virsh says."""
    fields = text.split(",")
    if len(fields) > len(RATE_FIELDS):
        raise InvalidArgument(f"Rate string '{text}' has too many fields")
    if not all(f.isdigit() and f.isascii() for f in fields if f):
        raise InvalidArgument(f"malformed rate string '{text}'")
    values = {name: int(f) if f else 0 for name, f in zip(RATE_FIELDS, fields, strict=False)}
    if any(v > UINT_MAX for v in values.values()):
        raise InvalidArgument(f"{direction} rate larger than maximum {UINT_MAX}")
    return InterfaceRate(**values)


def interface_xml(itype: str, source: str | None, model: str | None, mac: str | None,
                  inbound: InterfaceRate | None = None,
                  outbound: InterfaceRate | None = None) -> str:  # fmt: skip
    """The ``<interface>`` virsh's attach-interface builds (the agent checks its
    ``<bandwidth>`` like any definition's)."""
    root = etree.Element("interface", type=itype)
    if mac:
        etree.SubElement(root, "mac", address=mac)
    if itype in ("network", "bridge"):
        if not source:
            raise InvalidArgument(f"an interface of type {itype} needs a source")
        etree.SubElement(root, "source", **{itype: source})
    elif source:
        raise InvalidArgument("an interface of type user takes no source")
    if model:
        etree.SubElement(root, "model", type=model)
    if inbound is not None or outbound is not None:
        bw = etree.SubElement(root, "bandwidth")
        for tag, rate in (("inbound", inbound), ("outbound", outbound)):
            if rate is not None:
                etree.SubElement(bw, tag, {n: str(getattr(rate, n)) for n in RATE_FIELDS
                                           if getattr(rate, n)})  # fmt: skip
    return dumps(root)


def _interfaces(xml: str) -> list[etree._Element]:
    from virtbus.domain import parse_domain_xml  # the XML model: only for these verbs

    return [i.element for i in parse_domain_xml(xml).interfaces]


def _row(el: etree._Element) -> tuple[str, str, str, str, str]:
    def attr(path: str, name: str) -> str:
        found = el.find(path)
        return str(found.get(name) or "-") if found is not None else "-"

    itype = str(el.get("type") or "user")
    src = el.find("source")
    source = "-"
    if src is not None:
        source = str(src.get("network") or src.get("bridge") or src.get("dev") or "-")
    return (attr("target", "dev"), itype, source, attr("model", "type"), attr("mac", "address"))


async def attach_interface(ctx: Context, args: argparse.Namespace) -> int:
    inbound = parse_rate(args.inbound, "inbound") if args.inbound else None
    outbound = parse_rate(args.outbound, "outbound") if args.outbound else None
    xml = interface_xml(args.type, args.source, args.model, args.mac, inbound, outbound)
    if args.print_xml:
        sys.stdout.write(xml)
        return 0
    dom = await ctx.domain(args.host, args.domain)
    await _change(ctx, args, dom, xml, attach=True)
    return _said(ctx, dom, "Interface attached successfully")


async def detach_interface(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    rows = [_row(el) for el in await _interfaces_of(dom)]
    wanted = [r for r in rows if r[1] == args.type
              and (args.mac is None or r[4] == args.mac.lower())]  # fmt: skip
    if not wanted:
        which = f" and MAC address is {args.mac}" if args.mac else ""
        raise OperationFailed(f"No interface found whose type is {args.type}{which}")
    if len(wanted) > 1:
        raise OperationFailed(f"Domain has {len(wanted)} interfaces. Please specify which one"
                              " to detach using --mac")  # fmt: skip
    xml = interface_xml(args.type, None if args.type == "user" else wanted[0][2], None,
                        wanted[0][4])  # fmt: skip
    await _change(ctx, args, dom, xml, attach=False)
    return _said(ctx, dom, "Interface detached successfully")


async def _interfaces_of(dom: Domain) -> list[etree._Element]:
    return _interfaces(await dom.xml())


async def domiflist(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    rows = [_row(el) for el in await _interfaces_of(dom)]
    if ctx.json:
        emit_json([dict(zip(("interface", "type", "source", "model", "mac"), r, strict=True))
                   for r in rows])  # fmt: skip
    else:
        print(table(["Interface", "Type", "Source", "Model", "MAC"], rows))
    return 0


async def domif_getlink(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    wanted = args.interface.lower()
    for el in await _interfaces_of(dom):
        row = _row(el)
        if wanted in (row[0].lower(), row[4]):
            link = el.find("link")
            state = str(link.get("state") or "up") if link is not None else "up"
            if ctx.json:
                emit_json({"interface": args.interface, "state": state})
            else:
                print(f"{args.interface} {state}")
            return 0
    raise OperationFailed(f"Interface ({args.interface}) not found.")


async def domif_setlink(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    running = (await dom.state()).state != "shutoff"
    await dom.set_interface_link(args.interface, args.state == "up", live=running,
                                 config=args.config or not running)  # fmt: skip
    return _said(ctx, dom, "Device updated successfully", state=args.state)


async def domifaddr(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    found = await dom.interface_addresses(args.source)
    if args.interface:
        wanted = args.interface.lower()
        found = [i for i in found if wanted in (i.name.lower(), i.hwaddr)]
    if ctx.json:
        emit_json([to_wire(i) for i in found])
        return 0
    rows = [(i.name if n == 0 else "-", i.hwaddr if n == 0 else "-", a.type,
             f"{a.addr}/{a.prefix}") for i in found for n, a in enumerate(i.addrs)]  # fmt: skip
    print(table(["Name", "MAC address", "Protocol", "Address"], rows))
    return 0


async def domiftune(ctx: Context, args: argparse.Namespace) -> int:
    if args.current and (args.live or args.config):
        raise InvalidArgument("--current is exclusive with --live and --config")
    inbound = parse_rate(args.inbound, "inbound") if args.inbound is not None else None
    outbound = parse_rate(args.outbound, "outbound") if args.outbound is not None else None
    dom = await ctx.domain(args.host, args.domain)
    if inbound is None and outbound is None:
        found = await dom.interface_parameters(args.interface, live=args.live,
                                               config=args.config)  # fmt: skip
        values = [(f"{d}.{n}", getattr(getattr(found, d), n)) for d in ("inbound", "outbound")
                  for n in RATE_FIELDS if (d, n) != ("outbound", "floor")]  # fmt: skip
        if ctx.json:
            emit_json(dict(values))
        else:
            print("\n".join(f"{name:<15}: {value}" for name, value in values))
        return 0
    await dom.set_interface_parameters(args.interface, inbound=inbound, outbound=outbound,
                                       live=args.live, config=args.config)  # fmt: skip
    if ctx.json:
        emit_json({"host": dom.host.name, "domain": dom.ref, "ok": True})
    return 0
