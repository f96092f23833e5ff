"""Displays and audio backends: VNC, SPICE (TLS port, channels, compression, GL),
D-Bus, egl-headless, SDL, and ``-audiodev`` for every ``<audio>`` type, as libvirt's
``qemuBuildGraphicsCommandLine`` and ``qemuBuildAudioCommandLine`` build them.

Passwords never go on the command line: the driver sets them over QMP before the guest
runs (``QemuLaunch.passwords``), as libvirt does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.qemu.argv_chardev import SpiceRuntime, VncRuntime
from drivers.qemu.argv_common import (
    BuildContext,
    host_value,
    json_arg,
    kv_escape,
    port_value,
    token,
    unsupported,
)
from drivers.qemu.helpers import HelperSpec
from drivers.qemu.xmlnum import num
from virtbus.domain.model import Element, Graphics
from virtbus.errors import ConfigUnsupported, InvalidArgument, XMLError

AUDIO_TYPES = frozenset({"none", "alsa", "coreaudio", "jack", "oss", "pulseaudio", "sdl",
                         "spice", "file", "dbus", "pipewire"})  # fmt: skip
SPICE_CHANNELS = frozenset({"main", "display", "inputs", "cursor", "playback", "record",
                            "smartcard", "usbredir"})  # fmt: skip


@dataclass(frozen=True, slots=True)
class Password:
    """A display password the driver sets over QMP (``set_password``/``expire_password``)."""

    protocol: str  # vnc | spice
    password: str
    valid_to: str | None  # libvirt's passwdValidTo (ISO 8601), or None
    connected: str | None  # keep | disconnect | fail


def _listen(ctx: BuildContext, g: Graphics) -> tuple[str, str | None]:
    """(listen type, address or socket)."""
    el = g.element
    listen = el.find("listen")
    if listen is not None:
        ltype = listen.get("type", "address")
        if ltype == "address":
            return "address", listen.get("address") or el.get("listen")
        if ltype == "socket":
            return "socket", listen.get("socket")
        if ltype == "none":
            return "none", None
        if ltype == "network":
            raise unsupported("<listen type='network'> (no libvirt networks here)")
        raise XMLError(f"invalid <listen type='{ltype}'>")
    if el.get("socket"):
        return "socket", el.get("socket")
    auto = ctx.settings.vnc_auto_unix_socket if g.type == "vnc" else (
        ctx.settings.spice_auto_unix_socket
    )  # fmt: skip
    if auto and not el.get("listen") and el.get("port") is None:
        return "socket", None
    return "address", el.get("listen")


def _password(ctx: BuildContext, g: Graphics) -> None:
    passwd = g.element.get("passwd")
    if passwd is None:
        return
    ctx.passwords.append(Password(g.type, passwd, g.element.get("passwdValidTo"),
                                  g.element.get("connected")))  # fmt: skip


def _audio_id(ctx: BuildContext, el: Element) -> str:
    audio = el.find("audio")
    if audio is not None and audio.get("id"):
        return f"audio{num(audio, 'id', maximum=255)}"
    return ctx.audio_ids[0] if ctx.audio_ids else "audio1"


def build_vnc(ctx: BuildContext, g: Graphics) -> VncRuntime:
    el = g.element
    ltype, where = _listen(ctx, g)
    runtime: VncRuntime
    if ltype == "none":
        opts = "none"
        runtime = VncRuntime("none", None, False)
    elif ltype == "socket":
        path = ctx.user_socket(Path(where), bind=True) if where else ctx.socket_path("vnc.sock")
        # "vnc=" spelled out: an implied first value that holds a '=' would be a key
        opts = f"vnc=unix:{kv_escape(str(path))}"
        runtime = VncRuntime(f"unix:{path}", None, False)
    else:
        listen = host_value(where or ctx.settings.default_graphics_listen, "<graphics listen")
        host = f"[{listen}]" if ":" in listen else listen
        autoport = g.autoport is True or g.port in (None, -1)
        if autoport:
            opts = f"{host}:0,to={ctx.settings.vnc_autoport_displays - 1}"
            runtime = VncRuntime(listen, 0, True)
        else:
            assert g.port is not None
            if not 5900 <= g.port <= 65535:
                raise ConfigUnsupported("vnc port must be in range [5900,65535]")
            opts = f"{host}:{g.port - 5900}"
            runtime = VncRuntime(listen, g.port - 5900, False)
        ws = el.get("websocket")
        if ws is not None and ws != "-1":
            opts += f",websocket={port_value(ws, '<graphics websocket')}"
    share = el.get("sharePolicy")
    if share is not None:
        if share not in ("allow-exclusive", "force-shared", "ignore"):
            raise XMLError(f"invalid <graphics sharePolicy='{share}'>")
        opts += f",share={share}"
    if el.get("passwd") is not None:
        opts += ",password=on"
    if ctx.settings.vnc_tls:
        tls_id = "vnc-tls-creds0"
        ctx.add("-object", json_arg({"qom-type": "tls-creds-x509", "id": tls_id,
                                     "dir": ctx.settings.vnc_tls_dir, "endpoint": "server",
                                     "verify-peer": ctx.settings.vnc_tls_verify}))  # fmt: skip
        opts += f",tls-creds={tls_id}"
    if ctx.settings.vnc_sasl:
        opts += ",sasl=on"
        ctx.env["SASL_CONF_PATH"] = ctx.settings.sasl_dir
    power = el.get("powerControl")
    if power in ("yes", "no"):
        opts += f",power-control={'on' if power == 'yes' else 'off'}"
    opts += f",audiodev={_audio_id(ctx, el)}"
    ctx.add("-vnc", opts)
    if el.get("keymap"):
        ctx.add("-k", token(el.get("keymap"), "<graphics keymap"))
    _password(ctx, g)
    return runtime


def build_spice(ctx: BuildContext, g: Graphics, ports: Mapping[int, int]) -> SpiceRuntime:
    el = g.element
    ltype, where = _listen(ctx, g)
    opts: list[str] = []
    secure = insecure = False
    port = 0
    listen = ctx.settings.default_graphics_listen
    tls_raw = el.get("tlsPort")
    tls_port = num(el, "tlsPort", minimum=-1, maximum=65535) if tls_raw is not None else 0
    if ltype == "socket":
        path = ctx.user_socket(Path(where), bind=True) if where else ctx.socket_path("spice.sock")
        opts.append(f"unix=on,addr={kv_escape(str(path))}")
        insecure = True
        listen = f"unix:{path}"
    elif ltype == "address":
        autoport = g.autoport is True or g.port in (None, -1)
        if g.port is not None and g.port > 0 and g.autoport is not True:
            port = g.port
        elif autoport:
            allocated = ports.get(g.index)
            if allocated is None:
                raise InvalidArgument(
                    f"<graphics type='spice'> #{g.index} has autoport: the driver must allocate "
                    "a port and pass it in graphics_ports (see graphics_needing_ports())"
                )
            port = allocated
        if tls_port > 0 and not ctx.settings.spice_tls:
            raise ConfigUnsupported(
                "spice TLS port set in XML configuration, but TLS is disabled in the driver "
                "settings (spice_tls)"
            )
        if port > 0:
            opts.append(f"port={port}")
            insecure = True
        if tls_port > 0:
            opts.append(f"tls-port={tls_port}")
            secure = True
        listen = host_value(where or listen, "<graphics listen")
        if port > 0 or tls_port > 0:
            opts.append(f"addr={kv_escape(listen)}")
    else:
        opts.append("port=0")
        insecure = True
    if ctx.settings.spice_sasl:
        opts.append("sasl=on")
        ctx.env["SASL_CONF_PATH"] = ctx.settings.sasl_dir
    mouse = el.find("mouse")
    if mouse is not None and mouse.get("mode") in ("server", "client"):
        opts.append(f"agent-mouse={'off' if mouse.get('mode') == 'server' else 'on'}")
    if el.get("passwd") is None:
        opts.append("disable-ticketing=on")
    if secure:
        opts.append(f"x509-dir={kv_escape(ctx.settings.spice_tls_dir)}")
    default_mode = el.get("defaultMode")
    if default_mode == "secure":
        if not secure:
            raise ConfigUnsupported(
                "spice defaultMode secure requested in XML configuration, but TLS connection "
                "is not available"
            )
        opts.append("tls-channel=default")
    elif default_mode == "insecure":
        if not insecure:
            raise ConfigUnsupported(
                "spice defaultMode insecure requested in XML configuration, but plaintext "
                "connection is not available"
            )
        opts.append("plaintext-channel=default")
    for ch in el.findall("channel"):
        name, mode = ch.get("name", ""), ch.get("mode", "any")
        if name not in SPICE_CHANNELS:
            raise XMLError(f"invalid <channel name='{name}'> in <graphics type='spice'>")
        if mode == "secure":
            if not secure:
                raise ConfigUnsupported(
                    "spice secure channels set in XML configuration, but TLS connection is not "
                    "available"
                )
            opts.append(f"tls-channel={name}")
        elif mode == "insecure":
            if not insecure:
                raise ConfigUnsupported(
                    "spice insecure channels set in XML configuration, but plaintext "
                    "connection is not available"
                )
            opts.append(f"plaintext-channel={name}")
    for tag, attr, opt, allowed in (
        ("image", "compression", "image-compression",
         ("auto_glz", "auto_lz", "quic", "glz", "lz", "off")),
        ("jpeg", "compression", "jpeg-wan-compression", ("auto", "never", "always")),
        ("zlib", "compression", "zlib-glz-wan-compression", ("auto", "never", "always")),
        ("playback", "compression", "playback-compression", ("on", "off")),
        ("streaming", "mode", "streaming-video", ("filter", "all", "off")),
    ):  # fmt: skip
        child = el.find(tag)
        if child is not None and child.get(attr):
            value = str(child.get(attr))
            if value not in allowed:
                raise XMLError(f"invalid <{tag} {attr}='{value}'> in <graphics type='spice'>")
            opts.append(f"{opt}={value}")
    clip = el.find("clipboard")
    if clip is not None and clip.get("copypaste") == "no":
        opts.append("disable-copy-paste=on")
    ft = el.find("filetransfer")
    if ft is not None and ft.get("enable") == "no":
        opts.append("disable-agent-file-xfer=on")
    gl = el.find("gl")
    if gl is not None and gl.get("enable") == "yes":
        opts.append("gl=on")
        if gl.get("rendernode"):
            opts.append(f"rendernode={kv_escape(str(gl.get('rendernode')))}")
    opts.append("seamless-migration=on")
    ctx.add("-spice", ",".join(opts))
    if el.get("keymap"):
        ctx.add("-k", token(el.get("keymap"), "<graphics keymap"))
    _password(ctx, g)
    return SpiceRuntime(listen, port)


def build_graphics(
    ctx: BuildContext, ports: Mapping[int, int]
) -> tuple[VncRuntime | None, SpiceRuntime | None]:
    vnc: VncRuntime | None = None
    spice: SpiceRuntime | None = None
    gl_displays = 0
    for g in ctx.defn.graphics:
        el = g.element
        if g.type in ("spice", "dbus", "sdl") and _gl(el):
            gl_displays += 1
        if g.type == "egl-headless":
            gl_displays += 1
    if gl_displays > 1:
        raise ConfigUnsupported("multiple OpenGL displays are not supported by QEMU")
    types = [g.type for g in ctx.defn.graphics]
    if "egl-headless" in types and any(t not in ("vnc", "spice", "egl-headless") for t in types):
        raise ConfigUnsupported(
            "graphics type 'egl-headless' is only supported with one of: 'vnc', 'spice' "
            "graphics types"
        )
    for g in ctx.defn.graphics:
        el = g.element
        if g.type == "vnc":
            if vnc is not None:
                raise ConfigUnsupported("only one VNC graphics device is supported")
            vnc = build_vnc(ctx, g)
        elif g.type == "spice":
            if spice is not None:
                raise ConfigUnsupported("only one SPICE graphics device is supported")
            spice = build_spice(ctx, g, ports)
        elif g.type == "sdl":
            if el.get("xauth"):
                ctx.env["XAUTHORITY"] = str(el.get("xauth"))
            if el.get("display"):
                ctx.env["DISPLAY"] = str(el.get("display"))
            if el.get("fullscreen") == "yes":
                ctx.add("-full-screen")
            opts = "sdl"
            gl = el.find("gl")
            if gl is not None and gl.get("enable") in ("yes", "no"):
                opts += f",gl={'on' if gl.get('enable') == 'yes' else 'off'}"
            ctx.displays.append(opts)
        elif g.type == "egl-headless":
            opts = "egl-headless"
            gl = el.find("gl")
            if gl is not None and gl.get("rendernode"):
                opts += f",rendernode={kv_escape(str(gl.get('rendernode')))}"
            ctx.displays.append(opts)
        elif g.type == "dbus":
            opts = "dbus"
            if el.get("p2p") == "yes":
                opts += ",p2p=on"
            else:
                address = el.get("address") or (
                    f"unix:path={ctx.run_dir / (ctx.defn.uuid + '-dbus.sock')}"
                )
                opts += f",addr={kv_escape(address)}"
                ctx.dbus_address = address
            gl = el.find("gl")
            if gl is not None and gl.get("enable") in ("yes", "no"):
                opts += f",gl={'on' if gl.get('enable') == 'yes' else 'off'}"
            if gl is not None and gl.get("rendernode"):
                opts += f",rendernode={kv_escape(str(gl.get('rendernode')))}"
            audio = el.find("audio")
            if audio is not None and audio.get("id"):
                opts += f",audiodev=audio{num(audio, 'id', maximum=255)}"
            ctx.displays.append(opts)
        elif g.type == "rdp":
            raise unsupported("<graphics type='rdp'> (needs qemu-rdp, not installed)")
        else:
            raise unsupported(f"<graphics type='{g.type}'>")
    return vnc, spice


def _gl(el: Element) -> bool:
    gl = el.find("gl")
    return gl is not None and gl.get("enable") == "yes"


# ---------------------------------------------------------------------------- audio


def _io(el: Element | None, atype: str) -> dict[str, Any]:
    if el is None:
        return {}
    out: dict[str, Any] = {}
    for attr, prop in (("mixingEngine", "mixing-engine"), ("fixedSettings", "fixed-settings")):
        if el.get(attr) in ("yes", "no"):
            out[prop] = el.get(attr) == "yes"
    for attr, prop in (("voices", "voices"), ("bufferLength", "buffer-length")):
        if el.get(attr):
            out[prop] = num(el, attr)
    if el.get("fixedSettings") == "yes":
        settings = el.find("settings")
        if settings is not None:
            for attr in ("frequency", "channels"):
                if settings.get(attr):
                    out[attr] = num(settings, attr)
            if settings.get("format"):
                out["format"] = settings.get("format")
    if atype in ("alsa", "oss") and el.get("dev"):
        out["dev"] = el.get("dev")
    if atype == "coreaudio" and el.get("bufferCount"):
        out["buffer-count"] = num(el, "bufferCount")
    if atype == "oss" and el.get("bufferCount"):
        out["buffer-count"] = num(el, "bufferCount")
    if atype == "oss" and el.get("tryPoll") in ("yes", "no"):
        out["try-poll"] = el.get("tryPoll") == "yes"
    if atype in ("pulseaudio", "pipewire"):
        for attr, prop in (("name", "name"), ("streamName", "stream-name")):
            if el.get(attr):
                out[prop] = el.get(attr)
        if el.get("latency"):
            out["latency"] = num(el, "latency")
    if atype == "jack":
        for attr, prop in (("serverName", "server-name"), ("clientName", "client-name"),
                           ("connectPorts", "connect-ports")):  # fmt: skip
            if el.get(attr):
                out[prop] = el.get(attr)
        if el.get("exactName") in ("yes", "no"):
            out["exact-name"] = el.get("exactName") == "yes"
    if atype == "sdl" and el.get("bufferCount"):
        out["buffer-count"] = num(el, "bufferCount")
    return out


def build_audio(ctx: BuildContext) -> None:
    for el in ctx.defn.elements("devices/audio"):
        atype = el.get("type", "none")
        if atype not in AUDIO_TYPES:
            raise XMLError(f"invalid <audio type='{atype}'>")
        if atype == "spice" and not ctx.spice:
            raise ConfigUnsupported("<audio type='spice'> needs <graphics type='spice'>")
        aid = f"audio{num(el, 'id', '1', maximum=255)}"
        props: dict[str, Any] = {"id": aid, "driver": "pa" if atype == "pulseaudio" else atype}
        if el.get("timerPeriod"):
            props["timer-period"] = num(el, "timerPeriod")
        if atype == "oss":
            for attr, prop in (("tryMMap", "try-mmap"), ("exclusive", "exclusive")):
                if el.get(attr) in ("yes", "no"):
                    props[prop] = el.get(attr) == "yes"
            if el.get("dspPolicy"):
                props["dsp-policy"] = num(el, "dspPolicy")
        if atype == "pulseaudio" and el.get("serverName"):
            props["server"] = el.get("serverName")
        if atype == "file" and el.get("path"):
            props["path"] = el.get("path")
        if atype == "sdl" and el.get("driver"):
            ctx.env["SDL_AUDIODRIVER"] = str(el.get("driver"))
        if atype == "pipewire" and el.get("runtimeDir"):
            ctx.env["PIPEWIRE_RUNTIME_DIR"] = str(el.get("runtimeDir"))
        for io in ("input", "output"):
            value = _io(el.find(io), atype)
            if value:
                props["in" if io == "input" else "out"] = value
        ctx.add("-audiodev", json_arg(props))
        ctx.audio_ids.append(aid)
    if ctx.defn.sounds and not ctx.audio_ids:
        ctx.add("-audiodev", json_arg({"id": "audio1", "driver": "none"}))
        ctx.audio_ids.append("audio1")


def dbus_daemon(ctx: BuildContext) -> tuple[HelperSpec, ...]:
    """The per-domain bus a dbus display or channel talks on, when it is virtbus' own
    (an ``address`` the XML names is someone else's bus, already running)."""
    own = f"unix:path={ctx.run_dir / (ctx.defn.uuid + '-dbus.sock')}"
    if ctx.dbus_address != own:
        return ()
    socket = ctx.run_dir / f"{ctx.defn.uuid}-dbus.sock"
    argv = (ctx.settings.dbus_daemon, "--session", "--nofork", "--nopidfile",
            f"--address={own}")  # fmt: skip
    return (HelperSpec("dbus-daemon", "dbus", argv, socket),)
