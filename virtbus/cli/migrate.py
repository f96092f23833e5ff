"""Scheduler verbs: ``migrate``, ``migrate-cancel``, ``migrations``, ``drain``, ``undrain``.

They talk to the active ``virtbus-scheduler``, which runs the migrations; ``--wait``
follows a migration (and ``drain`` its domains) by polling the scheduler, printing each
change of phase and progress.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from virtbus.cli.context import Context
from virtbus.cli.domain import read_xml
from virtbus.cli.output import emit_json, table
from virtbus.cli.term import ProgressLine, Style, bar
from virtbus.errors import MigrateFailed, OperationFailed
from virtbus.protocol.base import decode, to_wire
from virtbus.protocol.migration import MigrationParams, MigrationRecord

POLL = 0.05  # s between drain status queries while waiting (cheap calls to the scheduler)
TERMINAL = ("completed", "failed", "cancelled")
MIB = 1024 * 1024


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("migrate", help="live-migrate a running domain to another host")
    p.add_argument("domain", help="domain name or uuid")
    p.add_argument("--to", metavar="HOST", help="destination (default: placed by the scheduler)")
    p.add_argument(
        "--offline", action="store_true",
        help="move a shut-off domain's definition instead (containers move this way)",
    )  # fmt: skip
    _migration_options(p)
    p.add_argument(
        "--xml", metavar="FILE",
        help="the definition the destination starts (host paths may differ; same name, uuid)",
    )  # fmt: skip
    p.add_argument("--wait", action="store_true", help="follow it until it ends")
    p.set_defaults(func=migrate)

    p = sub.add_parser("migrate-cancel", help="cancel a domain's migration (it stays put)")
    p.add_argument("domain", help="domain name or uuid")
    p.set_defaults(func=migrate_cancel)

    p = sub.add_parser("migrations", help="list migrations in flight and recently finished")
    p.set_defaults(func=migrations)

    p = sub.add_parser("drain", help="migrate every running domain off a host")
    p.add_argument("host")
    _migration_options(p)
    p.add_argument(
        "--stop-containers", action="store_true",
        help="shut containers down, move them offline and start them elsewhere (they cannot"
        " move live; without this they keep running here)",
    )  # fmt: skip
    p.add_argument("--no-wait", action="store_true", help="return once the drain started")
    p.set_defaults(func=drain)

    p = sub.add_parser("undrain", help="let the scheduler place domains on a host again")
    p.add_argument("host")
    p.set_defaults(func=undrain)


def _migration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bandwidth", type=int, metavar="MiB/s", help="maximum bandwidth")
    p.add_argument("--max-downtime", type=int, metavar="MS", help="maximum downtime")
    p.add_argument("--auto-converge", action="store_true", help="throttle a busy guest")
    p.add_argument("--postcopy", action="store_true", help="switch to post-copy after a pass")
    p.add_argument("--parallel", type=int, default=0, metavar="N", help="multifd channels")
    p.add_argument(
        "--copy-storage-all", action="store_true",
        help="non-shared disks: copy every writable disk to volumes the destination makes",
    )  # fmt: skip
    p.add_argument(
        "--copy-storage-inc", action="store_true",
        help="non-shared disks over a shared base: copy only each disk's top image (its"
        " backing volume must be in the same pool on the destination)",
    )  # fmt: skip
    p.add_argument(
        "--tls", action="store_true",
        help="the stream and the NBD disk copy over TLS with the hosts' certificates"
        " (QEMU's migrate_tls_x509_cert_dir on each host)",
    )  # fmt: skip
    p.add_argument(
        "--tls-destination", metavar="NAME",
        help="with --tls: the name the destination's certificate must carry (default: the"
        " destination host's name)",
    )  # fmt: skip
    p.add_argument(
        "--timeout",
        dest="migration_timeout",
        type=float,
        default=None,
        metavar="S",
        help="roll back when not done within S seconds",
    )


def _params(args: argparse.Namespace) -> MigrationParams:
    """The flags as typed params, checked here as the scheduler and agents check them."""
    given = {
        "auto_converge": args.auto_converge,
        "postcopy": args.postcopy,
        "parallel": args.parallel,
        "bandwidth_mib_s": args.bandwidth,
        "max_downtime_ms": args.max_downtime,
        "copy_storage_all": args.copy_storage_all,
        "copy_storage_inc": args.copy_storage_inc,
        "tls": args.tls,
        "tls_destination": args.tls_destination,
    }
    return decode({k: v for k, v in given.items() if v is not None}, MigrationParams)


def _progress(rec: dict[str, Any], with_bar: bool = False) -> str:
    """The last status map in words; ``with_bar``: a bar instead of the bare percentage."""
    p = rec.get("progress") or {}
    if p.get("phase") == "disk":  # copy-storage: the disks first, then memory
        done, total = p.get("disk_transferred", 0), p.get("disk_total", 0)
        fraction = done / max(1, total)
        amount = f"{done // MIB}/{total // MIB} MiB"
        shown = bar(fraction) if with_bar else f"{int(100 * min(fraction, 1.0))}%"
        return f"disk {shown} ({amount})"
    if not p.get("total"):
        return p.get("status", "") or ""
    fraction = p.get("transferred", 0) / max(1, p["total"])
    if rec.get("state") == "completed":
        fraction = 1.0  # dirty pages resent: transferred may end below or above total
    amount = f"{p.get('transferred', 0) // MIB}/{p['total'] // MIB} MiB, pass {p.get('passes', 0)}"
    what = f"memory {p.get('status')}" if p.get("phase") == "memory" else p.get("status")
    if with_bar:
        return f"{what} {bar(fraction)} ({amount})"
    return f"{what} {int(100 * min(fraction, 1.0))}% ({amount})"


def _line(rec: dict[str, Any], with_bar: bool = False, style: Style | None = None) -> str:
    err = f": {rec['error']}" if rec.get("error") else ""
    state = rec["state"]
    if style is not None:
        colour = {"completed": "green", "failed": "red", "cancelled": "yellow"}.get(state)
        state = style(state, colour) if colour else state
    return (
        f"Migration {rec['id']} of '{rec['domain']}' {rec['source']} -> {rec['destination']}: "
        f"{state} [{rec['phase']}] {_progress(rec, with_bar)}{err}".rstrip()
    )


async def migrate(ctx: Context, args: argparse.Namespace) -> int:
    if args.offline:
        moved = to_wire(await ctx.client.scheduler.migrate_offline(args.domain, args.to))
        if ctx.json:
            emit_json(moved)
        else:
            print(f"Domain '{moved['domain']}' moved offline: {moved['source']} -> "
                  f"{moved['destination']}")  # fmt: skip
        return 0
    xml = read_xml(args.xml) if args.xml else None
    record = await ctx.client.scheduler.migrate(
        args.domain, args.to, _params(args), timeout=args.migration_timeout, xml=xml
    )
    if args.wait:
        record = await follow_migration(ctx, record)
    rec = to_wire(record)
    if ctx.json:
        emit_json(rec)
    elif not args.wait:
        print(_line(rec))
    if args.wait and rec["state"] != "completed":
        raise MigrateFailed(f"migration of '{rec['domain']}' {rec['state']}: {rec.get('error')}")
    return 0


async def follow_migration(
    ctx: Context, record: MigrationRecord, line: ProgressLine | None = None
) -> MigrationRecord:
    """Follow the migration until it ends (the client's long poll): a redrawn bar on a
    terminal, else one line per change of phase or progress. Returns the final record."""
    out = line or ProgressLine()
    style = Style(out.stream)
    last = record
    try:
        async for last in ctx.client.scheduler.follow(record.id):
            if not ctx.json:
                out.update(_line(to_wire(last), with_bar=out.tty, style=style))
    finally:
        out.clear()
    return last


async def migrate_cancel(ctx: Context, args: argparse.Namespace) -> int:
    rec = to_wire(await ctx.client.scheduler.cancel_migration(args.domain))
    if ctx.json:
        emit_json(rec)
    else:
        print(f"Migration {rec['id']} of '{rec['domain']}' is being cancelled")
    return 0


async def migrations(ctx: Context, args: argparse.Namespace) -> int:
    recs = [to_wire(r) for r in await ctx.client.scheduler.migrations()]
    if ctx.json:
        emit_json(recs)
        return 0
    rows = [
        (r["id"], r["domain"], r["source"], r["destination"], r["state"], r["phase"], _progress(r))
        for r in recs
    ]
    print(table(["Id", "Domain", "From", "To", "State", "Phase", "Progress"], rows))
    return 0


async def drain(ctx: Context, args: argparse.Namespace) -> int:
    scheduler = ctx.client.scheduler
    started = await scheduler.drain(
        args.host, _params(args), timeout=args.migration_timeout,
        stop_containers=args.stop_containers,
    )  # fmt: skip
    job = to_wire(started)
    if not ctx.json:
        print(f"Host '{args.host}' is draining: {len(job['domains'])} running domain(s) to move")
    seen: dict[str, str] = {}
    with_bar = ProgressLine().tty  # bars on a terminal; plain percentages in a pipe
    while not args.no_wait:
        for name, row in sorted(job["domains"].items()):
            dest = row.get("destination") or "-"
            err = f": {row['error']}" if row.get("error") else ""
            line = f"  {name}: {row['state']} -> {dest} {_progress(row, with_bar)}{err}".rstrip()
            if row["state"] == "stays":  # a container: it keeps running here
                line = f"  {name}: cannot move live (a container; --stop-containers moves it)"
            if seen.get(name) != line and not ctx.json:
                print(line, flush=True)
                seen[name] = line
        if job["done"]:
            break
        await asyncio.sleep(POLL)
        job = to_wire(await scheduler.drain_status(args.host))
    if ctx.json:
        emit_json(job)
    if args.no_wait or job["ok"]:
        return 0
    failed = [n for n, r in job["domains"].items() if r["state"] != "completed"]
    raise OperationFailed(f"drain of '{args.host}' left {', '.join(sorted(failed))} behind")


async def undrain(ctx: Context, args: argparse.Namespace) -> int:
    result = await ctx.client.scheduler.undrain(args.host)
    if ctx.json:
        emit_json(to_wire(result))
    else:
        print(f"Host '{args.host}' is no longer draining")
    return 0
