"""``virtbus-scheduler --bus URL --state-dir DIR``: the central scheduler daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from scheduler.placement import WEIGHERS, PlacementPolicy
from scheduler.service import SchedulerService
from scheduler.settings import SchedulerSettings
from virtbus.aio import configure_logging
from virtbus.bus.factory import open_bus
from virtbus.config import extras_for, parse_with_config, scheduler_keys
from virtbus.errors import VirtbusError
from virtbus.settings import BusSettings, bus_url_from_env

log = logging.getLogger("virtbus.scheduler")
_DEFAULTS = SchedulerSettings()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="virtbus-scheduler", description="virtbus cluster scheduler")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="TOML settings (e.g. /etc/virtbus/scheduler.toml); flags override it",
    )
    p.add_argument(
        "--bus", default=None, help="bus URL (default: $VIRTBUS_BUS_URL or local RabbitMQ)"
    )
    p.add_argument("--state-dir", type=Path, default=_DEFAULTS.state_dir, help="journal directory")
    p.add_argument(
        "--host-down-after",
        type=float,
        default=_DEFAULTS.host_down_after,
        metavar="S",
        help="a host without a heartbeat for S seconds is down (default %(default)s)",
    )
    p.add_argument("--cpu-overcommit", type=float, default=_DEFAULTS.placement.cpu_overcommit)
    p.add_argument("--memory-overcommit", type=float, default=_DEFAULTS.placement.memory_overcommit)
    p.add_argument(
        "--weigher",
        choices=WEIGHERS,
        default=_DEFAULTS.placement.weigher,
        help="spread: most free memory first (default); pack: fill hosts up",
    )
    p.add_argument(
        "--max-outbound",
        type=int,
        default=_DEFAULTS.max_outbound_per_host,
        help="migrations leaving one host at once (default %(default)s)",
    )
    p.add_argument(
        "--max-migrations",
        type=int,
        default=_DEFAULTS.max_migrations,
        help="migrations in flight in the cluster (default %(default)s)",
    )
    p.add_argument(
        "--migration-timeout", type=float, default=_DEFAULTS.migration_timeout, metavar="S"
    )
    p.add_argument(
        "--step-timeout",
        type=float,
        default=_DEFAULTS.step_timeout,
        metavar="S",
        help="deadline of each agent call of a migration (default %(default)s)",
    )
    p.add_argument(
        "--cleanup-timeout",
        type=float,
        default=_DEFAULTS.cleanup_timeout,
        metavar="S",
        help="retry rollback steps this long (default %(default)s)",
    )
    p.add_argument(
        "--journal-fsync",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="fsync every journal write (survives losing the host; slower)",
    )
    p.add_argument("--log-level", default="INFO")
    args, file_only = parse_with_config(p, argv, scheduler_keys(WEIGHERS))
    args.file_settings = file_only  # keys without a flag (bus.*, fine tuning)
    return args  # fmt: skip


def settings_from(args: argparse.Namespace) -> SchedulerSettings:
    if args.max_outbound < 1 or args.max_migrations < 1:
        raise SystemExit("virtbus-scheduler: migration limits must be at least 1")
    extra = getattr(args, "file_settings", {})
    return SchedulerSettings(
        **extras_for(extra),
        state_dir=args.state_dir,
        host_down_after=args.host_down_after,
        placement=PlacementPolicy(
            cpu_overcommit=args.cpu_overcommit,
            memory_overcommit=args.memory_overcommit,
            weigher=args.weigher,
        ),
        max_outbound_per_host=args.max_outbound,
        max_migrations=args.max_migrations,
        migration_timeout=args.migration_timeout,
        step_timeout=args.step_timeout,
        cleanup_timeout=args.cleanup_timeout,
        journal_fsync=args.journal_fsync,
    )


async def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    extra = getattr(args, "file_settings", {})
    bus_settings = BusSettings(url=bus_url_from_env(args.bus), **extras_for(extra, "bus."))
    bus = open_bus(bus_settings.url, src="scheduler", settings=bus_settings)
    service = SchedulerService(settings, bus)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
    except VirtbusError as exc:
        log.error("scheduler could not start: %s", exc)
        await service.stop()
        return 1
    print(f"virtbus-scheduler {service.id} ready", flush=True)
    waits = {
        asyncio.create_task(stop.wait(), name="scheduler:signal-watch"),
        asyncio.create_task(service.failed.wait(), name="scheduler:failed-watch"),
    }
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    await service.stop()
    return 1 if service.failed.is_set() else 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
