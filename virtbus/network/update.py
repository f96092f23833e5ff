"""net-update on the XML side: libvirt's ``virNetworkDefUpdateSection`` for the sections
virtbus changes (``ip-dhcp-host``, ``ip-dhcp-range``, ``dns-host``), as a pure function of
a definition: the new definition, re-validated whole, or an error with libvirt's code.

- commands: ``add`` (= ``add-last``), ``add-first``, ``add-last``, ``delete``, ``modify``
  (``modify`` only for ``ip-dhcp-host``, as in libvirt: ranges and DNS hosts are added or
  deleted, NO_SUPPORT otherwise);
- the other sections libvirt knows (``bridge``, ``forward``, ``portgroup``, ...) and any
  unknown one are NO_SUPPORT; an unknown command is INVALID_ARG;
- the element must be the section's (``<host>``, ``<range>``): XML_ERROR otherwise;
- ``add`` of an entry that matches an existing one (a DHCP host with the same MAC, name or
  IP; the same range; a DNS host with the same IP or a hostname in common) is
  OPERATION_INVALID, so is ``delete``/``modify`` of one that is not there, and a
  ``parent_index`` that names no ``<ip>``.

Without ``parent_index`` a DHCP entry goes to the ``<ip>`` whose subnet holds its address.
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass

from lxml import etree

from virtbus.domain.model import Element
from virtbus.domain.xml import parse_untrusted_root
from virtbus.errors import InvalidArgument, NoSupport, OperationInvalid, XMLError
from virtbus.network.definition import NetworkDefinition, check_mac

COMMANDS = ("add", "add-first", "add-last", "delete", "modify")
SECTIONS = ("ip-dhcp-host", "ip-dhcp-range", "dns-host")
#: libvirt's other sections: known names, not changed by virtbus (NO_SUPPORT)
OTHER_SECTIONS = ("bridge", "domain", "ip", "forward", "forward-interface", "forward-pf",
                  "portgroup", "dns-txt", "dns-srv")  # fmt: skip
_TAG = {"ip-dhcp-host": "host", "ip-dhcp-range": "range", "dns-host": "host"}


@dataclass(frozen=True, slots=True)
class Update:
    command: str
    section: str
    xml: str
    parent_index: int | None = None


def check_update(update: Update) -> None:
    """The command and section are ones virtbus updates (before anything is parsed)."""
    if update.section not in SECTIONS:
        if update.section in OTHER_SECTIONS:
            raise NoSupport(f"can't update '{update.section}' section of network: virtbus"
                            f" updates {', '.join(SECTIONS)}")  # fmt: skip
        raise NoSupport(f"can't update unrecognized section '{update.section}' of network"
                        f" (one of {', '.join(SECTIONS)})")  # fmt: skip
    if update.command not in COMMANDS:
        raise InvalidArgument(f"unrecognized network update command '{update.command}'"
                              f" (one of {', '.join(COMMANDS)})")  # fmt: skip
    if update.command == "modify" and update.section != "ip-dhcp-host":
        what = "dhcp ranges" if update.section == "ip-dhcp-range" else "DNS host records"
        raise NoSupport(f"{what} cannot be modified, only added or deleted")


def apply_update(defn: NetworkDefinition, update: Update) -> NetworkDefinition:
    """``defn`` with ``update`` applied, as a new definition (``defn`` is not changed)."""
    check_update(update)
    el = parse_untrusted_root(update.xml, "network update")
    tag = _TAG[update.section]
    if not isinstance(el.tag, str) or el.tag != tag:
        raise XMLError(f"unexpected element <{el.tag}>, expecting <{tag}>, while updating"
                       f" network '{defn.name}'")  # fmt: skip
    root = copy.deepcopy(defn.root)
    if update.section == "dns-host":
        _dns_host(root, el, update.command, defn.name)
    else:
        ip = _parent_ip(root, el, update, defn.name)
        if update.section == "ip-dhcp-host":
            _dhcp_host(ip, el, update.command, defn.name)
        else:
            _dhcp_range(ip, el, update.command, defn.name)
    return NetworkDefinition(root)  # the whole definition is checked again


# --------------------------------------------------------------------- where it goes
def _address(el: Element, attr: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = el.get(attr)
    if raw is None:
        raise XMLError(f"missing {attr} in {what}")
    try:
        return ipaddress.ip_address(raw.strip())
    except ValueError:
        raise XMLError(f"invalid address '{raw}' in {what}") from None


def _parent_ip(root: Element, el: Element, update: Update, name: str) -> Element:
    ips = root.findall("ip")
    if update.parent_index is not None:
        if update.parent_index >= len(ips):
            raise OperationInvalid(f"couldn't update dhcp {_TAG[update.section]} entry - no"
                                   f" <ip> element found at index {update.parent_index} in"
                                   f" network '{name}'")  # fmt: skip
        return ips[update.parent_index]
    attr = "ip" if update.section == "ip-dhcp-host" else "start"
    if el.get(attr) is None and update.command == "delete":
        attr = ""  # a host deleted by its MAC or name: the IPv4 <ip> with DHCP
    if attr:
        addr = _address(el, attr, f"<{el.tag}>")
        for ip in ips:
            try:
                subnet = _subnet(ip)
            except ValueError:
                continue
            if addr.version == subnet.version and addr in subnet:
                return ip
        raise OperationInvalid(f"couldn't match {addr} to any <ip> subnet of network '{name}'"
                               " (use --parent-index)")  # fmt: skip
    for ip in ips:
        if ip.find("dhcp") is not None:
            return ip
    raise OperationInvalid(f"network '{name}' has no <ip> with <dhcp>")


def _subnet(ip: Element) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    address = ip.get("address", "")
    mask = ip.get("netmask") or ip.get("prefix")
    if mask is None:  # classful, as the definition does
        first = int(address.split(".")[0]) if "." in address else 0
        mask = "8" if first < 128 else "16" if first < 192 else "24"
    return ipaddress.ip_network(f"{address}/{mask}", strict=False)


def _place(parent: Element, el: Element, tag: str, first: bool, before: tuple[str, ...]) -> None:
    """Insert ``el`` first or last among ``parent``'s ``tag`` children; with none yet,
    before the first child named in ``before`` (the schema's order), else at the end."""
    same = parent.findall(tag)
    if same:
        anchor = same[0] if first else same[-1]
        index = list(parent).index(anchor)
        parent.insert(index if first else index + 1, el)
        return
    for i, child in enumerate(parent):
        if child.tag in before:
            parent.insert(i, el)
            return
    parent.append(el)


def _clean(el: Element) -> Element:
    out = copy.deepcopy(el)
    out.tail = None
    return out


# --------------------------------------------------------------------- the sections
def _host_fields(el: Element, name: str) -> tuple[str | None, str | None, str | None]:
    mac = el.get("mac")
    where = f"<host> of network '{name}'"
    return (check_mac(mac, where) if mac else None, el.get("name"),
            str(_address(el, "ip", where)) if el.get("ip") else None)  # fmt: skip


def _describe(el: Element) -> str:
    attrs = " ".join(f"{k}='{v}'" for k, v in el.attrib.items())
    return f"<{el.tag} {attrs}/>"


def _dhcp_host(ip: Element, el: Element, command: str, name: str) -> None:
    mac, hname, addr = _host_fields(el, name)
    if mac is None and hname is None:
        raise XMLError(f"<host> in an update of network '{name}' needs a mac or a name")
    dhcp = ip.find("dhcp")
    hosts = dhcp.findall("host") if dhcp is not None else []
    fields = [(h, _host_fields(h, name)) for h in hosts]
    if command.startswith("add"):
        for _, (m, n, a) in fields:
            if (mac and m == mac) or (hname and n == hname) or (addr and a == addr):
                raise OperationInvalid(f"there is an existing dhcp host entry in network"
                                       f" '{name}' that matches \"{_describe(el)}\"")  # fmt: skip
        if addr is None:
            raise XMLError(f"missing ip in <host> added to network '{name}'")
        if dhcp is None:
            dhcp = etree.SubElement(ip, "dhcp")
        _place(dhcp, _clean(el), "host", command == "add-first", ("bootp",))
        return
    if command == "modify":  # the entry with this MAC (or, without one, this name)
        match = [h for h, (m, n, _) in fields if (m == mac if mac else n == hname)]
    else:  # delete: every attribute given must match
        match = [h for h, (m, n, a) in fields
                 if (mac is None or m == mac) and (hname is None or n == hname)
                 and (addr is None or a == addr)]  # fmt: skip
    if not match:
        raise OperationInvalid(f"couldn't locate a matching dhcp host entry in network"
                               f" '{name}' for \"{_describe(el)}\"")  # fmt: skip
    assert dhcp is not None
    if command == "modify":
        if addr is None:
            raise XMLError(f"missing ip in <host> of a modify of network '{name}'")
        match[0].addprevious(_clean(el))
    dhcp.remove(match[0])


def _dhcp_range(ip: Element, el: Element, command: str, name: str) -> None:
    where = f"<range> of network '{name}'"
    start, end = str(_address(el, "start", where)), str(_address(el, "end", where))
    dhcp = ip.find("dhcp")
    ranges = dhcp.findall("range") if dhcp is not None else []
    same = [r for r in ranges
            if (r.get("start", "").strip(), r.get("end", "").strip()) == (start, end)]  # fmt: skip
    if command.startswith("add"):
        if same:
            raise OperationInvalid(f"there is an existing dhcp range entry in network"
                                   f" '{name}' that matches \"{_describe(el)}\"")  # fmt: skip
        if dhcp is None:
            dhcp = etree.SubElement(ip, "dhcp")
        _place(dhcp, _clean(el), "range", command == "add-first", ("host", "bootp"))
        return
    if not same:
        raise OperationInvalid(f"couldn't locate a matching dhcp range entry in network"
                               f" '{name}' for \"{_describe(el)}\"")  # fmt: skip
    assert dhcp is not None
    dhcp.remove(same[0])


def _dns_fields(el: Element, name: str) -> tuple[str | None, set[str]]:
    addr = str(_address(el, "ip", f"<dns><host> of network '{name}'")) if el.get("ip") else None
    return addr, {(h.text or "").strip() for h in el.findall("hostname")}


def _dns_host(root: Element, el: Element, command: str, name: str) -> None:
    addr, names = _dns_fields(el, name)
    dns = root.find("dns")
    hosts = dns.findall("host") if dns is not None else []
    if command.startswith("add"):
        if addr is None or not names:
            raise XMLError(f"a <dns><host> added to network '{name}' needs an ip and a"
                           " hostname")  # fmt: skip
        for h in hosts:
            a, n = _dns_fields(h, name)
            if a == addr or names & n:
                raise OperationInvalid(f"there is already at least one DNS HOST record with"
                                       f" a matching field in network '{name}'")  # fmt: skip
        if dns is None:
            dns = etree.SubElement(root, "dns")
        _place(dns, _clean(el), "host", command == "add-first", ())
        return
    match = []
    for h in hosts:
        a, n = _dns_fields(h, name)
        if (addr is None or a == addr) and (not names or names <= n):
            match.append(h)
    if not match or (addr is None and not names):
        raise OperationInvalid(f"couldn't locate a matching DNS HOST record in network"
                               f" '{name}'")  # fmt: skip
    if len(match) > 1:
        raise OperationInvalid(f"multiple matching DNS HOST records were found in network"
                               f" '{name}'")  # fmt: skip
    assert dns is not None
    dns.remove(match[0])
