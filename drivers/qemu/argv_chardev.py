"""Character devices (serial, console, channel, USB redirection) and graphics (VNC, SPICE).

libvirt semantics: a ``<console>`` whose target is ``serial`` is the same device as the
``<serial>`` with that port (and becomes one when there is none); a ``virtio`` console is a
``virtconsole``; channels are ``virtserialport``\\ s. QEMU runs daemonized, so ``stdio``
has nowhere to go and is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.qemu.argv_common import (
    BuildContext,
    ChardevRuntime,
    host_value,
    kv_escape,
    port_value,
    unsupported,
)
from drivers.qemu.argv_devices import usb_props
from virtbus.domain.model import CharDevice, Graphics
from virtbus.domain.views import enum_value
from virtbus.errors import ConfigUnsupported, InvalidArgument

#: QEMU's -spice image-compression values (libvirt's <image compression> uses the same)
SPICE_IMAGE_COMPRESSION = ("auto_glz", "auto_lz", "quic", "glz", "lz", "off")

GUEST_AGENT = "org.qemu.guest_agent.0"
SPICE_AGENT = "com.redhat.spice.0"


@dataclass(frozen=True, slots=True)
class VncRuntime:
    listen: str  # address, or "unix:<path>" / "none"
    display: int | None  # first display tried (port 5900+display); None for unix/none
    autoport: bool  # QEMU took the first free display in range: ask query-vnc for the port


@dataclass(frozen=True, slots=True)
class SpiceRuntime:
    listen: str
    port: int


def _backend(
    ctx: BuildContext, cd: CharDevice, cid: str, default_sock: str
) -> tuple[str, Path | None]:
    """``-chardev`` value and the path the driver may need (file/unix)."""
    where = f"<{cd.kind} type='{cd.type}'> #{cd.index}"
    if cd.type == "pty":
        return f"pty,id={cid}", None
    if cd.type == "null":
        return f"null,id={cid}", None
    if cd.type == "file":
        if not cd.source_path:
            raise ConfigUnsupported(f"{where} needs <source path=...>")
        src = cd.element.find("source")
        append = ",append=on" if src is not None and src.get("append") == "on" else ""
        return f"file,id={cid},path={kv_escape(cd.source_path)}{append}", Path(cd.source_path)
    mode = enum_value(cd.source_mode, ("bind", "connect"), f"{where} <source mode", "bind")
    bind = mode == "bind"
    if cd.type == "unix":
        if cd.source_path:
            path = ctx.user_socket(Path(cd.source_path), bind=bind)
        else:
            path = ctx.socket_path(default_sock)  # ours: QEMU always binds it
            bind = True
        server = ",server=on,wait=off" if bind else ""
        return f"socket,id={cid},path={kv_escape(str(path))}{server}", path
    if cd.type == "tcp":
        if not cd.source_host or not cd.source_service:
            raise ConfigUnsupported(f"{where} needs <source host=... service=...>")
        host = host_value(cd.source_host, f"{where} <source host")
        port = port_value(cd.source_service, f"{where} <source service")
        server = ",server=on,wait=off" if bind else ""
        telnet = ",telnet=on" if cd.protocol == "telnet" else ""
        return f"socket,id={cid},host={kv_escape(host)},port={port}{server}{telnet}", None
    if cd.type == "spicevmc":
        if not ctx.spice:
            raise ConfigUnsupported(f"{where} needs <graphics type='spice'>")
        name = "usbredir" if cd.kind == "redirdev" else "vdagent"
        return f"spicevmc,id={cid},name={name}", None
    if cd.type == "stdio":
        raise unsupported(f"{where}: QEMU runs daemonized, it has no stdio")
    raise unsupported(where)


def _serial_device(ctx: BuildContext, cd: CharDevice, port: int, cid: str) -> str:
    target = cd.target_type or "isa-serial"
    dev_id = f"serial{port}"
    if target in ("isa-serial", "serial"):
        if port > 3:
            raise unsupported(f"isa-serial port {port} (0-3 exist)")
        ctx.device({"driver": "isa-serial", "chardev": cid, "id": dev_id, "index": port})
    elif target == "pci-serial":
        ctx.device(
            {"driver": "pci-serial", "chardev": cid, "id": dev_id}
            | ctx.pci_props(cd.element.find("address"), f"serial {port}")
        )
    else:
        raise unsupported(f"<serial><target type='{target}'>")
    return dev_id


def _serial_port(
    ctx: BuildContext, cd: CharDevice, kind: str, port: int, ports: dict[int, str]
) -> None:
    """The chardev and device of serial port ``port`` (a <serial>, or a <console> alone)."""
    cid = f"charserial{port}"
    backend, path = _backend(ctx, cd, cid, f"serial{port}.sock")
    ctx.add("-chardev", backend)
    dev_id = _serial_device(ctx, cd, port, cid)
    ports[port] = cid
    ctx.chardevs.append(ChardevRuntime(kind, cd.index, cid, cd.type, path, dev_id))


def build_serials(ctx: BuildContext) -> dict[int, str]:
    """Serials and consoles; returns port -> chardev id of the serial devices."""
    ports: dict[int, str] = {}
    for cd in ctx.defn.serials:
        port = cd.target_port if cd.target_port is not None else cd.index
        if port in ports:
            raise ConfigUnsupported(f"two <serial> devices with target port {port}")
        _serial_port(ctx, cd, "serial", port, ports)
    for cd in ctx.defn.consoles:
        target = cd.target_type or "serial"
        if target == "serial":
            port = cd.target_port or 0
            if port in ports:  # the same device as that serial (libvirt semantics)
                ctx.chardevs.append(
                    ChardevRuntime("console", cd.index, ports[port], cd.type, None, None)
                )
                continue
            _serial_port(ctx, cd, "console", port, ports)
        elif target == "virtio":
            cid, dev_id = f"charconsole{cd.index}", f"console{cd.index}"
            backend, path = _backend(ctx, cd, cid, f"console{cd.index}.sock")
            ctx.add("-chardev", backend)
            props: dict[str, Any] = {"driver": "virtconsole", "chardev": cid, "id": dev_id}
            ctx.device(props | ctx.virtio_serial_props(cd.element.find("address"), console=True))
            ctx.chardevs.append(ChardevRuntime("console", cd.index, cid, cd.type, path, dev_id))
        else:
            raise unsupported(f"<console><target type='{target}'>")
    return ports


def build_channels(ctx: BuildContext) -> Path | None:
    """virtio channels; returns the guest agent's socket path if there is one."""
    agent: Path | None = None
    for cd in ctx.defn.channels:
        if cd.target_type != "virtio":
            raise unsupported(f"<channel><target type='{cd.target_type}'>")
        cid, dev_id = f"charchannel{cd.index}", f"channel{cd.index}"
        backend, path = _backend(ctx, cd, cid, f"channel{cd.index}.sock")
        ctx.add("-chardev", backend)
        props: dict[str, Any] = {"driver": "virtserialport", "chardev": cid, "id": dev_id}
        props |= ctx.virtio_serial_props(cd.element.find("address"), console=False)
        if cd.target_name:
            props["name"] = cd.target_name
        ctx.device(props)
        if cd.target_name == GUEST_AGENT and cd.type == "unix":
            agent = path
        ctx.chardevs.append(ChardevRuntime("channel", cd.index, cid, cd.type, path, dev_id))
    return agent


def build_redirdevs(ctx: BuildContext) -> None:
    for i, dev in enumerate(ctx.defn.devices_named("redirdev")):
        if dev.element.get("bus", "usb") != "usb" or dev.type != "spicevmc":
            raise unsupported(f"<redirdev bus='{dev.element.get('bus')}' type='{dev.type}'>")
        if not ctx.spice:
            raise ConfigUnsupported("<redirdev type='spicevmc'> needs <graphics type='spice'>")
        cid = f"charredir{i}"
        ctx.add("-chardev", f"spicevmc,id={cid},name=usbredir")
        props: dict[str, Any] = {"driver": "usb-redir", "chardev": cid, "id": f"redir{i}"}
        ctx.device(props | usb_props(ctx, dev.element.find("address")))
        ctx.chardevs.append(ChardevRuntime("redirdev", i, cid, "spicevmc", None, f"redir{i}"))


# ---------------------------------------------------------------------------- graphics

_VNC_ATTRS = frozenset({"type", "port", "autoport", "listen", "keymap"})
_SPICE_ATTRS = frozenset({"type", "port", "autoport", "listen", "keymap"})


def _check_graphics(g: Graphics, allowed: frozenset[str], children: frozenset[str]) -> None:
    for attr in g.element.attrib:
        if attr not in allowed:
            raise unsupported(f"<graphics type='{g.type}' {attr}=...>")
    for child in g.element:
        if isinstance(child.tag, str) and child.tag not in children:
            raise unsupported(f"<{child.tag}> in <graphics type='{g.type}'>")
    for listen in g.element.findall("listen"):
        if listen.get("type", "address") not in ("address", "none", "socket"):
            raise unsupported(f"<listen type='{listen.get('type')}'> in <graphics>")


def build_vnc(ctx: BuildContext, g: Graphics) -> VncRuntime:
    _check_graphics(g, _VNC_ATTRS, frozenset({"listen"}))
    listen_el = g.element.find("listen")
    ltype = listen_el.get("type", "address") if listen_el is not None else "address"
    if ltype == "none":
        ctx.add("-vnc", "none")
        return VncRuntime("none", None, False)
    if ltype == "socket":
        assert listen_el is not None
        sock = listen_el.get("socket")
        path = ctx.user_socket(Path(sock), bind=True) if sock else ctx.socket_path("vnc.sock")
        # "vnc=" spelled out: an implied first value that holds a '=' would be a key
        ctx.add("-vnc", f"vnc=unix:{kv_escape(str(path))}")
        return VncRuntime(f"unix:{path}", None, False)
    listen = host_value(g.listen or ctx.settings.default_graphics_listen, "<graphics listen")
    host = f"[{listen}]" if ":" in listen else listen
    autoport = g.autoport is True or g.port in (None, -1)
    if autoport:
        top = ctx.settings.vnc_autoport_displays - 1
        ctx.add("-vnc", f"{host}:0,to={top}")
        return VncRuntime(listen, 0, True)
    assert g.port is not None
    if g.port < 5900:
        raise unsupported(f"<graphics type='vnc' port='{g.port}'> (VNC ports start at 5900)")
    ctx.add("-vnc", f"{host}:{g.port - 5900}")
    return VncRuntime(listen, g.port - 5900, False)


def build_spice(ctx: BuildContext, g: Graphics, ports: Mapping[int, int]) -> SpiceRuntime:
    _check_graphics(g, _SPICE_ATTRS, frozenset({"listen", "image", "gl"}))
    gl = g.element.find("gl")
    if gl is not None and gl.get("enable", "no") != "no":
        raise unsupported("<graphics type='spice'><gl enable='yes'>")
    listen_el = g.element.find("listen")
    if listen_el is not None and listen_el.get("type", "address") != "address":
        raise unsupported(f"<graphics type='spice'><listen type='{listen_el.get('type')}'>")
    port = g.port if g.port is not None and g.port > 0 and g.autoport is not True else None
    if port is None:
        port = ports.get(g.index)
    if port is None:
        raise InvalidArgument(
            f"<graphics type='spice'> #{g.index} has autoport: the driver must allocate a "
            "port and pass it in graphics_ports (see graphics_needing_ports())"
        )
    listen = host_value(g.listen or ctx.settings.default_graphics_listen, "<graphics listen")
    opts = f"port={port},addr={kv_escape(listen)},disable-ticketing=on,seamless-migration=on"
    image = g.element.find("image")
    if image is not None:
        for attr in image.attrib:
            if attr != "compression":
                raise unsupported(f"<graphics type='spice'><image {attr}=...>")
        what = "<graphics type='spice'><image compression"
        compression = enum_value(image.get("compression"), SPICE_IMAGE_COMPRESSION, what)
        if compression is not None:
            opts += f",image-compression={compression}"
    ctx.add("-spice", opts)
    return SpiceRuntime(listen, port)
