"""Real QEMU guests for the test suite, built from Debian packages into a cache (see README).

The builder itself lives in :mod:`virtbus.guests` (``virtbus demo`` boots the guest too);
its names are re-exported here, loaded lazily, so existing tests keep working.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from virtbus.guests.build import TestGuest

CONTROL_PORT_NAME = "org.virtbus.guest.0"  # virtio-serial port the guest reads commands from
READY_MARKER = "VIRTBUS-GUEST-READY"
TICK_MARKER = "VIRTBUS-TICK"

_BUILD_NAMES = {
    "GuestBuildError",
    "GuestBuildSettings",
    "TestGuest",
    "build_test_guest",
    "default_cache_root",
    "disk_sector",
    "ensure_test_guest",
    "expected_disk_md5",
}

__all__ = [
    "CONTROL_PORT_NAME",
    "READY_MARKER",
    "TICK_MARKER",
    "FirmwareGuest",
    "firmware_guest",
    "qemu_argv",
    *sorted(_BUILD_NAMES),
]


def __getattr__(name: str) -> Any:
    if name in _BUILD_NAMES:
        return getattr(importlib.import_module("virtbus.guests.build"), name)
    raise AttributeError(name)


@dataclass(frozen=True)
class FirmwareGuest:
    """A guest with nothing to build: no kernel, no disk, so SeaBIOS runs and finds no boot
    device. It lives forever, answers QMP, can be paused, resumed, migrated and destroyed,
    but ignores ACPI power-off and prints nothing. It is the cheap guest for KVM (where
    kernel guests hang on this nested machine) and for scale tests."""

    memory_mib: int = 128
    vcpus: int = 1

    def domain_xml(self, name: str, domain_type: str = "kvm") -> str:
        """Minimal libvirt domain XML for this guest (no <os><kernel>, no disks)."""
        return (
            f"<domain type='{domain_type}'><name>{name}</name>"
            f"<memory unit='MiB'>{self.memory_mib}</memory><vcpu>{self.vcpus}</vcpu>"
            "<os><type arch='x86_64' machine='q35'>hvm</type></os>"
            "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>"
        )


def firmware_guest() -> FirmwareGuest:
    """The firmware-only guest (see FirmwareGuest): nothing to download or cache."""
    return FirmwareGuest()


def qemu_argv(
    guest: TestGuest,
    *,
    console: Path,
    qmp: Path,
    control: Path | None = None,
    port: Path | None = None,
    disk: Path | None = None,
    pvpanic: bool = True,
    memory_mib: int = 256,
    extra_cmdline: str = "",
    accel: str = "tcg",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """A plain qemu-system-x86_64 command line for the test guest.

    QEMU connects as a client to UNIX sockets the caller listens on: `console` (ttyS0,
    markers), `qmp`, `control` (ttyS1, commands) and `port` (the virtio-serial port named
    CONTROL_PORT_NAME); listening first means no early output or event is lost. `disk` is
    attached as virtio-blk (/dev/vda): pass a clone, never `guest.disk` itself.
    """
    cmdline = f"{guest.cmdline} {extra_cmdline}".strip()
    argv = [
        "qemu-system-x86_64", "-accel", accel, "-machine", "q35", "-nodefaults",
        "-no-user-config", "-display", "none", "-m", str(memory_mib),
        "-kernel", str(guest.kernel), "-initrd", str(guest.initramfs), "-append", cmdline,
        "-chardev", f"socket,id=con,path={console}", "-serial", "chardev:con",
        "-qmp", f"unix:{qmp}",
    ]  # fmt: skip
    if control is not None:
        argv += ["-chardev", f"socket,id=ctl,path={control}",
                 "-device", "isa-serial,chardev=ctl"]  # fmt: skip
    if port is not None:
        argv += ["-device", "virtio-serial-pci,id=vser0",
                 "-chardev", f"socket,id=port,path={port}",
                 "-device", f"virtserialport,chardev=port,name={CONTROL_PORT_NAME}"]  # fmt: skip
    if disk is not None:
        argv += ["-drive", f"if=none,id=disk0,file={disk},format=raw",
                 "-device", "virtio-blk-pci,drive=disk0"]  # fmt: skip
    if pvpanic:
        argv += ["-device", "pvpanic"]
    return [*argv, *extra_args]
