"""Network interfaces: the host side (``-netdev``) and the guest NIC (``-device``), as
libvirt's ``qemuBuildHostNetProps`` and ``qemuBuildNicDevProps`` build them.

Host sides: QEMU's user-mode stack (with guest addresses), the taps of NICs on the
agent's networks (``-netdev tap,fd=N``, opened by the agent: drivers/qemu/taps.py),
libvirt network names mapped by :attr:`ArgvSettings.networks`, bridges
(qemu-bridge-helper), taps (``ethernet``, with the interface scripts the driver runs),
sockets (server, client, mcast, udp), vhost-user and vhost-vDPA. ``hostdev`` interfaces
are VFIO devices (:mod:`drivers.qemu.argv_hostdev`).
What needs host network management virtbus does not do (VLAN tags, Open vSwitch
virtualports, macvtap, bandwidth shaping other than on the agent's own taps) is refused
by name.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.qemu import argv_hostdev
from drivers.qemu.argv_common import BuildContext, NetRuntime, json_arg, kv_escape, unsupported
from drivers.qemu.argv_controllers import user_alias
from drivers.qemu.argv_devices import generated_mac
from drivers.qemu.argv_virtio import onoff, virtio_props
from drivers.qemu.xmlnum import num, num_text
from virtbus.domain import parse_int
from virtbus.domain.model import Element
from virtbus.domain.views import enum_value
from virtbus.errors import ConfigUnsupported, XMLError

MODELS = {
    "virtio": "virtio-net", "virtio-transitional": "virtio-net",
    "virtio-non-transitional": "virtio-net", "e1000": "e1000", "e1000e": "e1000e",
    "rtl8139": "rtl8139", "igb": "igb", "ne2k_pci": "ne2k_pci", "pcnet": "pcnet",
    "vmxnet3": "vmxnet3", "usb-net": "usb-net", "i82559er": "i82559er",
    "i82801": "i82801",
}  # fmt: skip
_CHILDREN = frozenset({
    "mac", "source", "model", "target", "address", "boot", "alias", "link", "driver", "rom",
    "mtu", "coalesce", "ip", "route", "script", "downscript", "teaming", "acpi", "backend",
    "tune", "filterref", "portForward", "port", "guest",
})  # fmt: skip
_HOST_NETWORKING = ("vlan", "virtualport", "bandwidth")  # bandwidth: only on the agent's taps
_OFFLOADS = (("csum", "csum"), ("gso", "gso"), ("tso4", "host_tso4"), ("tso6", "host_tso6"),
             ("ecn", "host_ecn"), ("ufo", "host_ufo"), ("mrg_rxbuf", "mrg_rxbuf"))  # fmt: skip
_GUEST_OFFLOADS = (("csum", "guest_csum"), ("tso4", "guest_tso4"), ("tso6", "guest_tso6"),
                   ("ecn", "guest_ecn"), ("ufo", "guest_ufo"))  # fmt: skip


@dataclass(frozen=True, slots=True)
class IfScript:
    """A script the driver runs with the tap's name: after QEMU made the tap, and at exit."""

    path: str
    ifname: str
    down: bool


def _addr(src: Element | None, what: str) -> str:
    if src is None:
        raise ConfigUnsupported(f"{what} needs a <source address= port=>")
    host = src.get("address", "")
    port = src.get("port")
    if port is None:
        raise ConfigUnsupported(f"{what} needs a <source port=>")
    return f"{host}:{port}"


def _netdev(ctx: BuildContext, iface: Element, index: int, netdev_id: str,
            dev_id: str) -> dict[str, Any]:  # fmt: skip
    itype = iface.get("type", "user")
    where = f"<interface type='{itype}'> #{index}"
    src = iface.find("source")
    target = iface.find("target")
    ifname = target.get("dev") if target is not None else None
    if iface.find("script") is not None and itype != "ethernet":
        raise ConfigUnsupported(f"scripts are not supported on interfaces of type {itype}")
    if itype == "network":
        net = src.get("network") if src is not None else None
        if src is not None and src.get("portgroup"):
            raise unsupported(f"{where}: <source portgroup> (no portgroups in virtbus networks)")
        tap = ctx.taps.get(index)
        if tap is not None:  # on one of the agent's networks: the tap it opened for us
            return {"type": "tap", "fd": str(tap.fd), "id": netdev_id}
        meaning = ctx.settings.networks.get(net or "")
        if meaning == "user":
            return {"type": "user", "id": netdev_id}
        if meaning is not None and meaning.startswith("bridge:"):
            return {"type": "bridge", "br": meaning.removeprefix("bridge:"), "id": netdev_id}
        raise ConfigUnsupported(
            f"unsupported {where} (network '{net}'): this host maps only "
            f"{', '.join(repr(n) for n in sorted(ctx.settings.networks)) or 'no'} libvirt "
            "network names; use type='user', 'bridge' or 'ethernet'"
        )
    if itype == "user":
        backend = iface.find("backend")
        if backend is not None and backend.get("type") == "passt":
            raise unsupported(f"{where}: <backend type='passt'> (passt is not installed)")
        if iface.find("portForward") is not None:
            raise ConfigUnsupported(
                "The <portForward> element can only be used with the 'passt' backend of "
                "interface type='user' or type='vhostuser'"
            )
        props: dict[str, Any] = {"type": "user"}
        for ip in iface.findall("ip"):
            address = ip.get("address", "")
            prefix = ip.get("prefix")
            try:
                parsed = ipaddress.ip_address(address)
            except ValueError:
                raise XMLError(f"invalid <ip address='{address}'> in {where}") from None
            if parsed.version == 4:
                props["net"] = f"{address}/{prefix}" if prefix else address
            else:
                props["ipv6-prefix"] = address
                if prefix:
                    props["ipv6-prefixlen"] = parse_int(prefix, "<ip prefix", minimum=0,
                                                        maximum=128)  # fmt: skip
        return props | {"id": netdev_id}
    if itype == "bridge":
        br = src.get("bridge") if src is not None else None
        if not br:
            raise ConfigUnsupported(f"{where} needs <source bridge=...>")
        return {"type": "bridge", "br": br, "id": netdev_id}
    if itype == "ethernet":
        props = {"type": "tap", "script": "no", "downscript": "no"}
        script = iface.find("script")
        down = iface.find("downscript")
        if (script is not None or down is not None) and not ifname:
            ifname = f"vnet{ctx.defn.uuid[:6]}{index}"
        if ifname:
            props["ifname"] = ifname
        if script is not None and script.get("path"):
            ctx.net_scripts.append(IfScript(str(script.get("path")), str(ifname), False))
        if down is not None and down.get("path"):
            ctx.net_scripts.append(IfScript(str(down.get("path")), str(ifname), True))
        driver = iface.find("driver")
        if _virtio(iface) and driver is not None and driver.get("name") == "vhost":
            props["vhost"] = True  # QEMU opens /dev/vhost-net
        sndbuf = iface.find("tune/sndbuf")
        if sndbuf is not None and sndbuf.text:
            props["sndbuf"] = num_text(sndbuf)
        return props | {"id": netdev_id}
    if itype in ("server", "client", "mcast"):
        key = {"server": "listen", "client": "connect", "mcast": "mcast"}[itype]
        return {"type": "socket", key: _addr(src, where), "id": netdev_id}
    if itype == "udp":
        local = src.find("local") if src is not None else None
        if local is None:
            raise ConfigUnsupported(f"{where} needs <source><local address= port=>")
        return {
            "type": "socket",
            "udp": _addr(src, where),
            "localaddr": f"{local.get('address')}:{local.get('port')}",
            "id": netdev_id,
        }
    if itype == "vhostuser":
        if ifname:
            raise ConfigUnsupported(
                f"interface {_mac(iface) or index} - custom tap device path is not supported "
                "for network interfaces of type vhostuser"
            )
        if src is None or src.get("type", "unix") != "unix" or not src.get("path"):
            raise ConfigUnsupported(f"{where} needs <source type='unix' path=...>")
        mode = enum_value(src.get("mode"), ("client", "server"), f"{where} <source mode", "client")
        path = ctx.user_socket(Path(str(src.get("path"))), bind=mode == "server")
        chardev = f"socket,id=char{dev_id},path={kv_escape(str(path))}"
        if mode == "server":
            chardev += ",server=on,wait=off"
        reconnect = src.find("reconnect")
        if reconnect is not None and reconnect.get("enabled") == "yes":
            chardev += f",reconnect={num(reconnect, 'timeout', '1')}"
        ctx.add("-chardev", chardev)
        props = {"type": "vhost-user", "chardev": f"char{dev_id}"}
        queues = _driver_int(iface, "queues")
        if queues and queues > 1:
            props["queues"] = queues
        return props | {"id": netdev_id}
    if itype == "vdpa":
        dev = src.get("dev") if src is not None else None
        if not dev:
            raise ConfigUnsupported(f"{where} needs <source dev=...>")
        props = {"type": "vhost-vdpa", "vhostdev": dev}
        queues = _driver_int(iface, "queues")
        if queues and queues > 1:
            props["queues"] = queues
        ctx.host_devices.append(dev)
        return props | {"id": netdev_id}
    if itype == "direct":
        raise unsupported(f"{where} (macvtap devices are not created here)")
    raise ConfigUnsupported(f"network device type '{itype}' is not supported by this hypervisor")


def _mac(iface: Element) -> str | None:
    m = iface.find("mac")
    return m.get("address") if m is not None else None


def _model(iface: Element) -> str:
    m = iface.find("model")
    return (m.get("type") if m is not None else None) or "rtl8139"


def _virtio(iface: Element) -> bool:
    return _model(iface).startswith("virtio")


def _driver_int(iface: Element, attr: str) -> int | None:
    driver = iface.find("driver")
    raw = driver.get(attr) if driver is not None else None
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise XMLError(f"invalid <driver {attr}='{raw}'>") from None
    if value < 0:
        raise XMLError(
            f"Invalid value for attribute '{attr}' in element 'driver': '{raw}'. Expected "
            "non-negative integer value"
        )
    return value


def _nic(ctx: BuildContext, iface: Element, index: int, netdev_id: str, dev_id: str,
         mac: str) -> dict[str, Any]:  # fmt: skip
    model = _model(iface)
    if model not in MODELS:
        raise unsupported(f"<interface><model type='{model}'>")
    props: dict[str, Any]
    driver = iface.find("driver")
    if model.startswith("virtio"):
        props = virtio_props("virtio-net", iface, model if model != "virtio" else None)
        if driver is not None:
            txmode = driver.get("txmode")
            if txmode in ("iothread", "timer"):
                props["tx"] = "bh" if txmode == "iothread" else "timer"
            for attr in ("ioeventfd", "event_idx"):
                value = onoff(driver, attr, "<driver>")
                if value is not None:
                    props[attr] = value
            for child, table in (("host", _OFFLOADS), ("guest", _GUEST_OFFLOADS)):
                el = driver.find(child)
                for attr, prop in table:
                    value = onoff(el, attr, f"<driver><{child}>")
                    if value is not None:
                        props[prop] = value
            queues = _driver_int(iface, "queues")
            if queues and queues > 1:
                props |= {"mq": True, "vectors": 2 * queues + 2}
            for attr in ("rx_queue_size", "tx_queue_size"):
                size = _driver_int(iface, attr)
                if size is not None:
                    if size & (size - 1) or not 256 <= size <= 1024:
                        raise ConfigUnsupported(f"{attr.split('_')[0]}_queue_size has to be a "
                                                "power of two")  # fmt: skip
                    props[attr] = size
            for attr, prop in (("rss", "rss"), ("rss_hash_report", "hash")):
                value = onoff(driver, attr, "<driver>")
                if value is not None:
                    props[prop] = value
        mtu = iface.find("mtu")
        if mtu is not None and mtu.get("size"):
            props["host_mtu"] = num(mtu, "size")
        teaming = iface.find("teaming")
        if teaming is not None and teaming.get("type") == "persistent":
            props["failover"] = True
    else:
        props = {"driver": MODELS[model]}
        if driver is not None and any(driver.get(a) for a in ("queues", "txmode", "rss")):
            raise ConfigUnsupported(f"<driver> options need a virtio <model> (not '{model}')")
    props |= {"netdev": netdev_id, "id": dev_id, "mac": mac}
    boot = ctx.bootindex.get(("interface", index))
    if boot is not None:
        props["bootindex"] = boot
    props |= ctx.addr_props(iface, f"interface #{index}")
    rom = iface.find("rom")
    if rom is not None:
        if rom.get("bar") in ("on", "off"):
            props["rombar"] = 1 if rom.get("bar") == "on" else 0
        if rom.get("file") is not None:
            props["romfile"] = rom.get("file")
        if rom.get("enabled") == "no":
            props["romfile"] = ""
    return props


def build_interfaces(ctx: BuildContext) -> None:
    for i, iface in enumerate(ctx.defn.elements("devices/interface")):
        itype = iface.get("type", "user")
        for child in iface:
            if not isinstance(child.tag, str):
                continue
            if child.tag == "bandwidth" and ctx.taps.get(i) is not None:
                continue  # shaped on the tap the agent made (drivers/qemu/taps.py)
            if child.tag in _HOST_NETWORKING:
                raise unsupported(
                    f"<{child.tag}> in <interface type='{itype}'> (host network management"
                    + (": <bandwidth> only on the host's own virtual networks)"
                       if child.tag == "bandwidth" else ")")
                )  # fmt: skip
            if child.tag not in _CHILDREN:
                raise unsupported(f"<{child.tag}> in <interface type='{itype}'>")
        if iface.find("filterref") is not None:
            raise unsupported(f"<filterref> in <interface type='{itype}'> (no nwfilter here)")
        if iface.find("coalesce") is not None and itype not in ("bridge", "network", "ethernet"):
            raise ConfigUnsupported("coalesce settings on interface type not supported")
        link = iface.find("link")
        if link is not None and link.get("state", "up") not in ("up", "down"):
            raise XMLError(f"invalid <link state='{link.get('state')}'>")
        dev_id = user_alias(iface) or f"net{i}"
        netdev_id = f"host{dev_id}"
        if itype == "hostdev":
            target = iface.find("target")
            if target is not None and target.get("dev"):
                raise ConfigUnsupported(
                    f"interface {_mac(iface) or i} - custom tap device path is not supported "
                    "for network interfaces of type hostdev"
                )
            argv_hostdev.build_net_hostdev(ctx, iface, i, f"hostdev{i}")
            continue
        mac = _mac(iface)
        if mac is None:
            mac = generated_mac(ctx.settings.mac_prefix, ctx.defn.uuid, i)
            ctx.generated_macs[i] = mac
        ctx.add("-netdev", json_arg(_netdev(ctx, iface, i, netdev_id, dev_id)))
        ctx.device(_nic(ctx, iface, i, netdev_id, dev_id, mac))
        if link is not None and link.get("state") == "down":
            ctx.links_down.append(dev_id)
        target = iface.find("target")
        ifname = target.get("dev") if itype == "ethernet" and target is not None else None
        if i in ctx.taps:
            ifname = ctx.taps[i].ifname or None
        ctx.nets.append(NetRuntime(i, netdev_id, dev_id, mac, ifname))
