"""Device cgroups: each QEMU may open only the device nodes its domain is given.

libvirt's QEMU driver puts every QEMU in a cgroup of its own and, in its ``devices``
controller, denies every device except ``cgroup_device_acl`` (qemu.conf) and what the
domain uses. With the QEMU driver option ``cgroup_devices`` (``on``, or ``auto``: where
the hierarchy exists) virtbus does the same on the cgroup v1 ``devices`` hierarchy
(found in the mount table, usually ``/sys/fs/cgroup/devices``):

- the launch step :class:`DeviceCgroups` creates ``<hierarchy>/virtbus/<key>-<uuid>``
  (``key``: 8 hex digits of the agent's run dir, so two agents of one machine, e.g. a
  migration's source and destination in a test, never share a group), writes ``a`` to
  its ``devices.deny`` and then allows: libvirt's default ACL (:data:`DEFAULT_ACL`, those
  of its nodes this host has), every pty (``c 136:* rw``), ``/dev/net/tun`` for
  ``<interface type='ethernet'|'bridge'>`` (QEMU or its bridge helper opens the tap),
  ``/dev/vhost-net`` for a ``<driver name='vhost'>`` NIC, ``cgroup_devices_allow``, and
  every device node the definition names (:func:`domain_rules`): a block device behind a
  disk (its source, or the volume it resolved to) ``rwm``, or ``rm`` when the disk is
  ``<readonly/>``; a char device (``<serial type='dev'>``, rng, TPM, evdev, render node,
  ``<hostdev>`` block/char sources) ``rw``;
- QEMU joins the group before it is exec'd (:func:`drivers.qemu.process.spawn` writes
  its pid to ``cgroup.procs`` in the child, as root, before dropping to the QEMU user),
  so it never opens anything outside it;
- a hot-plugged disk's device is allowed before ``blockdev-add`` (:meth:`allow`) and
  revoked after the detach unless another disk still uses it (:meth:`revoke`); a NIC
  hot-plugged live gets what :func:`base_rules` gives it (``/dev/net/tun``, vhost-net);
- the group outlives an agent restart (a kernel object, found again by its name) and is
  removed when the run ends (the step's ``release``: after QEMU is gone), also after a
  failed launch; a launch that cannot build it fails with OPERATION_FAILED and leaves no
  group behind.

cgroup v2 controls devices with BPF programs attached to a group, not with files: not
supported yet. ``cgroup_devices=on`` on a host without the v1 hierarchy stops the agent at
its start (CONFIG_UNSUPPORTED, logged by the driver's open); ``auto`` logs that it is off;
``off`` (the default, as for ``qemu_user``: an opt-in confinement that could refuse
devices a running setup uses) changes nothing.

Not yet: VFIO (``/dev/vfio/*`` of a PCI ``<hostdev>``), USB ``<hostdev>`` nodes, and block
devices opened by block jobs or snapshots (a ``blockcopy`` destination on a device).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from drivers.qemu import confine
from virtbus.domain import DomainDefinition
from virtbus.domain.model import Element
from virtbus.errors import ConfigUnsupported, InvalidArgument, OperationFailed, OperationInvalid

if TYPE_CHECKING:
    from drivers.qemu.launch import LaunchPlan

log = logging.getLogger(__name__)
MODES = ("off", "on", "auto")
PARENT = "virtbus"  # the group every domain's group is in (created once, kept)
#: libvirt's cgroup_device_acl (qemu.conf's default)
DEFAULT_ACL = (
    "/dev/null", "/dev/full", "/dev/zero", "/dev/random", "/dev/urandom", "/dev/ptmx",
    "/dev/kvm", "/dev/userfaultfd",
)  # fmt: skip
PTY_MAJOR = 136  # /dev/pts/*
TAP_TYPES = ("ethernet", "bridge")  # QEMU (or qemu-bridge-helper) opens /dev/net/tun
RMDIR_WAIT = 1.0  # a group whose last task is exiting is busy for a moment


@dataclass(frozen=True, order=True, slots=True)
class Device:
    """A device node's identity: type (``b``/``c``), major, minor (None: every minor)."""

    type: str
    major: int
    minor: int | None

    def rule(self, access: str) -> str:
        """The line for devices.allow/deny."""
        minor = "*" if self.minor is None else str(self.minor)
        return f"{self.type} {self.major}:{minor} {access}"


Rules = dict[Device, str]  # device -> access ("rwm" subset, in that order)


def parse_mode(text: str) -> str:
    """The ``cgroup_devices`` setting; INVALID_ARG naming it otherwise."""
    mode = text.strip().lower()
    mode = {"true": "on", "yes": "on", "1": "on", "false": "off", "no": "off", "0": "off"}.get(
        mode, mode
    )
    if mode not in MODES:
        raise InvalidArgument(
            f"QEMU driver option cgroup_devices={text!r}: expected one of {', '.join(MODES)}"
        )
    return mode


def find_hierarchy(mounts: str = "/proc/self/mounts") -> Path | None:
    """Where the cgroup v1 ``devices`` controller is mounted (None: not on this host)."""
    try:
        text = Path(mounts).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup" and "devices" in fields[3].split(","):
            return Path(fields[1].replace("\\040", " "))
    return None


def device_of(path: str) -> Device | None:
    """The block or char device ``path`` is (symlinks followed); None for anything else."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    if stat.S_ISBLK(info.st_mode):
        kind = "b"
    elif stat.S_ISCHR(info.st_mode):
        kind = "c"
    else:
        return None
    return Device(kind, os.major(info.st_rdev), os.minor(info.st_rdev))


def _merge(rules: Rules, dev: Device, access: str) -> None:
    have = set(rules.get(dev, "")) | set(access)
    rules[dev] = "".join(c for c in "rwm" if c in have)


def element_rules(el: Element, volume: str | None = None) -> Rules:
    """The device nodes one ``<devices>`` child names (a disk: also the volume it resolved
    to), with the access its QEMU needs."""
    out: Rules = {}
    paths = [hp.path for hp in confine.host_paths(el)
             if hp.kind in (confine.Kind.FILE, confine.Kind.DEVICE)]  # fmt: skip
    if volume:
        paths.append(volume)
    readonly = el.tag == "disk" and el.find("readonly") is not None
    for path in paths:
        dev = device_of(path)
        if dev is None:
            continue
        if dev.type == "b":
            _merge(out, dev, "rm" if readonly else "rwm")
        else:
            _merge(out, dev, "rw")
    return out


def base_rules(defn: DomainDefinition, extra: Iterable[str] = ()) -> Rules:
    """libvirt's default ACL, ptys, what the NICs need and the operator's extra nodes."""
    out: Rules = {Device("c", PTY_MAJOR, None): "rw"}
    paths = [*DEFAULT_ACL, *extra]
    for device in defn.devices:
        el = device.element
        if device.tag != "interface":
            continue
        if el.get("type") in TAP_TYPES:
            paths.append("/dev/net/tun")
        driver = el.find("driver")
        if driver is not None and driver.get("name") == "vhost":
            paths.append("/dev/vhost-net")
    for path in paths:
        dev = device_of(path)
        if dev is not None:
            _merge(out, dev, "rw")
    return out


def domain_rules(defn: DomainDefinition, volumes: Mapping[int, str],
                 extra: Iterable[str] = ()) -> Rules:  # fmt: skip
    """Every rule of ``defn``'s group: :func:`base_rules` and each device's nodes
    (``volumes``: the local path each ``<disk type='volume'>``, by disk index, resolved to)."""
    out = base_rules(defn, extra)
    for disk in defn.disks:
        for dev, access in element_rules(disk.element, volumes.get(disk.index)).items():
            _merge(out, dev, access)
    for device in defn.devices:
        if device.tag != "disk":
            for dev, access in element_rules(device.element).items():
                _merge(out, dev, access)
    return out


def read_list(group: Path) -> Rules:
    """The group's ``devices.list`` (what the kernel allows it now)."""
    out: Rules = {}
    for line in (group / "devices.list").read_text().split("\n"):
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ("b", "c"):
            continue  # "a *:* rwm": allows everything (not a group of ours yet)
        major, _, minor = parts[1].partition(":")
        if major == "*":
            continue
        out[Device(parts[0], int(major), None if minor == "*" else int(minor))] = parts[2]
    return out


def _write(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _procs(group: Path) -> list[int]:
    try:
        return [int(p) for p in (group / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def agent_key(run_dir: Path) -> str:
    """The prefix of an agent's group names: its run dir's, so two agents never meet."""
    return hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]


class DeviceCgroups:
    """The launch step that puts a domain's QEMU in a devices cgroup of its own (module
    docstring). ``mode``: the ``cgroup_devices`` setting; ``extra``: device nodes every
    domain may use besides the default ACL (``cgroup_devices_allow``)."""

    def __init__(self, mode: str, run_dir: Path, *, extra: Iterable[str] = (),
                 hierarchy: Path | None = None,
                 mounts: str = "/proc/self/mounts") -> None:  # fmt: skip
        self.mode = parse_mode(mode)
        self.extra = tuple(extra)
        for path in self.extra:
            if not path.startswith("/dev/"):
                raise InvalidArgument(
                    f"QEMU driver option cgroup_devices_allow: {path!r} is not a device node "
                    "under /dev"
                )
        self.root: Path | None = None  # the v1 devices hierarchy; None: the feature is off
        self._key = agent_key(run_dir)
        if self.mode == "off":
            return
        self.root = hierarchy or find_hierarchy(mounts)
        if self.root is None and self.mode == "auto":
            log.info("cgroup_devices=auto: no cgroup v1 devices hierarchy here, QEMU runs "
                     "without device rules")  # fmt: skip

    def check(self) -> None:
        """CONFIG_UNSUPPORTED when ``on`` and this host has no v1 hierarchy (the driver's
        open: the agent logs it and does not start)."""
        if self.mode == "on" and self.root is None:
            raise ConfigUnsupported(
                "QEMU driver option cgroup_devices=on: this host has no cgroup v1 "
                "'devices' hierarchy (none in /proc/self/mounts); cgroup v2 device "
                "control (BPF programs) is not supported yet: mount the v1 controller "
                "or set cgroup_devices=off (or auto)"
            )

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def group(self, uuid: str) -> Path | None:
        """The domain's group (whether it exists or not); None when the feature is off."""
        if self.root is None:
            return None
        return self.root / PARENT / f"{self._key}-{uuid}"

    def procs(self, uuid: str) -> Path | None:
        """The ``cgroup.procs`` a new QEMU of ``uuid`` writes its pid to before exec."""
        group = self.group(uuid)
        return group / "cgroup.procs" if group is not None else None

    # --- the launch step ----------------------------------------------------------------
    async def acquire(self, plan: LaunchPlan) -> None:
        if self.root is None:
            return
        live = plan.live
        volumes = {i: v.path for i, v in (plan.volumes or {}).items() if v.kind != "network"}
        rules = await asyncio.to_thread(domain_rules, live, volumes, self.extra)
        await asyncio.to_thread(self._create, live.uuid, live.name, rules)

    def _create(self, uuid: str, name: str, rules: Rules) -> None:
        group = self.group(uuid)
        assert group is not None and self.root is not None
        try:
            group.parent.mkdir(exist_ok=True)
            group.mkdir()
        except FileExistsError:
            pids = _procs(group)
            if pids:
                raise OperationInvalid(
                    f"cannot start domain '{name}': its devices cgroup {group} holds "
                    f"processes ({', '.join(map(str, pids))}) this agent does not run"
                ) from None
            # left by a run that ended while no agent was there: built afresh below
        except OSError as exc:
            raise OperationFailed(
                f"cannot start domain '{name}': cannot create its devices cgroup {group}: "
                f"{exc.strerror} (QEMU driver option cgroup_devices={self.mode})"
            ) from exc
        line = "a"
        try:
            _write(group / "devices.deny", line)
            for dev, access in sorted(rules.items()):
                line = dev.rule(access)
                _write(group / "devices.allow", line)
        except OSError as exc:
            self._remove(group)
            raise OperationFailed(
                f"cannot start domain '{name}': cannot set up its devices cgroup {group} "
                f"('{line}'): {exc.strerror}"
            ) from exc

    async def release(self, uuid: str) -> None:
        """Remove the group (its QEMU is gone: the run ended, or its launch failed)."""
        group = self.group(uuid)
        if group is not None:
            await asyncio.to_thread(self._remove, group)

    @staticmethod
    def _remove(group: Path) -> None:
        deadline = time.monotonic() + RMDIR_WAIT
        while True:
            try:
                group.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                    log.warning("cannot remove devices cgroup %s (%s); pids %s", group,
                                exc.strerror, _procs(group))  # fmt: skip
                    return
            time.sleep(0.02)

    # --- hot-plug -----------------------------------------------------------------------
    async def allow(self, uuid: str, name: str, rules: Rules) -> Rules:
        """Add ``rules`` (a hot-plugged device's) before QEMU opens it; the ones that were
        new are returned (what a failed attach revokes). OPERATION_FAILED if refused."""
        group = self.group(uuid)
        if group is None or not rules:
            return {}
        return await asyncio.to_thread(self._allow, group, name, rules)

    @staticmethod
    def _allow(group: Path, name: str, rules: Rules) -> Rules:
        try:
            have = read_list(group)
        except OSError as exc:
            raise OperationFailed(
                f"domain '{name}': cannot read its devices cgroup {group}: {exc.strerror}"
            ) from exc
        added: Rules = {}
        for dev, access in sorted(rules.items()):
            missing = "".join(c for c in access if c not in have.get(dev, ""))
            if not missing:
                continue
            try:
                _write(group / "devices.allow", dev.rule(missing))
            except OSError as exc:
                DeviceCgroups._deny(group, added)
                raise OperationFailed(
                    f"domain '{name}': its devices cgroup {group} refuses "
                    f"'{dev.rule(missing)}': {exc.strerror}"
                ) from exc
            added[dev] = missing
        return added

    async def revoke(self, uuid: str, rules: Rules, keep: Rules) -> None:
        """Take ``rules`` (a detached device's) off, but what ``keep`` (the devices the
        run still uses) needs."""
        group = self.group(uuid)
        if group is None or not rules:
            return
        drop: Rules = {}
        for dev, access in rules.items():
            gone = "".join(c for c in access if c not in keep.get(dev, ""))
            if gone:
                drop[dev] = gone
        await asyncio.to_thread(self._deny, group, drop)

    @staticmethod
    def _deny(group: Path, rules: Rules) -> None:
        for dev, access in rules.items():
            try:
                _write(group / "devices.deny", dev.rule(access))
            except OSError as exc:
                log.warning("cannot revoke '%s' in %s: %s", dev.rule(access), group, exc)

    async def in_use(self, defn: DomainDefinition, files: Iterable[tuple[str, bool]]) -> Rules:
        """What a running ``defn`` still needs: its base rules, its devices' nodes, and the
        block devices QEMU has open (``files``: path, read-only; query-block), which
        include the volumes its disks resolved to."""
        return await asyncio.to_thread(self._in_use, defn, list(files))

    def _in_use(self, defn: DomainDefinition, files: list[tuple[str, bool]]) -> Rules:
        out = domain_rules(defn, {}, self.extra)
        for path, readonly in files:
            dev = device_of(path)
            if dev is not None:
                _merge(out, dev, "rm" if readonly else "rwm")
        return out
