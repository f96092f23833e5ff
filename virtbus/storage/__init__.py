"""libvirt storage pool and volume XML: safe parsing, typed views, dumpxml.

:func:`parse_pool_xml` and :func:`parse_volume_xml` use the same hardened parser as
domain XML (no DTD, no entities, bounded size). Every pool type of libvirt parses; which
ones this host can run is the storage backends' business (drivers/storage).
"""

from __future__ import annotations

from virtbus.domain.xml import XMLLimits, parse_untrusted_root
from virtbus.storage.names import check_name
from virtbus.storage.pool import (
    POOL_TYPES,
    Permissions,
    PoolDefinition,
    PoolSizes,
    PoolSource,
    SourceHost,
    normalize_path,
)
from virtbus.storage.units import MAX_BYTES, format_bytes, parse_scaled, parse_size_arg
from virtbus.storage.volume import (
    ALL_FORMATS,
    BACKING_FORMATS,
    Backing,
    VolumeDefinition,
    VolumeFacts,
    check_format,
    volume_xml,
)

_LIMITS = XMLLimits()


def parse_pool_xml(xml: str | bytes, *, limits: XMLLimits = _LIMITS) -> PoolDefinition:
    """A ``<pool>`` definition; XMLError naming what is wrong."""
    return PoolDefinition(parse_untrusted_root(xml, "storage pool", limits=limits))


def parse_volume_xml(xml: str | bytes, *, limits: XMLLimits = _LIMITS) -> VolumeDefinition:
    """A ``<volume>`` definition; XMLError naming what is wrong."""
    return VolumeDefinition(parse_untrusted_root(xml, "storage volume", limits=limits))


__all__ = [
    "ALL_FORMATS",
    "BACKING_FORMATS",
    "MAX_BYTES",
    "POOL_TYPES",
    "Backing",
    "Permissions",
    "PoolDefinition",
    "PoolSizes",
    "PoolSource",
    "SourceHost",
    "VolumeDefinition",
    "VolumeFacts",
    "check_format",
    "check_name",
    "format_bytes",
    "normalize_path",
    "parse_pool_xml",
    "parse_scaled",
    "parse_size_arg",
    "parse_volume_xml",
    "volume_xml",
]
