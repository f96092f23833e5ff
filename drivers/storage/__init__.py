"""Storage pool backends behind the StorageBackend protocol (libvirt's storage drivers).

:func:`backend_for` is the only place a pool type is mapped to its backend; every type
libvirt knows has one, the ones this host cannot run answer NO_SUPPORT with the reason.
"""

from __future__ import annotations

from drivers.storage.base import (
    WIPE_ALGORITHMS,
    BackendSettings,
    ImageSource,
    PoolScan,
    StorageBackend,
    UploadSink,
    VolumeSpec,
)
from drivers.storage.dir import DirBackend
from drivers.storage.disk import DiskBackend
from drivers.storage.fs import FsBackend
from drivers.storage.iscsi_direct import IscsiDirectBackend
from drivers.storage.unsupported import REASONS, UnsupportedBackend
from virtbus.storage import POOL_TYPES

SUPPORTED_TYPES = ("dir", "fs", "disk", "iscsi-direct")


def backend_for(pool_type: str, settings: BackendSettings | None = None) -> StorageBackend:
    """The backend of ``pool_type`` (an unsupported one raises NO_SUPPORT on every use)."""
    if pool_type == "dir":
        return DirBackend(settings)
    if pool_type == "fs":
        return FsBackend(settings)
    if pool_type == "disk":
        return DiskBackend(settings)
    if pool_type == "iscsi-direct":
        return IscsiDirectBackend(settings)
    assert pool_type in POOL_TYPES, pool_type
    return UnsupportedBackend(pool_type)  # type: ignore[return-value]


__all__ = [
    "REASONS",
    "SUPPORTED_TYPES",
    "WIPE_ALGORITHMS",
    "BackendSettings",
    "ImageSource",
    "PoolScan",
    "StorageBackend",
    "UploadSink",
    "VolumeSpec",
    "backend_for",
]
