"""libvirt <network> XML: every forward mode parses and dumps XML that libvirt's own schema
(network.rng, through virt-xml-validate) accepts; what cannot mean anything is XML_ERROR
naming the element; the nftables ruleset and dnsmasq config follow the definition."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from drivers.network import dnsmasq, nft
from drivers.network.dnsmasq import DnsmasqFiles
from virtbus.errors import XMLError
from virtbus.network import FORWARD_MODES, parse_leases, parse_network_xml

FULL = """<network>
  <name>default</name>
  <forward mode='nat'/>
  <bridge name='virbr0' stp='on' delay='0'/>
  <domain name='example.test'/>
  <dns><host ip='192.168.122.9'><hostname>fixed</hostname><hostname>f2</hostname></host></dns>
  <ip address='192.168.122.1' netmask='255.255.255.0'>
    <dhcp>
      <range start='192.168.122.2' end='192.168.122.254'/>
      <host mac='52:54:00:AA:00:01' name='fixed' ip='192.168.122.9'/>
    </dhcp>
  </ip>
  <ip family='ipv6' address='fd00:1::1' prefix='64'/>
</network>"""


def validate(tmp_path: Path, xml: str) -> None:
    tool = shutil.which("virt-xml-validate")
    assert tool, "virt-xml-validate is missing: run deploy/setup-dev (libvirt-clients)"
    path = tmp_path / "network.xml"
    path.write_text(xml)
    done = subprocess.run([tool, str(path), "network"], capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert done.returncode == 0, f"{done.stderr}\n{xml}"


@pytest.mark.parametrize("mode", [None, *FORWARD_MODES])
def test_every_forward_mode_parses_and_dumps_valid_xml(tmp_path: Path, mode: str | None) -> None:
    fwd = "" if mode is None else f"<forward mode='{mode}'" + (
        " dev='eth0'/>" if mode in ("private", "vepa", "passthrough") else "/>")  # fmt: skip
    br = "<bridge name='br0'/>" if mode == "bridge" else ""
    ip = "<ip address='10.0.0.1' prefix='24'/>" if mode in (None, "nat", "route", "open") else ""
    defn = parse_network_xml(f"<network><name>n</name>{fwd}{br}{ip}</network>")
    assert defn.mode == (mode or "isolated")
    if defn.managed:
        defn.fill(bridge="virbr9", mac="52:54:00:01:02:03")
        assert defn.bridge == "virbr9" and defn.mac == "52:54:00:01:02:03"
    again = parse_network_xml(defn.to_xml())
    assert (again.uuid, again.bridge, again.mode) == (defn.uuid, defn.bridge, defn.mode)
    validate(tmp_path, defn.to_xml())


def test_full_definition_views(tmp_path: Path) -> None:
    defn = parse_network_xml(FULL)
    (v4, v6) = defn.ips
    assert str(v4.network) == "192.168.122.0/24" and v4.interface == "192.168.122.1/24"
    assert str(v6.network) == "fd00:1::/64" and v6.family == "ipv6"
    assert v4.hosts[0].mac == "52:54:00:aa:00:01"  # normalised
    assert defn.dns_hosts[0].hostnames == ("fixed", "f2") and defn.domain == "example.test"
    validate(tmp_path, defn.to_xml())
    # <ip> without netmask or prefix: libvirt's classful default
    assert (
        parse_network_xml("<network><name>c</name><ip address='172.16.0.1'/></network>")
        .ips[0]
        .network.prefixlen
        == 16
    )


@pytest.mark.parametrize(
    ("xml", "words"),
    [
        ("<net/>", "root element"),
        ("<network><forward mode='nat'/></network>", "missing <name>"),
        ("<network><name>a/b</name></network>", "'/'"),
        ("<network><name>n</name><uuid>nope</uuid></network>", "invalid <uuid>"),
        ("<network><name>n</name><forward mode='x'/></network>", "unknown <forward mode='x'>"),
        ("<network><name>n</name><bridge name='abcdefghijklmnop'/></network>", "at most 15"),
        ("<network><name>n</name><bridge name='a b'/></network>", "not a valid interface"),
        ("<network><name>n</name><bridge name='b' stp='maybe'/></network>", "stp"),
        ("<network><name>n</name><forward mode='bridge'/></network>", "<bridge name=...>"),
        ("<network><name>n</name><mac address='01:00:5e:00:00:01'/></network>", "multicast"),
        ("<network><name>n</name><mtu size='9'/></network>", "mtu"),
        ("<network><name>n</name><ip address='10.0.0.300' prefix='24'/></network>",
         "invalid address"),
        ("<network><name>n</name><ip address='10.0.0.1' prefix='24' netmask='255.0.0.0'/>"
         "</network>", "both a netmask and a prefix"),
        ("<network><name>n</name><ip address='10.0.0.1' prefix='33'/></network>", "prefix"),
        ("<network><name>n</name><ip address='10.0.0.0' prefix='24'/></network>",
         "network or broadcast"),
        ("<network><name>n</name><ip address='10.0.0.1' prefix='24'><dhcp>"
         "<range start='10.0.1.2' end='10.0.1.9'/></dhcp></ip></network>",
         "outside its subnet 10.0.0.0/24"),
        ("<network><name>n</name><ip address='10.0.0.1' prefix='24'><dhcp>"
         "<range start='10.0.0.9' end='10.0.0.2'/></dhcp></ip></network>", "ends before"),
        ("<network><name>n</name><ip address='10.0.0.1' prefix='24'><dhcp>"
         "<host mac='52:54:00:00:00:01' ip='10.9.0.2'/></dhcp></ip></network>",
         "outside its subnet"),
        ("<network><name>n</name><ip address='10.0.0.1' prefix='24'><dhcp>"
         "<host mac='zz' ip='10.0.0.2'/></dhcp></ip></network>", "invalid MAC"),
        ("<network><name>n</name><forward mode='bridge'/><bridge name='br0'/>"
         "<ip address='10.0.0.1' prefix='24'/></network>", "cannot have <ip>"),
        ("<network><name>n</name><dns><host ip='10.0.0.2'/></dns></network>", "hostname"),
    ],
)  # fmt: skip
def test_bad_definitions_are_xml_errors(xml: str, words: str) -> None:
    with pytest.raises(XMLError) as err:
        parse_network_xml(xml)
    assert words in err.value.message


def test_firewall_and_dnsmasq_follow_the_definition(tmp_path: Path) -> None:
    defn = parse_network_xml(FULL)
    rules = nft.ruleset(defn, "virbr0")
    assert rules is not None
    assert "ip saddr 192.168.122.0/24 ip daddr != 192.168.122.0/24 masquerade" in rules
    assert 'iifname "virbr0" reject' in rules and "fd00:1::/64" in rules
    assert "masquerade" not in rules.split("fd00:1::/64")[1]  # no NAT for IPv6
    isolated = parse_network_xml("<network><name>i</name><ip address='10.0.0.1' prefix='24'/>"
                                 "</network>")  # fmt: skip
    text = nft.ruleset(isolated, "virbr1")
    assert text is not None and "accept" in text and "saddr" not in text
    assert "postrouting" not in text
    opened = parse_network_xml("<network><name>o</name><forward mode='open'/></network>")
    assert nft.ruleset(opened, "virbr2") is None
    files = DnsmasqFiles(tmp_path)
    conf = dnsmasq.config(defn, "virbr0", files)
    assert "interface=virbr0" in conf and "except-interface=lo" in conf
    assert "dhcp-range=192.168.122.2,192.168.122.254,255.255.255.0" in conf
    assert f"dhcp-leasefile={files.leases}" in conf and "local=/example.test/" in conf
    assert dnsmasq.hosts_file(defn) == "52:54:00:aa:00:01,192.168.122.9,fixed\n"
    assert dnsmasq.addn_hosts_file(defn) == "192.168.122.9 fixed f2\n"


def test_lease_file_lines() -> None:
    text = ("1700000000 52:54:00:aa:00:01 192.168.122.9 fixed 01:52:54:00:aa:00:01\n"
            "0 52:54:00:AA:00:02 192.168.122.10 * *\n"
            "garbage\nduid 00:01\n")  # fmt: skip
    (a, b) = parse_leases(text, 24)
    assert (a.hostname, a.client_id, a.prefix) == ("fixed", "01:52:54:00:aa:00:01", 24)
    assert (b.mac, b.hostname, b.expiry, b.family) == ("52:54:00:aa:00:02", None, 0, "ipv4")


def test_bandwidth_in_libvirt_units() -> None:
    from virtbus.domain.bandwidth import Rate

    defn = parse_network_xml(
        "<network><name>b</name><bandwidth><inbound average='1000' peak='2000' burst='64'/>"
        "<outbound average='500'/></bandwidth></network>"
    )
    assert defn.bandwidth is not None
    assert defn.bandwidth.inbound == Rate(1000, 2000, 64)
    assert defn.bandwidth.outbound == Rate(500)
    for bad, words in (
        ("<inbound peak='10'/>", "missing mandatory average"),
        ("<inbound average='0'/>", "positive integer"),
        ("<inbound average='100' peak='50'/>", "below its average"),
        ("<outbound average='1' floor='1'/>", "floor"),
        ("<inbound average='1'/><inbound average='2'/>", "only one <inbound>"),
    ):
        with pytest.raises(XMLError, match=words):
            parse_network_xml(f"<network><name>b</name><bandwidth>{bad}</bandwidth></network>")
    with pytest.raises(XMLError, match="bandwidth"):
        parse_network_xml(
            "<network><name>b</name><forward mode='bridge'/><bridge name='br0'/>"
            "<bandwidth><inbound average='1'/></bandwidth></network>"
        )
