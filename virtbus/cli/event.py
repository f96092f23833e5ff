"""``virtbus event``: print domain events as they arrive (virsh ``event --all --loop``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime

from virtbus.bus.topology import EVENTS_EXCHANGE
from virtbus.cli.context import Context
from virtbus.cli.output import emit_json
from virtbus.errors import InvalidArgument, OperationTimeout
from virtbus.protocol.envelope import Kind
from virtbus.protocol.events import routing_word


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


def binding_key(host: str | None, domain: str | None, event: str | None) -> str:
    parts = [routing_word(v) if v else "*" for v in (host, domain, event)]
    return ".".join(parts)


def _line(body: dict[str, object], sent: float) -> str:
    ts = datetime.fromtimestamp(sent, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    detail = f" ({body['detail']})" if body.get("detail") else ""
    data = body.get("data") or {}
    extra = " " + " ".join(f"{k}={v}" for k, v in data.items()) if data else ""  # type: ignore[union-attr]
    mark = " [reconciled]" if body.get("reconciled") else ""
    return (
        f"{ts}: host '{body['host']}' #{body['seq']}: event '{body['event']}' "
        f"for domain '{body['domain']}'{detail}{extra}{mark}"
    )


def parse_since(text: str) -> tuple[int | None, float | None]:
    """``--since``: a sequence number (an integer), or a time (ISO 8601 / epoch seconds)."""
    if text.isdigit() and len(text) < 10:
        return int(text), None
    try:
        return None, float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(f"--since wants a sequence number or a time, not {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return None, when.timestamp()


class Dedup:
    """Drops what a host already sent (its sequence numbers only grow): no duplicates at the
    seam between replay and live events, nor after a reconnect re-reads the stream."""

    def __init__(self, after_seq: int | None) -> None:
        self._floor = after_seq or 0
        self._last: dict[str, int] = {}

    def fresh(self, body: dict[str, object]) -> bool:
        host, seq = str(body.get("host")), body.get("seq")
        if not isinstance(seq, int):
            return True
        if seq <= max(self._last.get(host, 0), self._floor):
            return False
        self._last[host] = seq
        return True


def _matches(args: argparse.Namespace, body: dict[str, object]) -> bool:
    return (
        (not args.host or body.get("host") == args.host)
        and (not args.domain or body.get("domain") == args.domain)
        and (not args.event_name or body.get("event") == args.event_name)
    )


async def follow_events(ctx: Context, args: argparse.Namespace) -> int:
    if args.since is not None:
        after_seq, since_time = parse_since(args.since)
        sub = await ctx.bus.history("first" if since_time is None else since_time)
        where = f"history since {args.since}"
    else:
        after_seq = None
        key = binding_key(args.host, args.domain, args.event_name)
        sub = await ctx.bus.subscribe(EVENTS_EXCHANGE, [key])
        where = key
    sys.stderr.write(f"listening for events on {where}\n")
    sys.stderr.flush()
    dedup = Dedup(after_seq)
    seen = 0
    try:
        async with asyncio.timeout(args.event_timeout):
            async for env in sub:
                if env.kind != Kind.EVENT:
                    continue
                body = env.body
                # Routing words are sanitised and the history has every host: filter exactly.
                if not _matches(args, body) or not dedup.fresh(body):
                    continue
                if ctx.json:
                    emit_json(body)
                else:
                    print(_line(body, env.ts), flush=True)
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
