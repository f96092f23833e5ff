"""``virtbus domstats``: libvirt's domain statistics, fetched now from the agents.

Printed as ``virsh domstats`` prints them (``Domain: 'name'`` then ``  field=value``
lines and a blank line); with ``--json`` one object mapping each domain to its flat map
of libvirt field names (``{"vm1": {"state.state": 1, "cpu.time": 123456789, ...}}``).
Groups are libvirt's; ``--state``, ``--cpu-total``, ... are virsh's spellings of
``--group``.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from virtbus.cli.context import Context
from virtbus.cli.output import emit_json
from virtbus.errors import NoConnect, VirtbusError
from virtbus.protocol.domain import STATS_GROUPS as GROUPS
from virtbus.protocol.domain import StatsGroup


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("domstats", help="show domain statistics (libvirt's domstats fields)")
    p.add_argument("domains", nargs="*", metavar="DOMAIN", help="name or uuid (default: all)")
    p.add_argument("--host", help="only this host (default: the domain's host, or every host)")
    p.add_argument(
        "--group",
        action="append",
        dest="groups",
        default=[],
        choices=GROUPS,
        help="only this group of fields (repeatable; default: all)",
    )
    for group in GROUPS:
        p.add_argument(
            f"--{group}", action="append_const", dest="groups", const=group, help=argparse.SUPPRESS
        )
    p.add_argument("--json", action="store_true", dest="stats_json", help="one JSON object")
    p.set_defaults(func=domstats)


async def _fetch(
    ctx: Context, host: str, domains: list[str], groups: list[StatsGroup]
) -> dict[str, dict[str, Any]]:
    found = await ctx.client.host(host).stats(domains or None, sorted(set(groups)) or None)
    return dict(found)


async def _targets(ctx: Context, args: argparse.Namespace) -> dict[str, list[str]]:
    """host -> domains to ask it for ([] = all of them)."""
    host = ctx.explicit_host(args.host)
    if host or not args.domains:
        if host:
            return {host: list(args.domains)}
        hosts = sorted(await ctx.hosts_heard())
        if not hosts:
            raise NoConnect("no agent heard on the bus — is virtbus-agent running?")
        return {h: [] for h in hosts}
    by_host: dict[str, list[str]] = {}
    for domain in args.domains:
        dom = await ctx.domain(None, domain)
        by_host.setdefault(dom.host.name, []).append(domain)
    return by_host


def render(stats: dict[str, dict[str, Any]]) -> str:
    """virsh's layout: a block per domain, fields in the driver's (libvirt's) order."""
    blocks = []
    for name, fields in stats.items():
        lines = [f"Domain: '{name}'", *(f"  {k}={_value(v)}" for k, v in fields.items())]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") if value == value else "nan"
    return str(value)


async def domstats(ctx: Context, args: argparse.Namespace) -> int:
    targets = await _targets(ctx, args)
    hosts = sorted(targets)
    results = await asyncio.gather(
        *(_fetch(ctx, h, targets[h], args.groups) for h in hosts), return_exceptions=True
    )
    merged: dict[str, dict[str, Any]] = {}
    for host, result in zip(hosts, results, strict=True):
        if isinstance(result, VirtbusError) and len(hosts) > 1 and not args.domains:
            print(f"warning: host {host} did not answer: {result}")
            continue
        if isinstance(result, BaseException):
            raise result
        for name, fields in result.items():
            merged[f"{host}/{name}" if name in merged else name] = fields
    if ctx.json or args.stats_json:
        emit_json(merged)
    else:
        print(render(merged), end="")
    return 0
