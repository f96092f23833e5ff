"""Domain verbs: define, undefine, the lifecycle, dominfo, domstate, dumpxml."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from virtbus.cli.context import Context
from virtbus.cli.output import emit_json, fields, kib, state_label
from virtbus.errors import InvalidArgument
from virtbus.protocol import ops

# verb -> (op, past-tense message as virsh prints it)
LIFECYCLE = {
    "start": (ops.DOMAIN_START, "Domain '{}' started"),
    "shutdown": (ops.DOMAIN_SHUTDOWN, "Domain '{}' is being shutdown"),
    "destroy": (ops.DOMAIN_DESTROY, "Domain '{}' destroyed"),
    "reboot": (ops.DOMAIN_REBOOT, "Domain '{}' is being rebooted"),
    "reset": (ops.DOMAIN_RESET, "Domain '{}' was reset"),
    "suspend": (ops.DOMAIN_SUSPEND, "Domain '{}' suspended"),
    "resume": (ops.DOMAIN_RESUME, "Domain '{}' resumed"),
}
MAX_XML_FILE = 1024 * 1024


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("define", help="define a domain from an XML file")
    p.add_argument("file", help="domain XML file ('-' for stdin)")
    p.add_argument("--host", help="host to define it on (default: placed by the scheduler)")
    p.set_defaults(func=define)

    p = sub.add_parser("undefine", help="remove a shut-off domain's definition")
    _domain_args(p)
    p.set_defaults(func=undefine)

    for verb, (_, _msg) in LIFECYCLE.items():
        p = sub.add_parser(verb, help=f"{verb} a domain")
        _domain_args(p)
        if verb == "shutdown":
            p.add_argument(
                "--wait",
                type=float,
                default=None,
                metavar="S",
                help="wait up to S seconds for the guest to power off",
            )
        p.set_defaults(func=lifecycle, verb=verb)

    p = sub.add_parser("dominfo", help="show a domain's information")
    _domain_args(p)
    p.set_defaults(func=dominfo)

    p = sub.add_parser("domstate", help="show a domain's state")
    _domain_args(p)
    p.add_argument("--reason", action="store_true", help="also show the reason")
    p.set_defaults(func=domstate)

    p = sub.add_parser("dumpxml", help="print a domain's XML")
    _domain_args(p)
    p.set_defaults(func=dumpxml)


def _domain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help="domain name or uuid")
    p.add_argument("--host", help="host the domain is on (default: found on the bus)")


def _read_xml(path: str) -> str:
    if path == "-":
        return sys.stdin.read(MAX_XML_FILE + 1)
    try:
        file = Path(path)
        if file.stat().st_size > MAX_XML_FILE:
            raise InvalidArgument(f"{path}: larger than {MAX_XML_FILE} bytes")
        return file.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path}: not UTF-8 text") from exc


async def define(ctx: Context, args: argparse.Namespace) -> int:
    xml = _read_xml(args.file)
    host, result = await ctx.define_on(args.host, xml)  # no --host: the scheduler places it
    if ctx.json:
        emit_json({"host": host, **result})
    else:
        print(f"Domain '{result['name']}' defined from {args.file} on {host}")
    return 0


async def undefine(ctx: Context, args: argparse.Namespace) -> int:
    host = await ctx.host_for(args.host, args.domain)
    await ctx.call(host, ops.DOMAIN_UNDEFINE, {"domain": args.domain})
    if ctx.json:
        emit_json({"host": host, "domain": args.domain, "undefined": True})
    else:
        print(f"Domain '{args.domain}' has been undefined")
    return 0


async def lifecycle(ctx: Context, args: argparse.Namespace) -> int:
    op, message = LIFECYCLE[args.verb]
    host = await ctx.host_for(args.host, args.domain)
    body: dict[str, object] = {"domain": args.domain}
    if getattr(args, "wait", None) is not None:
        body["timeout"] = args.wait
        ctx.timeout = max(ctx.timeout, args.wait + 5)
    result = await ctx.call(host, op, body)
    if ctx.json:
        emit_json({"host": host, "domain": args.domain, **result})
    else:
        print(message.format(args.domain))
    return 0


async def dominfo(ctx: Context, args: argparse.Namespace) -> int:
    host = await ctx.host_for(args.host, args.domain)
    info = await ctx.call(host, ops.DOMAIN_INFO, {"domain": args.domain})
    if ctx.json:
        emit_json({"host": host, **info})
        return 0
    print(
        fields(
            [
                ("Id", info["id"] if info["id"] is not None else "-"),
                ("Name", info["name"]),
                ("UUID", info["uuid"]),
                ("Host", host),
                ("Type", info.get("type", "")),
                ("State", state_label(info["state"])),
                ("Reason", info["reason"]),
                ("CPU(s)", info["vcpus"]),
                ("CPU time", f"{info['cpu_time_ns'] / 1e9:.1f}s"),
                ("Max memory", kib(info["max_memory_kib"])),
                ("Used memory", kib(info["memory_kib"])),
                ("Persistent", "yes" if info["persistent"] else "no"),
                ("Autostart", "enable" if info["autostart"] else "disable"),
            ]
        )
    )
    return 0


async def domstate(ctx: Context, args: argparse.Namespace) -> int:
    host = await ctx.host_for(args.host, args.domain)
    state = await ctx.call(host, ops.DOMAIN_STATE, {"domain": args.domain})
    if ctx.json:
        emit_json({"host": host, "domain": args.domain, **state})
    elif args.reason:
        print(f"{state_label(state['state'])} ({state['reason']})")
    else:
        print(state_label(state["state"]))
    return 0


async def dumpxml(ctx: Context, args: argparse.Namespace) -> int:
    host = await ctx.host_for(args.host, args.domain)
    result = await ctx.call(host, ops.DOMAIN_XML, {"domain": args.domain})
    if ctx.json:
        emit_json({"host": host, "domain": args.domain, "xml": result["xml"]})
    else:
        sys.stdout.write(result["xml"] if result["xml"].endswith("\n") else result["xml"] + "\n")
    return 0
