"""Virtio device names and options as libvirt forms them (``qemuBuildVirtioDevProps``).

``virtio-blk`` becomes ``virtio-blk-pci`` on a PCI address, with ``-transitional`` or
``-non-transitional`` for those models; ``<driver iommu= ats= packed= page_per_vq=>``
become ``iommu_platform``, ``ats``, ``packed`` and ``page-per-vq``.
"""

from __future__ import annotations

from typing import Any

from drivers.qemu.argv_common import unsupported
from virtbus.domain.model import Element
from virtbus.errors import ConfigUnsupported, XMLError

_OPTIONS = (("iommu", "iommu_platform"), ("ats", "ats"), ("packed", "packed"),
            ("page_per_vq", "page-per-vq"))  # fmt: skip
_ON = {"on": True, "yes": True, "off": False, "no": False}


def onoff(el: Element | None, attr: str, what: str) -> bool | None:
    """libvirt's tristate ``on``/``off`` attribute (absent: None)."""
    if el is None:
        return None
    raw = el.get(attr)
    if raw is None:
        return None
    if raw not in _ON:
        raise XMLError(f"invalid {what} {attr}='{raw}': expected 'on' or 'off'")
    return _ON[raw]


def virtio_options(el: Element) -> dict[str, Any]:
    """The ``<driver>`` virtio options of a device element."""
    driver = el.find("driver")
    out: dict[str, Any] = {}
    for attr, prop in _OPTIONS:
        value = onoff(driver, attr, "<driver>")
        if value is not None:
            out[prop] = value
    return out


def check_virtio_options_absent(el: Element) -> None:
    """A non-virtio device must not carry virtio ``<driver>`` options (libvirt's check)."""
    driver = el.find("driver")
    if driver is None:
        return
    for attr, what in (("iommu", "iommu driver option"), ("ats", "ats driver option"),
                       ("packed", "packed driver option"),
                       ("page_per_vq", "page_per_vq option")):  # fmt: skip
        if driver.get(attr) is not None:
            raise ConfigUnsupported(f"{what} is only supported for virtio devices")


def virtio_props(base: str, el: Element, model: str | None = None, *, suffix: bool = True,
                 options: bool = True) -> dict[str, Any]:  # fmt: skip
    """``{"driver": base-pci[-transitional], <virtio options>}`` for a PCI virtio device."""
    a = el.find("address")
    if a is not None and a.get("type") not in (None, "pci"):
        raise unsupported(f"<address type='{a.get('type')}'> for a virtio device")
    name = base + ("-pci" if suffix else "")
    if model == "virtio-transitional":
        name += "-transitional"
    elif model == "virtio-non-transitional":
        name += "-non-transitional"
    props: dict[str, Any] = {"driver": name}
    if options:
        props |= virtio_options(el)
    return props
