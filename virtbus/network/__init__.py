"""libvirt virtual network XML (``<network>``): safe parsing, typed views, dumpxml.

:func:`parse_network_xml` uses the same hardened parser as domain and pool XML (no DTD,
no entities, bounded size); which forward modes this host can run is the network
backends' business (drivers/network).
"""

from __future__ import annotations

from virtbus.domain.xml import XMLLimits, parse_untrusted_root
from virtbus.network.definition import (
    CLUSTER_NS,
    FORWARD_MODES,
    MANAGED_MODES,
    VNI_MAX,
    ClusterConfig,
    DhcpHost,
    DhcpRange,
    DnsHost,
    IpConfig,
    NetworkDefinition,
    check_ifname,
    check_mac,
    overlaps,
)
from virtbus.network.leases import Lease, parse_leases

_LIMITS = XMLLimits()


def parse_network_xml(xml: str | bytes, *, limits: XMLLimits = _LIMITS) -> NetworkDefinition:
    """A ``<network>`` definition; XMLError naming what is wrong."""
    return NetworkDefinition(parse_untrusted_root(xml, "network", limits=limits))


__all__ = [
    "CLUSTER_NS",
    "FORWARD_MODES",
    "MANAGED_MODES",
    "VNI_MAX",
    "ClusterConfig",
    "DhcpHost",
    "DhcpRange",
    "DnsHost",
    "IpConfig",
    "Lease",
    "NetworkDefinition",
    "check_ifname",
    "check_mac",
    "overlaps",
    "parse_leases",
    "parse_network_xml",
]
