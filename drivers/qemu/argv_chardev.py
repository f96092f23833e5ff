"""Character devices (serial, console, channel, USB redirection) and graphics (VNC, SPICE).

libvirt semantics: a ``<console>`` whose target is ``serial`` is the same device as the
``<serial>`` with that port (and becomes one when there is none); a ``virtio`` console is a
``virtconsole``; channels are ``virtserialport``\\ s. QEMU runs daemonized, so ``stdio``
has nowhere to go and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.qemu.argv_common import (
    BuildContext,
    ChardevRuntime,
    host_value,
    json_arg,
    kv_escape,
    port_value,
    unsupported,
)
from drivers.qemu.argv_devices import usb_props
from drivers.qemu.xmlnum import num
from virtbus.domain.model import CharDevice, Element
from virtbus.domain.views import enum_value
from virtbus.errors import ConfigUnsupported, InvalidArgument

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


def _source(el: Element, mode: str | None = None) -> Element | None:
    for src in el.findall("source"):
        if mode is None or src.get("mode", "connect") == mode:
            return src
    return None


def _log(cd: CharDevice) -> str:
    log = cd.element.find("log")
    if log is None or not log.get("file"):
        return ""
    append = ",logappend=on" if log.get("append") == "on" else ""
    return f",logfile={kv_escape(str(log.get('file')))}{append}"


def _tcp(ctx: BuildContext, cd: CharDevice, cid: str, where: str) -> str:
    if not cd.source_host or not cd.source_service:
        raise ConfigUnsupported(f"{where} needs <source host=... service=...>")
    src = _source(cd.element)
    assert src is not None
    mode = enum_value(cd.source_mode, ("bind", "connect"), f"{where} <source mode", "connect")
    listen = mode == "bind"
    proto = cd.protocol or "raw"
    if proto not in ("raw", "telnet", "tls", "telnets"):
        raise ConfigUnsupported(f"tcp chardev protocol '{proto}' not supported")
    if proto in ("tls", "telnets"):
        raise ConfigUnsupported(f"tcp chardev protocol '{proto}' not supported")
    host = host_value(cd.source_host, f"{where} <source host")
    port = port_value(cd.source_service, f"{where} <source service")
    opts = f"socket,id={cid},host={kv_escape(host)},port={port}"
    if proto == "telnet":
        opts += ",telnet=on"
    if listen:
        opts += ",server=on,wait=off"
    opts += _reconnect(src, listen, where)
    if src.get("tls") == "yes" or (src.get("tls") is None and ctx.settings.chardev_tls):
        tls_id = f"obj{cid}_tls0"
        ctx.add("-object", json_arg({
            "qom-type": "tls-creds-x509", "id": tls_id, "dir": ctx.settings.chardev_tls_dir,
            "endpoint": "server" if listen else "client", "verify-peer": True,
        }))  # fmt: skip
        opts += f",tls-creds={tls_id}"
    return opts


def _reconnect(src: Element, listen: bool, where: str) -> str:
    rc = src.find("reconnect")
    if rc is None or rc.get("enabled") != "yes":
        return ""
    if listen:
        raise ConfigUnsupported("chardev reconnect is possible only for connect mode")
    timeout = num(rc, "timeout", "0")
    if timeout == 0:
        raise InvalidArgument("chardev reconnect source timeout cannot be '0'")
    return f",reconnect={timeout}"


def _backend(
    ctx: BuildContext, cd: CharDevice, cid: str, default_sock: str
) -> tuple[str, Path | None]:
    """``-chardev`` value and the path the driver may need (file/unix)."""
    where = f"<{cd.kind} type='{cd.type}'> #{cd.index}"
    log = _log(cd)
    el = cd.element
    if cd.type == "pty":
        return f"pty,id={cid}{log}", None
    if cd.type == "null":
        return f"null,id={cid}{log}", None
    if cd.type == "vc":
        return f"vc,id={cid}{log}", None
    if cd.type == "stdio":  # QEMU's stdout is the domain's log
        return f"stdio,id={cid}{log}", None
    if cd.type == "file":
        if not cd.source_path:
            raise ConfigUnsupported(f"{where} needs <source path=...>")
        src = el.find("source")
        append = ",append=on" if src is not None and src.get("append") == "on" else ""
        return (f"file,id={cid},path={kv_escape(cd.source_path)}{append}{log}",
                Path(cd.source_path))  # fmt: skip
    if cd.type in ("dev", "pipe"):
        if not cd.source_path:
            raise ConfigUnsupported("Missing source path attribute for char device")
        kind = "pipe" if cd.type == "pipe" else ("parallel" if cd.kind == "parallel" else "serial")
        return f"{kind},id={cid},path={kv_escape(cd.source_path)}{log}", None
    if cd.type == "unix":
        src = _source(el)
        if cd.kind in ("serial", "console", "parallel", "redirdev", "smartcard", "rng") and (
            not cd.source_path
        ):
            raise ConfigUnsupported("Missing source path attribute for char device")
        mode = enum_value(cd.source_mode, ("bind", "connect"), f"{where} <source mode", "connect")
        # a generated path is ours and always served by QEMU (libvirt forces listen mode);
        # a path the XML chose is never removed (QEMU binds it, or connects to it)
        listen = not cd.source_path or mode == "bind"
        path = (ctx.user_socket(Path(cd.source_path), bind=listen) if cd.source_path
                else ctx.socket_path(default_sock))  # fmt: skip
        opts = f"socket,id={cid},path={kv_escape(str(path))}"
        if listen:
            opts += ",server=on,wait=off"
        if src is not None:
            opts += _reconnect(src, listen, where)
        return opts + log, path
    if cd.type == "tcp":
        return _tcp(ctx, cd, cid, where) + log, None
    if cd.type == "udp":
        connect = _source(el, "connect")
        bind = _source(el, "bind")
        host = connect.get("host", "") if connect is not None else ""
        port = num(connect, "service", "0", maximum=65535) if connect is not None else 0
        laddr = bind.get("host", "") if bind is not None else ""
        lport = num(bind, "service", "0", maximum=65535) if bind is not None else 0
        if host:
            host_value(host, f"{where} <source mode='connect' host")
        if laddr:
            host_value(laddr, f"{where} <source mode='bind' host")
        return (f"udp,id={cid},host={kv_escape(host)},port={port},"
                f"localaddr={kv_escape(laddr)},localport={lport}{log}", None)  # fmt: skip
    if cd.type == "spicevmc":
        if not ctx.spice:
            raise ConfigUnsupported(f"{where} needs <graphics type='spice'>")
        name = "usbredir" if cd.kind == "redirdev" else "vdagent"
        if cd.kind == "smartcard":
            name = "smartcard"
        return f"spicevmc,id={cid},name={name}", None
    if cd.type == "spiceport":
        if not ctx.spice:
            raise ConfigUnsupported(f"{where} needs <graphics type='spice'>")
        src = el.find("source")
        channel = src.get("channel") if src is not None else None
        if not channel:
            raise ConfigUnsupported(f"{where} needs <source channel=...>")
        return f"spiceport,id={cid},name={kv_escape(channel)}", None
    if cd.type == "qemu-vdagent":
        src = el.find("source")
        opts = f"qemu-vdagent,id={cid},name=vdagent"
        if src is not None:
            clip = src.find("clipboard")
            mouse = src.find("mouse")
            copypaste = clip is not None and clip.get("copypaste") == "yes"
            opts += f",clipboard={'on' if copypaste else 'off'}"
            opts += f",mouse={'on' if mouse is None or mouse.get('mode') == 'client' else 'off'}"
        return opts, None
    if cd.type == "dbus":
        if ctx.dbus_address is None and not any(
            g.type == "dbus" and g.element.get("p2p") == "yes" for g in ctx.defn.graphics
        ):
            ctx.dbus_address = f"unix:path={ctx.run_dir / (ctx.defn.uuid + '-dbus.sock')}"
        src = el.find("source")
        channel = src.get("channel") if src is not None else None
        name = channel or ("org.qemu.usbredir" if cd.kind == "redirdev"
                           else f"org.qemu.console.serial.{cd.index}")  # fmt: skip
        return f"dbus,id={cid},name={kv_escape(name)}", None
    raise unsupported(where)


def _serial_device(ctx: BuildContext, cd: CharDevice, port: int, cid: str) -> str:
    target = cd.target_type or "isa-serial"
    model_el = cd.element.find("target/model")
    model = model_el.get("name") if model_el is not None else None
    dev_id = f"serial{port}"
    if target in ("isa-serial", "serial"):
        if model not in (None, "isa-serial"):
            raise ConfigUnsupported(
                f"Serial device with target type 'isa-serial' and target model '{model}' not "
                "compatible with guest architecture or machine type"
            )
        if port > 3:
            raise unsupported(f"isa-serial port {port} (0-3 exist)")
        ctx.device({"driver": "isa-serial", "chardev": cid, "id": dev_id, "index": port})
    elif target == "pci-serial":
        ctx.device(
            {"driver": "pci-serial", "chardev": cid, "id": dev_id}
            | ctx.addr_props(cd.element, f"serial {port}")
        )
    elif target == "usb-serial":
        ctx.device(
            {"driver": "usb-serial", "chardev": cid, "id": dev_id}
            | ctx.addr_props(cd.element, f"serial {port}")
        )
    elif target == "isa-debug":
        props: dict[str, Any] = {"driver": "isa-debugcon", "chardev": cid, "id": dev_id}
        props |= ctx.addr_props(cd.element, f"serial {port}")
        props.setdefault("iobase", 0x402)
        ctx.device(props)
    else:
        raise ConfigUnsupported(
            f"Serial device with target type '{target}' and target model '{model}' not "
            "compatible with guest architecture or machine type"
        )
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
            ctx.device(props | ctx.addr_props(cd.element, f"console #{cd.index}"))
            ctx.chardevs.append(ChardevRuntime("console", cd.index, cid, cd.type, path, dev_id))
        else:
            raise unsupported(f"<console><target type='{target}'>")
    return ports


def build_parallels(ctx: BuildContext) -> None:
    for cd in ctx.defn.parallels:
        port = cd.target_port if cd.target_port is not None else cd.index
        cid, dev_id = f"charparallel{port}", f"parallel{port}"
        backend, path = _backend(ctx, cd, cid, f"parallel{port}.sock")
        ctx.add("-chardev", backend)
        ctx.device({"driver": "isa-parallel", "chardev": cid, "id": dev_id})
        ctx.chardevs.append(ChardevRuntime("parallel", cd.index, cid, cd.type, path, dev_id))


def build_channels(ctx: BuildContext) -> Path | None:
    """virtio and guestfwd channels; returns the guest agent's socket path if any."""
    agent: Path | None = None
    for cd in ctx.defn.channels:
        cid, dev_id = f"charchannel{cd.index}", f"channel{cd.index}"
        if cd.target_type == "guestfwd":
            target = cd.element.find("target")
            assert target is not None
            addr, port = target.get("address"), target.get("port")
            if not addr or not port:
                raise ConfigUnsupported("guestfwd channel needs <target address= port=>")
            backend, path = _backend(ctx, cd, cid, f"channel{cd.index}.sock")
            ctx.add("-chardev", backend)
            ctx.add("-netdev", json_arg({"type": "user", "guestfwd": [
                {"str": f"tcp:{addr}:{port}-chardev:{cid}"}], "id": dev_id}))  # fmt: skip
            ctx.chardevs.append(ChardevRuntime("channel", cd.index, cid, cd.type, path, None))
            continue
        if cd.target_type != "virtio":
            raise unsupported(f"<channel><target type='{cd.target_type}'>")
        backend, path = _backend(ctx, cd, cid, f"channel{cd.index}.sock")
        ctx.add("-chardev", backend)
        props: dict[str, Any] = {"driver": "virtserialport", "chardev": cid, "id": dev_id}
        props |= ctx.addr_props(cd.element, f"channel #{cd.index}")
        name = cd.target_name
        if cd.type == "spicevmc" and not name:
            name = SPICE_AGENT
        if cd.type == "qemu-vdagent" and not name:
            name = SPICE_AGENT
        if name:
            props["name"] = name
        ctx.device(props)
        if cd.target_name == GUEST_AGENT and cd.type == "unix":
            agent = path
        ctx.chardevs.append(ChardevRuntime("channel", cd.index, cid, cd.type, path, dev_id))
    return agent


def _redirfilter(ctx: BuildContext) -> str | None:
    rf = ctx.defn.root.find("devices/redirfilter")
    if rf is None:
        return None
    rules = []
    for usbdev in rf.findall("usbdev"):

        def val(attr: str, usbdev: Element = usbdev) -> str:
            v = usbdev.get(attr)
            return "-1" if v in (None, "-1") else str(v)

        version = usbdev.get("version")
        rules.append(f"{val('class')}:{val('vendor')}:{val('product')}:"
                     f"{'-1' if version in (None, '-1') else version}:"
                     f"{1 if usbdev.get('allow') == 'yes' else 0}")  # fmt: skip
    return "|".join(rules)


def build_redirdevs(ctx: BuildContext) -> None:
    filt = _redirfilter(ctx)
    for i, dev in enumerate(ctx.defn.devices_named("redirdev")):
        if dev.element.get("bus", "usb") != "usb":
            raise unsupported(f"<redirdev bus='{dev.element.get('bus')}'>")
        if dev.type not in ("spicevmc", "tcp", "unix", "dbus"):
            raise unsupported(f"<redirdev type='{dev.type}'>")
        cid = f"charredir{i}"
        cd = CharDevice(kind="redirdev", index=i, type=dev.type or "spicevmc",
                        source_path=_attr(dev.element, "path"),
                        source_mode=_attr(dev.element, "mode"),
                        source_host=_attr(dev.element, "host"),
                        source_service=_attr(dev.element, "service"),
                        protocol=None, target_type=None, target_port=None, target_name=None,
                        element=dev.element)  # fmt: skip
        backend, _path = _backend(ctx, cd, cid, f"redir{i}.sock")
        ctx.add("-chardev", backend)
        props: dict[str, Any] = {"driver": "usb-redir", "chardev": cid, "id": f"redir{i}"}
        if filt is not None:
            props["filter"] = filt
        boot = dev.element.find("boot")
        if boot is not None and boot.get("order"):
            props["bootindex"] = num(boot, "order")
        ctx.device(props | usb_props(ctx, dev.element.find("address")))
        ctx.chardevs.append(ChardevRuntime("redirdev", i, cid, dev.type or "spicevmc", None,
                                           f"redir{i}"))  # fmt: skip


def _attr(el: Element, attr: str) -> str | None:
    src = el.find("source")
    return src.get(attr) if src is not None else None


def build_smartcards(ctx: BuildContext) -> None:
    for i, card in enumerate(ctx.defn.elements("devices/smartcard")):
        mode = card.get("mode")
        a = card.find("address")
        ccid = num(a, "controller", "0") if a is not None else 0
        props: dict[str, Any] = {"bus": f"ccid{ccid}.0", "id": f"smartcard{i}"}
        if mode == "host":
            props = {"driver": "ccid-card-emulated", "backend": "nss-emulated"} | props
        elif mode == "host-certificates":
            certs = [c.text or "" for c in card.findall("certificate")]
            if len(certs) != 3:
                raise ConfigUnsupported(
                    "host-certificates smartcard mode needs exactly three <certificate>s"
                )
            db = card.find("database")
            props = {
                "driver": "ccid-card-emulated",
                "backend": "certificates",
                "cert1": certs[0],
                "cert2": certs[1],
                "cert3": certs[2],
                "db": db.text if db is not None and db.text else "/etc/pki/nssdb",
            } | props
        elif mode == "passthrough":
            cid = f"charsmartcard{i}"
            cd = CharDevice(kind="smartcard", index=i, type=card.get("type", "spicevmc"),
                            source_path=_attr(card, "path"), source_mode=_attr(card, "mode"),
                            source_host=_attr(card, "host"),
                            source_service=_attr(card, "service"),
                            protocol=card.find("protocol").get("type")
                            if card.find("protocol") is not None else None,
                            target_type=None, target_port=None, target_name=None,
                            element=card)  # fmt: skip
            backend, _path = _backend(ctx, cd, cid, f"smartcard{i}.sock")
            ctx.add("-chardev", backend)
            props = {"driver": "ccid-card-passthru", "chardev": cid} | props
        else:
            raise unsupported(f"<smartcard mode='{mode}'>")
        ctx.device(props)
