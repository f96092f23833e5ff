"""A network's ports (libvirt's virNetworkPort): one per guest NIC plugged into it.

libvirt creates a port when a running guest's ``<interface type='network'>`` is plugged
and deletes it when the NIC is unplugged (detach, destroy, shutdown). virtbus keeps no
records of guests' ports: they are computed from the live definitions of the
host's running domains, so the test and QEMU drivers answer alike and nothing can go
stale across an agent restart or a crash.

A port's UUID is derived, not stored: uuid5 of the network's uuid, the domain's uuid and
the NIC's MAC. It is stable for the life of the plug (and across agent restarts), unique
on the network (one MAC per NIC of a domain; libvirt refuses duplicates), and needs no
state to clean up. Unlike libvirt, unplugging and plugging the same NIC again gives the
same UUID back.

A port can also be made by hand (net-port-create, libvirt's virNetworkPortCreateXML: what
a hypervisor driver asks a network for before it plugs a NIC): a ``<networkport>`` with
an ``<owner>`` and a ``<mac>``; the network fills in its ``<plug>`` as libvirt's
networkAllocatePort does. Those ports are records the agent keeps while the network runs
(:func:`parse_port_xml` checks them); net-port-delete removes them.
"""

from __future__ import annotations

import copy
import uuid as uuidlib
from dataclasses import dataclass

from lxml import etree

from virtbus.domain.bandwidth import parse_bandwidth
from virtbus.domain.definition import DomainDefinition
from virtbus.domain.model import Element, Interface
from virtbus.domain.serialize import dumps
from virtbus.domain.xml import parse_untrusted_root
from virtbus.errors import ConfigUnsupported, OperationInvalid, XMLError
from virtbus.network.definition import MANAGED_MODES, NetworkDefinition, check_mac

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


_PORT_CHILDREN = frozenset({"uuid", "owner", "group", "mac", "bandwidth", "plug"})


def _uuid_text(el: Element | None, what: str) -> str | None:
    if el is None:
        return None
    try:
        return str(uuidlib.UUID((el.text or "").strip()))
    except ValueError:
        raise XMLError(f"invalid {what} '{(el.text or '').strip()}'") from None


def parse_port_xml(xml: str, net: NetworkDefinition) -> Port:
    """A ``<networkport>`` for net-port-create on ``net`` (libvirt's
    virNetworkPortDefParseXML): ``<owner>`` with a name and a uuid and ``<mac>`` are
    mandatory, ``<uuid>`` is generated when absent, ``<bandwidth>`` is checked as a NIC's;
    a ``<plug>`` given must be the network's own (it is filled in otherwise). XML_ERROR
    for what is malformed; CONFIG_UNSUPPORTED for what virtbus does not do."""
    root = parse_untrusted_root(xml, "network port")
    if root.tag != "networkport":
        raise XMLError(f"expected <networkport>, not <{root.tag}>")
    for child in root:
        if isinstance(child.tag, str) and child.tag not in _PORT_CHILDREN:
            raise ConfigUnsupported(f"<{child.tag}> in <networkport> is not supported by"
                                    " virtbus")  # fmt: skip
    owner = root.find("owner")
    name = (owner.findtext("name") or "").strip() if owner is not None else ""
    owner_uuid = _uuid_text(owner.find("uuid") if owner is not None else None, "owner uuid")
    if not name or owner_uuid is None:
        raise XMLError("a network port needs <owner> with <name> and <uuid>")
    mac_el = root.find("mac")
    if mac_el is None or not mac_el.get("address"):
        raise XMLError("a network port needs <mac address=...>")
    mac = check_mac(str(mac_el.get("address")).lower(), "<networkport>")
    bandwidth = root.find("bandwidth")
    parse_bandwidth(bandwidth, f"network port of '{name}'")
    plug = plug_of(net)
    if plug is None:
        raise OperationInvalid(f"network '{net.name}' ({net.forward}) has no ports to plug")
    given = root.find("plug")
    if given is not None and {k: str(v) for k, v in given.attrib.items()} != plug:
        raise XMLError(f"<plug> of the port is not how network '{net.name}' plugs"
                       f" ({', '.join(f'{k}={v}' for k, v in plug.items())})")  # fmt: skip
    group = (root.findtext("group") or "").strip() or None
    return Port(uuid=_uuid_text(root.find("uuid"), "port uuid") or str(uuidlib.uuid4()),
                domain=name, domain_uuid=owner_uuid, mac=mac, group=group,
                bandwidth=bandwidth, plug=plug)  # fmt: skip
