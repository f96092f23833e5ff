"""The QEMU/KVM driver. ``QemuDriver`` is imported lazily so the pure modules
(``events``, ``argv``) load without the QMP machinery."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from drivers.qemu.driver import QemuDriver
    from drivers.qemu.settings import QemuSettings

__all__ = ["QemuDriver", "QemuSettings"]


def __getattr__(name: str) -> Any:
    if name == "QemuDriver":
        from drivers.qemu.driver import QemuDriver

        return QemuDriver
    if name == "QemuSettings":
        from drivers.qemu.settings import QemuSettings

        return QemuSettings
    raise AttributeError(f"module 'drivers.qemu' has no attribute {name!r}")
