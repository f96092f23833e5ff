"""Virtual network verbs under virsh's names: net-* (one host's networks: ``--host H``,
else ``$VIRTBUS_HOST``)."""

from __future__ import annotations

import argparse
import sys
import time

from virtbus.cli.context import Context
from virtbus.cli.domain import read_xml
from virtbus.cli.output import emit_json, fields, table
from virtbus.client.core import Host
from virtbus.errors import InvalidArgument
from virtbus.protocol.base import to_wire
from virtbus.protocol.network import NetworkInfo

_VERBS = (
    ("net-start", "start an inactive network"),
    ("net-destroy", "stop a network (refused while interfaces use it, unless --force)"),
    ("net-undefine", "remove a network's definition (an active one becomes transient)"),
    ("net-autostart", "start the network with the agent"),
    ("net-info", "network information"),
    ("net-dumpxml", "a network's XML"),
    ("net-name", "a network's name from its uuid"),
    ("net-uuid", "a network's uuid from its name"),
)


def _host_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="the host whose networks these are (default: $VIRTBUS_HOST)")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for verb, helptext in (
        ("net-define", "define a persistent network from an XML file"),
        ("net-create", "create and start a transient network from XML"),
    ):
        p = sub.add_parser(verb, help=helptext)
        p.add_argument("file", help="libvirt <network> XML ('-': stdin)")
        _host_arg(p)
        if verb == "net-define":
            _cluster_arg(p, "through the scheduler, on every host, joined by VXLAN")
        p.set_defaults(func=net_define, verb=verb)
    for verb, helptext in _VERBS:
        p = sub.add_parser(verb, help=helptext)
        p.add_argument("network", help="network name or uuid")
        _host_arg(p)
        if verb == "net-destroy":
            p.add_argument("--force", action="store_true",
                           help="also when interfaces are still on its bridge")  # fmt: skip
        if verb == "net-autostart":
            p.add_argument("--disable", action="store_true")
        if verb == "net-undefine":
            _cluster_arg(p, "a cluster network: stopped and undefined on every host")
        p.set_defaults(func=net_verb, verb=verb)
    p = sub.add_parser("net-list", help="list virtual networks")
    _host_arg(p)
    _cluster_arg(p, "the cluster networks (the scheduler's), each host's copy")
    p.add_argument("--all", action="store_true", help="inactive networks too")
    p.add_argument("--inactive", action="store_true", help="inactive networks only")
    p.add_argument("--persistent", action="store_true")
    p.add_argument("--transient", action="store_true")
    p.add_argument("--autostart", action="store_true")
    p.add_argument("--no-autostart", action="store_true")
    p.add_argument("--name", action="store_true", help="names only")
    p.add_argument("--uuid", action="store_true", help="uuids only")
    p.set_defaults(func=net_list)
    p = sub.add_parser("net-update", help="update parts of a network's configuration")
    p.add_argument("network", help="network name or uuid")
    p.add_argument("command", help="add, add-first, add-last, delete or modify")
    p.add_argument("section", help="ip-dhcp-host, ip-dhcp-range or dns-host")
    p.add_argument("xml", help="the section's element: XML text or a file name ('-': stdin)")
    p.add_argument(
        "--parent-index",
        type=int,
        default=None,
        help="which <ip> of the network (default: the one whose subnet fits)",
    )
    p.add_argument("--live", action="store_true", help="affect the running network")
    p.add_argument("--config", action="store_true", help="affect the persistent definition")
    p.add_argument(
        "--current",
        action="store_true",
        help="the running network when active, else the definition (default)",
    )
    _host_arg(p)
    p.set_defaults(func=net_update)
    p = sub.add_parser("net-dhcp-leases", help="the DHCP leases of a network")
    p.add_argument("network", help="network name or uuid")
    p.add_argument("--mac", help="only the leases of this MAC address")
    _host_arg(p)
    p.set_defaults(func=net_dhcp_leases)
    p = sub.add_parser("net-port-list", help="list a network's ports (its guests' NICs)")
    p.add_argument("network", help="network name or uuid")
    p.add_argument("--uuid", action="store_true", help="port uuids only, one a line")
    p.add_argument("--table", action="store_true", help="a table (the default)")
    _host_arg(p)
    p.set_defaults(func=net_port_list)
    p = sub.add_parser("net-port-dumpxml", help="a network port's XML")
    p.add_argument("network", help="network name or uuid")
    p.add_argument("port", help="the port's uuid (net-port-list)")
    _host_arg(p)
    p.set_defaults(func=net_port_dumpxml)
    p = sub.add_parser("net-port-create", help="make a network port from an XML file")
    p.add_argument("network", help="network name or uuid")
    p.add_argument("file", help="a <networkport> XML file ('-': stdin)")
    _host_arg(p)
    p.set_defaults(func=net_port_create)
    p = sub.add_parser("net-port-delete", help="remove a network port")
    p.add_argument("network", help="network name or uuid")
    p.add_argument("port", help="the port's uuid")
    _host_arg(p)
    p.set_defaults(func=net_port_delete)


def _cluster_arg(p: argparse.ArgumentParser, helptext: str) -> None:
    p.add_argument("--cluster", action="store_true", help=helptext)


def _host(ctx: Context, args: argparse.Namespace) -> Host:
    name = ctx.explicit_host(args.host)
    if not name:
        raise InvalidArgument("networks are per host: pass --host H (or set $VIRTBUS_HOST)")
    return ctx.client.host(name)


def _said(ctx: Context, value: object, text: str) -> int:
    if ctx.json:
        emit_json(value)
    else:
        print(text)
    return 0


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


async def net_define(ctx: Context, args: argparse.Namespace) -> int:
    xml = read_xml(args.file)
    if getattr(args, "cluster", False):
        found = await ctx.client.scheduler.define_network(xml)
        hosts = ", ".join(h.host for h in found.hosts)
        text = (f"Cluster network {found.name} defined from {args.file} (VNI {found.vni},"
                f" DHCP on {found.dhcp_host}; hosts {hosts})")  # fmt: skip
        return _said(ctx, to_wire(found), text)
    host = _host(ctx, args)
    if args.verb == "net-define":
        net = await host.define_network(xml)
        word = "defined"
    else:
        net = await host.create_network(xml)
        word = "created"
    info = await net.info()
    return _said(ctx, to_wire(info), f"Network {info.name} {word} from {args.file}")


def _info_fields(info: NetworkInfo) -> str:
    return fields([("Name", info.name), ("UUID", info.uuid), ("Active", _yes(info.active)),
                   ("Persistent", _yes(info.persistent)), ("Autostart", _yes(info.autostart)),
                   ("Bridge", info.bridge or ""), ("Forward", info.forward),
                   ("Owner", info.owner or "-")])  # fmt: skip


async def net_verb(ctx: Context, args: argparse.Namespace) -> int:
    verb, ref = args.verb, args.network
    if verb == "net-undefine" and args.cluster:
        await ctx.client.scheduler.undefine_network(ref)
        return _said(ctx, {"network": ref, "undefined": True, "cluster": True},
                     f"Cluster network {ref} has been undefined")  # fmt: skip
    net = _host(ctx, args).network(args.network)
    if verb in ("net-info", "net-name", "net-uuid"):
        info = await net.info()
        if ctx.json:
            emit_json(to_wire(info))
        elif verb == "net-info":
            print(_info_fields(info))
        else:
            print(info.name if verb == "net-name" else info.uuid)
        return 0
    if verb == "net-dumpxml":
        xml = await net.xml()
        if ctx.json:
            emit_json({"network": ref, "xml": xml})
        else:
            sys.stdout.write(xml)
        return 0
    if verb == "net-start":
        info = await net.start()
        return _said(ctx, to_wire(info), f"Network {ref} started")
    if verb == "net-destroy":
        await net.destroy(force=args.force)
        return _said(ctx, {"network": ref, "destroyed": True}, f"Network {ref} destroyed")
    if verb == "net-undefine":
        await net.undefine()
        return _said(ctx, {"network": ref, "undefined": True},
                     f"Network {ref} has been undefined")  # fmt: skip
    info = await net.set_autostart(not args.disable)  # net-autostart
    word = "unmarked as autostarted" if args.disable else "marked as autostarted"
    return _said(ctx, to_wire(info), f"Network {ref} {word}")


async def net_list(ctx: Context, args: argparse.Namespace) -> int:
    if args.cluster:
        return await _cluster_list(ctx)
    nets = await _host(ctx, args).networks(all=True)
    if args.inactive:
        nets = [n for n in nets if not n.active]
    elif not args.all:
        nets = [n for n in nets if n.active]
    if args.persistent:
        nets = [n for n in nets if n.persistent]
    if args.transient:
        nets = [n for n in nets if not n.persistent]
    if args.autostart:
        nets = [n for n in nets if n.autostart]
    if args.no_autostart:
        nets = [n for n in nets if not n.autostart]
    if ctx.json:
        emit_json([to_wire(n) for n in nets])
    elif args.name or args.uuid:
        for n in nets:
            print(n.name if args.name else n.uuid)
    else:
        rows = [(n.name, "active" if n.active else "inactive", _yes(n.autostart),
                 _yes(n.persistent)) for n in nets]  # fmt: skip
        print(table(["Name", "State", "Autostart", "Persistent"], rows))
    return 0


async def _cluster_list(ctx: Context) -> int:
    found = await ctx.client.scheduler.networks()
    if ctx.json:
        emit_json([to_wire(n) for n in found])
        return 0
    rows: list[tuple[object, ...]] = []
    for n in found:
        rows += [(n.name, n.vni, n.dhcp_host, h.host, "active" if h.active else "inactive",
                  ",".join(h.peers) or "-") for h in n.hosts]  # fmt: skip
        if not n.hosts:
            rows.append((n.name, n.vni, n.dhcp_host, "-", "-", "-"))
    print(table(["Name", "VNI", "DHCP host", "Host", "State", "VXLAN peers"], rows))
    return 0


async def net_dhcp_leases(ctx: Context, args: argparse.Namespace) -> int:
    leases = await _host(ctx, args).network(args.network).dhcp_leases(args.mac)
    if ctx.json:
        emit_json([to_wire(lease) for lease in leases])
        return 0
    rows = [
        (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease.expiry)) if lease.expiry
         else "never", lease.mac, lease.type, f"{lease.ip}/{lease.prefix}",
         lease.hostname or "-", lease.client_id or "-")
        for lease in leases
    ]  # fmt: skip
    print(table(["Expiry Time", "MAC address", "Protocol", "IP address", "Hostname",
                 "Client ID or DUID"], rows))  # fmt: skip
    return 0


async def net_port_list(ctx: Context, args: argparse.Namespace) -> int:
    """virsh net-port-list: the ports' uuids (``--uuid``: bare, else a table); ``--json``
    also says whose NIC each port is."""
    if args.uuid and args.table:
        raise InvalidArgument("--uuid and --table are exclusive")
    ports = await _host(ctx, args).network(args.network).ports()
    if ctx.json:
        emit_json([to_wire(p) for p in ports])
    elif args.uuid:
        for p in ports:
            print(p.uuid)
    else:
        print(table(["UUID"], [(p.uuid,) for p in ports]))
    return 0


async def net_port_dumpxml(ctx: Context, args: argparse.Namespace) -> int:
    xml = await _host(ctx, args).network(args.network).port_xml(args.port)
    if ctx.json:
        emit_json({"network": args.network, "port": args.port, "xml": xml})
    else:
        sys.stdout.write(xml)
    return 0


async def net_port_create(ctx: Context, args: argparse.Namespace) -> int:
    port = await _host(ctx, args).network(args.network).port_create(read_xml(args.file))
    if ctx.json:
        emit_json(to_wire(port))
    else:
        print(f"Network port {port.uuid} created from {args.file}")
    return 0


async def net_port_delete(ctx: Context, args: argparse.Namespace) -> int:
    await _host(ctx, args).network(args.network).port_delete(args.port)
    if ctx.json:
        emit_json({"network": args.network, "port": args.port, "ok": True})
    else:
        print(f"Network port {args.port} deleted")
    return 0


async def net_update(ctx: Context, args: argparse.Namespace) -> int:
    """virsh net-update: XML is the element itself when it starts with '<', else a file."""
    if args.current and (args.live or args.config):
        raise InvalidArgument("--current is exclusive of --live and --config")
    if args.parent_index is not None and args.parent_index < 0:
        raise InvalidArgument(f"--parent-index must be 0 or more, not {args.parent_index}")
    xml = args.xml if args.xml.lstrip().startswith("<") else read_xml(args.xml)
    net = _host(ctx, args).network(args.network)
    done = await net.update(args.command, args.section, xml, parent_index=args.parent_index,
                            live=args.live, config=args.config)  # fmt: skip
    what = ("persistent config and live state" if done.live and done.config
            else "live state" if done.live else "persistent config")  # fmt: skip
    value = {"network": args.network, **to_wire(done)}
    return _said(ctx, value, f"Updated network {args.network} {what}")
