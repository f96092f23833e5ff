"""Driver selection by name: the only place the agent names a hypervisor.

Each driver's tuning comes from the agent's ``driver_options`` (``--driver-option
KEY=VALUE`` or the ``[driver_options]`` table of agent.toml) as fields of that driver's
settings dataclass; every driver refuses a key it does not know.
"""

from __future__ import annotations

from dataclasses import dataclass

from drivers.base import Driver
from virtbus.config import options_into
from virtbus.errors import InvalidArgument
from virtbus.settings import AgentSettings

DRIVER_NAMES = ("test", "qemu", "xen", "lxc")


@dataclass(frozen=True, slots=True)
class TestDriverOptions:
    delay: float = 0.0  # simulated latency of every lifecycle op (s)
    migration_time: float = 0.0  # how long a simulated live migration lasts (s)
    event_rate: float = 0.0  # rtc_change events per second from the running domains (0: off)


def make_driver(settings: AgentSettings) -> Driver:
    options = settings.driver_options
    if settings.driver == "test":
        from drivers.test import TestDriver

        test = options_into(TestDriverOptions, options, "test driver")
        return TestDriver(
            op_delay=test.delay, migration_time=test.migration_time, event_rate=test.event_rate
        )
    if settings.driver == "qemu":
        from drivers.qemu import QemuDriver
        from drivers.qemu.settings import QemuSettings

        qemu = options_into(QemuSettings, options, "qemu driver")
        return QemuDriver(state_dir=settings.state_dir, run_dir=settings.runtime_dir, settings=qemu)
    if settings.driver == "xen":
        from drivers.xen import XenDriver, XenSettings

        return XenDriver(XenSettings.from_options(settings.state_dir / "xen", options))
    if settings.driver == "lxc":
        from drivers.lxc import LxcDriver, LxcSettings

        return LxcDriver(LxcSettings.from_options(settings.state_dir, options))
    raise InvalidArgument(
        f"unknown driver '{settings.driver}' (choose from {', '.join(DRIVER_NAMES)})"
    )
