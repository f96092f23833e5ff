"""XML that virsh's ``*-as`` verbs write from their arguments (``pool-define-as``,
``pool-create-as``, ``attach-disk``), and ``domblklist``'s reading of a definition: the
client side of those verbs, kept here so every client builds the same documents."""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from virtbus.domain import DomainDefinition
from virtbus.domain.serialize import dumps
from virtbus.errors import InvalidArgument
from virtbus.storage.pool import POOL_TYPES


@dataclass(frozen=True, slots=True)
class PoolArgs:
    """``virsh pool-define-as NAME TYPE [--source-host H[:P]] [--source-path P] ...``."""

    name: str
    type: str
    source_host: str | None = None
    source_path: str | None = None
    source_dev: str | None = None
    source_name: str | None = None
    source_format: str | None = None
    source_initiator: str | None = None
    target: str | None = None


def pool_xml(args: PoolArgs) -> str:
    """The ``<pool>`` virsh builds (virshBuildPoolXML)."""
    if args.type not in POOL_TYPES:
        raise InvalidArgument(f"unknown pool type '{args.type}' (one of {', '.join(POOL_TYPES)})")
    root = etree.Element("pool", type=args.type)
    etree.SubElement(root, "name").text = args.name
    if any((args.source_host, args.source_path, args.source_dev, args.source_name,
            args.source_format, args.source_initiator)):  # fmt: skip
        src = etree.SubElement(root, "source")
        if args.source_host:
            host, port = _host_port(args.source_host)
            etree.SubElement(src, "host", {"name": host, **({"port": port} if port else {})})
        if args.source_path:
            etree.SubElement(src, "dir", path=args.source_path)
        if args.source_dev:
            etree.SubElement(src, "device", path=args.source_dev)
        if args.source_format:
            etree.SubElement(src, "format", type=args.source_format)
        if args.source_name:
            etree.SubElement(src, "name").text = args.source_name
        if args.source_initiator:
            init = etree.SubElement(src, "initiator")
            etree.SubElement(init, "iqn", name=args.source_initiator)
    if args.target:
        target = etree.SubElement(root, "target")
        etree.SubElement(target, "path").text = args.target
    return dumps(root)


def _host_port(value: str) -> tuple[str, str | None]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` (virsh's --source-host)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, rest.removeprefix(":") or None
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host, port or None
    return value, None


@dataclass(frozen=True, slots=True)
class DiskArgs:
    """``virsh attach-disk DOMAIN SOURCE TARGET [--targetbus B] [--subdriver F] ...``."""

    source: str
    target: str
    targetbus: str | None = None
    driver: str | None = None
    subdriver: str | None = None  # the image format (raw, qcow2)
    cache: str | None = None
    io: str | None = None
    type: str | None = None  # disk (default) | cdrom | floppy | lun
    mode: str | None = None  # readonly | shareable
    sourcetype: str | None = None  # file (default) | block
    serial: str | None = None


def disk_xml(args: DiskArgs) -> str:
    """The ``<disk>`` virsh attach-disk builds (cmdAttachDisk)."""
    if args.mode not in (None, "readonly", "shareable"):
        raise InvalidArgument(f"no support for mode '{args.mode}' (readonly or shareable)")
    if args.sourcetype not in (None, "file", "block"):
        raise InvalidArgument(f"unknown source type '{args.sourcetype}' (file or block)")
    kind = args.sourcetype or ("block" if args.source.startswith("/dev/") else "file")
    root = etree.Element("disk", type=kind, device=args.type or "disk")
    if args.driver or args.subdriver or args.cache or args.io:
        attrs = {"name": args.driver or "qemu"}
        for key, value in (("type", args.subdriver), ("cache", args.cache), ("io", args.io)):
            if value:
                attrs[key] = value
        etree.SubElement(root, "driver", attrs)
    etree.SubElement(root, "source", {"file" if kind == "file" else "dev": args.source})
    target = {"dev": args.target}
    if args.targetbus:
        target["bus"] = args.targetbus
    etree.SubElement(root, "target", target)
    if args.mode:
        etree.SubElement(root, args.mode)
    if args.serial:
        etree.SubElement(root, "serial").text = args.serial
    return dumps(root)


@dataclass(frozen=True, slots=True)
class BlockListEntry:
    """One row of ``virsh domblklist [--details]``."""

    type: str
    device: str
    target: str
    source: str  # a path, ``pool/volume`` for a volume disk, or ``-`` when empty


def block_list(defn: DomainDefinition) -> list[BlockListEntry]:
    out = []
    for disk in defn.disks:
        src = disk.element.find("source")
        source = disk.source_path or "-"
        if disk.type == "volume" and src is not None:
            source = f"{src.get('pool')}/{src.get('volume')}"
        elif disk.type == "network" and src is not None:
            source = f"{src.get('protocol') or disk.source_protocol}:{src.get('name') or ''}"
        out.append(BlockListEntry(disk.type, disk.device, disk.target_dev, source))
    return out
