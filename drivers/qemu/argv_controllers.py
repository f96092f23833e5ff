"""Controllers on the command line, in libvirt's order (PCI, USB, SCSI, IDE, SATA,
virtio-serial), then USB hubs and CCID controllers, which plug into USB.

Every controller already has its index, model and address (:mod:`drivers.qemu.postparse`);
this module maps models to QEMU devices and names them with libvirt's aliases
(``pci.N``, ``usb``/``usbN``, ``scsiN``, ``sataN``, ``virtio-serialN``, ``ccidN``), the
ids other devices' ``bus`` properties refer to.
"""

from __future__ import annotations

from typing import Any

from drivers.qemu import addresses as ad
from drivers.qemu.argv_common import BuildContext, unsupported
from drivers.qemu.argv_virtio import onoff, virtio_props
from drivers.qemu.xmlnum import attr_int, num_text
from virtbus.domain.model import Element
from virtbus.errors import ConfigUnsupported

USB_DEVICES = {
    "piix3-uhci": "piix3-usb-uhci", "piix4-uhci": "piix4-usb-uhci", "ehci": "usb-ehci",
    "ich9-ehci1": "ich9-usb-ehci1", "ich9-uhci1": "ich9-usb-uhci1",
    "ich9-uhci2": "ich9-usb-uhci2", "ich9-uhci3": "ich9-usb-uhci3",
    "vt82c686b-uhci": "vt82c686b-usb-uhci", "pci-ohci": "pci-ohci",
    "nec-xhci": "nec-usb-xhci", "qemu-xhci": "qemu-xhci",
}  # fmt: skip
SCSI_DEVICES = {
    "lsilogic": "lsi", "lsisas1068": "mptsas1068", "lsisas1078": "megasas",
    "vmpvscsi": "pvscsi", "am53c974": "am53c974", "dc390": "dc-390",
}  # fmt: skip
_ORDER = ("pci", "usb", "scsi", "ide", "sata", "virtio-serial")
_TYPES = frozenset({*_ORDER, "fdc", "ccid"})


def _int(el: Element | None, name: str, default: int = 0) -> int:
    return attr_int(el, name, default)


def user_alias(el: Element) -> str | None:
    """A ``<alias name='ua-...'/>`` the user chose (libvirt uses it as the device id)."""
    a = el.find("alias")
    name = a.get("name") if a is not None else None
    return name if name and name.startswith("ua-") else None


def controller_alias(ctx: BuildContext, ctrl: Element) -> str:
    ctype, idx, model = ctrl.get("type", ""), _int(ctrl, "index"), ctrl.get("model")
    if ctype == "pci":
        if model == "pcie-root":
            return f"pcie.{idx}"
        if model == "pci-root":
            return f"pci.{idx}"
    if (ua := user_alias(ctrl)) is not None:
        return ua
    if ctype == "pci":
        return f"pci.{idx}"
    if ctype == "ide" and idx == 0 and not ctx.q35:
        return "ide"
    if ctype == "sata" and idx == 0 and ctx.q35:
        return "ide"
    if ctype == "usb" and idx == 0:
        return "usb"
    if ctype == "scsi" and idx == 0 and model == "ncr53c90":
        return "scsi"
    return f"{ctype}{idx}"


def register_aliases(ctx: BuildContext) -> None:
    """Record every controller's id before any device refers to it."""
    for ctrl in ctx.defn.elements("devices/controller"):
        ctype, idx = ctrl.get("type"), _int(ctrl, "index")
        alias = controller_alias(ctx, ctrl)
        if ctype == "pci":
            ctx.pci_buses[idx] = alias
        elif ctype == "usb" and ctrl.find("master") is None:
            ctx.usb_aliases.setdefault(idx, alias)
        elif ctype == "virtio-serial":
            ctx.vser_aliases[idx] = alias
    if 0 in ctx.usb_aliases:
        ctx.usb_bus = f"{ctx.usb_aliases[0]}.0"


def check_types(ctx: BuildContext) -> None:
    for ctrl in ctx.defn.elements("devices/controller"):
        if ctrl.get("type") not in _TYPES:
            raise unsupported(f"<controller type='{ctrl.get('type')}'>")


def build_controllers(ctx: BuildContext) -> None:
    ordered = ad.ordered_controllers(ctx.defn.root.find("devices"))
    for ctype in _ORDER:
        for ctrl in ordered:
            if ctrl.get("type") != ctype:
                continue
            props = _controller(ctx, ctrl)
            if props is not None:
                ctx.device(props | ctx.addr_props(ctrl, f"<controller type='{ctype}'>"))


def _controller(ctx: BuildContext, ctrl: Element) -> dict[str, Any] | None:
    ctype, idx, model = ctrl.get("type"), _int(ctrl, "index"), ctrl.get("model")
    alias = controller_alias(ctx, ctrl)
    if ctype == "pci":
        return _pci(ctrl, alias, model or "")
    if ctype == "usb":
        return _usb(ctx, ctrl, alias, model or "")
    if ctype == "scsi":
        if model in ("virtio-scsi", "virtio-transitional", "virtio-non-transitional"):
            props = virtio_props("virtio-scsi", ctrl, model if model != "virtio-scsi" else None)
            driver = ctrl.find("driver")
            if driver is not None:
                if driver.get("iothread"):
                    props["iothread"] = f"iothread{driver.get('iothread')}"
                for attr, prop in (("queues", "num_queues"), ("cmd_per_lun", "cmd_per_lun"),
                                   ("max_sectors", "max_sectors")):  # fmt: skip
                    if driver.get(attr):
                        props[prop] = _int(driver, attr)
                ioeventfd = onoff(driver, "ioeventfd", "<driver>")
                if ioeventfd is not None:
                    props["ioeventfd"] = ioeventfd
            props["id"] = alias
            return props
        if model == "ncr53c90" and idx == 0:
            return None
        if model not in SCSI_DEVICES:
            raise unsupported(f"<controller type='scsi' model='{model}'>")
        return {"driver": SCSI_DEVICES[str(model)], "id": alias}
    if ctype == "ide":
        if idx == 0 and not ctx.q35:
            return None  # the PIIX IDE of pc
        if idx > 0 and not ctx.q35:
            raise ConfigUnsupported(
                "Only a single IDE controller is supported for this machine type"
            )
        raise ConfigUnsupported(
            "IDE controllers are unsupported for this QEMU binary or machine type"
        )
    if ctype == "sata":
        if idx == 0 and ctx.q35:
            return None  # the ICH9 AHCI of q35
        return {"driver": "ahci", "id": alias}
    if ctype == "virtio-serial":
        props = virtio_props("virtio-serial", ctrl, model if model != "virtio" else None)
        props["id"] = alias
        if ctrl.get("ports"):
            props["max_ports"] = _int(ctrl, "ports")
        if ctrl.get("vectors"):
            props["vectors"] = _int(ctrl, "vectors")
        ctx.virtio_serial.add(idx)
        return props
    return None


def _pci(ctrl: Element, alias: str, model: str) -> dict[str, Any] | None:
    if model in ("pci-root", "pcie-root"):
        return None
    name_el = ctrl.find("model")
    name = name_el.get("name") if name_el is not None else None
    name = name or ad.PCI_MODEL_NAMES.get(model)
    if name is None:
        raise unsupported(f"<controller type='pci' model='{model}'>")
    target = ctrl.find("target")
    props: dict[str, Any] = {"driver": name}
    mem_reserve = target.get("memReserve") if target is not None else None
    if model == "pci-bridge":
        props["chassis_nr"] = _int(target, "chassisNr")
        if mem_reserve:
            props["mem-reserve"] = _int(target, "memReserve") * 1024
        props["id"] = alias
    elif model in ("pci-expander-bus", "pcie-expander-bus"):
        props |= {"bus_nr": _int(target, "busNr"), "id": alias}
        node = target.find("node") if target is not None else None
        if node is not None and node.text:
            props["numa_node"] = num_text(node)
    elif model in ("dmi-to-pci-bridge", "pcie-switch-upstream-port", "pcie-to-pci-bridge"):
        props["id"] = alias
    elif model in ("pcie-root-port", "pcie-switch-downstream-port"):
        props |= {"port": _int(target, "port"), "chassis": _int(target, "chassis"), "id": alias}
        hotplug = onoff(target, "hotplug", "<target>")
        if hotplug is not None:
            props["hotplug"] = hotplug
        if mem_reserve:
            props["mem-reserve"] = _int(target, "memReserve") * 1024
    else:
        raise unsupported(f"<controller type='pci' model='{model}'>")
    return props


def _usb(ctx: BuildContext, ctrl: Element, alias: str, model: str) -> dict[str, Any] | None:
    if model == "none":
        return None
    if model not in USB_DEVICES:
        raise unsupported(f"<controller type='usb' model='{model}'>")
    props: dict[str, Any] = {"driver": USB_DEVICES[model]}
    if ctrl.get("ports"):
        if model not in ("nec-xhci", "qemu-xhci"):
            raise ConfigUnsupported(
                f"usb controller type '{model}' doesn't support 'ports' with this QEMU binary"
            )
        props |= {"p2": _int(ctrl, "ports"), "p3": _int(ctrl, "ports")}
    master = ctrl.find("master")
    if master is not None:
        idx = _int(ctrl, "index")
        master_alias = ctx.usb_aliases.get(idx)
        if master_alias is None:
            raise ConfigUnsupported("masterbus not found")
        props |= {"masterbus": f"{master_alias}.0", "firstport": _int(master, "startport")}
    else:
        props["id"] = alias
    return props


def build_hubs(ctx: BuildContext) -> None:
    for i, hub in enumerate(ctx.defn.elements("devices/hub")):
        if hub.get("type") != "usb":
            raise unsupported(f"<hub type='{hub.get('type')}'>")
        hub_id = user_alias(hub) or f"hub{i}"
        ctx.device({"driver": "usb-hub", "id": hub_id} | ctx.addr_props(hub, "<hub>"))


def build_ccid(ctx: BuildContext) -> None:
    for ctrl in ad.ordered_controllers(ctx.defn.root.find("devices")):
        if ctrl.get("type") == "ccid":
            props = {"driver": "usb-ccid", "id": controller_alias(ctx, ctrl)}
            ctx.device(props | ctx.addr_props(ctrl, "<controller type='ccid'>"))


def usb_master_checks(ctx: BuildContext) -> None:
    """ICH9 UHCI companions need their EHCI master (libvirt's check)."""
    ctrls = [c for c in ctx.defn.elements("devices/controller") if c.get("type") == "usb"]
    for ctrl in ctrls:
        if ctrl.get("model", "").startswith("ich9-uhci"):
            idx = _int(ctrl, "index")
            if not any(c.find("master") is None and _int(c, "index") == idx for c in ctrls):
                raise ConfigUnsupported("No master USB controller specified")
