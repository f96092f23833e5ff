"""What libvirt's QEMU driver fills into a definition at define time, filled the same way.

libvirt completes every definition before it stores it (``virDomainDefPostParse`` and
``qemuDomainDefPostParse``): index-less controllers get the lowest free index, the
controllers that disks, consoles and smartcards need are added, an x86 guest gets its USB
controller, PCI root and balloon, a guest with graphics but no ``<video>`` gets the
default one, models left out get their defaults, and finally every device gets an
address (:mod:`drivers.qemu.addresses`). XML written by virt-install, virt-manager or an
old ``virsh dumpxml`` relies on exactly that completion (an index-less
``pcie-root-port`` must not become a second ``pci.0``), so :func:`complete` does it
here, into the tree, before the command line is built. It is idempotent.
"""

from __future__ import annotations

import re
from pathlib import Path

from lxml import etree

from drivers.qemu import addresses as ad
from drivers.qemu import firmware as fw
from drivers.qemu.capabilities import QemuCapabilities
from drivers.qemu.xmlnum import attr_int, num, num_text
from virtbus.domain import DomainDefinition
from virtbus.domain.model import Element
from virtbus.errors import ConfigUnsupported, XMLError

_DISK_PREFIXES = ("fd", "hd", "vd", "sd", "xvd", "ubd")
_BUS_BY_PREFIX = {
    "hd": "ide",
    "fd": "fdc",
    "vd": "virtio",
    "xvd": "xen",
    "sd": "scsi",
    "ubd": "uml",
}
XHCI_MAX_PORTS = 15
VIDEO_RAM = {"vga": 16384, "cirrus": 16384, "vmvga": 16384, "bochs": 16384, "xen": 4096,
             "qxl": 65536}  # fmt: skip
QXL_VGAMEM = 16384


def machine_of(root: Element) -> str:
    t = root.find("os/type")
    return (t.get("machine") if t is not None else None) or "pc"


def complete(defn: DomainDefinition, *, live: bool = False,
             firmware: tuple[fw.Descriptor, ...] | None = None,
             nvram_dir: Path = Path("/var/lib/virtbus/nvram"),
             caps: QemuCapabilities | None = None) -> None:  # fmt: skip
    """Fill in what libvirt fills in at define (see module docstring); XMLError or
    CONFIG_UNSUPPORTED for what libvirt refuses while doing so. ``live`` also assigns
    what libvirt assigns only when a domain starts (USB ports, virtio console ports).
    ``firmware`` are the host's QEMU firmware descriptors, ``caps`` the emulator's
    devices (None: not known here, assume libvirt's usual choices)."""
    with defn.edit() as root:
        complete_tree(root, live=live, firmware=firmware, nvram_dir=nvram_dir, caps=caps)


def complete_tree(root: Element, *, live: bool = False,
                  firmware: tuple[fw.Descriptor, ...] | None = None,
                  nvram_dir: Path = Path("/var/lib/virtbus/nvram"),
                  caps: QemuCapabilities | None = None) -> None:  # fmt: skip
    devices = root.find("devices")
    if devices is None:
        devices = etree.SubElement(root, "devices")
    machine = machine_of(root)
    _numa_memory(root)
    fw.fill(root, firmware, nvram_dir)
    _controller_indexes(devices)
    _reject_duplicate_controllers(devices)
    _disks(devices)
    _sort_disks(devices)
    _hostdev_scsi_addresses(devices)
    _implicit_controllers(devices)
    _implicit_video(devices)
    _default_devices(root, devices, machine, caps)
    _drop_generated_channel_paths(devices)
    for ctrl in devices.findall("controller"):
        _controller_defaults(ctrl, machine)
    for iface in devices.findall("interface"):
        _net_model(iface)
    _videos(devices)
    for serial in devices.findall("serial"):
        _serial_target(serial)
    for panic in devices.findall("panic"):
        if panic.get("model") is None:
            panic.set("model", "isa")
    _implicit_inputs(root, devices, machine)
    _default_audio(devices)
    _itco(devices, machine)
    ad.assign_virtio_serial(root, consoles=live)
    if machine != "isapc":
        ad.PciPlan(root, machine).run()
    ad.UsbPlan(root).run(assign=live)
    ad.assign_memory_slots(root)


# ---------------------------------------------------------------------------- controllers


def _int(el: Element | None, name: str, default: int = -1) -> int:
    return attr_int(el, name, default)


def _controller_indexes(devices: Element) -> None:
    """The lowest unused index per type; USB2 companions share the previous one's."""
    ctrls = devices.findall("controller")
    for pos, ctrl in enumerate(ctrls):
        if ctrl.get("index") is not None:
            if _int(ctrl, "index") < 0:
                raise XMLError(
                    f"Invalid value for attribute 'index' in element 'controller': "
                    f"'{ctrl.get('index')}'. Expected non-negative value"
                )
            continue
        ctype = ctrl.get("type")
        chosen: int | None = None
        if pos > 0 and ctype == "usb" and ctrl.get("model") in ad.USB2:
            prev = next((c for c in reversed(ctrls[:pos]) if c.get("type") == "usb"), None)
            if prev is not None and prev.get("model") in ad.USB2 and prev.get("index"):
                prev_idx = _int(prev, "index")
                clash = any(
                    c.get("type") == "usb" and c.get("index") is not None
                    and _int(c, "index") == prev_idx and c.get("model") == ctrl.get("model")
                    for c in ctrls
                )  # fmt: skip
                if not clash:
                    chosen = prev_idx
        if chosen is None:
            used = {_int(c, "index") for c in ctrls if c.get("type") == ctype and c.get("index")}
            chosen = next(i for i in range(len(ctrls) + 1) if i not in used)
        ctrl.set("index", str(chosen))


def _reject_duplicate_controllers(devices: Element) -> None:
    seen: set[tuple[str, int]] = set()
    for ctrl in devices.findall("controller"):
        ctype = ctrl.get("type", "")
        if ctype == "usb" and ctrl.get("model") in ad.USB2:
            continue  # companions share an index by design
        key = (ctype, _int(ctrl, "index", 0))
        if key in seen:
            raise XMLError(f"Multiple '{ctype}' controllers with index '{key[1]}'")
        seen.add(key)


def _find(devices: Element, ctype: str, index: int) -> Element | None:
    for c in devices.findall("controller"):
        if c.get("type") == ctype and _int(c, "index", 0) == index:
            return c
    return None


def add_controller(devices: Element, ctype: str, index: int, model: str | None = None) -> bool:
    if _find(devices, ctype, index) is not None:
        return False
    el = etree.Element("controller", type=ctype, index=str(index))
    if model is not None:
        el.set("model", model)
    ad.insert_controller(devices, el)
    return True


def _controller_defaults(ctrl: Element, machine: str) -> None:
    ctype, model = ctrl.get("type"), ctrl.get("model")
    idx = _int(ctrl, "index", 0)
    if ctype == "scsi" and model in (None, "auto", "default"):
        ctrl.set("model", "lsilogic")
    elif ctype == "usb":
        if model is None:
            ctrl.set("model", "piix3-uhci")
        elif model in ("qusb1", "qusb2"):
            raise ConfigUnsupported(
                "USB controller model type 'qusb1' or 'qusb2' is not supported in qemu"
            )
        if ctrl.get("model") in ("nec-xhci", "qemu-xhci") and _int(ctrl, "ports", 0) > (
            XHCI_MAX_PORTS
        ):
            raise ConfigUnsupported(
                f"'{ctrl.get('model')}' controller only supports up to '{XHCI_MAX_PORTS}' ports"
            )
    elif ctype == "pci":
        if model in ("pci-root", "pcie-root") and idx != 0:
            raise XMLError("pci-root and pcie-root controllers should have index 0")
        if model == "pci-expander-bus" and not ad.is_i440fx(machine):
            raise ConfigUnsupported(
                "pci-expander-bus controllers are only supported on 440fx-based machinetypes"
            )
        if model == "pcie-expander-bus" and not ad.is_q35(machine):
            raise ConfigUnsupported(
                "pcie-expander-bus controllers are not supported with this machine type"
            )
        node = ctrl.find("target/node")
        if node is not None and node.text is not None:
            root = ctrl.getroottree().getroot()
            ncells = len(root.findall("cpu/numa/cell"))
            if num_text(node) >= ncells:
                raise XMLError(
                    f"{model} with index {idx} is configured for a NUMA node ({node.text}) "
                    f"not present in the domain's <cpu><numa> array ({ncells})"
                )
    elif ctype in ("virtio-serial", "ide", "sata", "fdc") and ctrl.find("driver") is not None:
        drv = ctrl.find("driver")
        assert drv is not None
        if drv.get("iothread") is not None:
            raise XMLError("'iothread' attribute only supported for virtio scsi controllers")


# ---------------------------------------------------------------------------- disks


def parse_disk_name(dev: str) -> tuple[int, int] | None:
    """libvirt's ``virDiskNameParse``: vda -> (0, 0), sdaa -> (26, 0), vdb1 -> (1, 1)."""
    prefix = next((p for p in _DISK_PREFIXES if dev.startswith(p)), None)
    if prefix is None:
        return None
    rest = dev[len(prefix) :]
    letters = len(rest) - len(rest.lstrip("abcdefghijklmnopqrstuvwxyz"))
    if letters == 0:
        return None
    idx = 0
    for i, ch in enumerate(rest[:letters]):
        idx = (idx + (1 if i else 0)) * 26 + (ord(ch) - ord("a"))
        if idx > 2**31 - 1:
            return None
    digits = rest[letters:]
    if digits and (not digits.isdigit() or (len(digits) > 1 and digits[0] == "0")):
        return None
    return idx, int(digits) if digits else 0


def disk_name_index(dev: str) -> int:
    """libvirt's ``virDiskNameToIndex``: vda -> 0, sdaa -> 26; -1 if not a disk name."""
    parsed = parse_disk_name(dev)
    return -1 if parsed is None else parsed[0]


def _disks(devices: Element) -> None:
    for disk in devices.findall("disk"):
        target = disk.find("target")
        if target is None or not target.get("dev"):
            continue  # the generic parser reports it
        dev = str(target.get("dev"))
        if target.get("bus") is None:
            if disk.get("device") == "floppy":
                bus = "fdc"
            else:
                prefix = next((p for p in _DISK_PREFIXES if dev.startswith(p)), None)
                bus = _BUS_BY_PREFIX.get(prefix or "", "ide")
            target.set("bus", bus)
        bus = str(target.get("bus"))
        a = disk.find("address")
        if a is not None and a.get("type") == "drive":
            for key in ("controller", "bus", "target", "unit"):
                if a.get(key) is None:
                    a.set(key, "0")
        if a is not None or bus not in ("scsi", "ide", "sata", "fdc"):
            continue
        idx = disk_name_index(dev)
        if idx < 0:
            raise XMLError(f"Unknown disk name '{dev}' and no address specified")
        if bus == "scsi":
            ctrl, dbus, unit = idx // 7, 0, idx % 7
            _check_hostdev_scsi_clash(devices, dev, ctrl, unit)
        elif bus == "ide":
            ctrl, dbus, unit = idx // 4, (idx % 4) // 2, idx % 2
        elif bus == "sata":
            ctrl, dbus, unit = idx // 6, 0, idx % 6
        else:
            ctrl, dbus, unit = idx // 2, 0, idx % 2
        etree.SubElement(
            disk, "address", type="drive", controller=str(ctrl), bus=str(dbus), target="0",
            unit=str(unit),
        )  # fmt: skip


def _sort_disks(devices: Element) -> None:
    """libvirt keeps disks grouped by bus, each group in drive-name order
    (``virDomainDiskInsert``); their PCI slots and ``-device`` order follow it."""
    disks = devices.findall("disk")
    if len(disks) < 2:
        return
    keys: list[tuple[str | None, int]] = []
    for disk in disks:
        target = disk.find("target")
        assert target is not None
        keys.append((target.get("bus"), disk_name_index(target.get("dev", ""))))
    order: list[int] = []  # positions into disks, in libvirt's insertion order
    for i, (bus, idx) in enumerate(keys):
        at = -1
        for pos in range(len(order) - 1, -1, -1):
            other_bus, other_idx = keys[order[pos]]
            if other_bus == bus and other_idx > idx:
                at = pos
            elif other_bus == bus and at == -1:
                at = pos + 1
        order.insert(at if at >= 0 else len(order), i)
    if order == list(range(len(disks))):
        return
    sorted_disks = [disks[i] for i in order]
    anchor = etree.Element("anchor")
    disks[0].addprevious(anchor)
    tails = [d.tail for d in disks]
    for disk in disks:
        devices.remove(disk)
    for disk, tail in zip(sorted_disks, tails, strict=True):
        disk.tail = tail
        anchor.addprevious(disk)
    devices.remove(anchor)


def _check_hostdev_scsi_clash(devices: Element, dev: str, ctrl: int, unit: int) -> None:
    for hd in devices.findall("hostdev"):
        if hd.get("type") != "scsi":
            continue
        a = hd.find("address")
        if a is None or a.get("type") != "drive":
            continue
        if (_int(a, "controller", 0), _int(a, "bus", 0), _int(a, "target", 0),
                _int(a, "unit", 0)) == (ctrl, 0, 0, unit):  # fmt: skip
            raise ConfigUnsupported(
                f"using disk target name '{dev}' conflicts with SCSI host device address "
                f"controller='{ctrl}' bus='0' target='0' unit='{unit}"
            )


def _hostdev_scsi_addresses(devices: Element) -> None:
    """SCSI hostdevs without an address take the first free unit (libvirt's
    ``virDomainHostdevAssignAddress``: units 0-6 of each controller in turn)."""
    used: set[tuple[int, int, int, int]] = set()
    for el in devices.findall("disk") + devices.findall("hostdev"):
        a = el.find("address")
        if a is not None and a.get("type") == "drive":
            used.add((_int(a, "controller", 0), _int(a, "bus", 0), _int(a, "target", 0),
                      _int(a, "unit", 0)))  # fmt: skip
    for hd in devices.findall("hostdev"):
        if hd.get("type") != "scsi" or hd.find("address") is not None:
            continue
        ctrl = 0
        while True:
            unit = next((u for u in range(7) if (ctrl, 0, 0, u) not in used), None)
            if unit is not None:
                break
            ctrl += 1
        used.add((ctrl, 0, 0, unit))
        etree.SubElement(hd, "address", type="drive", controller=str(ctrl), bus="0",
                         target="0", unit=str(unit))  # fmt: skip


def _implicit_controllers(devices: Element) -> None:
    tops = {"scsi": -1, "fdc": -1, "ide": -1, "sata": -1}  # disk bus -> highest controller
    for disk in devices.iterchildren("disk"):
        target, a = disk.find("target"), disk.find("address")
        bus = target.get("bus") if target is not None else None
        if bus in tops and a is not None and a.get("type") == "drive":
            tops[bus] = max(tops[bus], _int(a, "controller", 0))
    for ctype, top in tops.items():  # libvirt's order: scsi, fdc, ide, sata
        for i in range(top + 1):
            add_controller(devices, ctype, i)
    for el in devices.findall("channel") + devices.findall("console"):
        target = el.find("target")
        if target is None or target.get("type") != "virtio":
            continue
        a = el.find("address")
        idx = _int(a, "controller", 0) if a is not None and a.get("type") == "virtio-serial" else 0
        add_controller(devices, "virtio-serial", idx)
    for card in devices.findall("smartcard"):
        a = card.find("address")
        if a is None:
            top = -1
            for other in devices.findall("smartcard"):
                oa = other.find("address")
                if oa is not None and oa.get("type") == "ccid" and _int(oa, "controller", 0) == 0:
                    top = max(top, _int(oa, "slot", 0))
            a = etree.SubElement(card, "address", type="ccid", controller="0", slot=str(top + 1))
        idx = _int(a, "controller", 0) if a.get("type") == "ccid" else 0
        add_controller(devices, "ccid", idx)
    # SCSI hostdevs: controllers up to the highest one used, all of the model of the
    # controller the highest-numbered hostdev so far sat on (libvirt keeps them alike)
    top, model = -1, None
    for hd in devices.findall("hostdev"):
        a = hd.find("address")
        if hd.get("type") == "scsi" and a is not None and a.get("type") == "drive":
            idx = _int(a, "controller", 0)
            if idx > top:
                top = idx
                ctrl = _find(devices, "scsi", idx)
                if ctrl is not None and ctrl.get("model") not in (None, "default"):
                    model = ctrl.get("model")
    for i in range(top + 1):
        add_controller(devices, "scsi", i, model)


# ---------------------------------------------------------------------------- defaults


def _default_usb_model(q35: bool, caps: QemuCapabilities | None) -> str | None:
    """q35 gets the best USB controller this QEMU has (``""``: none at all), pc the
    piix3 default."""
    if not q35:
        return None
    for model, device in (("qemu-xhci", "qemu-xhci"), ("nec-xhci", "nec-usb-xhci"),
                          ("ich9-ehci1", "ich9-usb-ehci1")):  # fmt: skip
        if caps is None or caps.has_device(device):
            return model
    return ""


def _default_devices(root: Element, devices: Element, machine: str,
                     caps: QemuCapabilities | None) -> None:  # fmt: skip
    q35 = ad.is_q35(machine)
    if machine != "isapc":
        usb = _default_usb_model(q35, caps)
        if _find(devices, "usb", 0) is None and usb != "":
            add_controller(devices, "usb", 0, usb)
        if q35:
            add_controller(devices, "sata", 0)
    root_ctrl = _find(devices, "pci", 0)
    want = "pcie-root" if q35 else ("pci-root" if ad.is_i440fx(machine) else None)
    if want is not None:
        if root_ctrl is not None:
            if root_ctrl.get("model") is None:
                root_ctrl.set("model", want)
            if root_ctrl.get("model") != want:
                raise XMLError(
                    f"The PCI controller with index='0' must be model='{want}' for this "
                    f"machine type, but model='{root_ctrl.get('model')}' was found instead"
                )
            if root_ctrl.find("address") is not None:
                raise ConfigUnsupported(
                    "pci-root and pcie-root controllers should not have an address"
                )
        else:
            add_controller(devices, "pci", 0, want)
    if devices.find("memballoon") is None:
        etree.SubElement(devices, "memballoon", model="virtio")


#: where libvirt generated virtio channel sockets, which older libvirt stored in the XML:
#: such a path is dropped (and generated again at start), as libvirt does
_GENERATED_CHANNEL_DIR = re.compile(
    r"^(/var)?/run/libvirt/qemu/channel|^/var/lib/libvirt/qemu/channel|^/etc/libvirt/qemu/channel"
)


def _drop_generated_channel_paths(devices: Element) -> None:
    for chan in devices.findall("channel"):
        target, src = chan.find("target"), chan.find("source")
        if chan.get("type") != "unix" or target is None or src is None:
            continue
        name, path = target.get("name"), src.get("path")
        if target.get("type") != "virtio" or not name or not path:
            continue
        prefix = _GENERATED_CHANNEL_DIR.match(path)
        rest = path[prefix.end() :] if prefix else ""
        if prefix and re.fullmatch(
            r"/(target/)?(([^/]+\.)|(domain-[^/]+/)|([0-9]+-[^/]+/))" + re.escape(name), rest
        ):
            del src.attrib["path"]


def _net_model(iface: Element) -> None:
    if iface.find("model") is not None:
        return
    itype = iface.get("type")
    if itype in ("vdpa", "vhostuser"):
        model = "virtio"
    elif itype == "hostdev":
        return
    else:
        model = "rtl8139"
    el = etree.Element("model", type=model)
    anchor = next(
        (c for t in ("target", "source", "mac") if (c := iface.find(t)) is not None), None
    )
    if anchor is not None:
        anchor.addnext(el)
    else:
        iface.insert(0, el)


def _implicit_video(devices: Element) -> None:
    if devices.find("graphics") is not None and devices.find("video") is None:
        video = etree.Element("video")
        etree.SubElement(video, "model", type="default")
        last = devices.findall("graphics")[-1]
        last.addnext(video)


def _videos(devices: Element) -> None:
    videos = devices.findall("video")
    if not videos:
        return
    primaries = [v for v in videos if _model(v).get("primary") == "yes"]
    if len(primaries) > 1:
        raise ConfigUnsupported("Only one primary video device is supported")
    if primaries and primaries[0] is not videos[0]:
        videos[0].addprevious(primaries[0])
        videos = devices.findall("video")
    types = [_model(v).get("type") for v in videos]
    if "none" in types and len(videos) > 1:
        raise ConfigUnsupported(
            "a 'none' video type must be the only video device defined for the domain"
        )
    for i, video in enumerate(videos):
        model = _model(video)
        vtype = model.get("type")
        if vtype in (None, "default"):
            model.set("type", vtype := "cirrus")
        if vtype == "none":
            continue
        ram = VIDEO_RAM.get(vtype)
        if vtype == "qxl" and model.get("ram") is None:
            model.set("ram", str(ram))
        if ram and model.get("vram") is None:
            model.set("vram", str(ram))
        if vtype == "qxl" and model.get("vgamem") is None:
            model.set("vgamem", str(QXL_VGAMEM))
        if model.get("heads") is None and vtype not in ("ramfb",):
            model.set("heads", "1")
        if i == 0:
            model.set("primary", "yes")


def _model(video: Element) -> Element:
    model = video.find("model")
    if model is None:
        model = etree.Element("model", type="default")
        video.insert(0, model)
    return model


def _serial_target(serial: Element) -> None:
    target = serial.find("target")
    if target is None:
        target = etree.SubElement(serial, "target")
    ttype = target.get("type")
    if ttype in (None, "isa-serial"):
        target.set("type", "isa-serial")
    models = {"isa-serial": "isa-serial", "usb-serial": "usb-serial", "pci-serial": "pci-serial",
              "isa-debug": "isa-debugcon"}  # fmt: skip
    model = target.find("model")
    name = models.get(str(target.get("type")))
    if model is None and name is not None:
        etree.SubElement(target, "model", name=name)
    if target.get("port") is None and target.get("type") == "isa-serial":
        ports = serial.getparent().findall("serial")
        taken = {_int(s.find("target"), "port") for s in ports
                 if s.find("target") is not None and s.find("target").get("port")}  # fmt: skip
        target.set("port", str(next(p for p in range(len(ports) + 1) if p not in taken)))


def _implicit_inputs(root: Element, devices: Element, machine: str) -> None:
    """The i8042 of pc/q35 has a PS/2 mouse and keyboard (libvirt lists them)."""
    ps2 = root.find("features/ps2")
    if machine == "isapc" or (ps2 is not None and ps2.get("state") == "off"):
        return
    for itype in ("mouse", "keyboard"):
        inputs = devices.findall("input")
        if any(i.get("type") == itype and i.get("bus", "ps2") == "ps2" for i in inputs):
            continue
        el = etree.Element("input", type=itype, bus="ps2")
        _place(devices, el, ("input", "channel", "console", "serial", "interface", "controller",
                             "disk"))  # fmt: skip


def _place(devices: Element, el: Element, after: tuple[str, ...]) -> None:
    for tag in after:
        found = devices.findall(tag)
        if found:
            found[-1].addnext(el)
            el.tail = found[-1].tail
            return
    devices.append(el)


def _default_audio(devices: Element) -> None:
    """libvirt's default audio backend: none, or spice with SPICE graphics."""
    if devices.find("audio") is not None:
        return
    backend: str | None = "none"
    graphics = devices.findall("graphics")
    if graphics:
        backend = None
        for g in graphics:
            if g.get("type") in ("vnc", "sdl"):
                backend = "none" if g.get("type") == "vnc" else None
            elif g.get("type") == "spice":
                backend = "spice"
    if backend is not None:
        el = etree.Element("audio", id="1", type=backend)
        _place(devices, el, ("sound", "video", "graphics", "input"))


def _itco(devices: Element, machine: str) -> None:
    """q35's ICH9 has the iTCO watchdog; libvirt lists it."""
    if not ad.is_q35(machine):
        return
    dogs = devices.findall("watchdog")
    if any(w.get("model") == "itco" for w in dogs):
        return
    action = dogs[0].get("action", "reset") if dogs else "reset"
    el = etree.Element("watchdog", model="itco", action=action)
    _place(devices, el, ("watchdog", "hub", "redirdev", "hostdev", "video", "sound", "graphics",
                         "input"))  # fmt: skip


def _numa_memory(root: Element) -> None:
    """With NUMA cells, ``<memory>`` is their sum plus the memory devices
    (``virDomainDefPostParseMemory``); ``<currentMemory>`` is clamped to it."""
    from virtbus.domain.units import to_kib

    cells = root.findall("cpu/numa/cell")
    if not cells:
        return
    total = sum(to_kib(num(c, "memory", "0"), c.get("unit", "KiB")) for c in cells)
    for dev in root.findall("devices/memory"):
        size = dev.find("target/size")
        if size is not None and size.text:
            total += to_kib(num_text(size), size.get("unit", "KiB"))
    mem = root.find("memory")
    if mem is None:
        mem = etree.Element("memory")
        name = root.find("uuid")
        (name if name is not None else root.find("name")).addnext(mem)
    mem.set("unit", "KiB")
    mem.text = str(total)
    cur = root.find("currentMemory")
    if cur is not None and cur.text and to_kib(num_text(cur), cur.get("unit", "KiB")) > total:
        cur.set("unit", "KiB")
        cur.text = str(total)
