"""``virtbus [--bus URL] [--json] [--timeout S] COMMAND ...`` — global options first, as virsh.

Start-up matters for a command run once: this module imports only what ``--version``
needs, the verbs' modules are imported to build the parser, and a one-shot command talks
to RabbitMQ over the lean transport (:mod:`virtbus.bus.oneshot`) instead of aio-pika;
only commands that follow something for long (``event``, ``migrate --wait``, ``drain``)
take the reconnecting transport.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from virtbus import __version__

DEFAULT_TIMEOUT = 30.0  # s; virtbus.settings.DEFAULT_CALL_TIMEOUT (checked by a test)
# Bus users (comma-separated) whose events and heartbeats count for any host.
TRUSTED_ENV = "VIRTBUS_TRUSTED_PUBLISHERS"


class CliParser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: a bad flag or a missing argument prints one
    line, ``error: INVALID_ARG: ...``, and exits 1 (argparse prints its usage and exits 2).
    Subcommand parsers are of the same class (argparse creates them with ``type(self)``)."""

    def error(self, message: str) -> NoReturn:
        from virtbus.cli.output import fail

        sys.exit(fail("INVALID_ARG", f"{self.prog}: {message} (see `{self.prog} --help`)"))


def build_parser() -> argparse.ArgumentParser:
    from virtbus.cli import (
        acl,
        audit,
        completion,
        disk,
        domain,
        event,
        host,
        migrate,
        network,
        pki,
        snapshot,
        stats,
        storage,
    )

    p: argparse.ArgumentParser = CliParser(
        prog="virtbus", description="virsh for a cluster, over a bus"
    )
    p.add_argument(
        "--bus",
        default=None,
        help="bus URL (default: $VIRTBUS_BUS_URL or amqp://guest:guest@127.0.0.1:5672/)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="deadline of each call (default %(default)s s)",
    )
    p.add_argument("--version", action="version", version=f"virtbus {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    host.add_parsers(sub)
    domain.add_parsers(sub)
    disk.add_parsers(sub)
    snapshot.add_parsers(sub)
    storage.add_parsers(sub)
    network.add_parsers(sub)
    event.add_parsers(sub)
    stats.add_parsers(sub)
    migrate.add_parsers(sub)
    acl.add_parsers(sub)
    audit.add_parsers(sub)
    pki.add_parsers(sub)
    _add_demo_parser(sub)
    completion.add_parsers(sub)
    return p


def _add_demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Only the options: the demo itself (virtbus.demo) is imported when it runs."""
    p = sub.add_parser(
        "demo",
        help="a guided tour: two agents and a scheduler, a guest's lifecycle, a live migration",
    )
    p.add_argument(
        "--bus",
        dest="demo_bus",
        default=None,
        metavar="URL",
        help="memory:// (default: everything in this process) or amqp://... (RabbitMQ, "
        "agents and scheduler as separate processes)",
    )
    p.add_argument(
        "--driver",
        choices=("auto", "qemu", "test"),
        default="auto",
        help="auto (default): QEMU with a small Linux guest when qemu-system-x86_64 is "
        "installed, else the in-memory test driver",
    )
    p.set_defaults(func=None, local=True)


def long_lived(args: argparse.Namespace) -> bool:
    """Commands that follow something for long need the reconnecting transport."""
    return (
        args.command == "event"
        or (args.command == "migrate" and bool(args.wait))
        or (args.command == "drain" and not args.no_wait)
    )


async def run(args: argparse.Namespace) -> int:
    import os

    from virtbus.cli.context import Context
    from virtbus.client import Client
    from virtbus.settings import BusSettings, bus_url_from_env

    trusted = tuple(u for u in os.environ.get(TRUSTED_ENV, "").split(",") if u)
    settings = BusSettings(
        url=bus_url_from_env(args.bus), call_timeout=args.timeout, trusted_publishers=trusted
    )
    client = await Client.connect(
        settings.url,
        src=f"cli-{os.getpid()}",
        timeout=args.timeout,
        settings=settings,
        oneshot=not long_lived(args),
    )
    async with client:
        ctx = Context(client=client, json=args.json, timeout=args.timeout)
        return int(await args.func(ctx, args))


def main(argv: list[str] | None = None) -> None:
    words = sys.argv[1:] if argv is None else argv
    if words in (["--version"], ["-V"]):  # before importing anything else
        sys.stdout.write(f"virtbus {__version__}\n")
        sys.exit(0)
    import asyncio
    import importlib
    import logging

    from virtbus.cli import completion
    from virtbus.cli.output import fail
    from virtbus.errors import VirtbusError

    parser = build_parser()
    args = parser.parse_args(argv)
    # The CLI reports failures itself, in one line: keep the AMQP libraries' logs quiet.
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if args.command == "completion":
        sys.stdout.write(completion.script(parser, args.shell))
        sys.exit(0)
    if args.command == "demo":  # the composition root: imported only when it runs
        sys.exit(importlib.import_module("virtbus.demo.main").main(args))
    if args.command == "audit" and args.file is not None:  # a local file: no bus
        from virtbus.cli.audit import audit_file

        args.func, args.no_bus = audit_file, True
    try:
        # Commands that need no bus (acl check reads the policy file) run without one.
        code = args.func(args) if getattr(args, "no_bus", False) else asyncio.run(run(args))
    except VirtbusError as exc:
        message = exc.message
        if exc.code == "BUS_UNAVAILABLE" and "cannot connect" in message:
            message += " — is RabbitMQ running? (pass --bus URL or set VIRTBUS_BUS_URL)"
        code = fail(exc.code, message)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
