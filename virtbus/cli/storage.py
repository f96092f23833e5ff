"""Storage verbs under virsh's names: pool-*, vol-* (one host's pools: ``--host H``, else
``$VIRTBUS_HOST``). Long transfers and jobs draw a progress bar on a terminal."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from virtbus.cli.context import Context
from virtbus.cli.domain import read_xml
from virtbus.cli.output import emit_json, fields, table
from virtbus.cli.term import ProgressLine, bar
from virtbus.client.core import Host
from virtbus.client.storage import Job, Pool, Progress, Volume
from virtbus.errors import InvalidArgument
from virtbus.protocol.base import to_wire
from virtbus.protocol.storage import PoolInfo, VolumeInfo
from virtbus.storage import Backing, check_name, format_bytes, parse_size_arg, volume_xml
from virtbus.storage.builders import PoolArgs, pool_xml

WIPE_ALGORITHMS = ("zero", "nnsa", "dod", "bsi", "gutmann", "schneier", "pfitzner7",
                   "pfitzner33", "random", "trim")  # fmt: skip


def _host_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="the host whose pools these are (default: $VIRTBUS_HOST)")


def _overwrite(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", dest="overwrite", action="store_const", const=True,
                   default=None, help="overwrite what is on the device")  # fmt: skip
    g.add_argument("--no-overwrite", dest="overwrite", action="store_const", const=False,
                   help="build only if nothing is on the device")  # fmt: skip


def _pool_as_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("type", help="dir, fs, disk, iscsi-direct, ... (virsh's types)")
    p.add_argument("--print-xml", action="store_true", help="print the XML, do nothing")
    for opt in ("source-host", "source-path", "source-dev", "source-name", "source-format",
                "source-initiator", "target"):  # fmt: skip
        p.add_argument(f"--{opt}")


def _vol_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("vol", help="volume name (with --pool), or its path or key")
    p.add_argument("--pool", help="pool name or uuid")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pool-define", help="define a storage pool from an XML file")
    p.add_argument("file")
    p.set_defaults(func=pool_define)
    p = sub.add_parser("pool-define-as", help="define a storage pool from arguments")
    _pool_as_args(p)
    p.set_defaults(func=pool_define_as)
    p = sub.add_parser("pool-create", help="create and start a transient pool from XML")
    p.add_argument("file")
    p.add_argument("--build", action="store_true")
    _overwrite(p)
    p.set_defaults(func=pool_create)
    p = sub.add_parser("pool-create-as", help="create and start a transient pool from arguments")
    _pool_as_args(p)
    p.add_argument("--build", action="store_true")
    _overwrite(p)
    p.set_defaults(func=pool_create_as)
    for verb, helptext in (("pool-build", "build a pool"), ("pool-start", "start a pool"),
                           ("pool-destroy", "stop a pool"),
                           ("pool-delete", "delete what pool-build made"),
                           ("pool-undefine", "remove an inactive pool's definition"),
                           ("pool-refresh", "rescan a pool"), ("pool-info", "pool information"),
                           ("pool-dumpxml", "a pool's XML"), ("pool-autostart", "autostart a pool"),
                           ("pool-name", "a pool's name from its uuid"),
                           ("pool-uuid", "a pool's uuid from its name")):  # fmt: skip
        p = sub.add_parser(verb, help=helptext)
        p.add_argument("pool", help="pool name or uuid")
        if verb in ("pool-build", "pool-start"):
            _overwrite(p)
        if verb == "pool-start":
            p.add_argument("--build", action="store_true", help="build it first")
        if verb == "pool-autostart":
            p.add_argument("--disable", action="store_true")
        if verb == "pool-info":
            p.add_argument("--bytes", action="store_true", help="sizes in bytes")
        p.set_defaults(func=pool_verb, verb=verb)
    p = sub.add_parser("pool-list", help="list storage pools")
    p.add_argument("--all", action="store_true")
    p.add_argument("--inactive", action="store_true")
    p.add_argument("--details", action="store_true")
    p.set_defaults(func=pool_list)

    p = sub.add_parser("vol-create", help="create a volume from an XML file")
    p.add_argument("pool")
    p.add_argument("file")
    p.add_argument("--prealloc-metadata", action="store_true")
    p.set_defaults(func=vol_create)
    p = sub.add_parser("vol-create-as", help="create a volume from arguments")
    p.add_argument("pool")
    p.add_argument("name")
    p.add_argument("capacity", help="size with an optional unit (10G, 512M, bytes by default)")
    p.add_argument("--allocation")
    p.add_argument("--format", help="raw, qcow2 (files) or a partition type")
    p.add_argument("--backing-vol", help="the backing volume (name in the pool, or a path)")
    p.add_argument("--backing-vol-format")
    p.add_argument("--prealloc-metadata", action="store_true")
    p.add_argument("--print-xml", action="store_true")
    p.set_defaults(func=vol_create_as)
    p = sub.add_parser("vol-create-from", help="create a volume as a copy of another")
    p.add_argument("pool")
    p.add_argument("file", help="the new volume's XML")
    p.add_argument("vol", help="the volume to copy")
    p.add_argument("--inputpool", help="the pool of the volume to copy (default: pool)")
    p.set_defaults(func=vol_create_from)
    p = sub.add_parser("vol-clone", help="clone a volume (same pool, same format)")
    _vol_args(p)
    p.add_argument("newname")
    p.set_defaults(func=vol_clone)
    for verb, helptext in (("vol-delete", "delete a volume"), ("vol-info", "volume information"),
                           ("vol-dumpxml", "a volume's XML"), ("vol-path", "a volume's path"),
                           ("vol-key", "a volume's key"), ("vol-pool", "a volume's pool"),
                           ("vol-name", "a volume's name")):  # fmt: skip
        p = sub.add_parser(verb, help=helptext)
        _vol_args(p)
        if verb == "vol-info":
            p.add_argument("--bytes", action="store_true")
        if verb == "vol-pool":
            p.add_argument("--uuid", action="store_true", help="print the pool's uuid")
        p.set_defaults(func=vol_verb, verb=verb)
    p = sub.add_parser("vol-wipe", help="wipe a volume's content")
    _vol_args(p)
    p.add_argument("--algorithm", default="zero", choices=WIPE_ALGORITHMS)
    p.set_defaults(func=vol_wipe)
    p = sub.add_parser("vol-resize", help="resize a volume")
    _vol_args(p)
    p.add_argument("capacity")
    p.add_argument("--allocate", action="store_true")
    p.add_argument("--delta", action="store_true")
    p.add_argument("--shrink", action="store_true")
    p.set_defaults(func=vol_resize)
    p = sub.add_parser("vol-list", help="list a pool's volumes")
    p.add_argument("pool")
    p.add_argument("--details", action="store_true")
    p.set_defaults(func=vol_list)
    for verb, helptext in (("vol-upload", "upload a file into a volume"),
                           ("vol-download", "download a volume into a file")):  # fmt: skip
        p = sub.add_parser(verb, help=helptext)
        _vol_args(p)
        p.add_argument("file")
        p.set_defaults(func=vol_transfer, verb=verb)
    for name, parser in sub.choices.items():
        if name.startswith(("pool-", "vol-")):
            _host_arg(parser)


# --- helpers --------------------------------------------------------------------------
def _host(ctx: Context, args: argparse.Namespace) -> Host:
    name = ctx.explicit_host(args.host)
    if not name:
        raise InvalidArgument("pools are per host: pass --host H (or set $VIRTBUS_HOST)")
    return ctx.client.host(name)


async def _volume(ctx: Context, args: argparse.Namespace) -> Volume:
    """``vol`` with ``--pool``: a name; without: a path or key, looked up on the host."""
    host = _host(ctx, args)
    if args.pool:
        return host.pool(args.pool).volume(args.vol)
    found = await host.find_volume(args.vol)
    return host.pool(found.pool).volume(found.name)


def _size(value: str, human: bool) -> str:
    return format_bytes(int(value)) if human else f"{value} bytes"


def _track(ctx: Context, what: str) -> tuple[ProgressLine, Progress]:
    line = ProgressLine(sys.stderr)

    def progress(done: int, total: int) -> None:
        if line.tty and not ctx.json:
            line.update(f"{what} {bar(done / total if total else 1.0)} {format_bytes(done)}")

    return line, progress


async def _wait_job(ctx: Context, job: Job, what: str) -> dict[str, object]:
    line, progress = _track(ctx, what)
    try:
        info = await job.wait(progress)
    finally:
        line.clear()
    wired: dict[str, object] = to_wire(info)
    return wired


def _pool_fields(info: PoolInfo, in_bytes: bool) -> str:
    def size(n: int) -> str:
        return f"{n} bytes" if in_bytes else format_bytes(n)

    return fields([
        ("Name", info.name), ("UUID", info.uuid), ("State", info.state),
        ("Persistent", "yes" if info.persistent else "no"),
        ("Autostart", "yes" if info.autostart else "no"), ("Capacity", size(info.capacity)),
        ("Allocation", size(info.allocation)), ("Available", size(info.available)),
        ("Owner", info.owner or "-"),
    ])  # fmt: skip


# --- pools ----------------------------------------------------------------------------
async def pool_define(ctx: Context, args: argparse.Namespace) -> int:
    pool = await _host(ctx, args).define_pool(read_xml(args.file))
    return _said(ctx, {"pool": pool.ref}, f"Pool {pool.ref} defined from {args.file}")


def _as_xml(args: argparse.Namespace) -> str:
    return pool_xml(PoolArgs(args.name, args.type, args.source_host, args.source_path,
                             args.source_dev, args.source_name, args.source_format,
                             args.source_initiator, args.target))  # fmt: skip


async def pool_define_as(ctx: Context, args: argparse.Namespace) -> int:
    xml = _as_xml(args)
    if args.print_xml:
        sys.stdout.write(xml)
        return 0
    pool = await _host(ctx, args).define_pool(xml)
    return _said(ctx, {"pool": pool.ref}, f"Pool {pool.ref} defined")


async def pool_create(ctx: Context, args: argparse.Namespace) -> int:
    pool = await _host(ctx, args).create_pool(read_xml(args.file), args.build, args.overwrite)
    return _said(ctx, {"pool": pool.ref}, f"Pool {pool.ref} created from {args.file}")


async def pool_create_as(ctx: Context, args: argparse.Namespace) -> int:
    xml = _as_xml(args)
    if args.print_xml:
        sys.stdout.write(xml)
        return 0
    pool = await _host(ctx, args).create_pool(xml, args.build, args.overwrite)
    return _said(ctx, {"pool": pool.ref}, f"Pool {pool.ref} created")


def _said(ctx: Context, data: dict[str, object], text: str) -> int:
    if ctx.json:
        emit_json(data)
    elif text:
        print(text)
    return 0


async def pool_verb(ctx: Context, args: argparse.Namespace) -> int:
    host = _host(ctx, args)
    pool: Pool = host.pool(args.pool)
    verb = args.verb
    if verb in ("pool-info", "pool-name", "pool-uuid"):
        info = await pool.info()
        if ctx.json:
            emit_json(to_wire(info))
        elif verb == "pool-info":
            print(_pool_fields(info, args.bytes))
        else:
            print(info.name if verb == "pool-name" else info.uuid)
        return 0
    if verb == "pool-dumpxml":
        xml = await pool.xml()
        if ctx.json:
            emit_json({"pool": args.pool, "xml": xml})
        else:
            sys.stdout.write(xml)
        return 0
    if verb == "pool-build":
        await pool.build(args.overwrite)
        return _said(ctx, {"pool": args.pool, "built": True}, f"Pool {args.pool} built")
    if verb == "pool-start":
        info = await pool.start(args.build, args.overwrite)
        return _said(ctx, to_wire(info), f"Pool {args.pool} started")
    if verb == "pool-destroy":
        await pool.destroy()
        return _said(ctx, {"pool": args.pool, "destroyed": True}, f"Pool {args.pool} destroyed")
    if verb == "pool-delete":
        await pool.delete()
        return _said(ctx, {"pool": args.pool, "deleted": True}, f"Pool {args.pool} deleted")
    if verb == "pool-undefine":
        await pool.undefine()
        return _said(ctx, {"pool": args.pool, "undefined": True},
                     f"Pool {args.pool} has been undefined")  # fmt: skip
    if verb == "pool-refresh":
        info = await pool.refresh()
        return _said(ctx, to_wire(info), f"Pool {args.pool} refreshed")
    info = await pool.set_autostart(not args.disable)  # pool-autostart
    word = "unmarked as autostarted" if args.disable else "marked as autostarted"
    return _said(ctx, to_wire(info), f"Pool {args.pool} {word}")


async def pool_list(ctx: Context, args: argparse.Namespace) -> int:
    pools = await _host(ctx, args).pools(all=True)
    if args.inactive:
        pools = [p for p in pools if p.state != "running"]
    elif not args.all:
        pools = [p for p in pools if p.state == "running"]
    if ctx.json:
        emit_json([to_wire(p) for p in pools])
        return 0
    if args.details:
        rows = [(p.name, p.state, "yes" if p.persistent else "no",
                 "yes" if p.autostart else "no", format_bytes(p.capacity),
                 format_bytes(p.allocation), format_bytes(p.available)) for p in pools]  # fmt: skip
        print(table(["Name", "State", "Persistent", "Autostart", "Capacity", "Allocation",
                     "Available"], rows))  # fmt: skip
    else:
        rows2 = [(p.name, "active" if p.state == "running" else "inactive",
                  "yes" if p.autostart else "no") for p in pools]  # fmt: skip
        print(table(["Name", "State", "Autostart"], rows2))
    return 0


# --- volumes --------------------------------------------------------------------------
async def vol_create(ctx: Context, args: argparse.Namespace) -> int:
    info = await _host(ctx, args).pool(args.pool).create_volume(read_xml(args.file),
                                                                args.prealloc_metadata)  # fmt: skip
    return _said(ctx, to_wire(info), f"Vol {info.name} created from {args.file}")


async def vol_create_as(ctx: Context, args: argparse.Namespace) -> int:
    check_name(args.name)  # an argument: INVALID_ARG, before it becomes XML
    capacity = parse_size_arg(args.capacity)
    allocation = parse_size_arg(args.allocation, "allocation") if args.allocation else None
    host = _host(ctx, args)
    backing = None
    if args.backing_vol:
        path = args.backing_vol
        if not path.startswith("/"):
            path = (await host.pool(args.pool).volume(path).info()).path
        backing = Backing(path, args.backing_vol_format)
    xml = volume_xml(args.name, capacity, format=args.format, allocation=allocation,
                     backing=backing)  # fmt: skip
    if args.print_xml:
        sys.stdout.write(xml)
        return 0
    info = await host.pool(args.pool).create_volume(xml, args.prealloc_metadata)
    return _said(ctx, to_wire(info), f"Vol {info.name} created")


async def vol_create_from(ctx: Context, args: argparse.Namespace) -> int:
    host = _host(ctx, args)
    source_pool = args.inputpool or args.pool
    job = await host.pool(args.pool).create_volume_from(read_xml(args.file), source_pool, args.vol)
    done = await _wait_job(ctx, job, "copying")
    result = done.get("result")
    name = result.get("name", "") if isinstance(result, dict) else ""
    return _said(ctx, done, f"Vol {name} created from input vol {args.vol}")


async def vol_clone(ctx: Context, args: argparse.Namespace) -> int:
    vol = await _volume(ctx, args)
    src = await vol.info()
    xml = volume_xml(args.newname, None, format=src.format)
    job = await vol.pool.create_volume_from(xml, vol.pool.ref, vol.name)
    done = await _wait_job(ctx, job, "cloning")
    return _said(ctx, done, f"Vol {args.newname} cloned from {vol.name}")


def _vol_fields(info: VolumeInfo, in_bytes: bool) -> str:
    def size(n: int) -> str:
        return f"{n} bytes" if in_bytes else format_bytes(n)

    return fields([
        ("Name", info.name), ("Type", info.type), ("Capacity", size(info.capacity)),
        ("Allocation", size(info.allocation)), ("Physical", size(info.physical)),
        ("Owner", info.owner or "-"),
    ])  # fmt: skip


async def vol_verb(ctx: Context, args: argparse.Namespace) -> int:
    vol = await _volume(ctx, args)
    verb = args.verb
    if verb == "vol-delete":
        await vol.delete()
        return _said(ctx, {"pool": vol.pool.ref, "volume": vol.name, "deleted": True},
                     f"Vol {vol.name} deleted")  # fmt: skip
    if verb == "vol-dumpxml":
        xml = await vol.xml()
        if ctx.json:
            emit_json({"pool": vol.pool.ref, "volume": vol.name, "xml": xml})
        else:
            sys.stdout.write(xml)
        return 0
    info = await vol.info()
    if ctx.json:
        emit_json(to_wire(info))
    elif verb == "vol-info":
        print(_vol_fields(info, args.bytes))
    elif verb == "vol-pool":
        print((await vol.pool.info()).uuid if args.uuid else info.pool)
    else:
        print({"vol-path": info.path, "vol-key": info.key, "vol-name": info.name}[verb])
    return 0


async def vol_wipe(ctx: Context, args: argparse.Namespace) -> int:
    vol = await _volume(ctx, args)
    done = await _wait_job(ctx, await vol.wipe(args.algorithm), "wiping")
    return _said(ctx, done, f"Vol {vol.name} wiped")


async def vol_resize(ctx: Context, args: argparse.Namespace) -> int:
    vol = await _volume(ctx, args)
    capacity = parse_size_arg(args.capacity.lstrip("-") if args.shrink else args.capacity)
    info = await vol.resize(capacity, delta=args.delta, shrink=args.shrink,
                            allocate=args.allocate)  # fmt: skip
    return _said(ctx, to_wire(info), f"Size of volume '{vol.name}' successfully changed to "
                 f"{args.capacity}")  # fmt: skip


async def vol_list(ctx: Context, args: argparse.Namespace) -> int:
    vols = await _host(ctx, args).pool(args.pool).volumes()
    if ctx.json:
        emit_json([to_wire(v) for v in vols])
        return 0
    if args.details:
        print(table(["Name", "Path", "Type", "Capacity", "Allocation"],
                    [(v.name, v.path, v.type, format_bytes(v.capacity),
                      format_bytes(v.allocation)) for v in vols]))  # fmt: skip
    else:
        print(table(["Name", "Path"], [(v.name, v.path) for v in vols]))
    return 0


async def vol_transfer(ctx: Context, args: argparse.Namespace) -> int:
    vol = await _volume(ctx, args)
    line, progress = _track(ctx, "uploading" if args.verb == "vol-upload" else "downloading")
    try:
        if args.verb == "vol-upload":
            info = await vol.upload(Path(args.file), progress)
            moved = info.physical
        else:
            moved = await vol.download(Path(args.file), progress)
    finally:
        line.clear()
    return _said(ctx, {"pool": vol.pool.ref, "volume": vol.name, "bytes": moved}, "")
