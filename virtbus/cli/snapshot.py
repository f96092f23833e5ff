"""Snapshot verbs under virsh's names and flags: snapshot-create, snapshot-create-as,
snapshot-list, snapshot-info, snapshot-dumpxml, snapshot-current, snapshot-parent,
snapshot-revert, snapshot-delete. Listing filters run here, over ``domain.snapshot.list``."""

from __future__ import annotations

import argparse
import sys
from xml.sax.saxutils import escape

from virtbus.cli import trees
from virtbus.cli.context import Context
from virtbus.cli.domain import read_xml
from virtbus.cli.output import emit_json, fields, table
from virtbus.client import Domain
from virtbus.errors import InvalidArgument, NoDomainSnapshot, NoSupport
from virtbus.protocol.base import to_wire
from virtbus.protocol.snapshot import SnapshotInfo

_SECURE = "include the domain's secrets (graphics passwords); needs domain.read_secure"


def _target(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help="domain name or uuid")
    p.add_argument("--host", help="host the domain is on (default: found on the bus)")


def _named(p: argparse.ArgumentParser, required: bool = False) -> None:
    """virsh's ``[snapshotname] [--current]`` (the name is required where virsh needs it)."""
    p.add_argument("snapshotname", nargs=None if required else "?", help="snapshot name")
    if not required:
        p.add_argument("--current", action="store_true", help="the current snapshot")


def _refused(p: argparse.ArgumentParser, *flags: str) -> None:
    """virsh flags virtbus does not implement yet: accepted by the parser, refused clearly."""
    for flag in flags:
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)


def _external_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disk-only", action="store_true",
                   help="external: each disk goes on to a new qcow2 overlay")  # fmt: skip
    p.add_argument("--quiesce", action="store_true",
                   help="freeze the guest's file systems through its guest agent (refused:"
                   " virtbus does not talk to guest agents yet)")  # fmt: skip
    p.add_argument("--halt", action="store_true", help="stop the domain once it is taken")
    p.add_argument("--live", action="store_true",
                   help="with --memspec: write the memory while the guest runs")  # fmt: skip


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("snapshot-create", help="take a snapshot from <domainsnapshot> XML")
    _target(p)
    p.add_argument("xmlfile", nargs="?", help="<domainsnapshot> XML ('-' for stdin)")
    _refused(p, "--redefine", "--no-metadata", "--reuse-external")
    _external_flags(p)
    p.add_argument("--atomic", action="store_true", help="all or nothing (always so)")
    p.set_defaults(func=snapshot_create)
    p = sub.add_parser("snapshot-create-as", help="take a snapshot from a name and description")
    _target(p)
    p.add_argument("name", nargs="?", help="snapshot name (default: the time)")
    p.add_argument("description", nargs="?", help="description")
    p.add_argument("--name", dest="opt_name", help="snapshot name")
    p.add_argument("--description", dest="opt_description", help="description")
    p.add_argument("--print-xml", action="store_true", help="print the XML, take nothing")
    p.add_argument("--memspec", help="memory: [file=]PATH[,snapshot=external] (a save image)"
                   " or snapshot=internal|no")  # fmt: skip
    p.add_argument("--diskspec", action="append", default=[],
                   help="disk[,snapshot=internal|external|no][,file=PATH]")  # fmt: skip
    _refused(p, "--no-metadata", "--reuse-external")
    _external_flags(p)
    p.add_argument("--atomic", action="store_true", help="all or nothing (always so)")
    p.set_defaults(func=snapshot_create_as)
    p = sub.add_parser("snapshot-list", help="list a domain's snapshots")
    _target(p)
    for flag, text in (("--parent", "add a column with the parent"),
                       ("--roots", "only snapshots without a parent"),
                       ("--leaves", "only snapshots without children"),
                       ("--no-leaves", "only snapshots with children"),
                       ("--tree", "the snapshots as a tree"),
                       ("--current", "only the current snapshot"),
                       ("--name", "names only"),
                       ("--descendants", "with --from: every descendant, not only children"),
                       ("--topological", "parents before children (always so)")):  # fmt: skip
        p.add_argument(flag, action="store_true", help=text)
    p.add_argument("--from", dest="from_", metavar="SNAPSHOT", help="only below this snapshot")
    p.set_defaults(func=snapshot_list)
    p = sub.add_parser("snapshot-info", help="a snapshot's information")
    _target(p)
    _named(p)
    p.set_defaults(func=snapshot_info)
    p = sub.add_parser("snapshot-dumpxml", help="a snapshot's <domainsnapshot> XML")
    _target(p)
    _named(p, required=True)
    p.add_argument("--security-info", action="store_true", help=_SECURE)
    p.set_defaults(func=snapshot_dumpxml)
    p = sub.add_parser("snapshot-current", help="the current snapshot (its XML, or --name)")
    _target(p)
    p.add_argument("--name", action="store_true", help="its name only")
    p.add_argument("--security-info", action="store_true", help=_SECURE)
    p.set_defaults(func=snapshot_current)
    p = sub.add_parser("snapshot-parent", help="a snapshot's parent")
    _target(p)
    _named(p)
    p.set_defaults(func=snapshot_parent)
    p = sub.add_parser("snapshot-revert", help="bring a domain back to a snapshot")
    _target(p)
    _named(p)
    p.add_argument("--running", action="store_true", help="running afterwards")
    p.add_argument("--paused", action="store_true", help="paused afterwards")
    p.add_argument("--force", action="store_true", help="(accepted; nothing needs forcing)")
    p.set_defaults(func=snapshot_revert)
    p = sub.add_parser("snapshot-delete", help="delete a snapshot")
    _target(p)
    _named(p)
    p.add_argument("--children", action="store_true", help="its descendants too")
    p.add_argument("--children-only", action="store_true", help="only its descendants")
    p.add_argument("--metadata", action="store_true", help="forget it, keep the images' data")
    p.set_defaults(func=snapshot_delete)


def _check_refused(args: argparse.Namespace) -> None:
    for flag in ("redefine", "no_metadata", "reuse_external"):
        if getattr(args, flag, False):
            raise NoSupport(f"snapshot --{flag.replace('_', '-')} is not supported yet"
                            " (internal, --disk-only and --memspec snapshots are)")  # fmt: skip


async def _name(dom: Domain, args: argparse.Namespace) -> str:
    """The snapshot a verb acts on: its argument, or with --current the current one."""
    if args.snapshotname and getattr(args, "current", False):
        raise InvalidArgument("give a snapshot name or --current, not both")
    if args.snapshotname:
        return str(args.snapshotname)
    if getattr(args, "current", False):
        return (await dom.snapshot_current()).name
    raise InvalidArgument("a snapshot name (or --current) is required")


async def snapshot_create(ctx: Context, args: argparse.Namespace) -> int:
    _check_refused(args)
    xml = read_xml(args.xmlfile) if args.xmlfile else None
    dom = await ctx.domain(args.host, args.domain)
    snap = await dom.snapshot_create(xml, disk_only=args.disk_only, quiesce=args.quiesce,
                                     halt=args.halt, live=args.live)  # fmt: skip
    return _created(ctx, dom, snap, args.xmlfile)


def _created(ctx: Context, dom: Domain, snap: SnapshotInfo, source: str | None) -> int:
    if ctx.json:
        emit_json({"host": dom.host.name, **to_wire(snap)})
    elif source:
        print(f"Domain snapshot {snap.name} created from '{source}'")
    else:
        print(f"Domain snapshot {snap.name} created")
    return 0


def request_xml(name: str | None, description: str | None, memspec: str | None,
                diskspecs: list[str]) -> str:  # fmt: skip
    """snapshot-create-as's options as a ``<domainsnapshot>`` request (virsh builds it so)."""
    parts = ["<domainsnapshot>"]
    if name:
        parts.append(f"  <name>{escape(name)}</name>")
    if description:
        parts.append(f"  <description>{escape(description)}</description>")
    if memspec:
        parts.append(_memory_xml(memspec))
    if diskspecs:
        parts.append("  <disks>")
        for spec in diskspecs:
            disk, _, rest = spec.partition(",")
            opts = dict(kv.partition("=")[::2] for kv in rest.split(",") if kv)
            mode = opts.get("snapshot", "external" if "file" in opts else "internal")
            name_attr, mode_attr = _attr(disk), _attr(mode)
            if mode != "external":
                parts.append(f"    <disk name='{name_attr}' snapshot='{mode_attr}'/>")
                continue
            parts.append(f"    <disk name='{name_attr}' snapshot='external'>")
            if "driver" in opts:
                parts.append(f"      <driver type='{_attr(opts['driver'])}'/>")
            if "file" in opts:
                parts.append(f"      <source file='{_attr(opts['file'])}'/>")
            parts.append("    </disk>")
        parts.append("  </disks>")
    parts.append("</domainsnapshot>")
    return "\n".join(parts) + "\n"


def _memory_xml(memspec: str) -> str:
    """virsh's ``--memspec [file=]PATH[,snapshot=MODE]`` (or ``snapshot=MODE`` alone) as
    ``<memory>``; a file without a mode is external, as libvirt takes it."""
    opts: dict[str, str] = {}
    for item in memspec.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            key, value = ("snapshot", key) if key in _MEMORY_MODES else ("file", key)
        if key not in ("file", "snapshot") or key in opts:
            raise InvalidArgument(f"bad --memspec {memspec!r}: [file=]PATH[,snapshot=MODE]")
        opts[key] = value
    attrs = f" snapshot='{_attr(opts['snapshot'])}'" if "snapshot" in opts else ""
    if "file" in opts:
        attrs += f" file='{_attr(opts['file'])}'"
    return f"  <memory{attrs}/>"


_MEMORY_MODES = ("no", "internal", "external", "manual")


def _attr(value: str) -> str:
    return escape(value, {"'": "&apos;"})


async def snapshot_create_as(ctx: Context, args: argparse.Namespace) -> int:
    _check_refused(args)
    name = args.opt_name or args.name
    description = args.opt_description or args.description
    xml = request_xml(name, description, args.memspec, args.diskspec)
    if args.print_xml:
        sys.stdout.write(xml)
        return 0
    dom = await ctx.domain(args.host, args.domain)
    snap = await dom.snapshot_create(xml, disk_only=args.disk_only, quiesce=args.quiesce,
                                     halt=args.halt, live=args.live)  # fmt: skip
    return _created(ctx, dom, snap, None)


def select(snaps: list[SnapshotInfo], args: argparse.Namespace) -> list[SnapshotInfo]:
    """virsh snapshot-list's filters (``--current`` besides the shared ones)."""
    snaps = trees.select(snaps, args, lambda name: NoDomainSnapshot(f"no snapshot named '{name}'"))
    return [s for s in snaps if s.current] if args.current else snaps


async def snapshot_list(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    snaps = select(await dom.snapshots(), args)
    if ctx.json:
        emit_json([to_wire(s) for s in snaps])
    elif args.tree:
        for line in trees.tree_lines(snaps):
            print(line)
    elif args.name:
        for s in snaps:
            print(s.name)
    elif args.parent:
        print(table(["Name", "Creation Time", "State", "Parent"],
                    [(s.name, trees.when(s.creation_time), s.state, s.parent or "")
                     for s in snaps]))  # fmt: skip
    else:
        print(table(["Name", "Creation Time", "State"],
                    [(s.name, trees.when(s.creation_time), s.state) for s in snaps]))  # fmt: skip
    return 0


async def snapshot_info(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    snap = await dom.snapshot(await _name(dom, args))
    if ctx.json:
        emit_json({"host": dom.host.name, **to_wire(snap)})
        return 0
    print(fields([
        ("Name", snap.name), ("Domain", snap.domain), ("Current", "yes" if snap.current else "no"),
        ("State", snap.state), ("Location", snap.location), ("Parent", snap.parent or "-"),
        ("Children", snap.children), ("Descendants", snap.descendants), ("Metadata", "yes"),
    ]))  # fmt: skip
    return 0


async def snapshot_dumpxml(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    sys.stdout.write(await dom.snapshot_xml(args.snapshotname, security_info=args.security_info))
    return 0


async def snapshot_current(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    snap = await dom.snapshot_current()
    if ctx.json:
        emit_json({"host": dom.host.name, **to_wire(snap)})
    elif args.name:
        print(snap.name)
    else:
        sys.stdout.write(await dom.snapshot_xml(snap.name, security_info=args.security_info))
    return 0


async def snapshot_parent(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    snap = await dom.snapshot(await _name(dom, args))
    if snap.parent is None:
        raise NoDomainSnapshot(f"snapshot '{snap.name}' has no parent")
    if ctx.json:
        emit_json({"host": dom.host.name, "snapshot": snap.name, "parent": snap.parent})
    else:
        print(snap.parent)
    return 0


async def snapshot_revert(ctx: Context, args: argparse.Namespace) -> int:
    if args.running and args.paused:
        raise InvalidArgument("--running and --paused are mutually exclusive")
    dom = await ctx.domain(args.host, args.domain)
    name = await _name(dom, args)
    status = await dom.snapshot_revert(name, running=args.running, paused=args.paused)
    if ctx.json:
        emit_json({"host": dom.host.name, "domain": args.domain, "snapshot": name,
                   **to_wire(status)})  # fmt: skip
    return 0  # virsh prints nothing


async def snapshot_delete(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    name = await _name(dom, args)
    deleted = await dom.snapshot_delete(name, children=args.children,
                                        children_only=args.children_only,
                                        metadata=args.metadata)  # fmt: skip
    if ctx.json:
        emit_json({"host": dom.host.name, "domain": args.domain, "deleted": deleted})
    elif args.children_only:
        print(f"Domain snapshot {name} children deleted")
    else:
        print(f"Domain snapshot {name} deleted")
    return 0
