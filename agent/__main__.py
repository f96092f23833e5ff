"""``virtbus-agent``: the per-host daemon. Its flags and agent.toml keys are the fields of
:class:`virtbus.settings.AgentSettings` (see :mod:`virtbus.config`)."""

from __future__ import annotations

import asyncio
import sys

from agent.drivers import DRIVER_NAMES, make_driver
from agent.service import AgentService
from virtbus.aio import configure_logging
from virtbus.bus.factory import open_bus
from virtbus.config import build, parse_daemon_args
from virtbus.daemon import loop_factory, serve
from virtbus.settings import AgentSettings, agent_keys

KEYS = agent_keys(DRIVER_NAMES)


def settings_from(argv: list[str] | None = None) -> AgentSettings:
    """The agent's settings: defaults < file < flags (the bus URL also from the env)."""
    values = parse_daemon_args("virtbus-agent", "virtbus per-host agent", KEYS, argv)
    return build(AgentSettings, values, KEYS)


def compose(settings: AgentSettings) -> AgentService:
    """The agent the daemon runs, not yet started: its directories, its bus (unconnected),
    its driver (agent/drivers.py) and the service. The nested-Xen bed's ``agent`` scenario
    (tests/xen/scenarios.py) starts the same in dom0."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings.runtime_dir.mkdir(parents=True, exist_ok=True)
    bus = open_bus(settings.bus.url, src=settings.host, settings=settings.bus)
    return AgentService(settings, bus, make_driver(settings), settings.bus)


async def run(settings: AgentSettings) -> int:
    service = compose(settings)
    return await serve(
        service, "agent", lambda: f"virtbus-agent {settings.host} ready (driver {settings.driver})"
    )


def main(argv: list[str] | None = None) -> None:
    settings = settings_from(argv)
    configure_logging(settings.log_level)
    factory = loop_factory(settings.uvloop)  # before anything starts: a missing uvloop exits 2
    with asyncio.Runner(loop_factory=factory) as runner:
        sys.exit(runner.run(run(settings)))


if __name__ == "__main__":
    main()
