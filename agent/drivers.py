"""Driver selection by name: the only place the agent names a hypervisor."""

from __future__ import annotations

from drivers.base import Driver
from virtbus.errors import InvalidArgument
from virtbus.settings import AgentSettings

DRIVER_NAMES = ("test", "qemu")


def make_driver(settings: AgentSettings) -> Driver:
    if settings.driver == "test":
        from drivers.test import TestDriver

        try:
            delay = float(settings.driver_options.get("delay", 0))
        except ValueError:
            raise InvalidArgument("driver option delay must be a number of seconds") from None
        return TestDriver(op_delay=delay)
    if settings.driver == "qemu":
        from drivers.qemu import QemuDriver

        return QemuDriver(state_dir=settings.state_dir, run_dir=settings.runtime_dir)
    raise InvalidArgument(
        f"unknown driver '{settings.driver}' (choose from {', '.join(DRIVER_NAMES)})"
    )
