"""``virtbus [--bus URL] [--json] [--timeout S] COMMAND ...`` — global options first, as virsh.

Start-up matters for a command run once: this module imports only what ``--version``
needs, a command builds the parser of its own verb's module only (:mod:`virtbus.cli.verbs`:
``virtbus list`` imports no storage, snapshot or PKI code), and a one-shot command talks
to RabbitMQ over the lean transport (:mod:`virtbus.bus.oneshot`) instead of aio-pika;
only commands that follow something for long (``event``, ``migrate --wait``, ``drain``)
take the reconnecting transport.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from virtbus import __version__

DEFAULT_TIMEOUT = 30.0  # s; virtbus.settings.DEFAULT_CALL_TIMEOUT (checked by a test)
# Bus users (comma-separated) whose events and heartbeats count for any host.
TRUSTED_ENV = "VIRTBUS_TRUSTED_PUBLISHERS"


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, sized as argparse sizes it (``$COLUMNS``, the terminal, else
    80) without importing shutil: argparse builds one for every ``add_argument``."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        from virtbus.cli.term import columns

        width = columns(fallback=80) - 2 if width is None else width
        super().__init__(prog, indent_increment, max_help_position, width)


class CliParser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: a bad flag or a missing argument prints one
    line, ``error: INVALID_ARG: ...``, and exits 1 (argparse prints its usage and exits 2).
    Subcommand parsers are of the same class (argparse creates them with ``type(self)``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        from virtbus.cli.output import fail

        sys.exit(fail("INVALID_ARG", f"{self.prog}: {message} (see `{self.prog} --help`)"))


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; with ``verb``, only the verbs of the module that has it (see
    :mod:`virtbus.cli.verbs`), so a command imports no other verb's module."""
    import importlib

    from virtbus.cli.verbs import MAIN, MODULE_VERBS, VERB_MODULE

    p: argparse.ArgumentParser = CliParser(
        prog="virtbus", description="virsh for a cluster, over a bus"
    )
    p.add_argument(
        "--bus",
        action="append",
        default=None,
        metavar="URL",
        help="bus URL (default: $VIRTBUS_BUS_URL or amqp://guest:guest@127.0.0.1:5672/); "
        "a RabbitMQ cluster: amqp://USER:PW@mq1,mq2,mq3/VHOST or --bus once per node",
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
    modules = list(MODULE_VERBS) if verb is None else [VERB_MODULE[verb]]
    for module in modules:
        if module == MAIN:
            _add_demo_parser(sub)
        else:
            importlib.import_module(f"virtbus.cli.{module}").add_parsers(sub)
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

    from virtbus.bus.nodes import join_bus_urls
    from virtbus.cli.context import Context
    from virtbus.client import Client
    from virtbus.settings import BusSettings, bus_url_from_env

    trusted = tuple(u for u in os.environ.get(TRUSTED_ENV, "").split(",") if u)
    settings = BusSettings(
        url=bus_url_from_env(join_bus_urls(args.bus or ())),
        call_timeout=args.timeout,
        trusted_publishers=trusted,
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

    from virtbus.cli.output import fail
    from virtbus.cli.verbs import verb_of
    from virtbus.errors import VirtbusError

    parser = build_parser(verb_of(words))
    args = parser.parse_args(words)
    # The CLI reports failures itself, in one line: keep the AMQP libraries' logs quiet.
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if args.command == "completion":  # completes every verb: the whole parser
        from virtbus.cli.completion import script

        sys.stdout.write(script(build_parser(), args.shell))
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
