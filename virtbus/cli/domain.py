"""Domain verbs: define, undefine, the lifecycle, dominfo, domstate, dumpxml, setmem,
setmaxmem."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from virtbus.cli.context import Context
from virtbus.cli.output import emit_json, fields, kib, state_label
from virtbus.errors import InvalidArgument, NoConnect
from virtbus.protocol.base import to_wire
from virtbus.protocol.domain import DomainStatus

# verb -> the past-tense message virsh prints
LIFECYCLE = {
    "start": "Domain '{}' started",
    "shutdown": "Domain '{}' is being shutdown",
    "destroy": "Domain '{}' destroyed",
    "reboot": "Domain '{}' is being rebooted",
    "reset": "Domain '{}' was reset",
    "suspend": "Domain '{}' suspended",
    "resume": "Domain '{}' resumed",
}
MAX_XML_FILE = 1024 * 1024


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("define", help="define a domain from an XML file")
    p.add_argument("file", help="domain XML file ('-' for stdin)")
    p.add_argument("--host", help="host to define it on (default: placed by the scheduler)")
    p.set_defaults(func=define)

    p = sub.add_parser("undefine", help="remove a shut-off domain's definition")
    _domain_args(p)
    p.add_argument("--remove-all-storage", action="store_true",
                   help="also delete the domain's storage volumes")  # fmt: skip
    p.set_defaults(func=undefine)

    for verb in LIFECYCLE:
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

    p = sub.add_parser("autostart", help="start a domain with its host's agent (once per boot)")
    _domain_args(p)
    p.add_argument("--disable", action="store_true", help="no longer start it automatically")
    p.set_defaults(func=autostart)

    p = sub.add_parser("save", help="save a domain's state to a file on its host, stop it")
    _domain_args(p)
    p.add_argument("file", help="absolute path on the domain's host")
    _state_flags(p)
    p.set_defaults(func=save)
    p = sub.add_parser("restore", help="start a domain from a save file on a host")
    p.add_argument("file", help="absolute path on that host")
    p.add_argument("--host", required=True, help="the host that has the file")
    _state_flags(p)
    p.set_defaults(func=restore)
    p = sub.add_parser("managedsave", help="save a domain's state for its next start")
    _domain_args(p)
    _state_flags(p)
    p.set_defaults(func=managedsave)
    p = sub.add_parser("managedsave-remove", help="drop a domain's managed save image")
    _domain_args(p)
    p.set_defaults(func=managedsave_remove)

    p = sub.add_parser("dominfo", help="show a domain's information")
    _domain_args(p)
    p.set_defaults(func=dominfo)

    p = sub.add_parser("domstate", help="show a domain's state")
    _domain_args(p)
    p.add_argument("--reason", action="store_true", help="also show the reason")
    p.set_defaults(func=domstate)

    p = sub.add_parser("dumpxml", help="print a domain's XML")
    _domain_args(p)
    p.add_argument(
        "--security-info",
        action="store_true",
        help="include secrets (graphics passwords); needs domain.read_secure",
    )
    p.set_defaults(func=dumpxml)

    for verb, what in (("setmem", "current"), ("setmaxmem", "maximum")):
        p = sub.add_parser(verb, help=f"change a domain's {what} memory")
        _domain_args(p)
        p.add_argument("size", help="new size: a scaled integer, KiB without a unit (512M, 1G)")
        p.add_argument("--live", action="store_true", help="affect the running domain")
        p.add_argument("--config", action="store_true", help="affect the next boot")
        p.add_argument("--current", action="store_true",
                       help="live if running, else the next boot")  # fmt: skip
        p.set_defaults(func=setmem, maximum=verb == "setmaxmem")


def _state_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--running", action="store_true", help="running once restored")
    p.add_argument("--paused", action="store_true", help="paused once restored")
    p.add_argument("--bypass-cache", action="store_true", help="(accepted; no effect)")


def _domain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help="domain name or uuid")
    p.add_argument("--host", help="host the domain is on (default: found on the bus)")


def read_xml(path: str) -> str:
    """An XML file's text ('-': stdin), bounded in size."""
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
    xml = read_xml(args.file)
    host = ctx.explicit_host(args.host)
    if host:
        dom = await ctx.client.host(host).define(xml)
        name, uuid = dom.ref, dom.uuid
    else:  # the scheduler places it
        if not await ctx.scheduler_answers():
            raise NoConnect("no scheduler answers: pass --host H (or start virtbus-scheduler)")
        placed = await ctx.client.scheduler.define(xml)
        host, name, uuid = placed.host, placed.name, placed.uuid
    if ctx.json:
        emit_json({"host": host, "name": name, "uuid": uuid})
    else:
        print(f"Domain '{name}' defined from {args.file} on {host}")
    return 0


async def undefine(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    removed = await dom.undefine(remove_all_storage=args.remove_all_storage)
    if ctx.json:
        emit_json({"host": dom.host.name, "domain": args.domain, "undefined": True,
                   "volumes": [to_wire(v) for v in removed]})  # fmt: skip
        return 0
    print(f"Domain '{args.domain}' has been undefined")
    for vol in removed:  # virsh's wording
        if vol.error is None:
            print(f"Volume '{vol.volume}'({vol.pool}) removed.")
        else:
            print(f"Failed to remove storage volume '{vol.volume}'({vol.pool}):"
                  f" {vol.error.get('message', '')}")  # fmt: skip
    return 0


async def lifecycle(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    status: DomainStatus
    if args.verb == "shutdown":
        status = await dom.shutdown(timeout=args.wait)
    else:
        status = await getattr(dom, args.verb)()
    if ctx.json:
        emit_json({"host": dom.host.name, "domain": args.domain, **to_wire(status)})
    else:
        print(LIFECYCLE[args.verb].format(args.domain))
    return 0


async def autostart(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    enabled = not args.disable
    await dom.set_autostart(enabled)
    if ctx.json:
        emit_json({"host": dom.host.name, "domain": args.domain, "autostart": enabled})
    elif enabled:
        print(f"Domain '{args.domain}' marked as autostarted")
    else:
        print(f"Domain '{args.domain}' unmarked as autostarted")
    return 0


async def save(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    status = await dom.save(args.file, running=args.running, paused=args.paused)
    if ctx.json:
        emit_json({"host": dom.host.name, "domain": args.domain, "file": args.file,
                   **to_wire(status)})  # fmt: skip
    else:
        print(f"Domain '{args.domain}' saved to {args.file}")
    return 0


async def restore(ctx: Context, args: argparse.Namespace) -> int:
    done = await ctx.client.host(args.host).restore(
        args.file, running=args.running, paused=args.paused
    )
    if ctx.json:
        emit_json({"host": args.host, "file": args.file, **to_wire(done)})
    else:
        print(f"Domain restored from {args.file}")
    return 0


async def managedsave(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    status = await dom.managed_save(running=args.running, paused=args.paused)
    if ctx.json:
        emit_json({"host": dom.host.name, "domain": args.domain, **to_wire(status)})
    else:
        print(f"Domain '{args.domain}' state saved by libvirt")
    return 0


async def managedsave_remove(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    await dom.managed_save_remove()
    if ctx.json:
        emit_json({"host": dom.host.name, "domain": args.domain, "removed": True})
    else:
        print(f"Removed managedsave image for domain '{args.domain}'")
    return 0


async def dominfo(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    info = await dom.info()
    if ctx.json:
        emit_json({"host": dom.host.name, **to_wire(info)})
        return 0
    print(
        fields(
            [
                ("Id", info.id if info.id is not None else "-"),
                ("Name", info.name),
                ("UUID", info.uuid),
                ("Host", dom.host.name),
                ("Type", info.type),
                ("State", state_label(info.state)),
                ("Reason", info.reason),
                ("CPU(s)", info.vcpus),
                ("CPU time", f"{info.cpu_time_ns / 1e9:.1f}s"),
                ("Max memory", kib(info.max_memory_kib)),
                ("Used memory", kib(info.memory_kib)),
                ("Persistent", "yes" if info.persistent else "no"),
                ("Autostart", "enable" if info.autostart else "disable"),
                ("Managed save", "yes" if info.managed_save else "no"),
                ("Owner", info.owner or "-"),
            ]
        )
    )
    return 0


def memory_size(text: str) -> int:
    """virsh's scaled integer (``vshCommandOptScaledInt``, default unit KiB) in KiB."""
    from virtbus.domain.units import to_kib  # the units table: only for these verbs

    raw = text.strip()
    digits = raw.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    if not digits.isdigit() or len(digits) > 20:
        raise InvalidArgument(f"Invalid memory size '{text}': a number with an optional unit")
    try:
        kib = to_kib(int(digits), raw[len(digits) :] or None)
    except ValueError as exc:
        raise InvalidArgument(f"Invalid memory size '{text}': {exc}") from None
    if kib <= 0:
        raise InvalidArgument(f"Invalid memory size '{text}': it must be above zero")
    return kib


async def setmem(ctx: Context, args: argparse.Namespace) -> int:
    """virsh setmem / setmaxmem: live through the balloon, or the definition's memory."""
    if args.current and (args.live or args.config):
        raise InvalidArgument("--current cannot be combined with --live or --config")
    kib = memory_size(args.size)
    dom = await ctx.domain(args.host, args.domain)
    await dom.set_memory(kib, maximum=args.maximum, live=args.live, config=args.config)
    if ctx.json:
        emit_json({"host": dom.host.name, "domain": dom.ref, "kib": kib,
                   "maximum": args.maximum})  # fmt: skip
    return 0


async def domstate(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    state = await dom.state()
    if ctx.json:
        emit_json({"host": dom.host.name, "domain": args.domain, **to_wire(state)})
    elif args.reason:
        print(f"{state_label(state.state)} ({state.reason})")
    else:
        print(state_label(state.state))
    return 0


async def dumpxml(ctx: Context, args: argparse.Namespace) -> int:
    dom = await ctx.domain(args.host, args.domain)
    xml = await dom.xml(security_info=args.security_info)
    if ctx.json:
        emit_json({"host": dom.host.name, "domain": args.domain, "xml": xml})
    else:
        sys.stdout.write(xml if xml.endswith("\n") else xml + "\n")
    return 0
