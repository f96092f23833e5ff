"""Device changes of a definition, shared by every driver: libvirt's attach/detach-device
on the XML side (which disk a device XML means, the definition with it added or removed)."""

from __future__ import annotations

import copy

from lxml import etree

from virtbus.domain.definition import DomainDefinition
from virtbus.domain.model import Element, Interface
from virtbus.domain.xml import parse_untrusted_root
from virtbus.errors import ConfigUnsupported, InvalidArgument, OperationFailed, XMLError


def parse_disk_device(xml: str) -> Element:
    """A ``<disk>`` device document (the only device virtbus attaches or detaches)."""
    root = parse_untrusted_root(xml, "device")
    if not isinstance(root.tag, str) or root.tag != "disk":
        raise ConfigUnsupported(
            f"only <disk> devices can be attached or detached, not <{root.tag}>"
        )
    return root


DEVICE_TAGS = ("disk", "interface")


def parse_device(xml: str) -> Element:
    """A device document virtbus attaches or detaches: a ``<disk>`` or an ``<interface>``."""
    root = parse_untrusted_root(xml, "device")
    if not isinstance(root.tag, str) or root.tag not in DEVICE_TAGS:
        raise ConfigUnsupported(
            f"only <disk> and <interface> devices can be attached or detached, not <{root.tag}>"
        )
    return root


def find_interface(defn: DomainDefinition, el: Element, where: str) -> Interface:
    """The NIC a detach-device ``<interface>`` means: by its MAC, else its target dev
    (libvirt's matching); OPERATION_FAILED naming what was looked for when none is."""
    mac_el, target = el.find("mac"), el.find("target")
    mac = (mac_el.get("address") or "").lower() if mac_el is not None else ""
    dev = target.get("dev") if target is not None else None
    if not mac and not dev:
        raise XMLError("the <interface> needs <mac address=...> or <target dev=...>")
    for iface in defn.interfaces:
        if (mac and iface.mac == mac) or (not mac and dev and iface.target_dev == dev):
            return iface
    raise OperationFailed(f"no interface with {'MAC ' + mac if mac else 'target ' + str(dev)}"
                          f" in {where}")  # fmt: skip


def named_interface(defn: DomainDefinition, name: str, where: str) -> Interface:
    """The NIC ``name`` means in domif-setlink/getlink: its target dev or its MAC."""
    for iface in defn.interfaces:
        if name in (iface.target_dev, iface.mac) or name.lower() == iface.mac:
            return iface
    raise OperationFailed(f"interface '{name}' not found in {where}")


def tuned_interface(defn: DomainDefinition, name: str, where: str) -> Interface:
    """The NIC ``name`` means in domiftune (target dev or MAC); INVALID_ARG when none is,
    as libvirt's virDomainNetFind."""
    for iface in defn.interfaces:
        if name in (iface.target_dev, iface.mac) or name.lower() == iface.mac:
            return iface
    raise InvalidArgument(f"'{name}' is not a known interface of {where}")


def without_interface(defn: DomainDefinition, index: int) -> DomainDefinition:
    """A copy of ``defn`` without interface ``index``."""
    new = defn.copy()
    with new.edit():
        el = new.interfaces[index].element
        parent = el.getparent()
        assert parent is not None
        parent.remove(el)
    return new


def disk_target(el: Element) -> str:
    target = el.find("target")
    dev = target.get("dev") if target is not None else None
    if not dev:
        raise XMLError("the <disk> needs <target dev=...>")
    return str(dev)


def with_disk(defn: DomainDefinition, el: Element) -> DomainDefinition:
    """A copy of ``defn`` with the disk appended (re-validated: a duplicate target fails)."""
    return with_device(defn, el)


def with_device(defn: DomainDefinition, el: Element) -> DomainDefinition:
    """A copy of ``defn`` with the device appended to its ``<devices>``."""
    new = defn.copy()
    with new.edit() as root:
        devices = root.find("devices")
        if devices is None:
            devices = etree.SubElement(root, "devices")
        devices.append(copy.deepcopy(el))
    return new


def without_disk(defn: DomainDefinition, target: str, where: str) -> DomainDefinition:
    """A copy of ``defn`` without the disk of ``target`` (OPERATION_FAILED if none)."""
    new = defn.copy()
    disk = next((d for d in new.disks if d.target_dev == target), None)
    if disk is None:
        raise OperationFailed(f"no target device {target} in {where}")
    with new.edit():
        parent = disk.element.getparent()
        assert parent is not None
        parent.remove(disk.element)
    return new


def only_disk(defn: DomainDefinition, el: Element) -> DomainDefinition:
    """A copy of ``defn`` whose only disk is ``el`` (to resolve one disk's volume alone)."""
    new = defn.copy()
    with new.edit() as root:
        devices = root.find("devices")
        if devices is not None:
            for child in list(devices):
                if child.tag == "disk":
                    devices.remove(child)
    return with_disk(new, el)


def volume_sources(defn: DomainDefinition) -> list[tuple[int, str, str]]:
    """(disk index, pool, volume) of every ``<disk type='volume'>``."""
    out = []
    for disk in defn.disks:
        if disk.type != "volume":
            continue
        src = disk.element.find("source")
        pool = src.get("pool") if src is not None else None
        vol = src.get("volume") if src is not None else None
        if not pool or not vol:
            raise XMLError(
                f"<disk type='volume'> {disk.target_dev} needs <source pool=... volume=...>"
            )
        out.append((disk.index, str(pool), str(vol)))
    return out
