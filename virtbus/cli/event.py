"""``virtbus event``: print domain events as they arrive (virsh ``event --all --loop``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime

from virtbus.bus.topology import EVENTS_EXCHANGE
from virtbus.cli.context import Context
from virtbus.cli.output import emit_json
from virtbus.errors import OperationTimeout
from virtbus.protocol.envelope import Kind
from virtbus.protocol.events import routing_word


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("event", help="print domain events as they arrive")
    p.add_argument("--host", help="only events of this host")
    p.add_argument("--domain", help="only events of this domain (name)")
    p.add_argument("--event", dest="event_name", help="only this event (e.g. started)")
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


def binding_key(host: str | None, domain: str | None, event: str | None) -> str:
    parts = [routing_word(v) if v else "*" for v in (host, domain, event)]
    return ".".join(parts)


def _line(body: dict[str, object]) -> str:
    ts = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    detail = f" ({body['detail']})" if body.get("detail") else ""
    data = body.get("data") or {}
    extra = " " + " ".join(f"{k}={v}" for k, v in data.items()) if data else ""  # type: ignore[union-attr]
    mark = " [reconciled]" if body.get("reconciled") else ""
    return (
        f"{ts}: host '{body['host']}' #{body['seq']}: event '{body['event']}' "
        f"for domain '{body['domain']}'{detail}{extra}{mark}"
    )


async def follow_events(ctx: Context, args: argparse.Namespace) -> int:
    key = binding_key(args.host, args.domain, args.event_name)
    sub = await ctx.bus.subscribe(EVENTS_EXCHANGE, [key])
    sys.stderr.write(f"listening for events on {key}\n")
    sys.stderr.flush()
    seen = 0
    try:
        async with asyncio.timeout(args.event_timeout):
            async for env in sub:
                if env.kind != Kind.EVENT:
                    continue
                body = env.body
                if args.domain and body.get("domain") != args.domain:
                    continue  # the routing word is sanitised; the body has the exact name
                if ctx.json:
                    emit_json(body)
                else:
                    print(_line(body), flush=True)
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
        await sub.close()
    return 0
