"""The small Linux test guest (Debian cloud kernel + busybox initramfs), built into a cache.

It lives in the package (not under tests/) because ``virtbus demo`` boots it too. Names
load lazily so that ``python -m virtbus.guests.build`` runs that module once.
"""

from __future__ import annotations

import importlib
from typing import Any

_BUILD_NAMES = frozenset(
    {
        "GuestBuildError",
        "GuestBuildSettings",
        "Progress",
        "TestGuest",
        "build_test_guest",
        "cache_key",
        "collect_modules",
        "default_cache_root",
        "disk_sector",
        "ensure_test_guest",
        "expected_disk_md5",
    }
)
__all__ = sorted(_BUILD_NAMES)


def __getattr__(name: str) -> Any:
    if name in _BUILD_NAMES:
        return getattr(importlib.import_module("virtbus.guests.build"), name)
    raise AttributeError(name)
