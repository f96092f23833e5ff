"""Driver selection by name: the only place the agent names a hypervisor.

Each driver's tuning comes from the agent's ``driver_options`` (``--driver-option
KEY=VALUE`` or the ``[driver_options]`` table of agent.toml) as fields of that driver's
settings dataclass; every driver refuses a key it does not know.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from drivers.base import Driver
from virtbus.config import option_fields, options_into
from virtbus.errors import InvalidArgument
from virtbus.settings import AgentSettings

if TYPE_CHECKING:
    from drivers.qemu.settings import QemuSettings

DRIVER_NAMES = ("test", "qemu", "xen", "lxc")


@dataclass(frozen=True, slots=True)
class TestDriverOptions:
    delay: float = 0.0  # simulated latency of every lifecycle op (s)
    migration_time: float = 0.0  # how long a simulated live migration lasts (s)
    event_rate: float = 0.0  # rtc_change events per second from the running domains (0: off)


def qemu_settings(options: Mapping[str, str], state_dir: Path) -> QemuSettings:
    """The QEMU driver's settings from driver options: its own fields and, by the same
    flat names, those of its command line (``ArgvSettings``: ``vnc_tls``, ``vnc_tls_dir``,
    ``spice_tls``, ``chardev_tls``, ``default_graphics_listen``, ...), as libvirt's
    qemu.conf holds both."""
    from drivers.qemu.argv_common import ArgvSettings
    from drivers.qemu.settings import QemuSettings

    own = option_fields(QemuSettings)
    argv_keys = option_fields(ArgvSettings).keys() - own.keys()
    unknown = sorted(options.keys() - own.keys() - argv_keys)
    if unknown:
        known = ", ".join(sorted([*own, *argv_keys]))
        raise InvalidArgument(f"unknown qemu driver option {unknown[0]!r} (known: {known})")
    argv_options = {key: text for key, text in options.items() if key in argv_keys}
    parsed = options_into(ArgvSettings, argv_options, "qemu driver")  # converted, checked
    argv = ArgvSettings.under(state_dir, **{key: getattr(parsed, key) for key in argv_options})
    rest = {key: text for key, text in options.items() if key not in argv_keys}
    return options_into(QemuSettings, rest, "qemu driver", argv=argv)


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

        qemu = qemu_settings(options, settings.state_dir)
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
