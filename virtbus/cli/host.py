"""Cluster verbs: ``hosts`` and ``list``."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from virtbus.cli.context import DISCOVERY_WAIT, Context
from virtbus.cli.output import emit_json, state_label, table
from virtbus.errors import VirtbusError
from virtbus.protocol import ops


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("hosts", help="list the hosts whose agents are heard on the bus")
    p.add_argument(
        "--wait",
        type=float,
        default=DISCOVERY_WAIT,
        metavar="S",
        help="listen for heartbeats this long (default %(default)s s)",
    )
    p.set_defaults(func=hosts)

    p = sub.add_parser("list", help="list domains")
    p.add_argument("--all", action="store_true", help="include inactive domains")
    p.add_argument("--host", help="only this host (default: every host heard on the bus)")
    p.set_defaults(func=list_domains)


async def hosts(ctx: Context, args: argparse.Namespace) -> int:
    found = await ctx.discover_hosts(args.wait)
    if ctx.json:
        emit_json([found[h] for h in sorted(found)])
        return 0
    rows = [
        (
            h["host"],
            h["driver"],
            h["arch"],
            h["cpus"],
            f"{h['memory_free_kib'] // 1024}/{h['memory_total_kib'] // 1024} MiB",
            f"{h['active_domains']}/{h['domains']}",
        )
        for h in (found[name] for name in sorted(found))
    ]
    print(table(["Host", "Driver", "Arch", "CPUs", "Free/Total memory", "Active/Defined"], rows))
    return 0


async def _list_one(ctx: Context, host: str, include_inactive: bool) -> list[dict[str, Any]]:
    result = await ctx.call(host, ops.DOMAIN_LIST, {"all": include_inactive})
    return [{"host": host, **d} for d in result["domains"]]


async def list_domains(ctx: Context, args: argparse.Namespace) -> int:
    host_names = [args.host] if args.host else sorted(await ctx.discover_hosts())
    results = await asyncio.gather(
        *(_list_one(ctx, h, args.all) for h in host_names), return_exceptions=True
    )
    domains: list[dict[str, Any]] = []
    for host, result in zip(host_names, results, strict=True):
        if isinstance(result, VirtbusError) and not args.host:
            print(f"warning: host {host} did not answer: {result}")
            continue
        if isinstance(result, BaseException):
            raise result
        domains.extend(result)
    domains.sort(key=lambda d: (d["host"], d["name"]))
    if ctx.json:
        emit_json(domains)
        return 0
    rows = [
        (d["id"] if d["id"] is not None else "-", d["name"], state_label(d["state"]), d["host"])
        for d in domains
    ]
    print(table(["Id", "Name", "State", "Host"], rows))
    return 0
