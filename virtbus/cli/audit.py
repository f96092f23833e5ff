"""``virtbus audit``: who called what, when, on what, and what came of it.

Read from the audit stream every agent and the scheduler publish to (``virtbus.audit``,
kept in ``virtbus.audit.history``), or with ``--file`` from one daemon's own audit log.
"""

from __future__ import annotations

import argparse
import fnmatch
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from virtbus.cli.context import Context
from virtbus.cli.output import emit_json, table
from virtbus.client.events import parse_since
from virtbus.errors import InvalidArgument
from virtbus.protocol.base import to_wire
from virtbus.protocol.messages import AuditRecord
from virtbus.security.audit import read_log

DEFAULT_SINCE = 3600.0  # s: the last hour, unless --since says otherwise


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("audit", help="the audit trail: every call served or refused")
    p.add_argument(
        "--since",
        default=None,
        metavar="TIME",
        help="from TIME (ISO 8601 or epoch seconds; default: the last hour)",
    )
    p.add_argument("--user", help="only calls of this bus user")
    p.add_argument("--host", help="only calls served by this host (or 'scheduler')")
    p.add_argument("--op", help="only ops matching this glob (e.g. 'domain.*')")
    p.add_argument("--denied", action="store_true", help="only refused calls (AUTH_DENIED)")
    p.add_argument(
        "--wait",
        type=float,
        default=2.0,
        metavar="S",
        help="stop when the stream was quiet this long (default %(default)s s)",
    )
    p.add_argument(
        "--file",
        type=Path,
        default=None,
        help="read this daemon's audit log instead of the bus "
        "(STATE_DIR/audit/audit.log on an agent, STATE_DIR/audit.log on the scheduler)",
    )
    p.set_defaults(func=audit)


def _since(args: argparse.Namespace) -> float:
    if args.since is None:
        return time.time() - DEFAULT_SINCE
    since = parse_since(args.since)
    if isinstance(since, datetime):
        return since.timestamp()
    if isinstance(since, int | float) and not isinstance(since, bool):
        return float(since)
    raise InvalidArgument(f"--since wants a time, not {args.since!r}")


def _wanted(rec: AuditRecord, args: argparse.Namespace, since: float) -> bool:
    return (
        rec.ts >= since
        and (args.user is None or rec.user == args.user)
        and (args.host is None or rec.daemon == args.host)
        and (args.op is None or fnmatch.fnmatchcase(rec.op, args.op))
        and (not args.denied or rec.code == "AUTH_DENIED")
    )


def audit_file(args: argparse.Namespace) -> int:
    """``--file``: one daemon's own log, read where it lies (no bus needed)."""
    since = _since(args)
    if not args.file.exists():
        raise InvalidArgument(f"no audit log at {args.file}")
    found = [(r, None) for r in read_log(args.file) if _wanted(r, args, since)]
    return _show(found, args.json)


async def audit(ctx: Context, args: argparse.Namespace) -> int:
    since = _since(args)
    found: list[tuple[AuditRecord, str | None]] = []
    # A little before: the stream's time offsets are per chunk of messages.
    start: float | str = since - 1 if since > 1 else "first"
    async for rec, publisher in ctx.client.audit(start, idle=args.wait):
        if _wanted(rec, args, since):
            found.append((rec, publisher))
    return _show(found, ctx.json)


def _show(found: Sequence[tuple[AuditRecord, str | None]], as_json: bool) -> int:
    if as_json:
        for rec, publisher in found:
            emit_json({**to_wire(rec), "publisher": publisher})
        return 0
    rows = [
        [
            datetime.fromtimestamp(r.ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            r.daemon,
            r.user or "-",
            r.op,
            r.target or "-",
            r.code,
            f"{r.ms:.1f}",
        ]
        for r, _ in found
    ]
    print(table(["Time (UTC)", "Host", "User", "Op", "Target", "Result", "ms"], rows))
    return 0
