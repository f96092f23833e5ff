"""Cluster verbs: ``hosts`` and ``list``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from virtbus.cli.context import DISCOVERY_WAIT, Context
from virtbus.cli.output import emit_json, state_label, table
from virtbus.errors import VirtbusError
from virtbus.protocol import ops


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "hosts", help="list the hosts (the scheduler's view, else agents heard on the bus)"
    )
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
    """The scheduler's cluster view when a scheduler answers, else heartbeats heard."""
    view = await ctx.try_scheduler(ops.SCHEDULER_HOSTS, {})
    if view is not None:
        found = {h["host"]: h for h in view["hosts"]}
    else:
        found = await ctx.discover_hosts(args.wait)
    if ctx.json:
        emit_json([found[h] for h in sorted(found)])
        return 0
    headers = ["Host", "Driver", "Arch", "CPUs", "Free/Total memory", "Active/Defined"]
    if view is not None:
        headers += ["State", "Labels"]
    rows = []
    for h in (found[name] for name in sorted(found)):
        row = [
            h["host"],
            h["driver"],
            h["arch"],
            h["cpus"],
            f"{h['memory_free_kib'] // 1024}/{h['memory_total_kib'] // 1024} MiB",
            f"{h['active_domains']}/{h['domains']}",
        ]
        if view is not None:
            state = ("up" if h.get("up") else "down") + (", draining" if h.get("draining") else "")
            labels = ",".join(f"{k}={v}" for k, v in sorted((h.get("labels") or {}).items()))
            row += [state, labels or "-"]
        rows.append(row)
    print(table(headers, rows))
    return 0


async def _list_one(ctx: Context, host: str, include_inactive: bool) -> list[dict[str, Any]]:
    result = await ctx.call(host, ops.DOMAIN_LIST, {"all": include_inactive})
    return [{"host": host, **d} for d in result["domains"]]


async def list_domains(ctx: Context, args: argparse.Namespace) -> int:
    if not args.host:
        view = await ctx.try_scheduler(ops.SCHEDULER_DOMAINS, {"all": args.all})
        if view is not None:
            for silent in view.get("unreachable", []):
                print(f"warning: host {silent} did not answer", file=sys.stderr)
            return _print_domains(ctx, view["domains"])
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
    return _print_domains(ctx, domains)


def _print_domains(ctx: Context, domains: list[dict[str, Any]]) -> int:
    if ctx.json:
        emit_json(domains)
        return 0
    rows = []
    for d in domains:
        state = state_label(d["state"])
        mig = d.get("migration")
        if mig:
            other = mig["destination"] if d["host"] == mig["source"] else mig["source"]
            arrow = "->" if d["host"] == mig["source"] else "<-"
            state += f" (migrating {arrow} {other})"
        rows.append((d["id"] if d["id"] is not None else "-", d["name"], state, d["host"]))
    print(table(["Id", "Name", "State", "Host"], rows))
    return 0
