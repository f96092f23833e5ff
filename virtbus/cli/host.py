"""Cluster verbs: ``hosts`` and ``list``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from virtbus.cli.context import DISCOVERY_WAIT, Context
from virtbus.cli.output import emit_json, state_label, table
from virtbus.errors import VirtbusError
from virtbus.protocol.base import to_wire


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
    view = None
    if await ctx.scheduler_answers():
        view = await ctx.client.scheduler.hosts()
        found = {h.host: to_wire(h) for h in view}
    else:
        found = {name: to_wire(inv) for name, inv in (await ctx.hosts_heard(args.wait)).items()}
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
    found = await ctx.client.host(host).domains(all=include_inactive)
    return [{"host": host, **to_wire(d)} for d in found]


async def list_domains(ctx: Context, args: argparse.Namespace) -> int:
    host = ctx.explicit_host(args.host)
    if not host and await ctx.scheduler_answers():
        domains, unreachable = await ctx.client.scheduler.domains(all=args.all)
        for silent in unreachable:
            print(f"warning: host {silent} did not answer", file=sys.stderr)
        return _print_domains(ctx, [to_wire(d) for d in domains])
    host_names = [host] if host else sorted(await ctx.hosts_heard())
    results = await asyncio.gather(
        *(_list_one(ctx, h, args.all) for h in host_names), return_exceptions=True
    )
    rows: list[dict[str, Any]] = []
    for name, result in zip(host_names, results, strict=True):
        if isinstance(result, VirtbusError) and not host:
            print(f"warning: host {name} did not answer: {result}")
            continue
        if isinstance(result, BaseException):
            raise result
        rows.extend(result)
    rows.sort(key=lambda d: (d["host"], d["name"]))
    return _print_domains(ctx, rows)


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
