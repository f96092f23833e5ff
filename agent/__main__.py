"""``virtbus-agent``: the per-host daemon. Its flags and agent.toml keys are the fields of
:class:`virtbus.settings.AgentSettings` (see :mod:`virtbus.config`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from agent.drivers import DRIVER_NAMES, make_driver
from agent.service import AgentService
from virtbus.aio import configure_logging
from virtbus.bus.factory import open_bus
from virtbus.config import add_flags, build, parse_settings
from virtbus.daemon import serve
from virtbus.settings import AgentSettings, agent_keys, bus_url_from_env

KEYS = agent_keys(DRIVER_NAMES)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    p = argparse.ArgumentParser(prog="virtbus-agent", description="virtbus per-host agent")
    p.add_argument(
        "--config", type=Path, default=None, metavar="FILE",
        help="TOML settings (e.g. /etc/virtbus/agent.toml); flags override it",
    )  # fmt: skip
    add_flags(p, KEYS)
    return parse_settings(p, argv, KEYS)


def settings_from(values: dict[str, Any]) -> AgentSettings:
    """The agent's settings: defaults < file < flags; the bus URL also from the env."""
    values = {**values, "bus.url": bus_url_from_env(values.get("bus.url"))}
    return build(AgentSettings, values, KEYS)


async def run(settings: AgentSettings) -> int:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings.runtime_dir.mkdir(parents=True, exist_ok=True)
    bus = open_bus(settings.bus.url, src=settings.host, settings=settings.bus)
    service = AgentService(settings, bus, make_driver(settings), settings.bus)
    return await serve(
        service, "agent", lambda: f"virtbus-agent {settings.host} ready (driver {settings.driver})"
    )


def main(argv: list[str] | None = None) -> None:
    _args, values = parse_args(argv)
    settings = settings_from(values)
    configure_logging(settings.log_level)
    sys.exit(asyncio.run(run(settings)))


if __name__ == "__main__":
    main()
