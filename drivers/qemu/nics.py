"""NICs of a running QEMU domain: libvirt's attach/detach-device with an ``<interface>``
and domif-setlink.

Attach: the host side first — a tap on one of the agent's networks (drivers/qemu/taps.py),
handed to QEMU with SCM_RIGHTS and ``getfd``, then ``netdev_add tap,fd=<name>``; or
QEMU's user-mode stack, or a bridge through qemu-bridge-helper — then ``device_add`` of
the NIC on a free PCI(e) slot (drivers/qemu/slots.py). Any failure removes what was
added (the netdev, the tap). Detach: ``device_del``, the wait for ``DEVICE_DELETED`` (the
guest lets go), ``netdev_del``, the tap removed. QEMU's ``DEVICE_DELETED`` is libvirt's
``device_removed`` event (drivers/qemu/events.py); ``device_added`` is emitted here.

A NIC's QEMU id is its ``<alias>`` in the live XML (written at start, as libvirt's live
XML has it), else ``net<index>``; a hot-plugged NIC gets ``ua-net<n>``, a user alias, so
a migration's destination builds it under the same id.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from drivers.qemu.argv_net import MODELS
from drivers.qemu.domain import Domain, Run
from drivers.qemu.slots import free_pci_slot
from drivers.qemu.taps import TapLeases, close_tap
from virtbus.domain import DomainDefinition
from virtbus.domain.bandwidth import Bandwidth
from virtbus.domain.devices import find_interface, without_interface
from virtbus.domain.model import Element, Interface
from virtbus.errors import ConfigUnsupported, OperationTimeout, VirtbusError


def nic_id(iface: Interface) -> str:
    """The NIC's device id in QEMU (see module docstring)."""
    alias = iface.element.find("alias")
    name = alias.get("name") if alias is not None else None
    return str(name) if name else f"net{iface.index}"


def random_mac() -> str:
    """libvirt's generated MAC for a NIC added later: 52:54:00 and three random bytes."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))


def ensure_mac(el: Element) -> str:
    """The device XML's MAC, generated into it when it has none (live and config agree)."""
    mac_el = el.find("mac")
    if mac_el is None or not mac_el.get("address"):
        if mac_el is None:
            from lxml import etree

            mac_el = etree.Element("mac")
            el.insert(0, mac_el)
        mac_el.set("address", random_mac())
    return str(mac_el.get("address")).lower()


class NicChanges:
    """Hot-plug of NICs and their links (see module docstring)."""

    def __init__(self, taps: TapLeases, detach_timeout: float) -> None:
        self._taps = taps
        self._detach_timeout = detach_timeout

    async def _netdev(self, dom: Domain, run: Run, trial: DomainDefinition, iface: Interface,
                      netdev_id: str) -> dict[str, Any]:  # fmt: skip
        """The host side's netdev_add arguments; a tap is opened (shaped) and handed over."""
        if iface.bandwidth is not None and not self._taps.wants_tap(iface):
            raise ConfigUnsupported("<bandwidth> in <interface type='" + iface.type + "'>:"
                                    " only on the host's own virtual networks")  # fmt: skip
        if self._taps.wants_tap(iface):
            tap = await self._taps.open(trial, iface)
            try:
                assert run.monitor is not None
                await run.monitor.pass_fd(tap.fd, f"fd-{netdev_id}")
            except BaseException:
                await self._taps.release_one(trial.uuid, tap.ifname)
                raise
            finally:
                close_tap(tap)  # QEMU has its own copy now
            trial.set_interface_target_dev(iface.index, tap.ifname)
            return {"type": "tap", "id": netdev_id, "fd": f"fd-{netdev_id}"}
        if iface.type == "user":
            return {"type": "user", "id": netdev_id}
        if iface.type == "bridge" and iface.source_bridge:
            return {"type": "bridge", "id": netdev_id, "br": iface.source_bridge}
        raise ConfigUnsupported(
            f"hot-plug of <interface type='{iface.type}'> is not supported (network, user and"
            " bridge are)"
        )

    async def attach_live(self, dom: Domain, run: Run, trial: DomainDefinition) -> None:
        """Plug the last interface of ``trial`` (run.live with it appended) into QEMU."""
        iface = trial.interfaces[-1]
        taken = {nic_id(i) for i in run.live.interfaces}
        dev_id = next(f"ua-net{n}" for n in range(len(taken) + 1) if f"ua-net{n}" not in taken)
        trial.set_interface_alias(iface.index, dev_id)
        iface = trial.interfaces[-1]
        model = iface.model or "rtl8139"
        if model not in MODELS:
            raise ConfigUnsupported(f"unsupported <interface><model type='{model}'>")
        driver = {"virtio-net": "virtio-net-pci"}.get(MODELS[model], MODELS[model])
        netdev_id = f"host{dev_id}"
        netdev = await self._netdev(dom, run, trial, iface, netdev_id)
        iface = trial.interfaces[-1]
        try:
            await dom.execute(run, "netdev_add", netdev)
            try:
                slot = await free_pci_slot(dom, run, f"interface {iface.mac}")
                await dom.execute(run, "device_add", {"driver": driver, "id": dev_id,
                                                      "netdev": netdev_id, "mac": iface.mac,
                                                      **slot})  # fmt: skip
            except BaseException:
                with contextlib.suppress(VirtbusError):
                    await dom.execute(run, "netdev_del", {"id": netdev_id})
                raise
        except BaseException:
            if iface.target_dev:
                await self._taps.release_one(trial.uuid, iface.target_dev)
            raise
        run.live = trial
        run.live_xml = None
        run.deleted_devices.discard(dev_id)
        await dom.save_status(run)
        dom.emit("device_added", None, {"device": dev_id, "mac": iface.mac})

    async def detach_live(self, dom: Domain, run: Run, el: Element) -> None:
        iface = find_interface(run.live, el, f"running domain '{dom.defn.name}'")
        dev_id = nic_id(iface)
        run.deleted_devices.discard(dev_id)
        await dom.execute(run, "device_del", {"id": dev_id})
        limit = self._detach_timeout
        try:
            await dom.wait(run, lambda: dev_id in run.deleted_devices, "detach", timeout=limit)
        except OperationTimeout:
            raise OperationTimeout(
                f"the guest of '{dom.defn.name}' did not release interface {iface.mac}"
                f" ({dev_id}) within {limit:g} s; it stays attached (the guest may still let"
                " it go)"
            ) from None
        with contextlib.suppress(VirtbusError):  # gone with the device on older QEMUs
            await dom.execute(run, "netdev_del", {"id": f"host{dev_id}"})
        if iface.target_dev and iface.type == "network":
            await self._taps.release_one(run.live.uuid, iface.target_dev)
        ids = [nic_id(i) for i in run.live.interfaces]
        remaining = without_interface(run.live, iface.index)
        for other in remaining.interfaces[iface.index :]:  # shifted: keep their QEMU ids
            if other.element.find("alias") is None:
                remaining.set_interface_alias(other.index, ids[other.index + 1])
        run.live = remaining
        run.live_xml = None
        await dom.save_status(run)

    async def set_bandwidth_live(self, dom: Domain, run: Run, iface: Interface,
                                 bandwidth: Bandwidth | None) -> None:  # fmt: skip
        """domiftune --live: the tap's shaping first, then the live XML that says so."""
        if not (self._taps.wants_tap(iface) and iface.target_dev):
            raise ConfigUnsupported(f"interface {iface.mac or iface.index}: bandwidth can be"
                                    " tuned only on the host's own virtual networks")  # fmt: skip
        await self._taps.set_bandwidth(run.live.uuid, iface.target_dev, bandwidth)
        live = run.live.copy()
        live.set_interface_bandwidth(iface.index, bandwidth)
        run.live = live
        run.live_xml = None
        await dom.save_status(run)

    async def set_link_live(self, dom: Domain, run: Run, iface: Interface, up: bool) -> None:
        await dom.execute(run, "set_link", {"name": nic_id(iface), "up": up})
        live = run.live.copy()
        live.set_interface_link(iface.index, up)
        run.live = live
        run.live_xml = None
        await dom.save_status(run)
