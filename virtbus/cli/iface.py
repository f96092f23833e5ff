"""NIC verbs under virsh's names: attach-interface, detach-interface (with ``--live``,
``--config``, ``--persistent``, ``--current``), domiflist, domif-getlink, domif-setlink
and domifaddr. attach-device/detach-device with an ``<interface>`` are in disk.py.

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

TYPES = ("network", "bridge", "user")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("attach-interface", help="attach a NIC to a domain")
    _target(p)
    p.add_argument("type", choices=TYPES, help="network, bridge or user")
    p.add_argument("source", nargs="?", help="the network or bridge name")
    p.add_argument("--model", help="NIC model (virtio, e1000, rtl8139, ...)")
    p.add_argument("--mac", help="MAC address (default: generated, 52:54:00:...)")
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


def interface_xml(itype: str, source: str | None, model: str | None, mac: str | None) -> str:
    """The ``<interface>`` virsh's attach-interface builds."""
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
    xml = interface_xml(args.type, args.source, args.model, args.mac)
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
