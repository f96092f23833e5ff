"""Input, video, sound, watchdog, RNG, panic and balloon devices (and the stable MACs of
NICs), with libvirt's device ids and defaults.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from lxml import etree

from drivers.memory import has_balloon
from drivers.qemu.argv_common import BuildContext, json_arg, kv_escape, unsupported
from drivers.qemu.argv_virtio import check_virtio_options_absent, virtio_props
from drivers.qemu.helpers import HelperSpec
from drivers.qemu.xmlnum import num
from virtbus.domain.model import Element
from virtbus.errors import ConfigUnsupported, XMLError

INPUT_DEVICES = {
    ("tablet", "usb"): "usb-tablet",
    ("mouse", "usb"): "usb-mouse",
    ("keyboard", "usb"): "usb-kbd",
    ("tablet", "virtio"): "virtio-tablet-pci",
    ("mouse", "virtio"): "virtio-mouse-pci",
    ("keyboard", "virtio"): "virtio-keyboard-pci",
}
WATCHDOG_ACTIONS = frozenset({"reset", "shutdown", "poweroff", "pause", "none", "inject-nmi"})


# ---------------------------------------------------------------------------- network


def generated_mac(prefix: str, uuid: str, index: int) -> str:
    """A stable MAC for interface ``index`` (same domain, same MAC on every build)."""
    digest = hashlib.sha256(f"{uuid}/{index}".encode()).digest()
    return prefix + "".join(f":{b:02x}" for b in digest[:3])


# ---------------------------------------------------------------------------- others


def build_inputs(ctx: BuildContext) -> None:
    for i, inp in enumerate(ctx.defn.inputs):
        el = inp.element
        bus = inp.bus or ("usb" if inp.type == "tablet" else "ps2")
        if inp.type == "evdev":
            src = el.find("source")
            dev = src.get("dev") if src is not None else None
            if not dev:
                raise ConfigUnsupported("<input type='evdev'> needs <source dev=...>")
            obj: dict[str, Any] = {"qom-type": "input-linux", "id": f"input{i}", "evdev": dev}
            if src is not None:
                if src.get("repeat") in ("on", "off"):
                    obj["repeat"] = src.get("repeat") == "on"
                if src.get("grab") == "all":
                    obj["grab_all"] = True
                if src.get("grabToggle"):
                    obj["grab-toggle"] = src.get("grabToggle")
            ctx.add("-object", json_arg(obj))
            ctx.host_devices.append(dev)
            continue
        if el.get("model") is not None and (
            bus != "virtio" or el.get("model") in ("virtio-transitional", "virtio-non-transitional")
        ):
            raise ConfigUnsupported(
                f"virtio (non-)transitional models are not supported for input type={inp.type}"
            )
        if bus == "ps2" and inp.type in ("mouse", "keyboard"):
            continue  # built into the i8042 of pc/q35
        if inp.type == "passthrough":
            if bus != "virtio":
                raise unsupported(f"<input type='passthrough' bus='{bus}'>")
            src = el.find("source")
            evdev = src.get("evdev") if src is not None else None
            if not evdev:
                raise ConfigUnsupported("<input type='passthrough'> needs <source evdev=...>")
            props = virtio_props("virtio-input-host", el, el.get("model")) | {
                "id": f"input{i}", "evdev": evdev,
            }  # fmt: skip
            ctx.host_devices.append(evdev)
            ctx.device(props | ctx.addr_props(el, "<input type='passthrough'>"))
            continue
        if bus == "virtio":
            base = {"tablet": "virtio-tablet", "mouse": "virtio-mouse",
                    "keyboard": "virtio-keyboard"}.get(inp.type)  # fmt: skip
            if base is None:
                raise unsupported(f"<input type='{inp.type}' bus='virtio'>")
            props = virtio_props(base, el, el.get("model")) | {"id": f"input{i}"}
            ctx.device(props | ctx.addr_props(el, f"<input type='{inp.type}'>"))
            continue
        if el.get("model") is not None:
            raise ConfigUnsupported(
                f"virtio (non-)transitional models are not supported for input type={inp.type}"
            )
        driver = INPUT_DEVICES.get((inp.type, bus))
        if driver is None:
            raise unsupported(f"<input type='{inp.type}' bus='{bus}'>")
        props = {"driver": driver, "id": f"input{i}"}
        if bus == "usb":
            props |= usb_props(ctx, el.find("address"))
        else:
            props |= ctx.addr_props(el, f"<input type='{inp.type}'>")
        ctx.device(props)


def usb_props(ctx: BuildContext, addr: Any) -> dict[str, Any]:
    """``bus``/``port`` of a USB device from its (completed) ``<address type='usb'>``."""
    if ctx.usb_bus is None:
        raise ConfigUnsupported("a USB device needs a USB controller")
    if addr is None or addr.get("type") != "usb":
        return {"bus": ctx.usb_bus}
    bus = num(addr, "bus", "0")
    alias = ctx.usb_aliases.get(bus)
    if alias is None:
        raise ConfigUnsupported(f"a USB device names USB bus {bus}, which has no controller")
    props: dict[str, Any] = {"bus": f"{alias}.0"}
    if addr.get("port"):
        props["port"] = str(addr.get("port"))
    return props


#: models with a VGA-compatible variant for the primary card, and the secondary variant
PRIMARY_VIDEO = {"vga": "VGA", "cirrus": "cirrus-vga", "vmvga": "vmware-svga",
                 "qxl": "qxl-vga", "virtio": "virtio-vga", "bochs": "bochs-display",
                 "ramfb": "ramfb"}  # fmt: skip
SECONDARY_VIDEO = {"qxl": "qxl", "virtio": "virtio-gpu"}


def _video_driver(ctx: BuildContext, vtype: str, primary: bool, vhost: bool,
                  accel3d: bool) -> tuple[str, bool]:  # fmt: skip
    """(driver, is virtio) as libvirt's qemuDeviceVideoGetModel picks them."""
    has = ctx.caps.has_device if ctx.caps is not None else (lambda _name: True)
    if vtype == "virtio" and primary:
        primary = has("vhost-user-vga" if vhost else "virtio-vga")
    if vhost:
        return ("vhost-user-vga", False) if primary else ("vhost-user-gpu-pci", True)
    if primary:
        model = PRIMARY_VIDEO.get(vtype)
        if model == "virtio-vga" and accel3d and has("virtio-vga-gl"):
            model = "virtio-vga-gl"
        if model is None:
            raise unsupported(f"<video><model type='{vtype}'>")
        return model, vtype == "virtio"
    model = SECONDARY_VIDEO.get(vtype)
    if model is None:
        raise ConfigUnsupported(f"video type '{vtype}' is only valid as primary video device")
    if model == "virtio-gpu":
        return ("virtio-gpu-gl-pci" if accel3d and has("virtio-gpu-gl-pci")
                else "virtio-gpu-pci"), True  # fmt: skip
    return model, False


def _kib(model: Element, attr: str) -> int:
    return num(model, attr, "0", maximum=1 << 40) if model.get(attr) else 0


def _check_video(vtype: str, model: Element, video: Element) -> None:
    """libvirt's domain_validate.c and qemu_validate.c video checks."""
    accel = model.find("acceleration")
    if accel is not None and accel.get("accel2d") == "yes":
        raise ConfigUnsupported("qemu does not support the accel2d setting")
    driver = video.find("driver")
    vhost = driver is not None and driver.get("name") == "vhostuser"
    if vhost and vtype != "virtio":
        raise ConfigUnsupported("'vhostuser' driver is only supported with 'virtio' device")
    if not vhost and accel is not None and accel.get("rendernode"):
        raise ConfigUnsupported("unsupported rendernode accel attribute without 'vhostuser'")
    if accel is not None and accel.get("accel3d") == "yes" and vtype != "virtio" and not vhost:
        raise ConfigUnsupported("3d acceleration is supported only with 'virtio' video device")
    if vtype != "qxl":
        for attr in ("ram", "vram64", "vgamem"):
            if _kib(model, attr):
                raise ConfigUnsupported(f"{attr} attribute only supported for video type qxl")
    else:
        vgamem = _kib(model, "vgamem")
        if vgamem and vgamem < 1024:
            raise ConfigUnsupported("value for 'vgamem' must be at least 1 MiB (1024 KiB)")
        if vgamem & (vgamem - 1):
            raise ConfigUnsupported("value for 'vgamem' must be power of two")
        for attr in ("vram", "ram"):
            if _kib(model, attr) > 0xFFFFFFFF // 1024:
                limit = 0xFFFFFFFF // 1024
                raise ConfigUnsupported(f"value for '{attr}' must be less than '{limit}'")
    if vtype in ("vga", "vmvga") and 0 < _kib(model, "vram") < 1024:
        raise ConfigUnsupported("value for 'vram' must be at least 1 MiB (1024 KiB)")
    res = model.find("resolution")
    if res is not None:
        if vtype not in ("vga", "qxl", "virtio", "bochs"):
            raise XMLError("model resolution is not supported")
        if not num(res, "x", "0") or not num(res, "y", "0"):
            raise ConfigUnsupported("video resolution values must be greater than 0")
    if vtype == "ramfb" and video.find("address") is not None:
        raise ConfigUnsupported("address not supported for video type ramfb")
    if vtype != "virtio":
        check_virtio_options_absent(video)
        if model.get("blob") is not None:
            raise ConfigUnsupported(f"video type '{vtype}' does not support blob resources")
    if vtype not in ("qxl", "virtio"):
        heads = model.get("heads")
        if heads is not None and heads != "1":
            raise ConfigUnsupported(f"video type '{vtype}' doesn't support multiple 'heads'")


def build_videos(ctx: BuildContext) -> None:
    """``-device`` per ``<video>``, as libvirt's qemuBuildVideoCommandLine builds them."""
    for i, video in enumerate(ctx.defn.videos):
        el = video.element
        model = el.find("model")
        vtype = (model.get("type") if model is not None else None) or "cirrus"
        if vtype == "none":
            continue
        if model is None:
            model = etree.SubElement(el, "model", type=vtype)
        _check_video(vtype, model, el)
        if vtype == "qxl" and ctx.caps is not None and not ctx.caps.spice:
            raise unsupported("<video><model type='qxl'> (this QEMU has no spice/qxl)")
        drv = el.find("driver")
        vhost = drv is not None and drv.get("name") == "vhostuser"
        accel = model.find("acceleration")
        accel3d = accel is not None and accel.get("accel3d") == "yes"
        primary = video.primary or i == 0
        if not primary and vtype not in SECONDARY_VIDEO:
            raise ConfigUnsupported(f"video type '{vtype}' is only valid as primary video device")
        driver, virtio = _video_driver(ctx, vtype, primary, vhost, accel3d)
        ctx.require_device(driver)
        vid = f"video{i}"
        props: dict[str, Any] = (
            virtio_props(driver, el, suffix=False) if virtio else {"driver": driver}
        )
        props["id"] = vid
        heads = num(model, "heads", "1")
        if vtype in ("qxl", "virtio") and heads:
            props["max_outputs"] = heads
        if vtype == "qxl":
            props |= {"ram_size": _kib(model, "ram") * 1024,
                      "vram_size": _kib(model, "vram") * 1024,
                      "vram64_size_mb": _kib(model, "vram64") // 1024,
                      "vgamem_mb": _kib(model, "vgamem") // 1024}  # fmt: skip
            if not props["ram_size"]:
                del props["ram_size"]
            if not props["vram_size"]:
                del props["vram_size"]
        elif vhost:
            chardev = f"chr-vu-{vid}"
            socket = ctx.socket_path(f"{vid}-vhost-user-gpu.sock")
            ctx.add("-chardev", f"socket,id={chardev},path={kv_escape(str(socket))}")
            props["chardev"] = chardev
            ctx.helpers.append(_vhost_user_gpu(ctx, vid, socket, accel))
        elif vtype in ("vga", "vmvga") and _kib(model, "vram"):
            props["vgamem_mb"] = _kib(model, "vram") // 1024
        elif vtype == "bochs" and _kib(model, "vram"):
            props["vgamem"] = _kib(model, "vram") * 1024
        elif vtype == "virtio" and model.get("blob") in ("on", "off"):
            props["blob"] = model.get("blob") == "on"
        res = model.find("resolution")
        if res is not None:
            props |= {"xres": num(res, "x"), "yres": num(res, "y")}
        if driver != "ramfb":
            preferred = (1 if ctx.q35 else 2) if i == 0 else None
            props |= ctx.pci_props(el.find("address"), f"video #{i}", preferred)
        ctx.device(props)


def _vhost_user_gpu(ctx: BuildContext, vid: str, socket: Path,
                    accel: Element | None) -> HelperSpec:  # fmt: skip
    """The vhost-user-gpu backend QEMU connects to (libvirt runs it per video device)."""
    argv = [ctx.settings.vhost_user_gpu, f"--socket-path={socket}"]
    if accel is not None and accel.get("rendernode"):
        argv.append(f"--render-node={accel.get('rendernode')}")
    if accel is not None and accel.get("accel3d") == "yes":
        argv.append("--virgl")
    return HelperSpec("vhost-user-gpu", vid, tuple(argv), socket)


HDA = {"ich9": "ich9-intel-hda", "ich6": "intel-hda", "ich7": "intel-hda"}
CODECS = {"duplex": "hda-duplex", "micro": "hda-micro", "output": "hda-output"}


def build_sounds(ctx: BuildContext) -> None:
    for i, sound in enumerate(ctx.defn.sounds):
        el = sound.element
        audio_el = el.find("audio")
        audio = (
            f"audio{num(audio_el, 'id', maximum=255)}" if audio_el is not None else ctx.audio_ids[0]
        )
        model = sound.model
        sid = f"sound{i}"
        if model in HDA:
            ctx.device({"driver": HDA[model], "id": sid} | ctx.addr_props(el, "sound"))
            codecs = el.findall("codec") or [None]
            for n, codec in enumerate(codecs):
                ctype = codec.get("type", "duplex") if codec is not None else "duplex"
                if ctype not in CODECS:
                    raise XMLError(f"invalid <codec type='{ctype}'>")
                ctx.device({"driver": CODECS[ctype], "id": f"{sid}-codec{n}", "bus": f"{sid}.0",
                            "cad": n, "audiodev": audio})  # fmt: skip
        elif model in ("ac97", "es1370"):
            ctx.device({"driver": "AC97" if model == "ac97" else "ES1370", "id": sid,
                        "audiodev": audio} | ctx.addr_props(el, "sound"))  # fmt: skip
        elif model == "sb16":
            ctx.device({"driver": "sb16", "id": sid, "audiodev": audio})
        elif model == "pcspk":
            continue  # a machine property (pcspk-audiodev)
        elif model == "usb":
            props: dict[str, Any] = {"driver": "usb-audio", "id": sid, "audiodev": audio}
            if el.get("multichannel") in ("yes", "no"):
                props["multi"] = el.get("multichannel") == "yes"
            ctx.device(props | usb_props(ctx, el.find("address")))
        elif model == "virtio":
            props = virtio_props("virtio-sound", el) | {"id": sid, "audiodev": audio}
            if el.get("streams"):
                props["streams"] = num(el, "streams")
            ctx.device(props | ctx.addr_props(el, "sound"))
        else:
            raise unsupported(f"<sound model='{model}'>")


def build_watchdogs(ctx: BuildContext) -> None:
    """Watchdog devices; q35's built-in iTCO is a pin strap, not a device. QEMU has one
    watchdog action, so every watchdog must ask for the same one (libvirt's rule)."""
    dogs = ctx.defn.watchdogs
    if not dogs:
        return
    actions = {wd.action or "reset" for wd in dogs}
    if len(actions) > 1:
        raise ConfigUnsupported("watchdogs with different actions are not supported")
    action = actions.pop()
    if action not in WATCHDOG_ACTIONS:
        raise unsupported(f"<watchdog action='{action}'>")
    itco = False
    for i, wd in enumerate(dogs):
        if wd.model == "itco":
            if not ctx.q35:
                raise ConfigUnsupported("the iTCO watchdog exists only on q35 machines")
            itco = True
        elif wd.model == "i6300esb":
            ctx.device(
                {"driver": "i6300esb", "id": f"watchdog{i}"}
                | ctx.addr_props(wd.element, "watchdog")
            )
        elif wd.model == "ib700":
            ctx.device({"driver": "ib700", "id": f"watchdog{i}"})
        else:
            raise unsupported(f"<watchdog model='{wd.model}'> on this machine")
    if itco:
        ctx.add("-global", "ICH9-LPC.noreboot=off")
    ctx.add("-action", f"watchdog={action}")


def build_rngs(ctx: BuildContext) -> None:
    for i, rng in enumerate(ctx.defn.rngs):
        el = rng.element
        if rng.model not in ("virtio", "virtio-transitional", "virtio-non-transitional"):
            raise unsupported(f"<rng model='{rng.model}'>")
        obj: dict[str, Any] = {"id": f"objrng{i}"}
        if rng.backend_model in (None, "random"):
            obj |= {"qom-type": "rng-random", "filename": rng.backend_path or "/dev/urandom"}
            obj = {"qom-type": obj.pop("qom-type"), **obj}
        elif rng.backend_model == "builtin":
            obj["qom-type"] = "rng-builtin"
            obj = {"qom-type": obj.pop("qom-type"), **obj}
        elif rng.backend_model == "egd":
            from drivers.qemu.argv_chardev import _backend as chardev_backend
            from virtbus.domain.model import CharDevice

            backend = el.find("backend")
            assert backend is not None
            src = backend.find("source")
            cd = CharDevice(kind="rng", index=i, type=backend.get("type", "pty"),
                            source_path=src.get("path") if src is not None else None,
                            source_mode=src.get("mode") if src is not None else None,
                            source_host=src.get("host") if src is not None else None,
                            source_service=src.get("service") if src is not None else None,
                            protocol=backend.find("protocol").get("type")
                            if backend.find("protocol") is not None else None,
                            target_type=None, target_port=None, target_name=None,
                            element=backend)  # fmt: skip
            value, _path = chardev_backend(ctx, cd, f"charrng{i}", f"rng{i}.sock")
            ctx.add("-chardev", value)
            obj = {"qom-type": "rng-egd", "id": f"objrng{i}", "chardev": f"charrng{i}"}
        else:
            raise unsupported(f"<rng><backend model='{rng.backend_model}'>")
        ctx.add("-object", json_arg(obj))
        props = virtio_props("virtio-rng", el, rng.model if rng.model != "virtio" else None)
        props |= {"rng": f"objrng{i}", "id": f"rng{i}"}
        rate = el.find("rate")
        if rate is not None and rate.get("bytes"):
            props["max-bytes"] = num(rate, "bytes")
            props["period"] = num(rate, "period", "1000")
        ctx.device(props | ctx.addr_props(el, "rng"))


def build_panics(ctx: BuildContext) -> None:
    seen: set[str] = set()
    for panic in ctx.defn.panics:
        model = panic.model or "isa"
        if model in seen:
            raise XMLError(f"Multiple panic devices with model '{model}'")
        seen.add(model)
        if model == "isa":
            props: dict[str, Any] = {"driver": "pvpanic"}
            a = panic.element.find("address")
            if a is not None and a.get("type") == "isa" and a.get("iobase"):
                props["ioport"] = num(a, "iobase", hex_ok=True)
            ctx.device(props)
        elif model == "pvpanic":
            ctx.device({"driver": "pvpanic-pci"} | ctx.addr_props(panic.element, "<panic>"))
        elif model == "hyperv":
            continue  # a CPU flag (hv-crash)
        else:
            raise unsupported(f"<panic model='{model}'> on x86")


def build_memballoon(ctx: BuildContext) -> bool:
    """virtio balloon (libvirt adds one when ``<memballoon>`` is absent); True if present."""
    bal = ctx.defn.memballoon
    if not has_balloon(ctx.defn):
        return False
    if bal is not None and bal.model not in ("virtio", "virtio-transitional",
                                             "virtio-non-transitional"):  # fmt: skip
        raise unsupported(f"<memballoon model='{bal.model}'>")
    if bal is None:
        props: dict[str, Any] = {"driver": "virtio-balloon-pci"}
    else:
        props = virtio_props("virtio-balloon", bal.element,
                             bal.model if bal.model != "virtio" else None)  # fmt: skip
    props["id"] = "balloon0"
    if bal is not None and bal.autodeflate is not None:
        props["deflate-on-oom"] = bal.autodeflate
    if bal is not None and bal.element.get("freePageReporting") in ("on", "off"):
        props["free-page-reporting"] = bal.element.get("freePageReporting") == "on"
    ctx.device(props | (ctx.addr_props(bal.element, "memballoon") if bal is not None else {}))
    return True
