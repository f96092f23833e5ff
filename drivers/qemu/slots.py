"""A free PCI(e) slot for a device plugged into a running domain (a disk, a NIC): on q35
an empty ``pcie-root-port`` (libvirt leaves spare ones), on pc a free slot of ``pci.0``;
read from QEMU itself (``query-pci``), so what was plugged since the start counts."""

from __future__ import annotations

from typing import Any

from drivers.qemu.domain import Domain, Run
from virtbus.errors import ConfigUnsupported


async def free_pci_slot(dom: Domain, run: Run, what: str) -> dict[str, Any]:
    """``{"bus": ..., "addr": ...}`` for ``device_add``; CONFIG_UNSUPPORTED naming ``what``
    when there is none."""
    buses = await dom.execute(run, "query-pci")
    devices = [d for bus in buses or [] for d in bus.get("devices", [])]
    ports = [c for c in run.live.controllers if c.type == "pci" and c.model == "pcie-root-port"]
    if ports:
        used = {d.get("qdev_id") for d in _walk(devices) if d.get("pci_bridge", {}).get("devices")}
        for ctrl in ports:
            qid = f"pci.{ctrl.index or 0}"
            if qid not in used and any(d.get("qdev_id") == qid for d in _walk(devices)):
                return {"bus": qid, "addr": "0x0"}
        raise ConfigUnsupported(
            f"no free pcie-root-port in domain '{dom.defn.name}' for {what}:"
            " add <controller type='pci' model='pcie-root-port'/> (libvirt adds spare ones)"
        )
    machine = (run.live.os.machine or "").lower()
    if "q35" in machine:
        raise ConfigUnsupported(
            f"domain '{dom.defn.name}' (q35) has no pcie-root-port to plug {what}"
            " into: add <controller type='pci' model='pcie-root-port'/>"
        )
    used_slots = {int(d.get("slot", -1)) for d in devices if int(d.get("bus", 0)) == 0}
    free = next((slot for slot in range(1, 32) if slot not in used_slots), None)
    if free is None:
        raise ConfigUnsupported(f"no free PCI slot in domain '{dom.defn.name}'")
    return {"bus": "pci.0", "addr": hex(free)}


def _walk(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every PCI device, bridges' children included (query-pci nests them)."""
    out: list[dict[str, Any]] = []
    for dev in devices:
        out.append(dev)
        out += _walk((dev.get("pci_bridge") or {}).get("devices") or [])
    return out
