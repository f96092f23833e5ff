"""``virtbus-scheduler``: the central scheduler daemon. Its flags and scheduler.toml keys are
the fields of :class:`scheduler.settings.SchedulerSettings` (see :mod:`virtbus.config`)."""

from __future__ import annotations

import asyncio
import sys

from scheduler.service import SchedulerService
from scheduler.settings import SchedulerSettings, scheduler_keys
from virtbus.aio import configure_logging
from virtbus.bus.factory import open_bus
from virtbus.config import build, parse_daemon_args
from virtbus.daemon import loop_factory, serve

KEYS = scheduler_keys()


def settings_from(argv: list[str] | None = None) -> SchedulerSettings:
    """The scheduler's settings: defaults < file < flags (the bus URL also from the env)."""
    values = parse_daemon_args("virtbus-scheduler", "virtbus cluster scheduler", KEYS, argv)
    return build(SchedulerSettings, values, KEYS)


async def run(settings: SchedulerSettings) -> int:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    bus = open_bus(settings.bus.url, src="scheduler", settings=settings.bus)
    service = SchedulerService(settings, bus)
    return await serve(service, "scheduler", lambda: f"virtbus-scheduler {service.id} ready")


def main(argv: list[str] | None = None) -> None:
    settings = settings_from(argv)
    configure_logging(settings.log_level)
    factory = loop_factory(settings.uvloop)  # before anything starts: a missing uvloop exits 2
    with asyncio.Runner(loop_factory=factory) as runner:
        sys.exit(runner.run(run(settings)))


if __name__ == "__main__":
    main()
