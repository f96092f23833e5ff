"""The agent's ``network.*`` ops: typed handlers over :class:`agent.network.Networks`."""

from __future__ import annotations

import uuid as uuidlib

from agent.network import Network
from agent.owners import caller
from agent.table import HANDLERS, AgentContext
from drivers.base import Affect, InterfaceLinks, InterfaceTuning
from virtbus.domain import parse_domain_xml
from virtbus.domain.bandwidth import Bandwidth, Rate, RateChange
from virtbus.errors import (
    InvalidArgument,
    NoDomainError,
    NoNetworkPort,
    NoSupport,
    OperationInvalid,
    XMLError,
)
from virtbus.network import check_mac
from virtbus.network.ports import Port, domain_ports
from virtbus.network.update import Update
from virtbus.protocol import ops
from virtbus.protocol.base import Accepted
from virtbus.protocol.events import DomainState
from virtbus.protocol.network import (
    DhcpLease,
    DhcpLeases,
    InterfaceAddress,
    InterfaceAddresses,
    InterfaceAddressesRequest,
    InterfaceAddressList,
    InterfaceLinkRequest,
    InterfaceParameters,
    InterfaceParametersRequest,
    InterfaceRate,
    InterfaceTuneRequest,
    NetworkAutostart,
    NetworkDestroy,
    NetworkInfo,
    NetworkLeasesRequest,
    NetworkList,
    NetworkListRequest,
    NetworkPeerList,
    NetworkPeers,
    NetworkPort,
    NetworkPortCreate,
    NetworkPortList,
    NetworkPortTarget,
    NetworkRef,
    NetworkTarget,
    NetworkUpdated,
    NetworkUpdateRequest,
    NetworkXml,
    NetworkXmlRequest,
)


async def network_info(ctx: AgentContext, net: Network) -> NetworkInfo:
    return NetworkInfo(**await ctx.networks.info(net))


def _ref(net: Network) -> NetworkRef:
    return NetworkRef(name=net.name, uuid=net.defn.uuid)


@HANDLERS.on(ops.NETWORK_DEFINE)
async def _define(ctx: AgentContext, req: NetworkXmlRequest) -> NetworkRef:
    return _ref(await ctx.networks.define(req.xml, owner=caller()))


@HANDLERS.on(ops.NETWORK_CREATE)
async def _create(ctx: AgentContext, req: NetworkXmlRequest) -> NetworkRef:
    return _ref(await ctx.networks.create(req.xml, owner=caller()))


@HANDLERS.on(ops.NETWORK_START)
async def _start(ctx: AgentContext, req: NetworkTarget) -> NetworkInfo:
    return await network_info(ctx, await ctx.networks.start(req.network))


@HANDLERS.on(ops.NETWORK_DESTROY)
async def _destroy(ctx: AgentContext, req: NetworkDestroy) -> Accepted:
    await ctx.networks.destroy(req.network, force=req.force)
    return Accepted()


@HANDLERS.on(ops.NETWORK_UNDEFINE)
async def _undefine(ctx: AgentContext, req: NetworkTarget) -> Accepted:
    await ctx.networks.undefine(req.network)
    return Accepted()


@HANDLERS.on(ops.NETWORK_AUTOSTART)
async def _autostart(ctx: AgentContext, req: NetworkAutostart) -> NetworkInfo:
    return await network_info(ctx, await ctx.networks.set_autostart(req.network, req.autostart))


@HANDLERS.on(ops.NETWORK_UPDATE)
async def _update(ctx: AgentContext, req: NetworkUpdateRequest) -> NetworkUpdated:
    update = Update(req.command, req.section, req.xml, req.parent_index)
    live, config, dhcp = await ctx.networks.update(req.network, update, live=req.live,
                                                   config=req.config)  # fmt: skip
    return NetworkUpdated(live=live, config=config, dhcp=dhcp)


@HANDLERS.on(ops.NETWORK_LIST)
async def _list(ctx: AgentContext, req: NetworkListRequest) -> NetworkList:
    nets = [n for n in ctx.networks.networks() if req.all or n.active]
    return NetworkList(networks=[await network_info(ctx, n) for n in nets])


@HANDLERS.on(ops.NETWORK_INFO)
async def _info(ctx: AgentContext, req: NetworkTarget) -> NetworkInfo:
    return await network_info(ctx, ctx.networks.get(req.network))


@HANDLERS.on(ops.NETWORK_XML)
async def _xml(ctx: AgentContext, req: NetworkTarget) -> NetworkXml:
    return NetworkXml(xml=ctx.networks.get(req.network).defn.to_xml())


@HANDLERS.on(ops.NETWORK_DHCP_LEASES)
async def _leases(ctx: AgentContext, req: NetworkLeasesRequest) -> DhcpLeases:
    mac = None
    if req.mac is not None:
        try:
            mac = check_mac(req.mac, "--mac")
        except XMLError as exc:
            raise InvalidArgument(exc.message) from None
    leases = ctx.networks.dhcp_leases(req.network, mac)
    return DhcpLeases(leases=[
        DhcpLease(expiry=lease.expiry, mac=lease.mac, type=lease.family, ip=lease.ip,
                  prefix=lease.prefix, hostname=lease.hostname, client_id=lease.client_id)
        for lease in leases
    ])  # fmt: skip


# --- a network's ports: its running guests' NICs (virtbus/network/ports.py) -------------
#: a domain whose NICs are plugged: its hypervisor process runs (libvirt's active)
_PLUGGED = frozenset({DomainState.RUNNING, DomainState.BLOCKED, DomainState.PAUSED,
                      DomainState.SHUTDOWN, DomainState.PMSUSPENDED})  # fmt: skip


async def _ports(ctx: AgentContext, ref: str) -> list[Port]:
    """The network's ports: its running guests' NICs, then those net-port-create made."""
    return [*await _guest_ports(ctx, ref), *ctx.networks.get(ref).created.values()]


async def _guest_ports(ctx: AgentContext, ref: str) -> list[Port]:
    net = ctx.networks.get(ref)  # NO_NETWORK
    if not net.active:
        raise OperationInvalid(f"network '{net.name}' is not active")
    out: list[Port] = []
    for info in await ctx.driver.list_domains(include_inactive=False):
        if info.state not in _PLUGGED:
            continue
        try:
            xml = await ctx.driver.xml(info.uuid)
        except NoDomainError:
            continue  # gone since the list: its ports with it
        out.extend(domain_ports(net.defn, parse_domain_xml(xml)))
    return out


@HANDLERS.on(ops.NETWORK_PORT_LIST)
async def _port_list(ctx: AgentContext, req: NetworkTarget) -> NetworkPortList:
    return NetworkPortList(ports=[_wire_port(p) for p in await _ports(ctx, req.network)])


@HANDLERS.on(ops.NETWORK_PORT_XML)
async def _port_xml(ctx: AgentContext, req: NetworkPortTarget) -> NetworkXml:
    wanted = _port_uuid(req.port)
    for port in await _ports(ctx, req.network):
        if port.uuid == wanted:
            return NetworkXml(xml=port.to_xml())
    raise NoNetworkPort(f"Network port not found: no network port with matching uuid"
                        f" '{req.port}' on network '{req.network}'")  # fmt: skip


def _port_uuid(text: str) -> str:
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        raise InvalidArgument(f"invalid network port uuid '{text}'") from None


def _wire_port(p: Port) -> NetworkPort:
    return NetworkPort(uuid=p.uuid, domain=p.domain, domain_uuid=p.domain_uuid, mac=p.mac,
                       plug=p.plug["type"], bridge=p.plug.get("bridge"),
                       dev=p.plug.get("dev"), group=p.group)  # fmt: skip


@HANDLERS.on(ops.NETWORK_PORT_CREATE)
async def _port_create(ctx: AgentContext, req: NetworkPortCreate) -> NetworkPort:
    taken = {p.uuid for p in await _guest_ports(ctx, req.network)}
    return _wire_port(await ctx.networks.create_port(req.network, req.xml, taken))


@HANDLERS.on(ops.NETWORK_PORT_DELETE)
async def _port_delete(ctx: AgentContext, req: NetworkPortTarget) -> Accepted:
    wanted = _port_uuid(req.port)
    for port in await _guest_ports(ctx, req.network):
        if port.uuid == wanted:
            raise OperationInvalid(
                f"network port '{wanted}' is interface {port.mac} of running domain"
                f" '{port.domain}': detach-interface unplugs it"
            )
    if not await ctx.networks.delete_port(req.network, wanted):
        raise NoNetworkPort(f"Network port not found: no network port with matching uuid"
                            f" '{req.port}' on network '{req.network}'")  # fmt: skip
    return Accepted()


# --- a domain's interfaces on this host's networks ---------------------------------------
def _links(ctx: AgentContext) -> InterfaceLinks:
    if not isinstance(ctx.driver, InterfaceLinks):
        raise NoSupport(f"the {ctx.driver.name} driver cannot set a NIC's link")
    return ctx.driver


@HANDLERS.on(ops.DOMAIN_SET_INTERFACE_LINK)
async def _set_link(ctx: AgentContext, req: InterfaceLinkRequest) -> Accepted:
    await _links(ctx).set_interface_link(req.domain, req.interface, req.up,
                                         Affect(req.live, req.config))  # fmt: skip
    return Accepted()


@HANDLERS.on(ops.DOMAIN_INTERFACE_ADDRESSES)
async def _addresses(ctx: AgentContext, req: InterfaceAddressesRequest) -> InterfaceAddressList:
    """domifaddr: each NIC on one of this host's networks, with the leases dnsmasq gave
    its MAC. The guest agent is not spoken to by virtbus: ``agent`` says so."""
    if req.source not in ("lease", "agent"):
        raise InvalidArgument(f"unknown address source '{req.source}' (lease or agent)")
    if req.source == "agent":
        raise NoSupport("Guest agent is not responding: virtbus does not connect to a QEMU"
                        " guest agent; use --source lease")  # fmt: skip
    if ctx.driver.lookup(req.domain) is None:
        raise NoDomainError(f"Domain not found: no domain with matching name '{req.domain}'")
    state, _ = ctx.driver.state(req.domain)
    if state not in (DomainState.RUNNING, DomainState.PAUSED, DomainState.BLOCKED):
        raise OperationInvalid(f"domain '{req.domain}' is not running")
    defn = parse_domain_xml(await ctx.driver.xml(req.domain))
    known = {n.name for n in ctx.networks.networks() if n.active}
    out = []
    for iface in defn.interfaces:
        if iface.type != "network" or iface.source_network not in known or not iface.mac:
            continue
        leases = ctx.networks.dhcp_leases(str(iface.source_network), iface.mac)
        if leases:
            out.append(InterfaceAddresses(
                name=iface.target_dev or "-", hwaddr=iface.mac,
                addrs=[InterfaceAddress(type=lease.family, addr=lease.ip, prefix=lease.prefix)
                       for lease in leases],
            ))  # fmt: skip
    return InterfaceAddressList(interfaces=out)


# --- a NIC's bandwidth (domiftune) ------------------------------------------------------
def _tuning(ctx: AgentContext) -> InterfaceTuning:
    if not isinstance(ctx.driver, InterfaceTuning):
        raise NoSupport(f"the {ctx.driver.name} driver cannot tune a NIC's bandwidth")
    return ctx.driver


def _rate(rate: Rate | None) -> InterfaceRate:
    """libvirt's parameters of one direction: 0 where unset."""
    if rate is None:
        return InterfaceRate()
    return InterfaceRate(average=rate.average, peak=rate.peak or 0, burst=rate.burst or 0)


def _change(rate: InterfaceRate | None) -> RateChange | None:
    if rate is None:
        return None
    return RateChange(rate.average, rate.peak, rate.burst, rate.floor)


@HANDLERS.on(ops.DOMAIN_INTERFACE_PARAMETERS)
async def _interface_parameters(
    ctx: AgentContext, req: InterfaceParametersRequest
) -> InterfaceParameters:
    if req.live and req.config:  # as virDomainGetInterfaceParameters
        raise InvalidArgument("flags 'live' and 'config' are mutually exclusive")
    found = await _tuning(ctx).interface_bandwidth(req.domain, req.interface,
                                                   Affect(req.live, req.config))  # fmt: skip
    found = found or Bandwidth()
    return InterfaceParameters(inbound=_rate(found.inbound), outbound=_rate(found.outbound))


@HANDLERS.on(ops.DOMAIN_SET_INTERFACE_PARAMETERS)
async def _set_interface_parameters(ctx: AgentContext, req: InterfaceTuneRequest) -> Accepted:
    if req.inbound is None and req.outbound is None:
        raise InvalidArgument("no bandwidth given: --inbound and/or --outbound")
    affect = Affect(req.live, req.config)
    await _tuning(ctx).tune_interface(req.domain, req.interface, _change(req.inbound),
                                      _change(req.outbound), affect)  # fmt: skip
    return Accepted()


# --- cluster networks: the VXLAN peers the scheduler knows (scheduler/networks.py) --------
@HANDLERS.on(ops.NETWORK_SET_PEERS)
async def _set_peers(ctx: AgentContext, req: NetworkPeers) -> NetworkPeerList:
    return NetworkPeerList(peers=await ctx.networks.set_flood_peers(req.network, req.peers))
