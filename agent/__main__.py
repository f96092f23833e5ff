"""``virtbus-agent``: the per-host daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path

from agent.drivers import DRIVER_NAMES, make_driver
from agent.service import AgentService
from virtbus.aio import configure_logging
from virtbus.bus.factory import open_bus
from virtbus.config import agent_keys, extras_for, parse_with_config
from virtbus.errors import VirtbusError
from virtbus.settings import (
    DEFAULT_HEARTBEAT_INTERVAL,
    AgentSettings,
    BusSettings,
    bus_url_from_env,
)

log = logging.getLogger("virtbus.agent")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="virtbus-agent", description="virtbus per-host agent")
    p.add_argument(
        "--config", type=Path, default=None, metavar="FILE",
        help="TOML settings (e.g. /etc/virtbus/agent.toml); flags override it",
    )  # fmt: skip
    p.add_argument("--host", default=socket.gethostname(), help="this host's name on the bus")
    p.add_argument("--driver", default="test", choices=DRIVER_NAMES)
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/virtbus"))
    p.add_argument("--run-dir", type=Path, default=None, help="default: STATE_DIR/run")
    p.add_argument(
        "--bus", default=None, help="bus URL (default: $VIRTBUS_BUS_URL or local RabbitMQ)"
    )
    p.add_argument("--heartbeat-interval", type=float, default=DEFAULT_HEARTBEAT_INTERVAL)
    p.add_argument(
        "--driver-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="driver tuning, e.g. delay=0.2 (test driver: latency of every op)",
    )
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label of this host in its inventory (placement, e.g. rack=r1)",
    )
    p.add_argument(
        "--metrics-interval", type=float, default=10.0, metavar="S",
        help="seconds between metrics passes on virtbus.metrics (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--metrics-listen", default=None, metavar="ADDR:PORT",
        help="serve Prometheus metrics on http://ADDR:PORT/metrics (default: off)",
    )  # fmt: skip
    p.add_argument(
        "--migration-address", default="127.0.0.1", metavar="ADDR",
        help="address other hosts stream live migrations to (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--cpu-overcommit", type=float, default=4.0, metavar="R",
        help="refuse a start past R vCPUs of active guests per host CPU (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--memory-overcommit", type=float, default=1.0, metavar="R",
        help="refuse a start past R x host memory for active guests (default %(default)s)",
    )  # fmt: skip
    p.add_argument("--log-level", default="INFO")
    args, file_only = parse_with_config(p, argv, agent_keys(DRIVER_NAMES))
    args.file_settings = file_only  # keys without a flag (tables, bus.*, limits)
    return args


def _key_value(option: str) -> tuple[str, str]:
    key, sep, value = option.partition("=")
    if not sep or not key:
        raise SystemExit(f"virtbus-agent: --driver-option wants KEY=VALUE, got {option!r}")
    return key, value


async def run(args: argparse.Namespace) -> int:
    extra = getattr(args, "file_settings", {})
    labels = {**extra.get("labels", {}), **dict(_key_value(o) for o in args.label)}
    options = {**extra.get("driver_options", {}), **dict(_key_value(o) for o in args.driver_option)}
    settings = AgentSettings(
        **{k: v for k, v in extras_for(extra).items() if k not in ("labels", "driver_options")},
        host=args.host,
        driver=args.driver,
        state_dir=args.state_dir,
        run_dir=args.run_dir,
        heartbeat_interval=args.heartbeat_interval,
        driver_options=options,
        metrics_interval=args.metrics_interval,
        metrics_listen=args.metrics_listen,
        labels=labels,
        migration_address=args.migration_address,
        cpu_overcommit=args.cpu_overcommit,
        memory_overcommit=args.memory_overcommit,
    )
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings.runtime_dir.mkdir(parents=True, exist_ok=True)
    bus_settings = BusSettings(url=bus_url_from_env(args.bus), **extras_for(extra, "bus."))
    bus = open_bus(bus_settings.url, src=settings.host, settings=bus_settings)
    service = AgentService(settings, bus, make_driver(settings), bus_settings)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
    except VirtbusError as exc:
        log.error("agent could not start: %s", exc)
        await service.stop()
        return 1
    print(f"virtbus-agent {settings.host} ready (driver {settings.driver})", flush=True)
    failed = asyncio.create_task(service.failed.wait(), name="agent:failed-watch")
    stopping = asyncio.create_task(stop.wait(), name="agent:signal-watch")
    await asyncio.wait({failed, stopping}, return_when=asyncio.FIRST_COMPLETED)
    failed.cancel()
    stopping.cancel()
    log.info("stopping agent %s", settings.host)
    await service.stop()
    return 1 if service.failed.is_set() else 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
