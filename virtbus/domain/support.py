"""Helpers a driver uses to refuse what it cannot honour (CONFIG_UNSUPPORTED)."""

from __future__ import annotations

from collections.abc import Collection

from virtbus.domain import model as m
from virtbus.domain.definition import DomainDefinition


def unknown_devices(defn: DomainDefinition, supported: Collection[str]) -> list[str]:
    """Devices in ``defn`` that ``supported`` does not cover, as printable labels.

    ``supported`` holds tags (``"disk"``: any disk) and ``tag:type`` entries
    (``"interface:user"``: only that type, matched against the ``type`` attribute, or
    ``device`` for disks, e.g. ``"disk:cdrom"``). A tag listed only with types is
    unsupported for its other types. Labels look like ``<interface type='vhostuser'>``,
    ready for a CONFIG_UNSUPPORTED message. ``<emulator>`` is not a device.
    """
    whole = {s for s in supported if ":" not in s}
    typed: dict[str, set[str]] = {}
    for entry in supported:
        if ":" in entry:
            tag, _, variant = entry.partition(":")
            typed.setdefault(tag, set()).add(variant)
    found: list[str] = []
    for dev in defn.devices:
        if dev.tag in whole:
            continue
        if dev.tag in typed:
            kind: str | None = (
                str(dev.element.get("device", "disk")) if dev.tag == "disk" else dev.type
            )
            if kind in typed[dev.tag]:
                continue
            attr = "device" if dev.tag == "disk" else "type"
            label = f"<{dev.tag} {attr}='{kind}'>" if kind else f"<{dev.tag}>"
        else:
            label = f"<{dev.tag}>"
        if label not in found:
            found.append(label)
    return found


def unknown_attributes(element: m.Element, known: Collection[str]) -> list[str]:
    """Attribute names of ``element`` not in ``known`` (for CONFIG_UNSUPPORTED messages)."""
    return [str(k) for k in element.attrib if k not in known]
