"""Host devices given to the guest: PCI functions through VFIO (``<hostdev type='pci'>``
and ``<interface type='hostdev'>``), mediated devices, USB devices, SCSI devices (local
``/dev/sg*`` or iSCSI LUNs) and vhost-scsi targets, built as libvirt's
``qemuBuildHostdevCommandLine`` builds them.

Their argv needs nothing from the host; start does: every device the command line names
must exist (``QemuLaunch.host_devices``), and a missing one is a clear error instead of
a QEMU that fails to open it.
"""

from __future__ import annotations

from typing import Any

from drivers.qemu.argv_common import BuildContext, json_arg, unsupported
from drivers.qemu.argv_controllers import user_alias
from drivers.qemu.argv_virtio import onoff, virtio_props
from drivers.qemu.xmlnum import attr_int, num
from virtbus.domain.model import Element
from virtbus.errors import ConfigUnsupported, XMLError


def _int(el: Element | None, name: str, default: int = 0) -> int:
    return attr_int(el, name, default)


def pci_host_address(src: Element | None, what: str) -> str:
    a = src.find("address") if src is not None else None
    if a is None:
        raise XMLError(f"{what} needs <source><address>")
    return (f"{_int(a, 'domain'):04x}:{_int(a, 'bus'):02x}:{_int(a, 'slot'):02x}."
            f"{_int(a, 'function'):x}")  # fmt: skip


def _key(hd: Element) -> tuple[str, ...] | None:
    """What makes two hostdevs the same host device (libvirt refuses duplicates)."""
    src = hd.find("source")
    stype = hd.get("type")
    if src is None:
        return None
    if stype == "pci":
        return ("pci", pci_host_address(src, "<hostdev>"))
    if stype == "usb":
        a = src.find("address")
        vendor, product = src.find("vendor"), src.find("product")
        return ("usb", str(a.attrib) if a is not None else "",
                vendor.get("id", "") if vendor is not None else "",
                product.get("id", "") if product is not None else "")  # fmt: skip
    if stype == "scsi":
        adapter = src.find("adapter")
        a = src.find("address")
        return ("scsi", src.get("protocol", ""), src.get("name", ""),
                adapter.get("name", "") if adapter is not None else "",
                str(a.attrib) if a is not None else "")  # fmt: skip
    if stype == "mdev":
        a = src.find("address")
        return ("mdev", a.get("uuid", "") if a is not None else "")
    return None


def check_hostdevs(ctx: BuildContext) -> None:
    hostdevs = ctx.defn.elements("devices/hostdev")
    seen: set[tuple[str, ...]] = set()
    ramfb = 0
    for hd in hostdevs:
        mode, stype = hd.get("mode", "subsystem"), hd.get("type")
        if mode != "subsystem":
            raise unsupported(f"<hostdev mode='{mode}'> (capabilities mode is for LXC)")
        if stype not in ("pci", "usb", "scsi", "scsi_host", "mdev"):
            raise unsupported(f"<hostdev type='{stype}'>")
        key = _key(hd)
        if key is not None:
            if key in seen:
                raise XMLError("Hostdev already exists in the domain configuration")
            seen.add(key)
        if stype != "scsi" and hd.get("rawio"):
            raise XMLError("rawio is only supported for scsi host device")
        if stype != "scsi" and hd.get("sgio"):
            raise XMLError("sgio is only supported for scsi host device")
        a = hd.find("address")
        if stype == "mdev":
            src_a = hd.find("source/address")
            if src_a is None or not src_a.get("uuid"):
                raise ConfigUnsupported("Missing 'uuid' attribute for element <address>")
            model = hd.get("model")
            if model != "vfio-pci":
                raise unsupported(f"<hostdev type='mdev' model='{model}'> on x86")
            if a is not None and a.get("type") not in ("pci",):
                raise XMLError(
                    f"Unsupported address type '{a.get('type')}' with mediated device model "
                    f"'{model}'"
                )
            if hd.get("display") == "on" and not ctx.defn.graphics:
                raise ConfigUnsupported(
                    "graphics device is needed for attribute value 'display=on' in <hostdev>"
                )
        if hd.get("ramfb") == "on":
            ramfb += 1
        if stype == "scsi_host" and hd.find("boot") is not None:
            raise ConfigUnsupported(
                "booting from assigned devices is not supported by vhost SCSI devices"
            )
    if ramfb > 1:
        raise ConfigUnsupported("Only one vgpu device can have 'ramfb' enabled")
    drives: dict[tuple[int, int, int, int], str] = {}
    for hd in hostdevs:
        a = hd.find("address")
        if hd.get("type") != "scsi" or a is None or a.get("type") != "drive":
            continue
        drive = (_int(a, "controller"), _int(a, "bus"), _int(a, "target"), _int(a, "unit"))
        if drive in drives:
            raise ConfigUnsupported(
                f"SCSI host address controller='{drive[0]}' bus='{drive[1]}' "
                f"target='{drive[2]}' unit='{drive[3]}' in use by another SCSI host device"
            )
        drives[drive] = "hostdev"


def _rom(el: Element, props: dict[str, Any]) -> None:
    rom = el.find("rom")
    if rom is None:
        return
    if rom.get("bar") in ("on", "off"):
        props["rombar"] = 1 if rom.get("bar") == "on" else 0
    if rom.get("file") is not None:
        props["romfile"] = rom.get("file")
    if rom.get("enabled") == "no":
        props["romfile"] = ""


def _hostdev_id(el: Element, n: int) -> str:
    return user_alias(el) or f"hostdev{n}"


def build_net_hostdev(ctx: BuildContext, iface: Element, index: int, dev_id: str) -> None:
    """``<interface type='hostdev'>``: the VF behind it through VFIO."""
    src = iface.find("source")
    host = pci_host_address(src, f"<interface type='hostdev'> #{index}")
    props: dict[str, Any] = {"driver": "vfio-pci", "host": host, "id": dev_id}
    boot = ctx.bootindex.get(("interface", index))
    if boot is not None:
        props["bootindex"] = boot
    teaming = iface.find("teaming")
    if teaming is not None and teaming.get("type") == "transient" and teaming.get("persistent"):
        props["failover_pair_id"] = teaming.get("persistent")
    props |= ctx.addr_props(iface, f"interface #{index}")
    _rom(iface, props)
    ctx.device(props)
    ctx.host_devices.append(f"/sys/bus/pci/devices/{host}")


def build_hostdevs(ctx: BuildContext) -> None:
    n = sum(1 for i in ctx.defn.elements("devices/interface") if i.get("type") == "hostdev")
    for hd in ctx.defn.elements("devices/hostdev"):
        stype = hd.get("type")
        src = hd.find("source")
        a = hd.find("address")
        dev_id = _hostdev_id(hd, n)
        n += 1
        boot = hd.find("boot")
        bootindex = _int(boot, "order") if boot is not None else None
        props: dict[str, Any]
        if stype == "pci":
            if a is not None and a.get("type") == "unassigned":
                continue
            host = pci_host_address(src, "<hostdev type='pci'>")
            driver = hd.find("driver")
            if driver is not None and driver.get("name") not in (None, "vfio"):
                raise ConfigUnsupported(
                    f"invalid PCI passthrough type '{driver.get('name')}' (vfio is)"
                )
            ramfb = hd.get("ramfb") == "on"
            props = {"driver": "vfio-pci-nohotplug" if ramfb else "vfio-pci", "host": host,
                     "id": dev_id}  # fmt: skip
            if bootindex is not None:
                props["bootindex"] = bootindex
            teaming = hd.find("teaming")
            if teaming is not None and teaming.get("persistent"):
                props["failover_pair_id"] = teaming.get("persistent")
            if hd.get("display") in ("on", "off"):
                props["display"] = hd.get("display")
            if ramfb:
                props["ramfb"] = True
            props |= ctx.addr_props(hd, "<hostdev type='pci'>")
            _rom(hd, props)
            ctx.host_devices.append(f"/sys/bus/pci/devices/{host}")
        elif stype == "mdev":
            src_a = src.find("address") if src is not None else None
            uuid = src_a.get("uuid") if src_a is not None else None
            path = f"/sys/bus/mdev/devices/{uuid}"
            ramfb = hd.get("ramfb") == "on"
            props = {"driver": "vfio-pci-nohotplug" if ramfb else "vfio-pci", "id": dev_id,
                     "sysfsdev": path}  # fmt: skip
            if hd.get("display") in ("on", "off"):
                props["display"] = hd.get("display")
            if ramfb:
                props["ramfb"] = True
            if bootindex is not None:
                props["bootindex"] = bootindex
            props |= ctx.addr_props(hd, "<hostdev type='mdev'>")
            ctx.host_devices.append(path)
        elif stype == "usb":
            props = {"driver": "usb-host"}
            addr = src.find("address") if src is not None else None
            vendor = src.find("vendor") if src is not None else None
            product = src.find("product") if src is not None else None
            if addr is not None and addr.get("bus") and addr.get("device"):
                path = f"/dev/bus/usb/{_int(addr, 'bus'):03d}/{_int(addr, 'device'):03d}"
                props["hostdevice"] = path
                ctx.host_devices.append(path)
            elif vendor is not None and product is not None:
                props |= {"vendorid": num(vendor, "id", maximum=0xFFFF, hex_ok=True),
                          "productid": num(product, "id", maximum=0xFFFF, hex_ok=True)}  # fmt: skip
            else:
                raise ConfigUnsupported("USB host device is missing bus/device information")
            props["id"] = dev_id
            if bootindex is not None:
                props["bootindex"] = bootindex
            reset = src.get("guestReset") if src is not None else None
            if reset == "off":
                props["guest-reset"] = False
            elif reset == "uninitialized":
                props |= {"guest-reset": True, "guest-resets-all": False}
            elif reset == "on":
                props |= {"guest-reset": True, "guest-resets-all": True}
            props |= ctx.addr_props(hd, "<hostdev type='usb'>")
        elif stype == "scsi":
            props = _scsi(ctx, hd, src, dev_id, n - 1)
            if bootindex is not None:
                props["bootindex"] = bootindex
        else:  # scsi_host: vhost-scsi
            if src is None or src.get("protocol") != "vhost":
                raise unsupported("<hostdev type='scsi_host'> other than protocol='vhost'")
            props = virtio_props("vhost-scsi", hd, hd.get("model"))
            props |= {"wwpn": src.get("wwpn"), "id": dev_id}
            props |= ctx.addr_props(hd, "<hostdev type='scsi_host'>")
            ctx.host_devices.append("/dev/vhost-scsi")
        ctx.device(props)


def _scsi(ctx: BuildContext, hd: Element, src: Element | None, dev_id: str,
          n: int) -> dict[str, Any]:  # fmt: skip
    if src is None:
        raise XMLError("<hostdev type='scsi'> needs a <source>")
    node = f"hostdev{n}-backend"
    readonly = hd.find("readonly") is not None
    if src.get("protocol") == "iscsi":
        from drivers.qemu.argv_storage import _network_props

        backend = _network_props(ctx, src, node, src.find("auth"), readonly)
    else:
        adapter = src.find("adapter")
        a = src.find("address")
        name = adapter.get("name", "") if adapter is not None else ""
        host = name.removeprefix("scsi_host")
        key = f"{host}:{_int(a, 'bus')}:{_int(a, 'target')}:{_int(a, 'unit')}"
        sg = None
        if ctx.host is not None and getattr(ctx.host, "resolve_devices", True):
            sg = ctx.host.scsi_generic.get(key)
            if sg is None:
                raise ConfigUnsupported(f"SCSI host device {key} ({name}) is not on this host")
        backend = {"driver": "host_device", "filename": sg or f"/dev/sg-of-{key}"}
        ctx.host_devices.append(f"/sys/bus/scsi/devices/{key}")
    backend |= {"node-name": node, "read-only": readonly}
    ctx.add("-blockdev", json_arg(backend))
    a = hd.find("address")
    props: dict[str, Any] = {"driver": "scsi-generic", "drive": node, "id": dev_id}
    if a is None or a.get("type") != "drive":
        raise ConfigUnsupported("<hostdev type='scsi'> needs a drive address")
    ctrl = _int(a, "controller")
    cont = None
    for c in ctx.defn.elements("devices/controller"):
        if c.get("type") == "scsi" and _int(c, "index") == ctrl:
            cont = c
    if cont is None:
        raise ConfigUnsupported(f"no SCSI controller {ctrl} for <hostdev type='scsi'>")
    if cont.get("model") in ("lsilogic", "ncr53c90", "dc390", "am53c974"):
        props |= {"bus": f"scsi{ctrl}.{_int(a, 'bus')}", "scsi-id": _int(a, "unit")}
    else:
        props |= {"bus": f"scsi{ctrl}.0", "channel": _int(a, "bus"),
                  "scsi-id": _int(a, "target"), "lun": _int(a, "unit")}  # fmt: skip
    if hd.get("sgio") == "unfiltered" and onoff(hd, "rawio", "<hostdev>") is None:
        pass
    return props
