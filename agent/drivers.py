"""Driver selection by name: the only place the agent names a hypervisor."""

from __future__ import annotations

from drivers.base import Driver
from virtbus.errors import InvalidArgument
from virtbus.settings import AgentSettings

DRIVER_NAMES = ("test", "qemu", "xen")


def make_driver(settings: AgentSettings) -> Driver:
    if settings.driver == "test":
        from drivers.test import TestDriver

        try:
            delay = float(settings.driver_options.get("delay", 0))
            migration_time = float(settings.driver_options.get("migration_time", 0))
        except ValueError:
            raise InvalidArgument(
                "driver options delay and migration_time must be numbers of seconds"
            ) from None
        return TestDriver(op_delay=delay, migration_time=migration_time)
    if settings.driver == "qemu":
        from drivers.qemu import QemuDriver

        return QemuDriver(state_dir=settings.state_dir, run_dir=settings.runtime_dir)
    if settings.driver == "xen":
        from drivers.xen import XenDriver, XenSettings

        return XenDriver(
            XenSettings.from_options(settings.state_dir / "xen", settings.driver_options)
        )
    raise InvalidArgument(
        f"unknown driver '{settings.driver}' (choose from {', '.join(DRIVER_NAMES)})"
    )
