"""``virtbus event``: print domain events as they arrive (virsh ``event --all --loop``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime

from virtbus.cli.context import Context
from virtbus.cli.output import emit_json
from virtbus.client.events import parse_since
from virtbus.errors import OperationTimeout
from virtbus.protocol.base import to_wire
from virtbus.protocol.messages import DomainEvent


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("event", help="print domain events as they arrive")
    p.add_argument("--host", help="only events of this host")
    p.add_argument("--domain", help="only events of this domain (name)")
    p.add_argument("--event", dest="event_name", help="only this event (e.g. started)")
    p.add_argument(
        "--since",
        default=None,
        metavar="SEQ|TIME",
        help="first replay kept events: after sequence number SEQ (per host), or "
        "from TIME (ISO 8601 or epoch seconds); then follow live events",
    )
    p.add_argument("--count", type=int, default=None, help="stop after N events")
    p.add_argument(
        "--timeout",
        dest="event_timeout",
        type=float,
        default=None,
        metavar="S",
        help="stop after S seconds",
    )
    p.set_defaults(func=follow_events)


def _line(ev: DomainEvent) -> str:
    detail = f" ({ev.detail})" if ev.detail else ""
    extra = " " + " ".join(f"{k}={v}" for k, v in ev.data.items()) if ev.data else ""
    mark = " [reconciled]" if ev.reconciled else ""
    return (
        f"host '{ev.host}' #{ev.seq}: event '{ev.event}' for domain '{ev.domain}'"
        f"{detail}{extra}{mark}"
    )


def _stamp(ts: float | None) -> str:
    when = datetime.fromtimestamp(ts, UTC) if ts is not None else datetime.now(UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


async def follow_events(ctx: Context, args: argparse.Namespace) -> int:
    since = parse_since(args.since) if args.since is not None else None
    where = f"history since {args.since}" if since is not None else "live events"
    events = await ctx.client.subscribe(
        host=args.host, domain=args.domain, event=args.event_name, since=since
    )
    sys.stderr.write(f"listening for events ({where})\n")
    sys.stderr.flush()
    seen = 0
    try:
        async with asyncio.timeout(args.event_timeout):
            async for ev in events:
                if ctx.json:
                    emit_json(to_wire(ev))
                else:
                    print(f"{_stamp(ev.ts)}: {_line(ev)}", flush=True)
                seen += 1
                if args.count is not None and seen >= args.count:
                    return 0
    except TimeoutError:
        if args.count is not None:
            raise OperationTimeout(
                f"received {seen} of {args.count} events within {args.event_timeout:g} s"
            ) from None
        return 0
    finally:
        await events.aclose()
    return 0
