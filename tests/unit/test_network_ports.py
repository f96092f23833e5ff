"""virtbus/network/ports.py: which NICs of a live definition are a network's ports, their
derived UUIDs, the ``<plug>`` per forward mode and the ``<networkport>`` XML."""

from __future__ import annotations

from lxml import etree

from virtbus.domain import parse_domain_xml
from virtbus.network import parse_network_xml
from virtbus.network.ports import domain_ports, plug_of, port_uuid

DOM = "6f2a1c0e-4b8d-4e1f-9a3b-2c5d7e9f1a20"
NET = "1b3d5f70-92a4-4c6e-8f10-32547698badc"


def domain(*nics: str) -> str:
    return (f"<domain type='test'><name>g</name><uuid>{DOM}</uuid><memory>65536</memory>"
            f"<os><type>hvm</type></os><devices>{''.join(nics)}</devices></domain>")  # fmt: skip


def network(body: str) -> str:
    return f"<network><name>n</name><uuid>{NET}</uuid>{body}</network>"


def test_ports_of_a_domain() -> None:
    net = parse_network_xml(network("<bridge name='virbr7'/>"))
    defn = parse_domain_xml(domain(
        "<interface type='network'><mac address='52:54:00:00:00:01'/><source network='n'/>"
        "</interface>",
        "<interface type='network'><mac address='52:54:00:00:00:02'/>"
        "<source network='other'/></interface>",
        "<interface type='bridge'><mac address='52:54:00:00:00:03'/>"
        "<source bridge='virbr7'/></interface>",
        "<interface type='network'><mac address='52:54:00:00:00:04'/>"
        "<source network='n' portgroup='pg'/>"
        "<bandwidth><outbound average='10'/></bandwidth></interface>",
    ))  # fmt: skip
    ports = domain_ports(net, defn)
    assert [p.mac for p in ports] == ["52:54:00:00:00:01", "52:54:00:00:00:04"]
    assert ports[0].uuid == port_uuid(NET, DOM, "52:54:00:00:00:01")
    assert ports[0].uuid == port_uuid(NET.upper(), DOM.upper(), "52:54:00:00:00:01")
    assert len({p.uuid for p in ports}) == 2
    assert ports[0].to_xml() == (
        "<networkport>\n"
        f"  <uuid>{ports[0].uuid}</uuid>\n"
        "  <owner>\n    <name>g</name>\n"
        f"    <uuid>{DOM}</uuid>\n  </owner>\n"
        "  <mac address='52:54:00:00:00:01'/>\n"
        "  <plug type='network' bridge='virbr7'/>\n"
        "</networkport>\n"
    )
    root = etree.fromstring(ports[1].to_xml())
    assert [c.tag for c in root] == ["uuid", "owner", "group", "mac", "bandwidth", "plug"]
    assert root.findtext("group") == "pg"
    assert root.find("bandwidth/outbound").get("average") == "10"


def test_plug_per_forward_mode() -> None:
    def plug(body: str) -> dict[str, str] | None:
        return plug_of(parse_network_xml(network(body)))

    assert plug("<forward mode='nat'/><bridge name='virbr1'/>") == {
        "type": "network", "bridge": "virbr1"}  # fmt: skip
    assert plug("<forward mode='bridge'/><bridge name='br0'/>") == {
        "type": "bridge", "bridge": "br0"}  # fmt: skip
    assert plug("<forward mode='vepa' dev='eth1'><interface dev='eth1'/></forward>") == {
        "type": "direct", "dev": "eth1", "mode": "vepa"}  # fmt: skip
