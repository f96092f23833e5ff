"""libvirt domain XML: safe parsing, a typed model, and the tree written back by dumpxml.

Use :func:`parse_domain_xml` to get a :class:`DomainDefinition`; its typed views (disks,
interfaces, ...) are read-only and keep their lxml element; change the tree with the
definition's setters or ``edit()``.
"""

from virtbus.domain.definition import MAX_VCPUS, NON_DEVICE_TAGS, DomainDefinition
from virtbus.domain.model import (
    RNG,
    Capabilities,
    CharDevice,
    ClockConfig,
    Controller,
    CPUConfig,
    CPUFeature,
    CPUTopology,
    CPUTune,
    Device,
    Disk,
    Filesystem,
    Graphics,
    IdMap,
    IdRange,
    Input,
    Interface,
    IPAddress,
    Loader,
    Memballoon,
    MemTune,
    OSConfig,
    Panic,
    PMConfig,
    Route,
    Sound,
    Timer,
    Video,
    Watchdog,
)
from virtbus.domain.names import MAX_NAME_BYTES, check_domain_name
from virtbus.domain.numbers import optional_int, parse_int
from virtbus.domain.serialize import dumps
from virtbus.domain.support import unknown_attributes, unknown_devices
from virtbus.domain.units import UNIT_FACTORS, to_kib
from virtbus.domain.views import normalize_mac
from virtbus.domain.xml import XMLLimits, domain_name_of, parse_domain_xml, without_secrets

__all__ = [
    "MAX_NAME_BYTES",
    "MAX_VCPUS",
    "NON_DEVICE_TAGS",
    "RNG",
    "UNIT_FACTORS",
    "CPUConfig",
    "CPUFeature",
    "CPUTopology",
    "CPUTune",
    "Capabilities",
    "CharDevice",
    "ClockConfig",
    "Controller",
    "Device",
    "Disk",
    "DomainDefinition",
    "Filesystem",
    "Graphics",
    "IPAddress",
    "IdMap",
    "IdRange",
    "Input",
    "Interface",
    "Loader",
    "MemTune",
    "Memballoon",
    "OSConfig",
    "PMConfig",
    "Panic",
    "Route",
    "Sound",
    "Timer",
    "Video",
    "Watchdog",
    "XMLLimits",
    "check_domain_name",
    "domain_name_of",
    "dumps",
    "normalize_mac",
    "optional_int",
    "parse_domain_xml",
    "parse_int",
    "to_kib",
    "unknown_attributes",
    "unknown_devices",
    "without_secrets",
]
