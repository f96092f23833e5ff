"""A libvirt virtual network definition: the lxml tree (kept verbatim) and typed views.

Every forward mode of libvirt's ``network.rng`` parses; which ones this host can run is the
network backends' business (drivers/network, NO_SUPPORT with a reason). What a network
must mean is checked here, as libvirt's ``virNetworkDefParse`` does, so a definition that
cannot work is refused at define time with XML_ERROR naming the element: an address that
is no address, a netmask and a prefix at once, a DHCP range or a reserved host outside
its subnet, a bridge name the kernel cannot take (more than 15 bytes). What is generated
at define (the uuid, a bridge name, the bridge's MAC) is written back into the tree, so
net-dumpxml shows it as libvirt does.
"""

from __future__ import annotations

import copy as _copy
import ipaddress
import re
from dataclasses import dataclass

from lxml import etree

from virtbus.domain.bandwidth import Bandwidth, parse_bandwidth
from virtbus.domain.model import Element
from virtbus.domain.serialize import dumps
from virtbus.errors import InvalidArgument, XMLError
from virtbus.storage.names import check_name, definition_uuid

#: libvirt's forward modes; None (no <forward>) is an isolated network
FORWARD_MODES = ("nat", "route", "open", "bridge", "private", "vepa", "passthrough", "hostdev")
#: the modes whose bridge virtbus creates (and addresses, firewalls and serves DHCP on)
MANAGED_MODES = frozenset({None, "nat", "route", "open"})
IFNAMSIZ = 16  # the kernel's interface name buffer: 15 bytes and a NUL
_IFNAME_BAD = re.compile(r"[\s/:%]|^\.\.?$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")

#: virtbus's own elements inside a libvirt <network> (libvirt keeps foreign namespaces too)
CLUSTER_NS = "https://virtbus.dev/xmlns/network/cluster/1"
VNI_MAX = 2**24 - 1  # VXLAN network identifiers are 24 bits

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class DhcpRange:
    start: IPAddress
    end: IPAddress


@dataclass(frozen=True, slots=True)
class DhcpHost:
    """A reservation: ``mac`` (or ``name``) gets ``ip``."""

    mac: str | None
    name: str | None
    ip: IPAddress


@dataclass(frozen=True, slots=True)
class IpConfig:
    """One ``<ip>``: the bridge's address in its subnet, and DHCP on it."""

    address: IPAddress
    network: IPNetwork
    ranges: tuple[DhcpRange, ...]
    hosts: tuple[DhcpHost, ...]

    @property
    def family(self) -> str:
        return "ipv4" if self.address.version == 4 else "ipv6"

    @property
    def interface(self) -> str:
        """``address/prefix`` as the bridge carries it."""
        return f"{self.address}/{self.network.prefixlen}"


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """``<vb:cluster vni='N' dhcp='yes|no'/>``: a network spanning hosts over VXLAN ``vni``.

    ``dhcp`` is per host (the scheduler writes it): one host carries the gateway address,
    the firewall and dnsmasq; the others only bridge, so a guest keeps its lease anywhere.
    """

    vni: int
    dhcp: bool


@dataclass(frozen=True, slots=True)
class DnsHost:
    ip: IPAddress
    hostnames: tuple[str, ...]


def overlaps(a: IPNetwork, b: IPNetwork) -> bool:
    """Two subnets share an address (the check between networks, on a host and across
    a cluster network's hosts)."""
    return a.version == b.version and a.overlaps(b)


def check_ifname(name: str, what: str) -> str:
    """A Linux interface name: at most 15 bytes, no white space, '/' or ':'."""
    if not name:
        raise XMLError(f"{what} must not be empty")
    if len(name.encode()) >= IFNAMSIZ:
        raise XMLError(
            f"{what} '{name}' is {len(name.encode())} bytes long: interface names have at most"
            f" {IFNAMSIZ - 1}"
        )
    if _IFNAME_BAD.search(name) or any(ord(c) < 32 or ord(c) > 126 for c in name):
        raise XMLError(f"{what} {name!r} is not a valid interface name")
    return name


def check_mac(mac: str, what: str) -> str:
    if not _MAC.match(mac):
        raise XMLError(f"invalid MAC address '{mac}' in {what}")
    if int(mac[:2], 16) & 1:
        raise XMLError(f"MAC address '{mac}' in {what} is a multicast address")
    return mac.lower()


def _addr(raw: str | None, what: str) -> IPAddress:
    if raw is None:
        raise XMLError(f"missing {what}")
    try:
        return ipaddress.ip_address(raw.strip())
    except ValueError:
        raise XMLError(f"invalid address '{raw}' in {what}") from None


class NetworkDefinition:
    """One network's definition. Views are read-only; :meth:`to_xml` dumps the tree."""

    name: str
    uuid: str
    forward: str | None  # None: isolated
    forward_dev: str | None
    bridge: str | None
    stp: bool
    delay: int
    mac: str | None
    mtu: int | None
    domain: str | None
    ips: tuple[IpConfig, ...]
    dns_hosts: tuple[DnsHost, ...]
    bandwidth: Bandwidth | None
    cluster: ClusterConfig | None

    def __init__(self, root: Element) -> None:
        self._root = root
        self._load()

    @property
    def root(self) -> Element:
        return self._root

    @property
    def mode(self) -> str:
        """The forward mode as virsh names it ("isolated" when there is no <forward>)."""
        return self.forward or "isolated"

    @property
    def managed(self) -> bool:
        """virtbus creates this network's bridge (not an existing one, nor a device pool)."""
        return self.forward in MANAGED_MODES

    @property
    def dhcp(self) -> bool:
        return any(ip.ranges or ip.hosts for ip in self.ips)

    @property
    def gateway(self) -> bool:
        """This host carries the network's addresses, firewall and dnsmasq (every host
        but the non-DHCP hosts of a cluster network, which only bridge)."""
        return self.cluster is None or self.cluster.dhcp

    def default_stp(self, on: bool) -> None:
        """Set ``<bridge stp>`` unless the definition says it."""
        el = self._root.find("bridge")
        if el is None:
            el = etree.SubElement(self._root, "bridge")
        if el.get("stp") is None:
            el.set("stp", "on" if on else "off")
        self._load()

    def set_cluster(self, vni: int, *, dhcp: bool) -> None:
        """Write a cluster network's VNI and this host's DHCP role (the scheduler does)."""
        el = self._root.find(f"{{{CLUSTER_NS}}}cluster")
        if el is None:
            el = etree.SubElement(self._root, f"{{{CLUSTER_NS}}}cluster", nsmap={"vb": CLUSTER_NS})
        el.set("vni", str(vni))
        el.set("dhcp", "yes" if dhcp else "no")
        self._load()

    def to_xml(self) -> str:
        return dumps(self._root)

    def copy(self) -> NetworkDefinition:
        return NetworkDefinition(_copy.deepcopy(self._root))

    def fill(self, *, bridge: str | None, mac: str | None) -> None:
        """Write the generated bridge name and MAC back, as libvirt does at define."""
        if bridge is not None and self.bridge is None:
            el = self._root.find("bridge")
            if el is None:
                el = etree.SubElement(self._root, "bridge")
            el.set("name", bridge)
            el.set("stp", "on" if self.stp else "off")
            el.set("delay", str(self.delay))
        if mac is not None and self.mac is None:
            etree.SubElement(self._root, "mac", address=mac)
        self._load()

    def __repr__(self) -> str:
        return f"<NetworkDefinition {self.mode} {self.name!r} {self.uuid}>"

    # ------------------------------------------------------------------ parsing
    def _load(self) -> None:
        root = self._root
        if not isinstance(root.tag, str) or etree.QName(root).localname != "network":
            raise XMLError(f"root element must be <network>, not <{root.tag}>")
        if etree.QName(root).namespace is not None:
            raise XMLError("<network> must not be in a namespace")
        name_el = root.find("name")
        if name_el is None or not (name_el.text or "").strip():
            raise XMLError("missing <name> in network")
        try:
            self.name = check_name(name_el.text, "network")
        except InvalidArgument as exc:
            raise XMLError(exc.message) from None
        self.uuid = definition_uuid(root, "network")
        fwd = root.find("forward")
        self.forward, self.forward_dev = None, None
        if fwd is not None:
            mode = fwd.get("mode", "nat")  # libvirt: <forward/> without a mode is nat
            if mode not in FORWARD_MODES:
                raise XMLError(
                    f"unknown <forward mode='{mode}'> in network '{self.name}'"
                    f" (one of {', '.join(FORWARD_MODES)})"
                )
            self.forward = mode
            dev = fwd.get("dev")
            self.forward_dev = check_ifname(dev, "<forward dev>") if dev is not None else None
        br = root.find("bridge")
        self.bridge = None
        self.stp, self.delay = True, 0
        if br is not None:
            raw = br.get("name")
            self.bridge = check_ifname(raw, "<bridge name>") if raw is not None else None
            stp = br.get("stp", "on")
            if stp not in ("on", "off"):
                raise XMLError(f"invalid <bridge stp='{stp}'>: expected 'on' or 'off'")
            self.stp = stp == "on"
            delay = br.get("delay", "0")
            if not delay.isdigit() or int(delay) > 300:
                raise XMLError(f"invalid <bridge delay='{delay}'>: expected 0..300 seconds")
            self.delay = int(delay)
        if self.forward == "bridge" and self.bridge is None and self.forward_dev is None:
            raise XMLError(
                f"network '{self.name}' forwards to a bridge: <bridge name=...> is required"
            )
        mac = root.find("mac")
        self.mac = check_mac(mac.get("address", ""), "<mac>") if mac is not None else None
        mtu = root.find("mtu")
        self.mtu = None
        if mtu is not None:
            size = mtu.get("size", "")
            if not size.isdigit() or not 68 <= int(size) <= 65535:
                raise XMLError(f"invalid <mtu size='{size}'>: expected 68..65535")
            self.mtu = int(size)
        dom = root.find("domain")
        self.domain = dom.get("name") if dom is not None else None
        self.ips = tuple(self._parse_ip(el) for el in root.findall("ip"))
        if not self.managed and self.ips:
            raise XMLError(
                f"network '{self.name}' ({self.mode}) cannot have <ip> addresses:"
                " virtbus does not own its bridge"
            )
        v4 = [ip for ip in self.ips if ip.family == "ipv4" and (ip.ranges or ip.hosts)]
        if len(v4) > 1:
            raise XMLError(f"network '{self.name}': DHCP on more than one IPv4 <ip>")
        self.dns_hosts = self._parse_dns(root)
        self.bandwidth = parse_bandwidth(root.find("bandwidth"), f"network '{self.name}'")
        if self.bandwidth is not None and not self.managed:
            raise XMLError(f"network '{self.name}' ({self.mode}): <bandwidth> is for networks"
                           " whose bridge virtbus makes")  # fmt: skip
        self.cluster = self._parse_cluster(root)

    def _parse_cluster(self, root: Element) -> ClusterConfig | None:
        found = root.findall(f"{{{CLUSTER_NS}}}cluster")
        if not found:
            return None
        if len(found) > 1:
            raise XMLError(f"network '{self.name}' has more than one <vb:cluster>")
        el = found[0]
        if not self.managed:
            raise XMLError(f"cluster network '{self.name}' ({self.mode}) must be a network whose"
                           " bridge virtbus makes (isolated, nat, route or open)")  # fmt: skip
        raw = el.get("vni", "")
        if not raw.isdigit() or not 1 <= int(raw) <= VNI_MAX:
            raise XMLError(f"invalid <vb:cluster vni='{raw}'> in network '{self.name}':"
                           f" expected 1..{VNI_MAX}")  # fmt: skip
        dhcp = el.get("dhcp", "yes")
        if dhcp not in ("yes", "no"):
            raise XMLError(f"invalid <vb:cluster dhcp='{dhcp}'>: expected 'yes' or 'no'")
        return ClusterConfig(int(raw), dhcp == "yes")

    def _parse_ip(self, el: Element) -> IpConfig:
        where = f"<ip> of network '{self.name}'"
        address = _addr(el.get("address"), f"<ip address> of network '{self.name}'")
        family = el.get("family", "ipv6" if address.version == 6 else "ipv4")
        if family not in ("ipv4", "ipv6") or (family == "ipv4") != (address.version == 4):
            raise XMLError(f"<ip family='{family}'> does not match address {address}")
        netmask, prefix = el.get("netmask"), el.get("prefix")
        if netmask is not None and prefix is not None:
            raise XMLError(f"{where} has both a netmask and a prefix")
        try:
            if netmask is not None:
                if address.version != 4:
                    raise XMLError(f"{where}: a netmask is for IPv4 only (use prefix)")
                net = ipaddress.ip_network(f"{address}/{netmask}", strict=False)
            elif prefix is not None:
                if not prefix.isdigit():
                    raise ValueError(prefix)
                net = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
            else:
                # libvirt: IPv4 gets its classful mask, IPv6 needs a prefix
                if address.version == 6:
                    raise XMLError(f"{where}: an IPv6 address needs a prefix")
                first = int(str(address).split(".")[0])
                bits = 8 if first < 128 else 16 if first < 192 else 24
                net = ipaddress.ip_network(f"{address}/{bits}", strict=False)
        except ValueError:
            raise XMLError(f"invalid netmask or prefix in {where}") from None
        if address in (net.network_address, net.broadcast_address) and (
            net.prefixlen < net.max_prefixlen - 1
        ):
            raise XMLError(f"{where}: {address} is the subnet's network or broadcast address")
        ranges: list[DhcpRange] = []
        hosts: list[DhcpHost] = []
        dhcp = el.find("dhcp")
        if dhcp is not None:
            for rng in dhcp.findall("range"):
                start = _addr(rng.get("start"), f"<range start> in {where}")
                end = _addr(rng.get("end"), f"<range end> in {where}")
                for bound in (start, end):
                    if bound.version != address.version or bound not in net:
                        raise XMLError(
                            f"DHCP range {start} - {end} of network '{self.name}' is outside"
                            f" its subnet {net}"
                        )
                if int(end) < int(start):
                    raise XMLError(f"DHCP range {start} - {end} ends before it starts")
                if address.version == 6:
                    raise XMLError(f"{where}: DHCPv6 ranges are not supported by virtbus yet")
                ranges.append(DhcpRange(start, end))
            for host in dhcp.findall("host"):
                mac = host.get("mac")
                hname = host.get("name")
                ip = _addr(host.get("ip"), f"<host ip> in {where}")
                if mac is None and hname is None:
                    raise XMLError(f"<host ip='{ip}'> in {where} needs a mac or a name")
                if ip not in net:
                    raise XMLError(
                        f"DHCP host {ip} of network '{self.name}' is outside its subnet {net}"
                    )
                hosts.append(
                    DhcpHost(check_mac(mac, f"<host> in {where}") if mac else None, hname, ip)
                )
        return IpConfig(address, net, tuple(ranges), tuple(hosts))

    def _parse_dns(self, root: Element) -> tuple[DnsHost, ...]:
        out: list[DnsHost] = []
        for host in root.findall("dns/host"):
            ip = _addr(host.get("ip"), f"<dns><host ip> of network '{self.name}'")
            names = tuple((h.text or "").strip() for h in host.findall("hostname"))
            if not names or not all(names):
                raise XMLError(f"<dns><host ip='{ip}'> of network '{self.name}' needs a hostname")
            for n in names:
                if not re.fullmatch(r"[A-Za-z0-9_.-]{1,253}", n):
                    raise XMLError(f"invalid DNS hostname {n!r} in network '{self.name}'")
            out.append(DnsHost(ip, names))
        return tuple(out)
