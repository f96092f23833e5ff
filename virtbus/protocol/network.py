"""The ``network.*`` ops an agent serves (libvirt's virNetwork API) and the network
lifecycle event.

A ``network`` argument is a network's name or UUID, on the host the call is routed to.
"""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta
from msgspec import field as default

from virtbus.protocol.base import Accepted, HostName, Message, Name, NonNegInt, XmlText
from virtbus.protocol.registry import Access, Service, Target, field, op


class NetworkXmlRequest(Message):
    xml: XmlText


class NetworkTarget(Message):
    network: Name


class NetworkDestroy(NetworkTarget):
    """net-destroy; ``force`` also when interfaces are still on its bridge."""

    force: bool = False


class NetworkAutostart(NetworkTarget):
    autostart: bool = True


class NetworkListRequest(Message):
    all: bool = True  # inactive networks too (virsh net-list --all)


class NetworkLeasesRequest(NetworkTarget):
    mac: str | None = None  # net-dhcp-leases --mac


class NetworkUpdateRequest(NetworkTarget):
    """net-update: ``command`` add, add-first, add-last, delete or modify; ``section``
    ip-dhcp-host, ip-dhcp-range or dns-host; ``xml`` the section's element. Neither
    ``live`` nor ``config``: the live state when active, else the persistent config."""

    command: Name
    section: Name
    xml: XmlText
    parent_index: NonNegInt | None = None  # which <ip> (default: the one whose subnet fits)
    live: bool = False
    config: bool = False


class NetworkUpdated(Message):
    """What net-update changed, and how the running dnsmasq took it (``sighup``: it
    re-read its hosts files; ``restart``: it was started again; None: not touched)."""

    live: bool
    config: bool
    dhcp: str | None = None


class NetworkRef(Message):
    name: str
    uuid: str


class NetworkInfo(Message):
    """virsh net-info, plus the forward mode and what is on the bridge."""

    name: str
    uuid: str
    active: bool
    persistent: bool
    autostart: bool
    bridge: str | None = None
    forward: str = "isolated"  # nat, route, open, bridge, ... (isolated: no <forward>)
    ports: list[str] = default(default_factory=list)  # interfaces on the bridge
    supported: bool = True  # False: this host cannot run the forward mode (NO_SUPPORT)
    owner: str | None = None  # the bus user that defined it (None: nobody's)


class NetworkList(Message):
    networks: list[NetworkInfo]


class NetworkXml(Message):
    xml: str


class DhcpLease(Message):
    """One line of virsh net-dhcp-leases."""

    expiry: NonNegInt  # epoch seconds (0: never)
    mac: str
    type: str  # ipv4
    ip: str
    prefix: NonNegInt
    hostname: str | None = None
    client_id: str | None = None


class DhcpLeases(Message):
    leases: list[DhcpLease]


class NetworkPortTarget(NetworkTarget):
    """net-port-dumpxml, net-port-delete: ``port`` is the port's uuid."""

    port: Name


class NetworkPortCreate(NetworkTarget):
    """net-port-create: ``xml`` a ``<networkport>`` (owner, mac; uuid, group, bandwidth)."""

    xml: XmlText


class NetworkPort(Message):
    """One port of a network (net-port-list): a running guest's NIC plugged into it,
    or one net-port-create made.
    ``plug`` is how: ``network`` (the network's bridge), ``bridge`` (a host bridge) or
    ``direct`` (a macvtap on ``dev``)."""

    uuid: str
    domain: str
    domain_uuid: str
    mac: str
    plug: str
    bridge: str | None = None
    dev: str | None = None
    group: str | None = None


class NetworkPortList(Message):
    ports: list[NetworkPort]


class NetworkSummary(Message):
    """One network in a heartbeat."""

    name: str
    uuid: str = ""
    active: bool = False
    bridge: str | None = None
    forward: str = "isolated"
    subnets: list[str] = default(default_factory=list)  # its <ip>s' subnets
    vni: NonNegInt | None = None  # a cluster network's VXLAN identifier
    peers: list[str] = default(default_factory=list)  # its VXLAN peers, as programmed


class NetworkPeers(NetworkTarget):
    """A cluster network's VXLAN peers: the other hosts' underlay addresses (the
    scheduler sends them as hosts come and go)."""

    peers: list[Annotated[str, Meta(min_length=1, max_length=64)]] = default(default_factory=list)


class NetworkPeerList(Message):
    peers: list[str]


class NetworkEvent(Message):
    """A network lifecycle event (libvirt's defined, undefined, started, stopped), and
    virtbus's ``dhcp-restarted`` when a dnsmasq that died was started again."""

    host: HostName
    seq: NonNegInt
    network: str
    uuid: str
    event: str
    detail: str | None = None
    data: dict[str, Any] = default(default_factory=dict)
    reconciled: bool = False
    ts: float | None = None


_A, _N = Service.AGENT, Target.NETWORK
_net = field("network")

NETWORK_DEFINE = op(
    "network.define", NetworkXmlRequest, NetworkRef, _A, "define a virtual network from XML",
    access=Access.CONFIG, target=_N,
)  # fmt: skip
NETWORK_CREATE = op(
    "network.create", NetworkXmlRequest, NetworkRef, _A, "create and start a transient network",
    access=Access.CONFIG, target=_N,
)  # fmt: skip
NETWORK_START = op(
    "network.start", NetworkTarget, NetworkInfo, _A, "start a network (bridge, firewall, DHCP)",
    access=Access.LIFECYCLE, target=_N, target_of=_net, serial=True,
)  # fmt: skip
NETWORK_DESTROY = op(
    "network.destroy", NetworkDestroy, Accepted, _A,
    "stop a network (refused while interfaces use it, unless forced)",
    access=Access.LIFECYCLE, target=_N, target_of=_net, serial=True,
)  # fmt: skip
NETWORK_UNDEFINE = op(
    "network.undefine", NetworkTarget, Accepted, _A, "remove a network's definition",
    access=Access.CONFIG, target=_N, target_of=_net, serial=True,
)  # fmt: skip
NETWORK_AUTOSTART = op(
    "network.set_autostart", NetworkAutostart, NetworkInfo, _A,
    "start the network with the agent", access=Access.CONFIG, target=_N, target_of=_net,
    serial=True,
)  # fmt: skip
NETWORK_LIST = op(
    "network.list", NetworkListRequest, NetworkList, _A, "the host's virtual networks",
    access=Access.READ, target=Target.HOST,
)  # fmt: skip
NETWORK_SET_PEERS = op(
    "network.set_peers", NetworkPeers, NetworkPeerList, _A,
    "set a running cluster network's VXLAN peers (the scheduler's head-end replication list)",
    access=Access.CONFIG, target=_N, target_of=_net, serial=True,
)  # fmt: skip
NETWORK_UPDATE = op(
    "network.update", NetworkUpdateRequest, NetworkUpdated, _A,
    "change a section of a network, live and/or persistent (net-update)",
    access=Access.CONFIG, target=_N, target_of=_net, serial=True,
)  # fmt: skip
NETWORK_INFO = op(
    "network.info", NetworkTarget, NetworkInfo, _A, "a network's state (net-info)",
    access=Access.READ, target=_N, target_of=_net,
)  # fmt: skip
NETWORK_XML = op(
    "network.xml", NetworkTarget, NetworkXml, _A, "a network's XML (net-dumpxml)",
    access=Access.READ, target=_N, target_of=_net,
)  # fmt: skip
NETWORK_DHCP_LEASES = op(
    "network.dhcp_leases", NetworkLeasesRequest, DhcpLeases, _A,
    "the DHCP leases dnsmasq handed out (net-dhcp-leases)",
    access=Access.READ, target=_N, target_of=_net,
)  # fmt: skip

NETWORK_PORT_LIST = op(
    "network.port_list", NetworkTarget, NetworkPortList, _A,
    "a network's ports: its running guests' NICs (net-port-list)",
    access=Access.READ, target=_N, target_of=_net,
)  # fmt: skip
NETWORK_PORT_XML = op(
    "network.port_xml", NetworkPortTarget, NetworkXml, _A,
    "a network port's <networkport> XML (net-port-dumpxml)",
    access=Access.READ, target=_N, target_of=_net,
)  # fmt: skip

NETWORK_PORT_CREATE = op(
    "network.port_create", NetworkPortCreate, NetworkPort, _A,
    "make a port on a running network from <networkport> XML (net-port-create)",
    access=Access.CONFIG, target=_N, target_of=_net, serial=True,
)  # fmt: skip
NETWORK_PORT_DELETE = op(
    "network.port_delete", NetworkPortTarget, Accepted, _A,
    "remove a port net-port-create made (net-port-delete)",
    access=Access.CONFIG, target=_N, target_of=_net, serial=True,
)  # fmt: skip


# --- a domain's interfaces on the host's networks ---------------------------------------
class InterfaceLinkRequest(Message):
    """domif-setlink: ``interface`` is the NIC's target dev (its tap) or its MAC."""

    domain: Name
    interface: Name
    up: bool
    live: bool = False
    config: bool = False


class InterfaceAddressesRequest(Message):
    """domifaddr: ``source`` is ``lease`` (the networks' DHCP leases) or ``agent``."""

    domain: Name
    source: str = "lease"


class InterfaceAddress(Message):
    type: str  # ipv4 | ipv6
    addr: str
    prefix: NonNegInt


class InterfaceAddresses(Message):
    """One NIC of domifaddr: its name (the tap), MAC and addresses."""

    name: str
    hwaddr: str
    addrs: list[InterfaceAddress]


class InterfaceAddressList(Message):
    interfaces: list[InterfaceAddresses]


UInt32 = Annotated[int, Meta(ge=0, le=2**32 - 1)]  # virDomainSetInterfaceParameters' UINTs


class InterfaceRate(Message):
    """One direction of domiftune, as virsh's ``average,peak,burst,floor``: kilobytes/s
    and kilobytes, 0 for "not given"; an average of 0 alone removes the limit."""

    average: UInt32 = 0
    peak: UInt32 = 0
    burst: UInt32 = 0
    floor: UInt32 = 0


class InterfaceTuneRequest(Message):
    """domiftune with limits: ``interface`` is the NIC's target dev or MAC; a direction
    left out keeps its limit. Neither ``live`` nor ``config``: libvirt's CURRENT."""

    domain: Name
    interface: Name
    inbound: InterfaceRate | None = None
    outbound: InterfaceRate | None = None
    live: bool = False
    config: bool = False


class InterfaceParametersRequest(Message):
    """domiftune without limits: the NIC's current ones, live or config (not both)."""

    domain: Name
    interface: Name
    live: bool = False
    config: bool = False


class InterfaceParameters(Message):
    """libvirt's seven interface parameters (0: unset), named as virsh prints them."""

    inbound: InterfaceRate
    outbound: InterfaceRate


_dom = field("domain")
DOMAIN_SET_INTERFACE_LINK = op(
    "domain.set_interface_link", InterfaceLinkRequest, Accepted, _A,
    "set a NIC's link up or down (domif-setlink; live: QMP set_link)",
    access=Access.CONFIG, target=Target.DOMAIN, target_of=_dom, serial=True,
)  # fmt: skip
DOMAIN_INTERFACE_ADDRESSES = op(
    "domain.interface_addresses", InterfaceAddressesRequest, InterfaceAddressList, _A,
    "a domain's NIC addresses (domifaddr: from the networks' DHCP leases)",
    access=Access.READ, target=Target.DOMAIN, target_of=_dom,
)  # fmt: skip
DOMAIN_INTERFACE_PARAMETERS = op(
    "domain.interface_parameters", InterfaceParametersRequest, InterfaceParameters, _A,
    "a NIC's bandwidth limits (domiftune without limits)",
    access=Access.READ, target=Target.DOMAIN, target_of=_dom,
)  # fmt: skip
DOMAIN_SET_INTERFACE_PARAMETERS = op(
    "domain.set_interface_parameters", InterfaceTuneRequest, Accepted, _A,
    "change a NIC's bandwidth limits (domiftune; live: tc on its tap)",
    access=Access.CONFIG, target=Target.DOMAIN, target_of=_dom, serial=True,
)  # fmt: skip
