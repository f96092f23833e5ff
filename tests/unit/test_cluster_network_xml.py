"""A cluster network's ``<vb:cluster>``: parsed, written per host, and what a host that is
not the network's DHCP host leaves out (addresses, firewall, dnsmasq)."""

from __future__ import annotations

import pytest

from drivers.network import dnsmasq, nft
from virtbus.errors import XMLError
from virtbus.network import CLUSTER_NS, parse_network_xml

BASE = (
    f"<network xmlns:vb='{CLUSTER_NS}'><name>cn</name>"
    "<ip address='10.91.0.1' netmask='255.255.255.0'><dhcp>"
    "<range start='10.91.0.100' end='10.91.0.150'/></dhcp></ip>{extra}</network>"
)


def test_cluster_element_parses_and_is_written_per_host() -> None:
    defn = parse_network_xml(BASE.format(extra="<vb:cluster vni='4100'/>"))
    assert defn.cluster is not None and (defn.cluster.vni, defn.cluster.dhcp) == (4100, True)
    assert defn.gateway and dnsmasq.wanted(defn) and nft.ruleset(defn, "virbr0") is not None
    defn.set_cluster(4100, dhcp=False)
    again = parse_network_xml(defn.to_xml())  # what an agent gets
    assert again.cluster is not None and not again.cluster.dhcp
    assert not again.gateway and not dnsmasq.wanted(again)
    assert nft.ruleset(again, "virbr0") is None
    plain = parse_network_xml(BASE.format(extra=""))
    assert plain.cluster is None and plain.gateway
    plain.set_cluster(7, dhcp=True)
    assert plain.cluster is not None and plain.cluster.vni == 7


def test_stp_defaults_off_only_when_unsaid() -> None:
    defn = parse_network_xml(BASE.format(extra=""))
    defn.default_stp(False)
    assert not defn.stp
    said = parse_network_xml(BASE.format(extra="<bridge stp='on'/>"))
    said.default_stp(False)
    assert said.stp


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ("<vb:cluster/>", "vni=''"),
        ("<vb:cluster vni='0'/>", "expected 1..16777215"),
        ("<vb:cluster vni='16777216'/>", "expected 1..16777215"),
        ("<vb:cluster vni='5' dhcp='maybe'/>", "dhcp='maybe'"),
        ("<vb:cluster vni='5'/><vb:cluster vni='6'/>", "more than one"),
    ],
)
def test_bad_cluster_elements_are_xml_errors(extra: str, words: str) -> None:
    with pytest.raises(XMLError, match=words.replace(".", r"\.")):
        parse_network_xml(BASE.format(extra=extra))


def test_a_cluster_network_must_be_one_virtbus_bridges() -> None:
    xml = (f"<network xmlns:vb='{CLUSTER_NS}'><name>br</name><forward mode='bridge'/>"
           "<bridge name='br9'/><vb:cluster vni='3'/></network>")  # fmt: skip
    with pytest.raises(XMLError, match="must be a network whose bridge virtbus makes"):
        parse_network_xml(xml)
