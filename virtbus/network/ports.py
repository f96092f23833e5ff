"""A network's ports (libvirt's virNetworkPort): one per guest NIC plugged into it.

libvirt creates a port when a running guest's ``<interface type='network'>`` is plugged
and deletes it when the NIC is unplugged (detach, destroy, shutdown). virtbus keeps no
port records: the ports of a network are computed from the live definitions of the
host's running domains, so the test and QEMU drivers answer alike and nothing can go
stale across an agent restart or a crash.

A port's UUID is derived, not stored: uuid5 of the network's uuid, the domain's uuid and
the NIC's MAC. It is stable for the life of the plug (and across agent restarts), unique
on the network (one MAC per NIC of a domain; libvirt refuses duplicates), and needs no
state to clean up. Unlike libvirt, unplugging and plugging the same NIC again gives the
same UUID back.
"""

from __future__ import annotations

import copy
import uuid as uuidlib
from dataclasses import dataclass

from lxml import etree

from virtbus.domain.definition import DomainDefinition
from virtbus.domain.model import Element, Interface
from virtbus.domain.serialize import dumps
from virtbus.network.definition import MANAGED_MODES, NetworkDefinition

#: the namespace of port UUIDs (uuid5 over "<network uuid>/<domain uuid>/<mac>")
PORT_NAMESPACE = uuidlib.UUID("5b0f4c2e-8d1a-4f57-9a53-6e2b1c7d9f10")


def port_uuid(network_uuid: str, domain_uuid: str, mac: str) -> str:
    key = f"{network_uuid.lower()}/{domain_uuid.lower()}/{mac.lower()}"
    return str(uuidlib.uuid5(PORT_NAMESPACE, key))


@dataclass(frozen=True, slots=True)
class Port:
    uuid: str
    domain: str  # the owner's name
    domain_uuid: str
    mac: str
    group: str | None  # <source portgroup=...>
    bandwidth: Element | None  # the interface's <bandwidth>, verbatim
    plug: dict[str, str]  # the <plug> element's attributes

    def to_xml(self) -> str:
        """libvirt's ``<networkport>`` (formatnetworkport), in its element order."""
        root = etree.Element("networkport")
        etree.SubElement(root, "uuid").text = self.uuid
        owner = etree.SubElement(root, "owner")
        etree.SubElement(owner, "name").text = self.domain
        etree.SubElement(owner, "uuid").text = self.domain_uuid
        if self.group:
            etree.SubElement(root, "group").text = self.group
        etree.SubElement(root, "mac", address=self.mac)
        if self.bandwidth is not None:
            bandwidth = copy.deepcopy(self.bandwidth)
            bandwidth.tail = None
            root.append(bandwidth)
        etree.SubElement(root, "plug", **self.plug)
        return dumps(root)


def plug_of(net: NetworkDefinition) -> dict[str, str] | None:
    """How a NIC is plugged into ``net``, as libvirt's network driver fills the port's
    ``<plug>``: the bridge virtbus manages, a host bridge (forward mode bridge with a
    ``<bridge name>``), or a macvtap on the forward device; None for hostdev."""
    if net.forward in MANAGED_MODES:
        return {"type": "network", "bridge": net.bridge or ""}
    if net.forward == "bridge" and net.bridge:
        return {"type": "bridge", "bridge": net.bridge}
    if net.forward in ("bridge", "private", "vepa", "passthrough") and net.forward_dev:
        return {"type": "direct", "dev": net.forward_dev, "mode": str(net.forward)}
    return None


def _plugged(iface: Interface, net: NetworkDefinition) -> bool:
    return iface.type == "network" and iface.source_network == net.name and bool(iface.mac)


def domain_ports(net: NetworkDefinition, domain: DomainDefinition) -> list[Port]:
    """The ports of a running domain's NICs on ``net`` (from its live definition)."""
    plug = plug_of(net)
    if plug is None:
        return []
    out = []
    for iface in domain.interfaces:
        if not _plugged(iface, net):
            continue
        assert iface.mac is not None
        source = iface.element.find("source")
        group = source.get("portgroup") if source is not None else None
        out.append(Port(
            uuid=port_uuid(net.uuid, domain.uuid, iface.mac), domain=domain.name,
            domain_uuid=domain.uuid, mac=iface.mac, group=group,
            bandwidth=iface.element.find("bandwidth"), plug=plug,
        ))  # fmt: skip
    return out
