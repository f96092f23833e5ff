"""Disk verbs under virsh's names: attach-disk, detach-disk, attach-device,
detach-device (with ``--live``, ``--config``, ``--persistent``, ``--current``),
domblklist and domblkinfo."""

from __future__ import annotations

import argparse
import sys

from virtbus.cli.context import Context
from virtbus.cli.domain import read_xml
from virtbus.cli.output import emit_json, fields, table
from virtbus.client import Domain
from virtbus.errors import InvalidArgument
from virtbus.protocol.base import to_wire
from virtbus.storage import format_bytes
from virtbus.storage.builders import DiskArgs, block_list, disk_xml


def _flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--live", action="store_true", help="affect the running domain")
    p.add_argument("--config", action="store_true", help="affect the next boot")
    p.add_argument("--persistent", action="store_true", help="live, and for the next boot")
    p.add_argument("--current", action="store_true", help="live if running, else the next boot")


def _target(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help="domain name or uuid")
    p.add_argument("--host", help="host the domain is on (default: found on the bus)")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("attach-disk", help="attach a disk to a domain")
    _target(p)
    p.add_argument("source", help="file or block device")
    p.add_argument("target", help="target device in the guest (vdb, sdc)")
    for opt in ("targetbus", "driver", "subdriver", "cache", "io", "type", "mode",
                "sourcetype", "serial"):  # fmt: skip
        p.add_argument(f"--{opt}")
    p.add_argument("--print-xml", action="store_true", help="print the XML, attach nothing")
    _flags(p)
    p.set_defaults(func=attach_disk)
    p = sub.add_parser("detach-disk", help="detach a disk from a domain")
    _target(p)
    p.add_argument("target", help="target device (vdb)")
    _flags(p)
    p.set_defaults(func=detach_disk)
    for verb in ("attach-device", "detach-device"):
        what = verb.split("-")[0]
        p = sub.add_parser(verb, help=f"{what} a device (a <disk> or an <interface>) from XML")
        _target(p)
        p.add_argument("file", help="device XML file ('-' for stdin)")
        _flags(p)
        p.set_defaults(func=device_change, verb=verb)
    p = sub.add_parser("domblklist", help="list a domain's block devices")
    _target(p)
    p.add_argument("--details", action="store_true", help="type and device too")
    p.set_defaults(func=domblklist)
    p = sub.add_parser("domblkinfo", help="a disk's capacity, allocation and physical size")
    _target(p)
    p.add_argument("target", help="target device (vda)")
    p.add_argument("--human", action="store_true", help="sizes with units")
    p.set_defaults(func=domblkinfo)


def _affect(args: argparse.Namespace) -> tuple[bool, bool]:
    """virsh's flags to (live, config); neither is CURRENT."""
    live, config = args.live, args.config
    if args.persistent:
        live, config = True, True
    return live, config


async def _change(ctx: Context, args: argparse.Namespace, dom: Domain, xml: str,
                  attach: bool) -> None:  # fmt: skip
    live, config = _affect(args)
    if args.persistent:  # live when running, the definition always
        live = (await dom.state()).state != "shutoff"
    if attach:
        await dom.attach_device(xml, live=live, config=config)
    else:
        await dom.detach_device(xml, live=live, config=config)


async def attach_disk(ctx: Context, args: argparse.Namespace) -> int:
    xml = disk_xml(DiskArgs(args.source, args.target, args.targetbus, args.driver,
                            args.subdriver, args.cache, args.io, args.type, args.mode,
                            args.sourcetype, args.serial))  # fmt: skip
    if args.print_xml:
        sys.stdout.write(xml)
        return 0
    dom = await ctx.domain(args.host, args.domain)
    await _change(ctx, args, dom, xml, attach=True)
    return _said(ctx, dom, "Disk attached successfully", target=args.target)


async def detach_disk(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    await _change(ctx, args, dom, f"<disk><target dev='{_safe_dev(args.target)}'/></disk>",
                  attach=False)  # fmt: skip
    return _said(ctx, dom, "Disk detached successfully", target=args.target)


def _safe_dev(dev: str) -> str:
    if not dev.isascii() or not dev.replace("_", "").isalnum():
        raise InvalidArgument(f"invalid target device {dev!r}")
    return dev


async def device_change(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    attach = args.verb == "attach-device"
    await _change(ctx, args, dom, read_xml(args.file), attach=attach)
    word = "attached" if attach else "detached"
    return _said(ctx, dom, f"Device {word} successfully")


def _said(ctx: Context, dom: Domain, text: str, **extra: str) -> int:
    if ctx.json:
        emit_json({"host": dom.host.name, "domain": dom.ref, "ok": True, **extra})
    else:
        print(text)
    return 0


async def domblklist(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    from virtbus.domain import parse_domain_xml  # the XML model: only for this verb

    defn = parse_domain_xml(await dom.xml())
    rows = block_list(defn)
    if ctx.json:
        emit_json([to_wire(r) for r in rows])
    elif args.details:
        print(table(["Type", "Device", "Target", "Source"],
                    [(r.type, r.device, r.target, r.source) for r in rows]))  # fmt: skip
    else:
        print(table(["Target", "Source"], [(r.target, r.source) for r in rows]))
    return 0


async def domblkinfo(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    info = await dom.block_info(args.target)
    if ctx.json:
        emit_json(to_wire(info))
        return 0

    def size(n: int) -> str:
        return format_bytes(n) if args.human else str(n)

    print(fields([("Capacity", size(info.capacity)), ("Allocation", size(info.allocation)),
                  ("Physical", size(info.physical))]))  # fmt: skip
    return 0
