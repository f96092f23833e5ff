"""The LXC driver: containers as domains, with libvirt's LXC XML, events and statistics.

Agent wiring: ``LxcDriver(LxcSettings.from_options(state_dir, driver_options))``.
"""

from drivers.lxc.driver import LxcDriver, NetworkPort
from drivers.lxc.settings import LxcSettings

__all__ = ["LxcDriver", "LxcSettings", "NetworkPort"]
