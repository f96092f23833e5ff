"""Checkpoint and backup verbs under virsh's names and flags: checkpoint-create,
checkpoint-create-as, checkpoint-list, checkpoint-info, checkpoint-dumpxml,
checkpoint-parent, checkpoint-delete, backup-begin, backup-dumpxml, domjobinfo,
domjobabort. Listing filters run here, over ``domain.checkpoint.list``."""

from __future__ import annotations

import argparse
import sys
from xml.sax.saxutils import escape

from virtbus.cli import trees
from virtbus.cli.context import Context
from virtbus.cli.domain import read_xml
from virtbus.cli.output import emit_json, fields, table
from virtbus.errors import InvalidArgument, NoDomainCheckpoint, NoSupport
from virtbus.protocol.backup import CheckpointInfo, DomainJobInfo
from virtbus.protocol.base import to_wire

_JOB_TYPES = {"none": "None", "unbounded": "Unbounded", "completed": "Completed",
              "failed": "Failed", "cancelled": "Cancelled"}  # fmt: skip


def _target(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help="domain name or uuid")
    p.add_argument("--host", help="host the domain is on (default: found on the bus)")


def _named(p: argparse.ArgumentParser) -> None:
    _target(p)
    p.add_argument("checkpointname", help="checkpoint name")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("checkpoint-create", help="create a checkpoint from <domaincheckpoint>")
    _target(p)
    p.add_argument("xmlfile", nargs="?", help="<domaincheckpoint> XML ('-' for stdin)")
    p.add_argument("--redefine", action="store_true", help="(refused: not supported yet)")
    p.add_argument("--quiesce", action="store_true", help="(refused: needs a guest agent)")
    p.set_defaults(func=checkpoint_create)
    p = sub.add_parser("checkpoint-create-as", help="create a checkpoint from a name")
    _target(p)
    p.add_argument("name", nargs="?", help="checkpoint name (default: the time)")
    p.add_argument("--name", dest="opt_name", help="checkpoint name")
    p.add_argument("--description", help="its description")
    p.add_argument("--diskspec", action="append", default=[],
                   help="disk[,checkpoint=bitmap|no]")  # fmt: skip
    p.add_argument("--print-xml", action="store_true", help="print the XML, create nothing")
    p.add_argument("--quiesce", action="store_true", help="(refused: needs a guest agent)")
    p.set_defaults(func=checkpoint_create_as)
    p = sub.add_parser("checkpoint-list", help="list a domain's checkpoints")
    _target(p)
    for flag, text in (("--parent", "show each one's parent"),
                       ("--roots", "only checkpoints without a parent"),
                       ("--leaves", "only checkpoints without children"),
                       ("--no-leaves", "only checkpoints with children"),
                       ("--tree", "the checkpoints as a tree"),
                       ("--name", "only their names"),
                       ("--descendants", "with --from: every descendant")):  # fmt: skip
        p.add_argument(flag, action="store_true", help=text)
    p.add_argument("--from", dest="from_", metavar="CHECKPOINT", help="only below this one")
    p.set_defaults(func=checkpoint_list)
    p = sub.add_parser("checkpoint-info", help="a checkpoint's information")
    _named(p)
    p.set_defaults(func=checkpoint_info)
    p = sub.add_parser("checkpoint-dumpxml", help="a checkpoint's <domaincheckpoint> XML")
    _named(p)
    p.set_defaults(func=checkpoint_dumpxml)
    p = sub.add_parser("checkpoint-parent", help="a checkpoint's parent")
    _named(p)
    p.set_defaults(func=checkpoint_parent)
    p = sub.add_parser("checkpoint-delete", help="delete a checkpoint and its bitmaps")
    _named(p)
    p.add_argument("--metadata", action="store_true", help="forget it, keep the bitmaps")
    p.set_defaults(func=checkpoint_delete)
    p = sub.add_parser("backup-begin", help="start a push-mode backup (full or incremental)")
    _target(p)
    p.add_argument("backupxml", nargs="?", help="<domainbackup> XML (default: full, all disks)")
    p.add_argument("checkpointxml", nargs="?", help="<domaincheckpoint> XML taken with it")
    p.add_argument("--reuse-external", action="store_true", help="(refused: not supported yet)")
    p.set_defaults(func=backup_begin)
    p = sub.add_parser("backup-dumpxml", help="the running backup's <domainbackup> XML")
    _target(p)
    p.set_defaults(func=backup_dumpxml)
    p = sub.add_parser("domjobinfo", help="a domain's backup job and its progress")
    _target(p)
    p.add_argument("--completed", action="store_true", help="the last job that ended")
    p.set_defaults(func=domjobinfo)
    p = sub.add_parser("domjobabort", help="cancel a domain's backup job")
    _target(p)
    p.set_defaults(func=domjobabort)


def _refuse(args: argparse.Namespace, verb: str) -> None:
    for flag in ("redefine", "quiesce", "reuse_external"):
        if getattr(args, flag, False):
            raise NoSupport(f"{verb} --{flag.replace('_', '-')} is not supported yet")


def _created(ctx: Context, host: str, cp: CheckpointInfo, source: str | None) -> int:
    if ctx.json:
        emit_json({"host": host, **to_wire(cp)})
    elif source:
        print(f"Domain checkpoint {cp.name} created from '{source}'")
    else:
        print(f"Domain checkpoint {cp.name} created")
    return 0


async def checkpoint_create(ctx: Context, args: argparse.Namespace) -> int:
    _refuse(args, "checkpoint-create")
    xml = read_xml(args.xmlfile) if args.xmlfile else None
    dom = await ctx.domain(args.host, args.domain)
    return _created(ctx, dom.host.name, await dom.checkpoint_create(xml), args.xmlfile)


def request_xml(name: str | None, description: str | None, diskspecs: list[str]) -> str:
    """checkpoint-create-as's options as a ``<domaincheckpoint>`` (virsh builds it so)."""
    parts = ["<domaincheckpoint>"]
    if name:
        parts.append(f"  <name>{escape(name)}</name>")
    if description:
        parts.append(f"  <description>{escape(description)}</description>")
    if diskspecs:
        parts.append("  <disks>")
        for spec in diskspecs:
            disk, *rest = spec.split(",")
            opts = dict(part.split("=", 1) for part in rest if "=" in part)
            mode = opts.get("checkpoint", "bitmap")
            parts.append(f"    <disk name='{_attr(disk)}' checkpoint='{_attr(mode)}'/>")
        parts.append("  </disks>")
    parts.append("</domaincheckpoint>")
    return "\n".join(parts) + "\n"


def _attr(value: str) -> str:
    return escape(value, {"'": "&apos;"})


async def checkpoint_create_as(ctx: Context, args: argparse.Namespace) -> int:
    _refuse(args, "checkpoint-create-as")
    if args.name and args.opt_name and args.name != args.opt_name:
        raise InvalidArgument("give the checkpoint's name once")
    xml = request_xml(args.opt_name or args.name, args.description, args.diskspec)
    if args.print_xml:
        sys.stdout.write(xml)
        return 0
    dom = await ctx.domain(args.host, args.domain)
    return _created(ctx, dom.host.name, await dom.checkpoint_create(xml), None)


def select(cps: list[CheckpointInfo], args: argparse.Namespace) -> list[CheckpointInfo]:
    """virsh checkpoint-list's filters."""
    return trees.select(cps, args, lambda name: NoDomainCheckpoint(f"no checkpoint named '{name}'"))


async def checkpoint_list(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    cps = select(await dom.checkpoints(), args)
    if ctx.json:
        emit_json([to_wire(c) for c in cps])
    elif args.tree:
        for line in trees.tree_lines(cps):
            print(line)
    elif args.name:
        for c in cps:
            print(c.name)
    elif args.parent:
        rows = [(c.name, trees.when(c.creation_time), c.parent or "") for c in cps]
        print(table(["Name", "Creation Time", "Parent"], rows))
    else:
        print(
            table(["Name", "Creation Time"], [(c.name, trees.when(c.creation_time)) for c in cps])
        )
    return 0


async def checkpoint_info(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    cp = await dom.checkpoint(args.checkpointname)
    if ctx.json:
        emit_json({"host": dom.host.name, **to_wire(cp)})
        return 0
    print(fields([("Name", cp.name), ("Domain", cp.domain), ("Parent", cp.parent or "-"),
                  ("Children", cp.children), ("Descendants", cp.descendants)]))  # fmt: skip
    return 0


async def checkpoint_dumpxml(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    sys.stdout.write(await dom.checkpoint_xml(args.checkpointname))
    return 0


async def checkpoint_parent(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    cp = await dom.checkpoint(args.checkpointname)
    if cp.parent is None:
        raise NoDomainCheckpoint(f"checkpoint '{cp.name}' has no parent")
    if ctx.json:
        emit_json({"host": dom.host.name, "checkpoint": cp.name, "parent": cp.parent})
    else:
        print(cp.parent)
    return 0


async def checkpoint_delete(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    deleted = await dom.checkpoint_delete(args.checkpointname, metadata=args.metadata)
    if ctx.json:
        emit_json({"host": dom.host.name, "deleted": deleted})
    else:
        print(f"Domain checkpoint {args.checkpointname} deleted")
    return 0


async def backup_begin(ctx: Context, args: argparse.Namespace) -> int:
    _refuse(args, "backup-begin")
    backup = read_xml(args.backupxml) if args.backupxml else None
    checkpoint = read_xml(args.checkpointxml) if args.checkpointxml else None
    dom = await ctx.domain(args.host, args.domain)
    started = await dom.backup_begin(backup, checkpoint)
    if ctx.json:
        emit_json({"host": dom.host.name, **to_wire(started)})
    else:
        print("Backup started")
    return 0


async def backup_dumpxml(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    sys.stdout.write(await dom.backup_xml())
    return 0


def _job_lines(info: DomainJobInfo) -> str:
    pairs: list[tuple[str, object]] = [("Job type", _JOB_TYPES.get(info.type, info.type))]
    if info.type == "none":
        return fields(pairs)
    pairs += [("Operation", (info.operation or "").capitalize()),
              ("Time elapsed", f"{info.time_elapsed_ms}         ms"),
              ("File processed", _size(info.data_processed)),
              ("File remaining", _size(info.data_remaining)),
              ("File total", _size(info.data_total))]  # fmt: skip
    if info.error:
        pairs.append(("Error message", info.error))
    return fields(pairs)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n} B"


async def domjobinfo(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    info = await dom.job_info(completed=args.completed)
    if ctx.json:
        emit_json(to_wire(info))
    else:
        print(_job_lines(info))
    return 0


async def domjobabort(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    info = await dom.job_abort()
    if ctx.json:
        emit_json(to_wire(info))
    return 0
