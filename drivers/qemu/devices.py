"""Devices of a QEMU domain that change while it lives: libvirt's attach-device,
detach-device and domblkinfo for disks, and the volumes behind ``<disk type='volume'>``.

Attach is ``blockdev-add`` (storage node, then format node) and ``device_add`` on a free
PCI(e) slot (q35: an empty ``pcie-root-port``, as libvirt leaves spare ones; pc: a free
slot of ``pci.0``); any failure removes what was added. Detach is ``device_del``, then a
wait for QEMU's ``DEVICE_DELETED`` (the guest must let go; past ``detach_timeout`` it is
OPERATION_TIMEOUT and the disk stays), then ``blockdev-del`` of both nodes. libvirt's
flags: CURRENT (live when running, else the definition), LIVE, CONFIG, or both.

Two collaborators of :class:`drivers.qemu.driver.QemuDriver`: :class:`VolumeLeases`, the
launch step that resolves (and leases) every volume disk through the agent's pools before
QEMU starts and releases them when the run ends, and :class:`DeviceChanges`. The pure
parts (node and device arguments) live in :mod:`argv_storage`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree

from drivers.base import Affect, BlockInfo, ResolvedVolume, VolumeResolver
from drivers.memory import check_live_memory, with_memory
from drivers.qemu import confine
from drivers.qemu.argv import volume_disks
from drivers.qemu.argv_storage import blockdev_nodes, device_id, hotplug_device
from drivers.qemu.cgroup import DeviceCgroups, Rules, base_rules, element_rules
from drivers.qemu.domain import Domain, Run
from drivers.qemu.launch import LaunchPlan
from drivers.qemu.nics import NicChanges, ensure_mac
from drivers.qemu.slots import free_pci_slot
from virtbus.domain import DomainDefinition
from virtbus.domain.bandwidth import Bandwidth, RateChange, tuned
from virtbus.domain.devices import (
    disk_target,
    find_interface,
    named_interface,
    only_disk,
    parse_device,
    tuned_interface,
    with_device,
    with_disk,
    without_disk,
    without_interface,
)
from virtbus.domain.model import Disk, Interface
from virtbus.errors import (
    ConfigUnsupported,
    InvalidArgument,
    OperationFailed,
    OperationInvalid,
    OperationTimeout,
    VirtbusError,
)
from virtbus.protocol.events import DomainState

if TYPE_CHECKING:
    from drivers.qemu.launch import Launcher
    from drivers.qemu.registry import DomainRegistry
    from drivers.qemu.settings import QemuSettings
    from drivers.qemu.state import StateStore

log = logging.getLogger("drivers.qemu.driver")
S = DomainState
_LIVE_STATES = (S.RUNNING, S.PAUSED, S.BLOCKED)


class VolumeLeases:
    """The launch step of volume disks: each is resolved by the agent's pools (a file, a
    device, an iSCSI LUN) and leased to the domain until its run ends."""

    def __init__(self) -> None:
        self.resolver: VolumeResolver | None = None  # the agent hands its pools in

    async def acquire(self, plan: LaunchPlan) -> None:
        plan.volumes = await self.resolve(plan.live)

    async def resolve(self, defn: DomainDefinition) -> dict[int, ResolvedVolume]:
        """Every volume disk of ``defn``, leased to it; on failure none stays leased."""
        wanted = volume_disks(defn)
        if not wanted:
            return {}
        if self.resolver is None:
            raise ConfigUnsupported(
                f"domain '{defn.name}' has <disk type='volume'> but this agent has no storage"
            )
        out: dict[int, ResolvedVolume] = {}
        try:
            for index, pool, volume in wanted:
                try:
                    out[index] = await self.resolver.resolve(pool, volume, defn.uuid)
                except VirtbusError as exc:
                    raise type(exc)(f"cannot start domain '{defn.name}': {exc.message}") from None
        except BaseException:
            self.resolver.release(defn.uuid)
            raise
        return out

    def pool_targets(self) -> tuple[Path, ...]:
        """Where the agent's active pools keep their volumes (none without storage)."""
        if self.resolver is None:
            return ()
        return tuple(Path(t) for t in self.resolver.pool_targets())

    def release_one(self, uuid: str, pool: str | None, volume: str | None) -> None:
        if self.resolver is not None:
            self.resolver.release(uuid, pool, volume)

    async def release(self, uuid: str) -> None:
        if self.resolver is not None:
            self.resolver.release(uuid)


class DeviceChanges:
    """attach/detach-device and domblkinfo of the driver's domains (see module docstring)."""

    def __init__(
        self, registry: DomainRegistry, launcher: Launcher, store: StateStore,
        settings: QemuSettings, leases: VolumeLeases, nics: NicChanges,
        cgroups: DeviceCgroups | None = None,
    ) -> None:  # fmt: skip
        """``cgroups``: the domains' device cgroups (drivers/qemu/cgroup.py): a disk's
        device is allowed before QEMU opens it and revoked after it is detached."""
        self._cgroups = cgroups
        self._nics = nics
        self._registry = registry
        self._launcher = launcher
        self._store = store
        self._settings = settings
        self._leases = leases

    def _get(self, ref: str) -> Domain:
        return self._registry.get(ref)

    def _validate(self, defn: DomainDefinition) -> None:
        self._launcher.validate(defn)

    async def _persist(self, defn: DomainDefinition) -> None:
        await self._store.save_definition(defn)

    async def _resolve_volumes(self, defn: DomainDefinition) -> dict[int, ResolvedVolume]:
        return await self._leases.resolve(defn)

    # --- flags --------------------------------------------------------------------------
    @staticmethod
    def _affect(dom: Domain, affect: Affect) -> tuple[bool, bool]:
        running = dom.run is not None and dom.state in _LIVE_STATES
        live, config = affect.live, affect.config
        if not live and not config:  # CURRENT
            live, config = running, not running
        if live and not running:
            raise OperationInvalid(f"domain '{dom.defn.name}' is not running")
        return live, config

    # --- attach -------------------------------------------------------------------------
    async def attach_device(self, ref: str, xml: str, affect: Affect) -> None:
        dom = self._get(ref)
        el = parse_device(xml)
        await self._launcher.confine(dom.defn, el)  # its host paths, before anything else
        live, config = self._affect(dom, affect)
        if el.tag == "interface":
            await self._attach_nic(dom, el, live, config)
            return
        persistent = None
        if config:
            persistent = with_disk(dom.defn, el)
            await self._launcher.complete(persistent)  # its address, as libvirt assigns it
            self._validate(persistent)
        if live:
            assert dom.run is not None
            await self._attach_live(dom, dom.run, el)
        if persistent is not None:
            await self._persist(persistent)
            dom.defn = persistent

    async def _attach_live(self, dom: Domain, run: Run, el: etree._Element) -> None:
        trial = with_disk(run.live, el)
        disk = trial.disks[-1]
        dev_id = device_id(disk)
        storage, fmt = f"{dev_id}-storage", f"{dev_id}-format"
        resolved = None
        if disk.type == "volume":
            resolved = next(
                iter((await self._resolve_volumes(only_disk(trial, disk.element))).values())
            )
        added: list[str] = []
        allowed: Rules = {}
        labeled: list[str] = []
        local = None
        if resolved is not None and resolved.kind != "network":
            local = resolved.path
        try:
            if self._cgroups is not None and self._cgroups.enabled:
                rules = await asyncio.to_thread(element_rules, disk.element, local)
                allowed = await self._cgroups.allow(dom.defn.uuid, dom.defn.name, rules)
            # its files become the QEMU user's before QEMU opens them (drivers/qemu/dac.py)
            labeled = await self._launcher.label_disk(trial, disk.element, local)
            nodes = blockdev_nodes(disk, storage, fmt, resolved)
            pci = await self._free_slot(dom, run, disk)
            props = hotplug_device(disk, fmt, pci)
            for node in nodes:
                await dom.execute(run, "blockdev-add", node)
                added.append(str(node["node-name"]))
            await dom.execute(run, "device_add", props)
        except BaseException:
            for name in reversed(added):
                with contextlib.suppress(VirtbusError):
                    await dom.execute(run, "blockdev-del", {"node-name": name})
            if self._cgroups is not None and allowed:  # new to the group: nobody else's
                await self._cgroups.revoke(dom.defn.uuid, allowed, {})
            await self._launcher.unlabel_disk(dom.defn.uuid, labeled)  # held by nobody else
            if resolved is not None:
                self._leases.release_one(dom.defn.uuid, resolved.pool, resolved.volume)
            raise
        run.live = trial
        run.live_xml = None
        run.deleted_devices.discard(dev_id)
        await dom.save_status(run)
        dom.emit("device_added", None, {"device": dev_id, "target": disk.target_dev})

    async def _free_slot(self, dom: Domain, run: Run, disk: Disk) -> dict[str, Any]:
        """bus/addr for a virtio disk (other buses need none)."""
        if (disk.target_bus or ("virtio" if disk.target_dev.startswith("vd") else "")) != "virtio":
            return {}
        return await free_pci_slot(dom, run, f"disk {disk.target_dev}")

    # --- detach -------------------------------------------------------------------------
    async def detach_device(self, ref: str, xml: str, affect: Affect) -> None:
        dom = self._get(ref)
        el = parse_device(xml)
        live, config = self._affect(dom, affect)
        if el.tag == "interface":
            await self._detach_nic(dom, el, live, config)
            return
        target = disk_target(el)
        persistent = None
        if config:
            persistent = without_disk(dom.defn, target, f"the definition of '{dom.defn.name}'")
        if live:
            assert dom.run is not None
            await self._detach_live(dom, dom.run, target)
        if persistent is not None:
            await self._persist(persistent)
            dom.defn = persistent

    # --- NICs (drivers/qemu/nics.py) ---------------------------------------------------
    async def _attach_nic(self, dom: Domain, el: etree._Element, live: bool,
                          config: bool) -> None:  # fmt: skip
        ensure_mac(el)  # the same generated MAC live and in the definition
        persistent = None
        if config:
            persistent = with_device(dom.defn, el)
            await self._launcher.complete(persistent)  # its PCI address, as libvirt assigns
            self._validate(persistent)
        if live:
            assert dom.run is not None
            trial = with_device(dom.run.live, el)
            if self._cgroups is not None and self._cgroups.enabled:  # a tap QEMU opens
                rules = await asyncio.to_thread(base_rules, trial, self._cgroups.extra)
                await self._cgroups.allow(dom.defn.uuid, dom.defn.name, rules)
            await self._nics.attach_live(dom, dom.run, trial)
        if persistent is not None:
            await self._persist(persistent)
            dom.defn = persistent

    async def _detach_nic(self, dom: Domain, el: etree._Element, live: bool,
                          config: bool) -> None:  # fmt: skip
        persistent = None
        if config:
            where = f"the definition of '{dom.defn.name}'"
            persistent = without_interface(dom.defn, find_interface(dom.defn, el, where).index)
        if live:
            assert dom.run is not None
            await self._nics.detach_live(dom, dom.run, el)
        if persistent is not None:
            await self._persist(persistent)
            dom.defn = persistent

    async def set_interface_link(self, ref: str, interface: str, up: bool,
                                 affect: Affect) -> None:  # fmt: skip
        dom = self._get(ref)
        live, config = self._affect(dom, affect)
        if live:
            assert dom.run is not None
            where = f"running domain '{dom.defn.name}'"
            iface = named_interface(dom.run.live, interface, where)
            await self._nics.set_link_live(dom, dom.run, iface, up)
        if config:
            iface = named_interface(dom.defn, interface, f"the definition of '{dom.defn.name}'")
            persistent = dom.defn.copy()
            persistent.set_interface_link(iface.index, up)
            await self._persist(persistent)
            dom.defn = persistent

    async def interface_bandwidth(self, ref: str, interface: str,
                                  affect: Affect) -> Bandwidth | None:  # fmt: skip
        dom = self._get(ref)
        live, _ = self._affect(dom, affect)
        if live:
            assert dom.run is not None
            defn, where = dom.run.live, f"running domain '{dom.defn.name}'"
        else:
            defn, where = dom.defn, f"the definition of '{dom.defn.name}'"
        return tuned_interface(defn, interface, where).bandwidth

    async def tune_interface(self, ref: str, interface: str, inbound: RateChange | None,
                             outbound: RateChange | None, affect: Affect) -> None:  # fmt: skip
        """domiftune: every check (both sides) before anything changes; live first."""
        dom = self._get(ref)
        live, config = self._affect(dom, affect)
        running: tuple[Interface, Bandwidth | None] | None = None
        persistent: DomainDefinition | None = None
        if live:
            assert dom.run is not None
            where = f"running domain '{dom.defn.name}'"
            nic = tuned_interface(dom.run.live, interface, where)
            running = nic, tuned(nic.bandwidth, inbound, outbound, where)
        if config:
            where = f"the definition of '{dom.defn.name}'"
            nic = tuned_interface(dom.defn, interface, where)
            persistent = dom.defn.copy()
            persistent.set_interface_bandwidth(
                nic.index, tuned(nic.bandwidth, inbound, outbound, where))  # fmt: skip
            self._validate(persistent)
        if running is not None:
            assert dom.run is not None
            await self._nics.set_bandwidth_live(dom, dom.run, *running)
        if persistent is not None:
            await self._persist(persistent)
            dom.defn = persistent

    async def _detach_live(self, dom: Domain, run: Run, target: str) -> None:
        remaining = without_disk(run.live, target, f"running domain '{dom.defn.name}'")
        disk = next(d for d in run.live.disks if d.target_dev == target)
        dev_id = device_id(disk)
        entry = await self._block_entry(dom, run, dev_id)
        inserted = (entry or {}).get("inserted") or {}
        node = str(inserted["node-name"]) if inserted.get("node-name") else None
        run.deleted_devices.discard(dev_id)
        await dom.execute(run, "device_del", {"id": dev_id})
        limit = self._settings.detach_timeout
        try:
            await dom.wait(run, lambda: dev_id in run.deleted_devices, "detach", timeout=limit)
        except OperationTimeout:
            raise OperationTimeout(
                f"the guest of '{dom.defn.name}' did not release disk {target} ({dev_id})"
                f" within {limit:g} s; it stays attached (the guest may still let it go)"
            ) from None
        if node is not None:
            for name in (node, node.removesuffix("-format") + "-storage"):
                try:
                    await dom.execute(run, "blockdev-del", {"node-name": name})
                except VirtbusError as exc:
                    log.warning("domain %s: blockdev-del %s: %s", dom.defn.name, name, exc)
        run.live = remaining
        run.live_xml = None
        await dom.save_status(run)
        await self._revoke(dom, run, disk, str(inserted.get("file", "")))
        await self._unlabel(dom, run, disk, str(inserted.get("file", "")))
        if disk.type == "volume":
            src = disk.element.find("source")
            assert src is not None
            self._leases.release_one(dom.defn.uuid, src.get("pool"), src.get("volume"))

    async def _block_entry(self, dom: Domain, run: Run, dev_id: str) -> dict[str, Any] | None:
        """query-block's entry of a disk's device (its format node, the file QEMU opened),
        read before it goes away."""
        for entry in await dom.execute(run, "query-block") or []:
            qdev = str(entry.get("qdev", ""))
            if qdev == dev_id or qdev.startswith(f"/machine/peripheral/{dev_id}/"):
                return dict(entry)
        return None

    async def _revoke(self, dom: Domain, run: Run, disk: Disk, opened: str) -> None:
        """The detached disk's device leaves the domain's cgroup unless the run still uses
        it: another disk (query-block's files: volumes too) or a device of the definition."""
        if self._cgroups is None or not self._cgroups.enabled:
            return
        gone = await asyncio.to_thread(element_rules, disk.element, opened or None)
        if not gone:
            return
        files = []
        try:
            for entry in await dom.execute(run, "query-block") or []:
                inserted = entry.get("inserted") or {}
                if inserted.get("file"):
                    files.append((str(inserted["file"]), bool(inserted.get("ro"))))
        except VirtbusError as exc:  # its rule stays: QEMU may still use the device
            log.warning("domain %s: cannot tell which devices it still uses (%s): the "
                        "rules of disk %s stay", dom.defn.name, exc, disk.target_dev)  # fmt: skip
            return
        keep = await self._cgroups.in_use(run.live, files)
        await self._cgroups.revoke(dom.defn.uuid, gone, keep)

    async def _unlabel(self, dom: Domain, run: Run, disk: Disk, opened: str) -> None:
        """The detached disk's files go back to their owners (drivers/qemu/dac.py) unless
        the run still uses them: another disk (query-block's files: volumes too) or a
        device of the live definition."""
        if self._launcher.qemu_user(dom.defn.uuid) is None:
            return
        paths = {hp.path for hp in confine.host_paths(disk.element)
                 if hp.kind == confine.Kind.FILE}  # fmt: skip
        if opened:
            paths.add(opened)
        keep = {hp.path for hp in confine.host_paths(run.live.root)}
        try:
            for entry in await dom.execute(run, "query-block") or []:
                keep.add(str((entry.get("inserted") or {}).get("file", "")))
        except VirtbusError as exc:  # they stay the QEMU user's until the run ends
            log.warning("domain %s: cannot tell which files it still uses (%s): disk %s's "
                        "stay its QEMU's until it stops", dom.defn.name, exc,
                        disk.target_dev)  # fmt: skip
            return
        await self._launcher.unlabel_disk(dom.defn.uuid, sorted(paths - keep))

    # --- domblkinfo ---------------------------------------------------------------------
    # --- memory (setmem, setmaxmem) -----------------------------------------------------
    async def set_memory(self, ref: str, kib: int, maximum: bool, affect: Affect) -> None:
        """Live: the balloon's target (QMP ``balloon``; the live definition follows the
        guest's BALLOON_CHANGE). In the definition: drivers.memory.with_memory."""
        dom = self._get(ref)
        live, config = self._affect(dom, affect)
        if live:
            assert dom.run is not None
            check_live_memory(dom.run.live, kib, maximum)
        persistent = with_memory(dom.defn, kib, maximum) if config else None
        if persistent is not None:
            self._validate(persistent)
        if live:
            assert dom.run is not None
            await dom.execute(dom.run, "balloon", {"value": kib * 1024})
        if persistent is not None:
            await self._persist(persistent)
            dom.defn = persistent

    async def block_info(self, ref: str, target: str) -> BlockInfo:
        dom = self._get(ref)
        run = dom.run
        defn = run.live if run is not None else dom.defn
        disk = next((d for d in defn.disks if d.target_dev == target), None)
        if disk is None:
            raise InvalidArgument(f"domain '{defn.name}' has no disk {target}")
        if run is not None and run.monitor is not None:
            dev_id = device_id(disk)
            for entry in await dom.execute(run, "query-block") or []:
                qdev = str(entry.get("qdev", ""))
                if qdev == dev_id or qdev.startswith(f"/machine/peripheral/{dev_id}/"):
                    image = (entry.get("inserted") or {}).get("image") or {}
                    return await _sizes(target, str((entry.get("inserted") or {}).get("file", "")),
                                        int(image.get("virtual-size", 0)),
                                        int(image.get("actual-size", 0)))  # fmt: skip
            raise OperationFailed(f"QEMU does not know disk {target} of '{defn.name}'")
        path, fmt = disk.source_path, disk.driver_type
        if disk.type == "volume":
            resolved = next(
                iter((await self._resolve_volumes(only_disk(defn, disk.element))).values())
            )
            self._leases.release_one(defn.uuid, resolved.pool, resolved.volume)
            if resolved.kind == "network":
                raise OperationInvalid(f"disk {target} is a network volume: start the domain")
            path, fmt = resolved.path, fmt or resolved.format
        if not path:
            raise OperationInvalid(f"disk {target} of '{defn.name}' has no source")
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "info", "--output=json", "-U", *(["-f", fmt] if fmt else []), path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(self._settings.qmp_timeout):
            out, err = await proc.communicate()
        if proc.returncode != 0:
            raise OperationFailed(f"cannot inspect {path}: {err.decode(errors='replace')[-300:]}")
        info = json.loads(out)
        return await _sizes(target, path, int(info.get("virtual-size", 0)),
                            int(info.get("actual-size", 0)))  # fmt: skip


async def _sizes(target: str, path: str, capacity: int, allocation: int) -> BlockInfo:
    physical = capacity
    if path.startswith("/"):
        with contextlib.suppress(OSError):
            st = await asyncio.to_thread(os.stat, path)
            if st.st_size:
                physical = st.st_size
    return BlockInfo(target, capacity, allocation, physical)
