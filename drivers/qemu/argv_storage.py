"""Disks (``-blockdev`` storage + format nodes and a front-end ``-device``) and the
storage controllers (SATA/AHCI, IDE, SCSI) they hang off, following libvirt's mapping of
cache modes, ids and drive addresses.
"""

from __future__ import annotations

from typing import Any

from drivers.base import ResolvedVolume
from drivers.qemu.argv_common import BuildContext, DiskRuntime, int_attr, json_arg, unsupported
from virtbus.domain.model import Controller, Disk
from virtbus.errors import ConfigUnsupported

# libvirt's cache modes -> (cache.direct, cache.no-flush, device write-cache)
CACHE_MODES: dict[str, tuple[bool, bool, bool]] = {
    "none": (True, False, True),
    "writeback": (False, False, True),
    "writethrough": (False, False, False),
    "directsync": (True, False, False),
    "unsafe": (False, True, True),
}
FORMATS = frozenset({"raw", "qcow2"})
SCSI_MODELS = {None: "virtio-scsi-pci", "virtio-scsi": "virtio-scsi-pci", "lsilogic": "lsi53c895a"}
_BUS_BY_PREFIX = {"vd": "virtio", "sd": "scsi", "hd": "ide"}
_DISK_CHILDREN = frozenset(
    {"driver", "source", "target", "readonly", "boot", "address", "serial", "alias"}
)
#: what a volume disk is built with while a definition is only being validated
PLACEHOLDER = ResolvedVolume("", "", "file", "/dev/null", "raw")


def disk_name_index(dev: str) -> int:
    """libvirt's ``virDiskNameToIndex``: vda -> 0, sdb -> 1, sdaa -> 26."""
    letters = dev[2:] if dev[:2] in _BUS_BY_PREFIX or dev[:2] == "fd" else dev[3:]
    if not letters or not letters.isalpha() or not letters.islower():
        raise ConfigUnsupported(f"cannot derive a drive address from <target dev='{dev}'>")
    idx = 0
    for ch in letters:
        idx = idx * 26 + (ord(ch) - ord("a") + 1)
    return idx - 1


def disk_bus(disk: Disk) -> str:
    return disk.target_bus or _BUS_BY_PREFIX.get(disk.target_dev[:2], "ide")


def build_storage_controllers(ctx: BuildContext) -> None:
    """Emit SATA/SCSI controllers (and implicit ones disks need, as libvirt adds them)."""
    seen: set[tuple[str, int]] = set()
    for ctrl in ctx.defn.controllers:
        idx = ctrl.index or 0
        seen.add((ctrl.type, idx))
        if ctrl.type == "sata":
            if ctx.q35 and idx == 0:
                continue  # the ICH9 AHCI built into q35 (00:1f.2, buses ide.0-5)
            ctx.device(
                {"driver": "ich9-ahci", "id": f"sata{idx}"}
                | ctx.pci_props(ctrl.element.find("address"), "<controller type='sata'>")
            )
        elif ctrl.type == "ide":
            if ctx.q35 or idx != 0:
                raise unsupported(f"<controller type='ide' index='{idx}'> on this machine")
        elif ctrl.type == "scsi":
            _scsi_controller(ctx, ctrl, idx)
    for disk in ctx.defn.disks:
        bus = disk_bus(disk)
        if bus == "scsi" and ("scsi", _drive_address(disk)[0]) not in seen:
            seen.add(("scsi", _drive_address(disk)[0]))
            _scsi_controller(ctx, None, _drive_address(disk)[0])
        if bus == "sata" and not ctx.q35 and ("sata", _drive_address(disk)[0]) not in seen:
            seen.add(("sata", _drive_address(disk)[0]))
            ctx.device(
                {"driver": "ich9-ahci", "id": f"sata{_drive_address(disk)[0]}"}
                | ctx.pci_props(None, "<controller type='sata'>")
            )


def _scsi_controller(ctx: BuildContext, ctrl: Controller | None, idx: int) -> None:
    model = ctrl.model if ctrl is not None else None
    if model not in SCSI_MODELS:
        raise unsupported(f"<controller type='scsi' model='{model}'>")
    addr = ctrl.element.find("address") if ctrl is not None else None
    ctx.device(
        {"driver": SCSI_MODELS[model], "id": f"scsi{idx}"}
        | ctx.pci_props(addr, "<controller type='scsi'>")
    )


def _drive_address(disk: Disk) -> tuple[int, int, int, int]:
    """(controller, bus, target, unit) from ``<address type='drive'>`` or the target name."""
    addr = disk.address
    if addr is not None and addr.get("type") == "drive":
        what = "<address type='drive'"
        return (
            int_attr(addr, "controller", what, maximum=255),
            int_attr(addr, "bus", what, maximum=255),
            int_attr(addr, "target", what, maximum=255),
            int_attr(addr, "unit", what, maximum=16383),
        )
    idx = disk_name_index(disk.target_dev)
    bus = disk_bus(disk)
    if bus == "ide":
        return (0, idx // 2, 0, idx % 2)
    if bus == "sata":
        return (idx // 6, 0, 0, idx % 6)
    return (idx // 7, 0, 0, idx % 7)  # scsi


def _check_disk(disk: Disk) -> None:
    where = f"<disk type='{disk.type}' device='{disk.device}'> ({disk.target_dev})"
    for child in disk.element:
        if isinstance(child.tag, str) and child.tag not in _DISK_CHILDREN:
            raise unsupported(f"<{child.tag}> in {where}")
    if disk.device not in ("disk", "cdrom"):
        raise unsupported(f"<disk device='{disk.device}'>")
    if disk.type not in ("file", "block", "volume"):
        raise unsupported(f"<disk type='{disk.type}'>")
    if disk.driver_name not in (None, "qemu"):
        raise unsupported(f"<driver name='{disk.driver_name}'> in {where}")
    if disk.driver_type is not None and disk.driver_type not in FORMATS:
        raise unsupported(f"<driver type='{disk.driver_type}'> in {where} (raw and qcow2 are)")
    if disk.shareable:
        raise unsupported(f"<shareable/> in {where}")
    if disk.source_path is None and disk.device != "cdrom" and disk.type != "volume":
        raise ConfigUnsupported(f"{where} has no <source>: only a cdrom may be empty")
    if disk.io == "native" and disk.cache not in ("none", "directsync"):
        raise ConfigUnsupported(
            f"{where}: io='native' needs cache='none' or 'directsync' (O_DIRECT)"
        )


def volume_of(ctx: BuildContext, disk: Disk) -> ResolvedVolume | None:
    """What a volume disk resolved to (the placeholder while validating); None otherwise."""
    if disk.type != "volume":
        return None
    if ctx.volumes is None:
        return PLACEHOLDER
    resolved = ctx.volumes.get(disk.index)
    if resolved is None:
        raise ConfigUnsupported(f"volume disk {disk.target_dev} was not resolved")
    return resolved


def disk_source_path(disk: Disk, resolved: ResolvedVolume | None) -> str | None:
    return resolved.path if resolved is not None else disk.source_path


def blockdev_nodes(
    disk: Disk, storage: str, fmt: str, resolved: ResolvedVolume | None
) -> list[dict[str, Any]]:
    """The storage and format nodes of a disk (``-blockdev`` values or ``blockdev-add``
    arguments): a file, a host device, or a network protocol node (a pool's iSCSI LUN)."""
    common: dict[str, Any] = {}
    if disk.cache not in (None, "default"):
        direct, no_flush, _ = CACHE_MODES[str(disk.cache)]
        common["cache"] = {"direct": direct, "no-flush": no_flush}
    if disk.discard not in (None, "default"):
        common["discard"] = disk.discard
    kind = resolved.kind if resolved is not None else disk.type
    node: dict[str, Any]
    if kind == "network":
        assert resolved is not None
        node = dict(resolved.network)
    else:
        driver = "file"
        if kind == "block":
            driver = "host_cdrom" if disk.device == "cdrom" else "host_device"
        node = {"driver": driver, "filename": disk_source_path(disk, resolved)}
        if disk.io not in (None, "default"):
            node["aio"] = disk.io
    node |= {"node-name": storage, "auto-read-only": True} | common
    image_format = disk.driver_type or (resolved.format if resolved is not None else None)
    if image_format is not None and image_format not in FORMATS:
        raise unsupported(f"format '{image_format}' of disk {disk.target_dev} (raw and qcow2 are)")
    fmt_node = (
        {"node-name": fmt, "read-only": disk.readonly, "driver": image_format or "raw"}
        | common
        | {"file": storage}
    )
    return [node, fmt_node]


def _blockdev(ctx: BuildContext, disk: Disk) -> str:
    """Emit the storage and format nodes; return the format node's name."""
    storage, fmt = f"disk{disk.index}-storage", f"disk{disk.index}-format"
    for node in blockdev_nodes(disk, storage, fmt, volume_of(ctx, disk)):
        ctx.add("-blockdev", json_arg(node))
    return fmt


def build_disks(ctx: BuildContext) -> None:
    for disk in ctx.defn.disks:
        _check_disk(disk)
        bus = disk_bus(disk)
        cdrom = disk.device == "cdrom"
        props: dict[str, Any]
        if bus == "virtio":
            if cdrom:
                raise unsupported("<disk device='cdrom'> on bus 'virtio'")
            props = {"driver": "virtio-blk-pci"} | ctx.pci_props(
                disk.address, f"disk {disk.target_dev}"
            )
            dev_id = f"virtio-disk{disk_name_index(disk.target_dev)}"
        elif bus in ("sata", "ide"):
            if disk.readonly and not cdrom:
                raise unsupported(f"<readonly/> on {bus} disk {disk.target_dev}")
            ctrl, dbus, _target, unit = _drive_address(disk)
            if bus == "ide":
                if ctx.q35 or ctrl != 0 or dbus > 1 or unit > 1:
                    raise unsupported(f"IDE disk {disk.target_dev} on this machine/address")
                qbus, dev_id = f"ide.{dbus}", f"ide0-{dbus}-{unit}"
                props = {"driver": "ide-cd" if cdrom else "ide-hd", "bus": qbus, "unit": unit}
            else:
                if unit > 5:
                    raise unsupported(f"SATA unit {unit} for {disk.target_dev} (0-5 exist)")
                qbus = f"ide.{unit}" if ctx.q35 and ctrl == 0 else f"sata{ctrl}.{unit}"
                dev_id = f"sata{ctrl}-0-{unit}"
                props = {"driver": "ide-cd" if cdrom else "ide-hd", "bus": qbus}
        elif bus == "scsi":
            ctrl, dbus, target, unit = _drive_address(disk)
            props = {"driver": "scsi-cd" if cdrom else "scsi-hd", "bus": f"scsi{ctrl}.0"}
            if _scsi_model(ctx, ctrl) == "lsilogic":
                props["scsi-id"] = unit
            else:
                props |= {"channel": dbus, "scsi-id": target, "lun": unit}
            dev_id = f"scsi{ctrl}-{dbus}-{target}-{unit}"
        else:
            raise unsupported(f"<target bus='{bus}'> for disk {disk.target_dev}")
        present = disk.source_path is not None or disk.type == "volume"
        node = _blockdev(ctx, disk) if present else None
        if node is not None:
            props["drive"] = node
        props["id"] = dev_id
        boot = ctx.bootindex.get(("disk", disk.index))
        if boot is not None:
            props["bootindex"] = boot
        if disk.cache not in (None, "default") and not cdrom:
            props["write-cache"] = "on" if CACHE_MODES[str(disk.cache)][2] else "off"
        if disk.serial:
            props["serial"] = disk.serial
        ctx.device(props)
        path = disk_source_path(disk, volume_of(ctx, disk))
        ctx.disks.append(DiskRuntime(disk.index, disk.target_dev, dev_id, node, path))


def _scsi_model(ctx: BuildContext, index: int) -> str | None:
    for ctrl in ctx.defn.controllers:
        if ctrl.type == "scsi" and (ctrl.index or 0) == index:
            return ctrl.model
    return None


def device_id(disk: Disk) -> str:
    """libvirt's qdev id of a disk's front end (``virtio-disk1``, ``scsi0-0-0-1`` ...)."""
    bus = disk_bus(disk)
    if bus == "virtio":
        return f"virtio-disk{disk_name_index(disk.target_dev)}"
    if bus == "scsi":
        ctrl, dbus, target, unit = _drive_address(disk)
        return f"scsi{ctrl}-{dbus}-{target}-{unit}"
    ctrl, dbus, _target, unit = _drive_address(disk)
    return f"ide0-{dbus}-{unit}" if bus == "ide" else f"sata{ctrl}-0-{unit}"


def hotplug_device(disk: Disk, node: str, pci: dict[str, Any]) -> dict[str, Any]:
    """``device_add`` arguments of a disk plugged into a running domain: virtio disks on a
    free PCI(e) slot, SCSI disks on their (virtio-scsi) controller."""
    _check_disk(disk)
    bus = disk_bus(disk)
    if disk.device == "cdrom":
        raise unsupported("hot-plug of a cdrom (change its medium instead)")
    props: dict[str, Any]
    if bus == "virtio":
        props = {"driver": "virtio-blk-pci"} | pci
    elif bus == "scsi":
        ctrl, dbus, target, unit = _drive_address(disk)
        props = {"driver": "scsi-hd", "bus": f"scsi{ctrl}.0", "channel": dbus,
                 "scsi-id": target, "lun": unit}  # fmt: skip
    else:
        raise ConfigUnsupported(
            f"disk {disk.target_dev} on bus '{bus}' cannot be hot-plugged (virtio and scsi can)"
        )
    props |= {"id": device_id(disk), "drive": node}
    if disk.cache not in (None, "default"):
        props["write-cache"] = "on" if CACHE_MODES[str(disk.cache)][2] else "off"
    if disk.serial:
        props["serial"] = disk.serial
    return props
