"""The Xen driver: ``xl`` for commands, a persistent asyncio XenStore connection for events.

Agent wiring: ``XenDriver(XenSettings.from_options(state_dir / "xen", driver_options))``.
"""

from drivers.xen.driver import XenDriver
from drivers.xen.settings import XenSettings, XenStoreSettings

__all__ = ["XenDriver", "XenSettings", "XenStoreSettings"]
