"""Which disks a copy-storage migration moves (libvirt's rules), for every driver that
implements :class:`drivers.base.CopyStorage`."""

from __future__ import annotations

from virtbus.domain import DomainDefinition
from virtbus.domain.model import Disk
from virtbus.errors import ConfigUnsupported

COPIED_TYPES = ("file", "volume")


def copied_disks(defn: DomainDefinition) -> list[Disk]:
    """The disks a copy-storage migration moves, as libvirt picks them: every writable,
    unshared disk with a source; CONFIG_UNSUPPORTED for one that is not a file or a
    volume (a block device or a network disk cannot be made on the destination)."""
    out = []
    for disk in defn.disks:
        if disk.readonly or disk.shareable or disk.device not in ("disk", "lun"):
            continue
        source = disk.element.find("source")
        if disk.type == "volume" or disk.source_path or source is not None:
            if disk.type not in COPIED_TYPES:
                raise ConfigUnsupported(
                    f"disk '{disk.target_dev}' of domain '{defn.name}' is type='{disk.type}':"
                    " copy-storage copies only file and volume disks (make it read-only or"
                    " shareable to leave it out)"
                )
            if disk.element.find("transient") is not None:
                raise ConfigUnsupported(
                    f"disk '{disk.target_dev}' of domain '{defn.name}' is transient: it"
                    " cannot be copied"
                )
            out.append(disk)
    return out
