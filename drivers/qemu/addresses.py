"""Device addresses as libvirt's QEMU driver assigns them at define
(``qemuDomainAssignAddresses``): virtio-serial ports, PCI slots (adding the
``pcie-root-port``\\ s, bridges and their options a topology needs), USB ports (adding
hubs when the controllers run out of ports) and DIMM slots.

The results are written into the definition as ``<address>`` elements and
``<controller>``\\ s, exactly where libvirt writes them, so ``dumpxml`` shows the layout
the guest gets and later changes to the XML do not move existing devices. Running it on
a definition that already has every address changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from lxml import etree

from drivers.qemu import pci_address as pa
from drivers.qemu.pci_address import Addr, AddressSet, F
from drivers.qemu.xmlnum import attr_int
from virtbus.domain.model import Element
from virtbus.errors import ConfigUnsupported, XMLError

PCI = F.PCI_DEVICE | F.AUTOASSIGN
PCIE = F.PCIE_DEVICE | F.AUTOASSIGN
USB2 = ("ich9-ehci1", "ich9-uhci1", "ich9-uhci2", "ich9-uhci3")
USB_PORTS = {
    "piix3-uhci": 2, "piix4-uhci": 2, "vt82c686b-uhci": 2, "ehci": 6, "ich9-ehci1": 6,
    "pci-ohci": 3, "nec-xhci": 4, "qemu-xhci": 4, "qusb1": 8, "qusb2": 8,
}  # fmt: skip
HUB_PORTS = 8
USB_MAX_DEPTH = 4
PCI_MODEL_NAMES = {
    "pci-bridge": "pci-bridge",
    "dmi-to-pci-bridge": "i82801b11-bridge",
    "pcie-to-pci-bridge": "pcie-pci-bridge",
    "pcie-root-port": "pcie-root-port",
    "pcie-switch-upstream-port": "x3130-upstream",
    "pcie-switch-downstream-port": "xio3130-downstream",
    "pci-expander-bus": "pxb",
    "pcie-expander-bus": "pxb-pcie",
}


def is_q35(machine: str) -> bool:
    return machine == "q35" or machine.startswith("pc-q35-")


def is_i440fx(machine: str) -> bool:
    return machine == "pc" or machine.startswith(("pc-i440fx-", "pc-0.", "pc-1."))


# ---------------------------------------------------------------------------- <address>


def _int(el: Element | None, name: str, default: int = 0) -> int:
    return attr_int(el, name, default)


def address_of(el: Element) -> Element | None:
    return el.find("address")


def pci_address(el: Element) -> tuple[str, Addr | None]:
    """``("none"|"wanted"|"pci"|<type>, addr)`` for a device's ``<address>``."""
    a = el.find("address")
    if a is None:
        return "none", None
    atype = a.get("type")
    if atype != "pci":
        return atype or "none", None
    if a.find("zpci") is not None:
        raise ConfigUnsupported("This QEMU binary doesn't support zPCI")
    addr = Addr(_int(a, "domain"), _int(a, "bus"), _int(a, "slot"), _int(a, "function"))
    if addr.domain > 0xFFFF:
        raise XMLError(f"Invalid PCI address domain='{a.get('domain')}', must be <= 0xFFFF")
    if addr.bus > 0xFF:
        raise XMLError(f"Invalid PCI address bus='{a.get('bus')}', must be <= 0xFF")
    if addr.slot > pa.SLOT_LAST:
        raise XMLError(f"Invalid PCI address slot='{a.get('slot')}', must be <= 0x1F")
    if addr.function > pa.FUNCTION_LAST:
        raise XMLError(f"Invalid PCI address function={a.get('function')}, must be <= 7")
    multi = a.get("multifunction")
    addr.multi = None if multi is None else multi == "on"
    if (addr.domain, addr.bus, addr.slot, addr.function) == (0, 0, 0, 0):
        return "wanted", None
    return "pci", addr


def set_pci_address(el: Element, addr: Addr) -> None:
    a = el.find("address")
    if a is None:
        a = etree.SubElement(el, "address")
    a.attrib.clear()
    a.set("type", "pci")
    a.set("domain", f"{addr.domain:#06x}")
    a.set("bus", f"{addr.bus:#04x}")
    a.set("slot", f"{addr.slot:#04x}")
    a.set("function", f"{addr.function:#x}")
    if addr.multi is not None:
        a.set("multifunction", "on" if addr.multi else "off")


def _children(devices: Element | None, tag: str) -> list[Element]:
    return [] if devices is None else devices.findall(tag)


# ---------------------------------------------------------------------------- PCI


@dataclass(eq=False, slots=True)
class PciDev:
    """One device that may take a PCI address: its element and what it needs."""

    el: Element
    kind: str
    flags: int
    addr: Addr | None = None  # present (explicit, or assigned by the chipset rules)
    wanted: bool = True


def _controller_model(el: Element) -> str:
    return str(el.get("model", ""))


def connect_flags(kind: str, el: Element, pcie: int) -> int:
    """``qemuDomainDeviceCalculatePCIConnectFlags`` for x86 (virtio is PCIe-capable)."""
    virtio = pcie
    model = el.get("model") or ""
    if kind == "controller":
        ctype = el.get("type")
        if ctype == "pci":
            return pa.CONTROLLER_CONNECT.get(model, pa.NONE)
        if ctype in ("sata", "ide"):
            return PCI
        if ctype == "usb":
            if model in ("nec-xhci", "qemu-xhci"):
                return pcie
            return pa.NONE if model in ("none", "qusb1", "qusb2") else PCI
        if ctype == "scsi":
            if model in ("virtio-scsi", "virtio-non-transitional"):
                return virtio
            return pa.NONE if model in ("ncr53c90", "") else PCI
        if ctype == "virtio-serial":
            return PCI if model == "virtio-transitional" else virtio
        return pa.NONE
    if kind == "filesystem":
        driver = el.find("driver")
        dtype = driver.get("type") if driver is not None else None
        if dtype == "virtiofs":
            return virtio
        if dtype in (None, "path", "handle"):
            return PCI if model == "virtio-transitional" else virtio
        return pa.NONE
    if kind == "interface":
        nmodel = _sub(el, "model", "type") or ""
        if el.get("type") == "hostdev" or nmodel == "usb-net":
            return pa.NONE
        if nmodel in ("virtio", "virtio-non-transitional"):
            return virtio
        if nmodel == "virtio-transitional":
            return PCI
        if nmodel in ("e1000e", "igb", ""):
            return pcie
        return PCI
    if kind == "sound":
        if model in ("es1370", "ac97", "ich6", "ich9"):
            return PCI
        return virtio if model == "virtio" else pa.NONE
    if kind == "disk":
        if disk_bus(el) != "virtio":
            return pa.NONE
        return PCI if model == "virtio-transitional" else virtio
    if kind == "hostdev":
        stype = el.get("type")
        if el.get("mode", "subsystem") != "subsystem" or stype not in ("pci", "scsi_host", "mdev"):
            return pa.NONE
        if stype == "scsi_host":
            return PCI if model == "virtio-transitional" else virtio
        return pcie
    if kind == "memballoon":
        if model == "virtio-transitional":
            return PCI
        return virtio if model in ("virtio", "virtio-non-transitional") else pa.NONE
    if kind == "rng":
        return PCI if model == "virtio-transitional" else virtio
    if kind == "watchdog":
        return PCI if model == "i6300esb" else pa.NONE
    if kind == "video":
        vtype = _sub(el, "model", "type") or ""
        if vtype == "virtio":
            return virtio
        if vtype in ("vga", "cirrus", "vmvga", "xen", "vbox", "qxl", "parallels"):
            return PCI
        return pcie if vtype == "bochs" else pa.NONE
    if kind == "shmem":
        return PCI
    if kind == "input":
        if el.get("bus") != "virtio":
            return pa.NONE
        return PCI if model == "virtio-transitional" else virtio
    if kind == "serial":
        return PCI if _sub(el, "target", "type") == "pci-serial" else pa.NONE
    if kind == "iommu":
        return virtio | F.INTEGRATED if model == "virtio" else pa.NONE
    if kind == "vsock":
        return PCI if model == "virtio-transitional" else virtio
    if kind == "memory":
        return virtio if model in ("virtio-pmem", "virtio-mem") else pa.NONE
    if kind == "crypto":
        return PCI
    if kind == "panic":
        return PCI | F.INTEGRATED if model == "pvpanic" else pa.NONE
    if kind == "pstore":
        return PCI
    return pa.NONE


def _sub(el: Element, child: str, attr: str) -> str | None:
    c = el.find(child)
    return c.get(attr) if c is not None else None


def disk_bus(el: Element) -> str:
    target = el.find("target")
    bus = target.get("bus") if target is not None else None
    if bus:
        return str(bus)
    dev = target.get("dev", "") if target is not None else ""
    return {"vd": "virtio", "sd": "scsi", "hd": "ide", "fd": "fdc"}.get(dev[:2], "ide")


#: PCI slot assignment order of libvirt (qemuDomainAssignDevicePCISlots); controllers of
#: type pci first, the other controllers after sound, as libvirt does
_ORDER = (
    "filesystem", "interface", "sound", "controller", "disk", "hostdev", "memballoon",
    "rng", "watchdog", "video", "shmem", "input", "serial", "iommu", "vsock", "memory",
    "crypto", "panic", "pstore",
)  # fmt: skip


def ordered_controllers(devices: Element | None) -> list[Element]:
    """Controllers in libvirt's list order: grouped by type (first appearance), each
    group by index (``virDomainControllerInsertPreAlloced``)."""
    ctrls = _children(devices, "controller")
    types: list[str] = []
    for c in ctrls:
        if c.get("type", "") not in types:
            types.append(c.get("type", ""))
    out: list[Element] = []
    for t in types:
        group = [c for c in ctrls if c.get("type", "") == t]
        out += sorted(group, key=lambda c: (_int(c, "index", 0), c.find("master") is not None))
    return out


class PciPlan:
    """One run of libvirt's ``qemuDomainAssignPCIAddresses`` over a definition."""

    def __init__(self, root: Element, machine: str) -> None:
        self.root = root
        self.devices = root.find("devices")
        self.q35 = is_q35(machine)
        self.i440fx = is_i440fx(machine)

    # -- device list ------------------------------------------------------------
    def _pcie_flags(self) -> int:
        return PCIE if self._root_model() == "pcie-root" else PCI

    def _root_model(self) -> str | None:
        for c in _children(self.devices, "controller"):
            if c.get("type") == "pci" and _int(c, "index", 0) == 0:
                model = c.get("model")
                return str(model) if model is not None else None
        return None

    def collect(self) -> list[PciDev]:
        pcie = self._pcie_flags()
        devs: list[PciDev] = []
        d = self.devices
        if d is None:
            return devs
        for kind in ("disk", "interface", "sound", "hostdev", "video"):
            for el in d.findall(kind):
                if kind == "interface" and el.get("type") == "hostdev":
                    dev = self._dev("hostdev", el, pcie)
                    dev.flags = pcie  # a PCI device of the host behind a NIC
                    devs.append(dev)
                    continue
                devs.append(self._dev(kind, el, pcie))
        for el in ordered_controllers(d):
            devs.append(self._dev("controller", el, pcie))
        for el in d:
            if not isinstance(el.tag, str):
                continue
            tag = el.tag
            if tag in (
                "serial",
                "filesystem",
                "input",
                "watchdog",
                "memballoon",
                "rng",
                "shmem",
                "panic",
                "memory",
                "iommu",
                "vsock",
                "crypto",
                "pstore",
            ):
                devs.append(self._dev(tag, el, pcie))
        return devs

    @staticmethod
    def _dev(kind: str, el: Element, pcie: int) -> PciDev:
        atype, addr = pci_address(el)
        dev = PciDev(el, kind, connect_flags(kind, el, pcie))
        if atype == "pci":
            dev.addr, dev.wanted = addr, False
        elif atype not in ("none", "wanted"):
            dev.wanted = False
        return dev

    # -- the address set ---------------------------------------------------------
    def _new_set(self, nbuses: int, dry_run: bool, devs: list[PciDev]) -> AddressSet:
        addrs = AddressSet(nbuses, dry_run=dry_run)
        has_pcie_root = False
        for c in _children(self.devices, "controller"):
            if c.get("type") != "pci":
                continue
            idx = _int(c, "index", 0)
            if idx >= nbuses:
                continue
            target = c.find("target")
            hotplug = target is None or target.get("hotplug") != "off"
            addrs.buses[idx].set_model(c.get("model", "pci-root"), hotplug)
            has_pcie_root |= c.get("model") == "pcie-root"
        if nbuses and addrs.buses[0].model is None:
            addrs.buses[0].set_model("pci-root")
        default = "pcie-root-port" if has_pcie_root else "pci-bridge"
        for bus in addrs.buses[1:]:
            if bus.model is None:
                bus.set_model(default)
        for dev in devs:
            if dev.addr is None:
                continue
            flags = dev.flags or F.PCI_DEVICE
            a = dev.addr
            if (
                dev.kind == "controller"
                and (a.bus, a.slot) == (0, 1)
                and self._piix3_builtin(dev.el, a)
            ):
                if addrs.buses and not addrs.buses[0].flags & F.PCI_DEVICE:
                    raise ConfigUnsupported(
                        "Bus 0 must be PCI for integrated PIIX3 USB or IDE controllers"
                    )
                continue
            addrs.reserve(Addr(a.domain, a.bus, a.slot, a.function), flags)
        return addrs

    @staticmethod
    def _piix3_builtin(el: Element, a: Addr) -> bool:
        ctype, idx, model = el.get("type"), _int(el, "index", 0), el.get("model")
        return (ctype == "ide" and idx == 0 and a.function == 1) or (
            ctype == "usb" and idx == 0 and model in (None, "piix3-uhci") and a.function == 2
        )

    # -- chipset rules -----------------------------------------------------------------
    def _chipset(self, addrs: AddressSet, devs: list[PciDev]) -> None:
        if self.i440fx:
            self._piix3(addrs, devs)
        elif self.q35:
            self._ich9(addrs, devs)

    def _primary_video(self, addrs: AddressSet, devs: list[PciDev], slot: int, flags: int) -> None:
        videos = [d for d in devs if d.kind == "video"]
        if not videos:
            return
        primary = videos[0]
        vtype = _sub(primary.el, "model", "type")
        if vtype in ("none", "ramfb") or not primary.wanted:
            return
        addr = Addr(slot=slot)
        addrs.validate(addr, flags, True)
        if addrs.in_use(addr):
            found = addrs.reserve_next(primary.flags)
            if addrs.dry_run:
                return
            primary.addr = found
        else:
            addrs.reserve(addr, flags)
            primary.addr = addr
        primary.wanted = False

    def _piix3(self, addrs: AddressSet, devs: list[PciDev]) -> None:
        flags = F.AUTOASSIGN | F.PCI_DEVICE
        for dev in devs:
            if dev.kind != "controller":
                continue
            ctype, idx, model = dev.el.get("type"), _int(dev.el, "index", 0), dev.el.get("model")
            if ctype == "ide" and idx == 0:
                fixed, what = Addr(slot=1, function=1), "Primary IDE controller"
            elif ctype == "usb" and idx == 0 and model in (None, "piix3-uhci"):
                fixed, what = Addr(slot=1, function=2), "PIIX3 USB controller at index 0"
            else:
                continue
            if dev.addr is not None:
                if not dev.addr.same(fixed):
                    raise XMLError(f"{what} must have PCI address 0:0:1.{fixed.function}")
            else:
                dev.addr, dev.wanted = fixed, False
            if addrs.buses:
                addrs.reserve(Addr(0, 0, 1, fixed.function), flags)
        if addrs.buses:
            addrs.reserve(Addr(slot=1), flags)
            addrs.reserve(Addr(slot=1, function=3), flags)
        self._primary_video(addrs, devs, 2, flags)

    def _ich9(self, addrs: AddressSet, devs: list[PciDev]) -> None:
        flags = F.PCIE_DEVICE
        for dev in devs:
            if dev.kind != "controller":
                continue
            ctype, model, idx = dev.el.get("type"), dev.el.get("model"), _int(dev.el, "index", 0)
            if ctype == "sata" and idx == 0:
                fixed = Addr(slot=0x1F, function=2)
                if dev.addr is not None:
                    if not dev.addr.same(fixed):
                        raise XMLError("Primary SATA controller must have PCI address 0:0:1f.2")
                else:
                    dev.addr, dev.wanted = fixed, False
            elif ctype == "usb" and model == "ich9-uhci1" and dev.el.find("address") is None:
                for slot in (0x1D, 0x1A):
                    a = Addr(slot=slot)
                    if not addrs.in_use(a):
                        addrs.reserve(a, flags)
                        dev.addr, dev.wanted = Addr(slot=slot, multi=True), False
                        break
            elif ctype == "pci" and model == "dmi-to-pci-bridge" and dev.wanted:
                a = Addr(slot=0x1E)
                if dev.el.find("address") is None and not addrs.in_use(a):
                    addrs.reserve(a, flags)
                    dev.addr, dev.wanted = a, False
        if addrs.buses:
            addrs.reserve(Addr(slot=0x1F, multi=True), flags)
            addrs.reserve(Addr(slot=0x1F, function=3), flags)
        self._primary_video(addrs, devs, 1, flags)
        a = Addr(slot=0x1B)
        if not addrs.in_use(a):
            for dev in devs:
                if dev.kind == "sound" and dev.el.get("model") == "ich9" and dev.wanted:
                    addrs.reserve(a, flags)
                    dev.addr, dev.wanted = a, False
                    break

    # -- slots for everything else -------------------------------------------------
    def _assign_slots(self, addrs: AddressSet, devs: list[PciDev]) -> None:
        def take(dev: PciDev) -> None:
            if addrs.dry_run:
                addrs.reserve_next(dev.flags)
            else:
                dev.addr, dev.wanted = addrs.reserve_next(dev.flags), False

        by_kind: dict[str, list[PciDev]] = {}
        for dev in devs:
            by_kind.setdefault(dev.kind, []).append(dev)
        ctrls = by_kind.get("controller", [])
        for dev in ctrls:
            if dev.el.get("type") == "pci" and dev.wanted and dev.el.get("model") not in (
                "pci-root", "pcie-root"
            ):  # fmt: skip
                take(dev)
        for kind in _ORDER:
            for dev in by_kind.get(kind, []):
                if not dev.wanted or not self._wants_slot(dev):
                    continue
                if kind == "controller" and dev.el.get("model") in USB2:
                    self._usb2(addrs, dev, ctrls)
                    continue
                a_el = dev.el.find("address")
                if kind == "disk" and a_el is not None and a_el.get("type") != "pci":
                    raise ConfigUnsupported(
                        "virtio disk cannot have an address of type "
                        f"'{dev.el.find('address').get('type')}'"
                    )
                take(dev)

    @staticmethod
    def _wants_slot(dev: PciDev) -> bool:
        el, kind = dev.el, dev.kind
        if kind == "controller":
            ctype, model = el.get("type"), el.get("model")
            if ctype == "pci" or ctype in ("fdc", "ccid"):
                return False
            if ctype == "usb" and model == "none":
                return False
            if ctype == "ide" and _int(el, "index", 0) == 0:
                return False
            return not (ctype == "scsi" and model == "ncr53c90")
        if kind == "filesystem":
            return _sub(el, "driver", "type") != "mtp"
        if kind == "interface":
            return _sub(el, "model", "type") != "usb-net" and el.get("type") != "hostdev"
        if kind == "sound":
            return el.get("model") not in ("sb16", "pcspk", "usb")
        if kind == "hostdev":
            if el.tag == "interface":
                return True
            stype = el.get("type")
            if el.get("mode", "subsystem") != "subsystem":
                return False
            if stype == "mdev":
                return bool(el.get("model") == "vfio-pci")
            return stype in ("pci", "scsi_host")
        if kind == "memballoon":
            return el.get("model") in ("virtio", "virtio-transitional", "virtio-non-transitional")
        if kind == "video":
            return _sub(el, "model", "type") not in ("none", "ramfb")
        return bool(dev.flags)

    def _usb2(self, addrs: AddressSet, dev: PciDev, ctrls: list[PciDev]) -> None:
        idx = _int(dev.el, "index", 0)
        fn, multi = {
            "ich9-ehci1": (7, None),
            "ich9-uhci1": (0, True),
            "ich9-uhci2": (1, None),
            "ich9-uhci3": (2, None),
        }[dev.el.get("model", "")]
        found = next(
            (c.addr for c in ctrls
             if c.el.get("type") == "usb" and c.el.get("model") in USB2
             and _int(c.el, "index", 0) == idx and c.addr is not None),
            None,
        )  # fmt: skip
        if found is not None:
            a = Addr(found.domain, found.bus, found.slot, fn, multi)
            addrs.reserve(a, dev.flags)
            if not addrs.dry_run:
                dev.addr, dev.wanted = a, False
        else:
            a = addrs.reserve_next(dev.flags, fn)
            a.multi = multi
            if not addrs.dry_run:
                dev.addr, dev.wanted = a, False

    # -- the whole thing -------------------------------------------------------------
    def run(self) -> None:
        pci_ctrls = [c for c in _children(self.devices, "controller") if c.get("type") == "pci"]
        max_idx = max((_int(c, "index", 0) for c in pci_ctrls), default=-1)
        nbuses = max_idx + 1
        if nbuses > 0:
            devs = self.collect()
            addrs = self._new_set(nbuses, True, devs)
            self._chipset(addrs, devs)
            if self._root_model() == "pci-root" and not all(
                b.fully_reserved() for b in addrs.buses
            ):
                addrs.reserve_next(PCI)  # a slot kept free for a future bridge
            self._assign_slots(addrs, devs)
            if (
                max_idx <= 0
                and len(addrs.buses) > max_idx + 1
                and self._root_model() == ("pcie-root")
            ):
                addrs.reserve_next(PCIE)  # one empty pcie-root-port for hotplug
            i = 1
            while i < len(addrs.buses):
                if self._add_controller(i, addrs.buses[i].model or "pci-bridge"):
                    el = self._pci_controller(i)
                    assert el is not None
                    flags = connect_flags("controller", el, self._pcie_flags())
                    if addrs.buses[i].model not in ("pci-root", "pcie-root"):
                        addrs.reserve_next(flags)
                i += 1
            nbuses = len(addrs.buses)
            self._chipset_persist(devs)
        devs = self.collect()
        addrs = self._new_set(nbuses, False, devs)
        self._chipset(addrs, devs)
        self._assign_slots(addrs, devs)
        self._write(devs)
        self._set_all_multi(devs)
        self._controller_defaults()
        for el in self._all_pci():
            _, a = pci_address(el)
            if a is not None:
                set_pci_address(el, a)  # libvirt writes every field

    def _chipset_persist(self, devs: list[PciDev]) -> None:
        """Addresses the chipset rules set in the dry run stay (as in libvirt)."""
        self._write(devs)

    def _pci_controller(self, index: int) -> Element | None:
        for c in _children(self.devices, "controller"):
            if c.get("type") == "pci" and _int(c, "index", 0) == index:
                return c
        return None

    def _add_controller(self, index: int, model: str) -> bool:
        if self._pci_controller(index) is not None:
            return False
        assert self.devices is not None
        el = etree.Element("controller", type="pci", index=str(index), model=model)
        insert_controller(self.devices, el)
        return True

    def _write(self, devs: list[PciDev]) -> None:
        for dev in devs:
            if (dev.addr is not None and dev.el.find("address") is None) or (
                dev.addr is not None and pci_address(dev.el)[0] == "wanted"
            ):
                set_pci_address(dev.el, dev.addr)

    def _set_all_multi(self, devs: list[PciDev]) -> None:
        fn0: dict[tuple[int, int, int], Element] = {}
        multi: set[tuple[int, int, int]] = set()
        for dev in self._all_pci():
            atype, a = pci_address(dev)
            if atype != "pci" or a is None:
                continue
            key = (a.domain, a.bus, a.slot)
            if a.function == 0:
                fn0[key] = dev
            else:
                multi.add(key)
        for key in multi:
            el = fn0.get(key)
            if el is not None:
                a_el = el.find("address")
                assert a_el is not None
                if a_el.get("multifunction") is None:
                    a_el.set("multifunction", "on")

    def _all_pci(self) -> Iterator[Element]:
        if self.devices is None:
            return
        for el in self.devices.iter():
            if isinstance(el.tag, str) and el.tag != "address":
                a = el.find("address")
                if a is not None and a.get("type") == "pci":
                    yield el

    def _controller_defaults(self) -> None:
        for c in _children(self.devices, "controller"):
            if c.get("type") != "pci":
                continue
            model, idx = c.get("model", ""), _int(c, "index", 0)
            name = PCI_MODEL_NAMES.get(model)
            model_el = c.find("model")
            if name is not None and (model_el is None or not model_el.get("name")):
                if model_el is None:
                    model_el = etree.Element("model")
                    c.insert(0, model_el)
                model_el.set("name", name)
            _, a = pci_address(c)
            target = c.find("target")
            want: dict[str, str] = {}
            if model == "pci-bridge":
                want["chassisNr"] = str(idx)
            elif model == "pcie-root-port" and a is not None:
                want |= {"chassis": str(idx), "port": f"{(a.slot << 3) + a.function:#x}"}
            elif model == "pcie-switch-downstream-port" and a is not None:
                want |= {"chassis": str(idx), "port": f"{a.slot:#x}"}
            elif model in ("pci-expander-bus", "pcie-expander-bus") and (
                target is None or target.get("busNr") is None
            ):
                bus_nr = self._new_bus_nr()
                if bus_nr < 0:
                    raise ConfigUnsupported(
                        "No free busNr lower than current lowest busNr is available to "
                        f"auto-assign to bus {a.bus if a else 0}. Must be manually assigned"
                    )
                want["busNr"] = str(bus_nr)
            missing = {k: v for k, v in want.items() if target is None or target.get(k) is None}
            if missing:
                if target is None:
                    target = etree.Element("target")
                    addr_el = c.find("address")
                    if addr_el is not None:
                        addr_el.addprevious(target)
                    else:
                        c.append(target)
                for k, v in missing.items():
                    target.set(k, v)
            if model == "pci-bridge" and a is not None and idx <= a.bus:
                raise ConfigUnsupported(
                    f"PCI controller at index {idx} ({idx:#04x}) has bus='{a.bus:#04x}', but "
                    "index must be larger than bus"
                )

    def _new_bus_nr(self) -> int:
        lowest = 256
        for c in _children(self.devices, "controller"):
            if c.get("type") == "pci":
                target = c.find("target")
                if target is not None and target.get("busNr") is not None:
                    lowest = min(lowest, _int(target, "busNr"))
        return -1 if lowest <= 2 else lowest - 2


def insert_controller(devices: Element, el: Element) -> None:
    """Place a new controller after the last controller (else after the disks)."""
    ctrls = devices.findall("controller")
    same = [c for c in ctrls if c.get("type") == el.get("type")]
    anchor = (same or ctrls or devices.findall("disk") or devices.findall("emulator") or [None])[-1]
    if anchor is None:
        devices.insert(0, el)
    else:
        anchor.addnext(el)
    el.tail = anchor.tail if anchor is not None else None


# ---------------------------------------------------------------------------- USB


def usb_port_path(el: Element) -> tuple[int, tuple[int, ...]] | None:
    """``(bus, (port, ...))`` of a device's ``<address type='usb'>`` (None: unassigned)."""
    a = el.find("address")
    if a is None or a.get("type") != "usb":
        return None
    port = a.get("port")
    if not port:
        return None
    try:
        path = tuple(int(p) for p in port.split("."))
    except ValueError:
        raise ConfigUnsupported(f"Cannot parse <address> 'port' attribute '{port}'") from None
    if len(path) > USB_MAX_DEPTH or any(p < 1 for p in path):
        raise ConfigUnsupported("Cannot parse <address> 'port' attribute")
    return _int(a, "bus", 0), path


class _Hub:
    def __init__(self, nports: int) -> None:
        self.used = [False] * nports
        self.hubs: list[_Hub | None] = [None] * nports


def usb_devices(devices: Element | None, *, hubs: bool) -> list[Element]:
    """USB devices in libvirt's iteration order (``virDomainDeviceInfoIterate``)."""
    if devices is None:
        return []
    out: list[Element] = []
    order = ("disk", "interface", "sound", "hostdev", "controller", "serial", "input",
             "filesystem", "hub", "redirdev")  # fmt: skip
    for tag in order:
        for el in devices.findall(tag):
            if tag == "hub" and not hubs:
                continue
            if _is_usb(tag, el):
                out.append(el)
    return out


def _is_usb(tag: str, el: Element) -> bool:
    if tag == "hub":
        return bool(el.get("type") == "usb")
    if tag == "hostdev":
        return bool(el.get("type") == "usb")
    if tag == "disk":
        return disk_bus(el) == "usb"
    if tag == "interface":
        return bool(_sub(el, "model", "type") == "usb-net")
    if tag == "controller":
        return bool(el.get("type") == "ccid")
    if tag == "input":
        return bool(el.get("bus") == "usb")
    if tag == "serial":
        return bool(_sub(el, "target", "type") == "usb-serial")
    if tag == "sound":
        return bool(el.get("model") == "usb")
    if tag == "redirdev":
        return bool(el.get("bus", "usb") == "usb")
    if tag == "filesystem":
        return bool(_sub(el, "driver", "type") == "mtp")
    return False


class UsbPlan:
    """libvirt's ``qemuDomainAssignUSBAddresses``: hubs first, then every device."""

    def __init__(self, root: Element) -> None:
        self.devices = root.find("devices")
        self.buses: dict[int, _Hub] = {}

    def _controllers(self) -> list[Element]:
        return [c for c in ordered_controllers(self.devices) if c.get("type") == "usb"]

    def run(self, *, assign: bool) -> None:
        """Check the USB topology; ``assign`` also gives every device a port (libvirt does
        that when the domain starts, and keeps them out of the persistent XML)."""
        devices = self.devices
        if devices is None:
            return
        ctrls = self._controllers()
        has_usb = bool(ctrls) and not any(c.get("model") == "none" for c in ctrls)
        devs = usb_devices(devices, hubs=True)
        if devs and not has_usb:
            raise ConfigUnsupported(
                "USB is disabled for this domain, but USB devices are present in the domain XML"
            )
        if not devs:
            return
        if assign:
            self._add_hubs(devices, ctrls)
        for c in ctrls:
            ports = self._ports(c)
            if ports == 0:
                continue
            idx = _int(c, "index", 0)
            if idx in self.buses:
                raise XMLError(f"Duplicate USB controllers with index {idx}")
            self.buses[idx] = _Hub(ports)
        for hub in devices.findall("hub"):
            if hub.get("type") == "usb" and usb_port_path(hub) is not None:
                self._add_hub(hub)
        for el in usb_devices(devices, hubs=False):
            self._reserve(el)
        if not assign:
            return
        for hub in devices.findall("hub"):
            if hub.get("type") == "usb" and usb_port_path(hub) is None:
                self._assign(hub)
                self._add_hub(hub)
        for el in usb_devices(devices, hubs=False):
            a = el.find("address")
            if a is not None and a.get("type") not in ("usb",):
                continue
            if usb_port_path(el) is None:
                self._assign(el)

    @staticmethod
    def _ports(ctrl: Element) -> int:
        model = ctrl.get("model", "piix3-uhci")
        if model in ("nec-xhci", "qemu-xhci", "qusb1", "qusb2") and ctrl.get("ports"):
            return _int(ctrl, "ports")
        return USB_PORTS.get(model, 0)

    def _add_hubs(self, devices: Element, ctrls: list[Element]) -> None:
        available = sum(self._ports(c) for c in ctrls)
        available += HUB_PORTS * sum(1 for h in devices.findall("hub") if h.get("type") == "usb")
        count = len(usb_devices(devices, hubs=True))
        if count > available:
            needed = -(-(count - available + 1) // (HUB_PORTS - 1))
            for _ in range(needed):
                hub = etree.Element("hub", type="usb")
                last = (devices.findall("hub") or devices.findall("redirdev")
                        or devices.findall("hostdev") or devices.findall("video")
                        or devices.findall("input") or list(devices)[-1:])[-1]  # fmt: skip
                last.addnext(hub)
                hub.tail = last.tail

    def _find(self, bus: int, path: tuple[int, ...], port_str: str) -> tuple[_Hub, int]:
        hub = self.buses.get(bus)
        if hub is None:
            raise XMLError(f"Missing USB bus {bus}")
        for p in path[:-1]:
            if p - 1 >= len(hub.used):
                raise XMLError(f"port {p} out of range in USB address bus: {bus} port: {port_str}")
            nxt = hub.hubs[p - 1]
            if nxt is None:
                raise XMLError(
                    f"there is no hub at port {p} in USB address bus: {bus} port: {port_str}"
                )
            hub = nxt
        target = path[-1] - 1
        if target >= len(hub.used):
            raise XMLError(f"requested USB port {port_str} not present on USB bus {bus}")
        return hub, target

    def _add_hub(self, el: Element) -> None:
        found = usb_port_path(el)
        if found is None:
            raise XMLError("Wrong address type for USB hub")
        bus, path = found
        port_str = ".".join(map(str, path))
        hub, target = self._find(bus, path, port_str)
        if hub.hubs[target] is not None:
            raise XMLError(f"Duplicate USB hub on bus {bus} port {port_str}")
        hub.used[target] = True
        hub.hubs[target] = _Hub(HUB_PORTS)

    def _reserve(self, el: Element) -> None:
        found = usb_port_path(el)
        if found is None:
            return
        bus, path = found
        port_str = ".".join(map(str, path))
        hub, target = self._find(bus, path, port_str)
        if hub.used[target]:
            raise XMLError(f"Duplicate USB address bus {bus} port {port_str}")
        hub.used[target] = True

    def _assign(self, el: Element) -> None:
        a = el.find("address")
        buses = sorted(self.buses)
        if a is not None and a.get("type") == "usb":
            bus = _int(a, "bus", 0)
            if bus not in self.buses:
                raise XMLError(
                    f"USB bus {bus} requested but no controller with that index is present"
                )
            buses = [bus]
        for bus in buses:
            path = self._free(self.buses[bus], 0)
            if path is not None:
                if a is None:
                    a = etree.SubElement(el, "address")
                a.attrib.clear()
                a.set("type", "usb")
                a.set("bus", str(bus))
                a.set("port", ".".join(map(str, path)))
                self._reserve(el)
                return
        raise ConfigUnsupported("No free USB ports")

    def _free(self, hub: _Hub, level: int) -> tuple[int, ...] | None:
        for i, used in enumerate(hub.used):
            if not used:
                return (i + 1,)
        if level >= USB_MAX_DEPTH - 1:
            return None
        for i, sub in enumerate(hub.hubs):
            if sub is None:
                continue
            rest = self._free(sub, level + 1)
            if rest is not None:
                return (i + 1, *rest)
        return None


# ---------------------------------------------------------------------------- virtio-serial


def assign_virtio_serial(root: Element, *, consoles: bool) -> None:
    """Consoles first (port 0 is theirs), then channels: the lowest free port of the
    first controller with one (``virDomainVirtioSerialAddrAutoAssign``). libvirt keeps
    the consoles' ports out of the persistent XML: ``consoles`` assigns them (at start)."""
    devices = root.find("devices")
    if devices is None:
        return
    ctrls: dict[int, int] = {}  # index -> max ports
    for c in ordered_controllers(devices):
        if c.get("type") == "virtio-serial":
            ctrls[_int(c, "index", 0)] = _int(c, "ports", 31) if c.get("ports") else 31
    used: dict[int, set[int]] = {i: set() for i in ctrls}
    ports = [el for el in devices.findall("console") + devices.findall("channel")
             if _sub(el, "target", "type") == "virtio"]  # fmt: skip
    for el in ports:
        a = el.find("address")
        if a is not None and a.get("type") == "virtio-serial" and a.get("port"):
            ctrl = _int(a, "controller", 0)
            if ctrl not in used:
                raise XMLError(f"virtio serial controller {ctrl} is missing")
            port = _int(a, "port")
            if port in used[ctrl]:
                raise XMLError(f"virtio serial port {port} is already occupied")
            used[ctrl].add(port)
    for want_console in (True, False) if consoles else (False,):
        for el in ports:
            if (el.tag == "console") != want_console:
                continue
            a = el.find("address")
            if a is not None and a.get("type") == "virtio-serial" and a.get("port"):
                continue
            first = 0 if want_console else 1
            if a is not None and a.get("type") == "virtio-serial" and a.get("controller"):
                order = [_int(a, "controller")]
            else:
                order = sorted(ctrls)
            for ctrl in order:
                if ctrl not in ctrls:
                    raise XMLError(f"virtio serial controller {ctrl} is missing")
                free = next((p for p in range(first, ctrls[ctrl]) if p not in used[ctrl]), None)
                if free is None:
                    continue
                used[ctrl].add(free)
                if a is None:
                    a = etree.SubElement(el, "address")
                a.attrib.clear()
                a.set("type", "virtio-serial")
                a.set("controller", str(ctrl))
                a.set("bus", "0")
                a.set("port", str(free))
                break
            else:
                if a is not None and a.get("type") == "virtio-serial" and a.get("controller"):
                    raise XMLError("Unable to find a free virtio-serial port")
                new = next(i for i in range(len(ctrls) + 1) if i not in ctrls)
                ctrl_el = etree.Element("controller", type="virtio-serial", index=str(new))
                insert_controller(devices, ctrl_el)
                ctrls[new], used[new] = 31, {first}
                if a is None:
                    a = etree.SubElement(el, "address")
                a.attrib.clear()
                for key, value in (("type", "virtio-serial"), ("controller", str(new)),
                                   ("bus", "0"), ("port", str(first))):  # fmt: skip
                    a.set(key, value)


def assign_memory_slots(root: Element) -> None:
    """DIMMs of a domain with ``<maxMemory>`` get the lowest free slot (libvirt writes
    ``<address type='dimm' slot='N'/>`` at define)."""
    if root.find("maxMemory") is None:
        return
    devices = root.find("devices")
    dimms = [d for d in _children(devices, "memory") if d.get("model") in ("dimm", "nvdimm")]
    used = set()
    for d in dimms:
        a = d.find("address")
        if a is not None and a.get("type") == "dimm" and a.get("slot") is not None:
            slot = _int(a, "slot")
            if slot in used:
                raise XMLError(f"memory device slot '{slot}' is already being used")
            used.add(slot)
    for d in dimms:
        a = d.find("address")
        if a is not None and a.get("type") == "dimm" and a.get("slot") is not None:
            continue
        slot = next(i for i in range(len(dimms) + len(used) + 1) if i not in used)
        used.add(slot)
        if a is None:
            a = etree.SubElement(d, "address", type="dimm")
        a.set("slot", str(slot))
