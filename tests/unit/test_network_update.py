"""net-update on the XML side (virtbus/network/update.py): where entries go, what
matches, and each refusal's code; the agent's live side is tests/network/test_net_update.py."""

from __future__ import annotations

import pytest

from virtbus.errors import InvalidArgument, NoSupport, OperationInvalid, XMLError
from virtbus.network import parse_network_xml
from virtbus.network.update import Update, apply_update

NET = parse_network_xml(
    "<network><name>n</name><ip address='10.1.0.1' netmask='255.255.255.0'><dhcp>"
    "<range start='10.1.0.100' end='10.1.0.150'/>"
    "<host mac='52:54:00:00:00:01' name='a' ip='10.1.0.11'/></dhcp></ip>"
    "<ip address='10.2.0.1' prefix='24'/></network>"
)


def hosts(defn: object, index: int = 0) -> list[str]:
    return [h.name or "" for h in parse_network_xml(defn.to_xml()).ips[index].hosts]  # type: ignore[attr-defined]


def test_add_first_last_delete_modify_and_the_parent_by_subnet() -> None:
    b = "<host mac='52:54:00:00:00:02' name='b' ip='10.1.0.12'/>"
    assert hosts(apply_update(NET, Update("add-first", "ip-dhcp-host", b))) == ["b", "a"]
    assert hosts(apply_update(NET, Update("add", "ip-dhcp-host", b))) == ["a", "b"]
    with pytest.raises(XMLError, match="more than one IPv4"):  # the 10.2.0.0/24 <ip>
        apply_update(NET, Update("add", "ip-dhcp-host", b.replace("10.1.0.12", "10.2.0.12")))
    assert hosts(apply_update(NET, Update("delete", "ip-dhcp-host", "<host name='a'/>"))) == []
    moved = apply_update(
        NET,
        Update(
            "modify", "ip-dhcp-host", "<host mac='52:54:00:00:00:01' name='a2' ip='10.1.0.13'/>"
        ),
    )
    assert [(h.name, str(h.ip)) for h in moved.ips[0].hosts] == [("a2", "10.1.0.13")]
    assert NET.ips[0].hosts[0].name == "a"  # the original is not changed
    ranged = apply_update(
        NET, Update("add-first", "ip-dhcp-range", "<range start='10.1.0.200' end='10.1.0.201'/>")
    )
    assert [str(r.start) for r in ranged.ips[0].ranges] == ["10.1.0.200", "10.1.0.100"]
    dns = apply_update(
        NET, Update("add", "dns-host", "<host ip='10.1.0.5'><hostname>x</hostname></host>")
    )
    assert dns.dns_hosts[0].hostnames == ("x",)
    assert apply_update(dns, Update("delete", "dns-host", "<host ip='10.1.0.5'/>")).dns_hosts == ()


@pytest.mark.parametrize(
    ("error", "command", "section", "xml"),
    [
        (OperationInvalid, "add", "ip-dhcp-host", "<host mac='52:54:00:00:00:01' ip='10.1.0.20'/>"),
        (OperationInvalid, "delete", "ip-dhcp-host", "<host name='zz'/>"),
        (OperationInvalid, "add", "ip-dhcp-range", "<range start='10.1.0.100' end='10.1.0.150'/>"),
        (OperationInvalid, "add", "ip-dhcp-host", "<host name='c' ip='10.9.0.1'/>"),
        (NoSupport, "add", "portgroup", "<portgroup/>"),
        (NoSupport, "add", "nonsense", "<x/>"),
        (NoSupport, "modify", "dns-host", "<host ip='10.1.0.5'/>"),
        (InvalidArgument, "replace", "ip-dhcp-host", "<host/>"),
        (XMLError, "add", "dns-host", "<range/>"),
        (XMLError, "add", "ip-dhcp-range", "<range start='10.1.0.160' end='10.1.0.155'/>"),
    ],
)
def test_refusals(error: type[Exception], command: str, section: str, xml: str) -> None:
    with pytest.raises(error):
        apply_update(NET, Update(command, section, xml))


def test_parent_index() -> None:
    b = "<host mac='52:54:00:00:00:02' name='b' ip='10.1.0.12'/>"
    with pytest.raises(OperationInvalid, match="index 2"):
        apply_update(NET, Update("add", "ip-dhcp-host", b, parent_index=2))
    with pytest.raises(XMLError, match="outside its subnet"):
        apply_update(NET, Update("add", "ip-dhcp-host", b, parent_index=1))
