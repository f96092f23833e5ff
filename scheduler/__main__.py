"""``virtbus-scheduler``: the central scheduler daemon. Its flags and scheduler.toml keys are
the fields of :class:`scheduler.settings.SchedulerSettings` (see :mod:`virtbus.config`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from scheduler.service import SchedulerService
from scheduler.settings import SchedulerSettings, scheduler_keys
from virtbus.aio import configure_logging
from virtbus.bus.factory import open_bus
from virtbus.config import add_flags, build, parse_settings
from virtbus.daemon import serve
from virtbus.settings import bus_url_from_env

KEYS = scheduler_keys()


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    p = argparse.ArgumentParser(prog="virtbus-scheduler", description="virtbus cluster scheduler")
    p.add_argument(
        "--config", type=Path, default=None, metavar="FILE",
        help="TOML settings (e.g. /etc/virtbus/scheduler.toml); flags override it",
    )  # fmt: skip
    add_flags(p, KEYS)
    return parse_settings(p, argv, KEYS)


def settings_from(values: dict[str, Any]) -> SchedulerSettings:
    values = {**values, "bus.url": bus_url_from_env(values.get("bus.url"))}
    return build(SchedulerSettings, values, KEYS)


async def run(settings: SchedulerSettings) -> int:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    bus = open_bus(settings.bus.url, src="scheduler", settings=settings.bus)
    service = SchedulerService(settings, bus)
    return await serve(service, "scheduler", lambda: f"virtbus-scheduler {service.id} ready")


def main(argv: list[str] | None = None) -> None:
    _args, values = parse_args(argv)
    settings = settings_from(values)
    configure_logging(settings.log_level)
    sys.exit(asyncio.run(run(settings)))


if __name__ == "__main__":
    main()
