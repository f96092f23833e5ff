"""Disks: ``-blockdev`` nodes for every layer of a source (protocol node plus format
node, a backing chain as libvirt spells it in ``<backingStore>``) and the front-end
``-device``, following libvirt's ``qemu_block.c`` and ``qemuBuildDiskDeviceProps``.

Sources: files, block devices, directories (vvfat), network disks (nbd, iscsi, rbd,
gluster, http(s)/ftp(s)/tftp through QEMU's curl driver, ssh, nfs), NVMe controllers of
the host, vhost-user and vhost-vDPA. Secrets (iSCSI/Ceph auth, LUKS passphrases) are
``-object secret`` read from files the driver provides at start (see
:class:`SecretRef`); a definition that needs one is built, and start says which one is
missing.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from drivers.base import ResolvedVolume
from drivers.qemu import postparse
from drivers.qemu.argv_common import (
    BuildContext,
    DiskRuntime,
    json_arg,
    kv_escape,
    port_value,
    secret_path,
    unsupported,
)
from drivers.qemu.argv_virtio import onoff, virtio_props
from drivers.qemu.xmlnum import attr_int, num, num_text
from virtbus.domain import parse_int
from virtbus.domain.model import Disk, Element
from virtbus.errors import ConfigUnsupported, XMLError

# libvirt's cache modes -> (cache.direct, cache.no-flush, device write-cache)
CACHE_MODES: dict[str, tuple[bool, bool, bool]] = {
    "none": (True, False, True),
    "writeback": (False, False, True),
    "writethrough": (False, False, False),
    "directsync": (True, False, False),
    "unsafe": (False, True, True),
}
FORMATS = frozenset(
    {"raw", "qcow2", "qcow", "qed", "vmdk", "vpc", "vdi", "vhdx", "luks", "bochs", "cloop",
     "dmg", "parallels", "fat", "vvfat"}
)  # fmt: skip
PROTOCOL_PORTS = {
    "nbd": 10809, "iscsi": 3260, "rbd": 6789, "gluster": 24007, "http": 80, "https": 443,
    "ftp": 21, "ftps": 990, "tftp": 69, "ssh": 22, "vxhs": 9999,
}  # fmt: skip
CURL = frozenset({"http", "https", "ftp", "ftps", "tftp"})
_BUS_BY_PREFIX = {"vd": "virtio", "sd": "scsi", "hd": "ide"}
_DISK_CHILDREN = frozenset(
    {"driver", "source", "target", "readonly", "boot", "address", "serial", "alias",
     "backingStore", "shareable", "transient", "wwn", "vendor", "product", "geometry",
     "blockio", "iotune", "encryption", "auth", "mirror", "acpi", "throttlefilters",
     "seclabel"}
)  # fmt: skip
ERROR_POLICIES = frozenset({"stop", "report", "ignore", "enospace"})


@dataclass(frozen=True, slots=True)
class SecretRef:
    """A secret QEMU reads from ``path`` (base64); the driver must provide the file."""

    object_id: str
    path: Path
    usage: str  # libvirt's secret uuid or usage name, for the error when it is missing


def disk_name_index(dev: str) -> int:
    """libvirt's ``virDiskNameToIndex``: vda -> 0, sdb -> 1, sdaa -> 26."""
    idx = postparse.disk_name_index(dev)
    if idx < 0:
        raise ConfigUnsupported(f"cannot derive a drive address from <target dev='{dev}'>")
    return idx


def disk_bus(disk: Disk) -> str:
    return disk.target_bus or _BUS_BY_PREFIX.get(disk.target_dev[:2], "ide")


def _int(el: Element | None, name: str, default: int = 0) -> int:
    return attr_int(el, name, default)


def _drive_address(disk: Disk) -> tuple[int, int, int, int]:
    """(controller, bus, target, unit) from the completed ``<address type='drive'>``, or,
    for a disk not completed yet (one being hot-plugged), from its name as libvirt
    derives it."""
    a = disk.address
    if a is not None and a.get("type") == "drive":
        return (_int(a, "controller"), _int(a, "bus"), _int(a, "target"), _int(a, "unit"))
    idx = disk_name_index(disk.target_dev)
    bus = disk_bus(disk)
    if bus == "ide":
        return (idx // 4, (idx % 4) // 2, 0, idx % 2)
    if bus == "sata":
        return (idx // 6, 0, 0, idx % 6)
    if bus == "fdc":
        return (idx // 2, 0, 0, idx % 2)
    return (idx // 7, 0, 0, idx % 7)  # scsi


def _controller(ctx: BuildContext, ctype: str, index: int) -> Element | None:
    for c in ctx.defn.elements("devices/controller"):
        if c.get("type") == ctype and _int(c, "index") == index:
            return c
    return None


# ---------------------------------------------------------------------------- validation


def check_disks(ctx: BuildContext) -> None:
    """libvirt's disk checks (``qemuValidateDomainDeviceDefDisk`` and friends)."""
    seen: dict[tuple[str, int, int, int, int], str] = {}
    for disk in ctx.defn.disks:
        _check_disk(ctx, disk)
        bus = disk_bus(disk)
        if bus in ("ide", "sata", "scsi", "fdc"):
            key = (bus, *_drive_address(disk))
            if key in seen:
                raise ConfigUnsupported(
                    f"Found duplicate drive address for disk with target name "
                    f"'{disk.target_dev}' controller='{key[1]}' bus='{key[2]}' "
                    f"target='{key[3]}' unit='{key[4]}'"
                )
            seen[key] = disk.target_dev


def _check_disk(ctx: BuildContext, disk: Disk) -> None:
    el = disk.element
    dev = disk.target_dev
    where = f"<disk type='{disk.type}' device='{disk.device}'> ({dev})"
    for child in el:
        if isinstance(child.tag, str) and child.tag not in _DISK_CHILDREN:
            raise unsupported(f"<{child.tag}> in {where}")
    parsed = postparse.parse_disk_name(dev)
    if parsed is None:
        raise ConfigUnsupported(f"invalid disk target '{dev}'")
    if parsed[1] != 0:
        raise ConfigUnsupported(
            f"invalid disk target '{dev}', partitions can't appear in disk targets"
        )
    if disk.device not in ("disk", "cdrom", "floppy", "lun"):
        raise unsupported(f"<disk device='{disk.device}'>")
    if disk.type not in ("file", "block", "network", "dir", "nvme", "vhostuser", "vhostvdpa",
                         "volume"):  # fmt: skip
        raise unsupported(f"<disk type='{disk.type}'>")
    if disk.driver_name not in (None, "qemu"):
        raise ConfigUnsupported(f"unsupported driver name '{disk.driver_name}' for disk '{dev}'")
    fmt = disk.driver_type
    if fmt in ("iso",):
        raise ConfigUnsupported(
            "storage format 'iso' is not directly supported by QEMU, use 'raw' instead"
        )
    if fmt == "dir":
        raise ConfigUnsupported(
            "'directory' storage format is not directly supported by QEMU, use 'dir' disk "
            "type instead"
        )
    if fmt is not None and fmt not in FORMATS:
        raise ConfigUnsupported(f"'{fmt}' storage format is not supported")
    bus = disk_bus(disk)
    a = disk.address
    if a is not None and a.get("type") not in (None, "drive", "pci", "usb", "ccw"):
        raise unsupported(f"<address type='{a.get('type')}'> for disk {dev}")
    if a is not None:
        want = {"ide": "drive", "sata": "drive", "scsi": "drive", "fdc": "drive",
                "virtio": "pci", "usb": "usb"}.get(bus)  # fmt: skip
        if want is not None and a.get("type") != want:
            if bus == "usb":
                raise ConfigUnsupported("unexpected address type for usb disk")
            raise ConfigUnsupported(
                f"Invalid address type '{a.get('type')}' for the disk '{dev}' with the bus "
                f"type '{bus}'"
            )
    if bus not in ("virtio", "scsi", "ide", "sata", "fdc", "usb"):
        raise unsupported(f"<target bus='{bus}'> for disk {dev}")
    if disk.device == "lun":
        if disk.type not in ("block", "network"):
            raise ConfigUnsupported("disk device='lun' is only valid for block type disk source")
        if bus not in ("scsi", "virtio"):
            raise ConfigUnsupported(f"disk device='lun' is not supported for bus='{bus}'")
        if bus == "virtio":
            raise ConfigUnsupported(
                "This QEMU doesn't support SCSI emulation with 'virtio-blk' device"
            )
    if disk.device == "cdrom" and bus == "virtio":
        raise unsupported("<disk device='cdrom'> on bus 'virtio'")
    if disk.device == "floppy" and bus != "fdc":
        raise ConfigUnsupported(f"floppy disk {dev} needs bus='fdc'")
    if bus == "fdc" and disk.device != "floppy":
        raise ConfigUnsupported(f"disk {dev} on bus 'fdc' must be a floppy")
    if bus == "fdc" and ctx.q35 and not ctx.machine.startswith("pc-q35-"):
        pass
    if (
        disk.source_path is None
        and not _has_source(disk)
        and disk.device not in ("cdrom", "floppy")
    ):
        raise ConfigUnsupported(f"{where} has no <source>: only a cdrom or floppy may be empty")
    if bus == "usb" and not _has_source(disk):
        raise ConfigUnsupported("'usb' disk must not be empty")
    if disk.io == "native" and disk.cache not in ("none", "directsync", None):
        raise ConfigUnsupported(
            f"{where}: io='native' needs cache='none' or 'directsync' (O_DIRECT)"
        )
    if disk.readonly and bus in ("ide", "sata") and disk.device == "disk":
        raise ConfigUnsupported(f"readonly {bus} disks are not supported")
    if disk.readonly and bus == "usb" and disk.device == "disk":
        pass
    vendor, product = _text(el, "vendor"), _text(el, "product")
    if vendor is not None and bus != "scsi":
        raise ConfigUnsupported("Only scsi disk supports 'vendor'")
    if product is not None and bus not in ("scsi", "ide", "sata"):
        raise ConfigUnsupported("Only scsi disk supports 'product'")
    if vendor is not None and len(vendor) > 8:
        raise ConfigUnsupported("disk vendor is more than 8 characters")
    if product is not None and len(product) > 16:
        raise ConfigUnsupported("disk product is more than 16 characters")
    if disk.shareable and fmt not in (None, "raw") and disk.readonly is False:
        raise ConfigUnsupported(
            f"shared access for disk '{dev}' requires use of supported storage format"
        )
    enc = el.find("encryption")
    src = el.find("source")
    if enc is not None and src is not None and src.find("encryption") is not None:
        raise ConfigUnsupported("an <encryption> definition already found for disk source")
    if el.find("auth") is not None and src is not None and src.find("auth") is not None:
        raise ConfigUnsupported("an <auth> definition already found for disk source")
    enc = enc if enc is not None else (src.find("encryption") if src is not None else None)
    if enc is not None:
        if enc.find("secret") is None and enc.get("format") not in ("default",):
            pass
        if fmt not in ("raw", "qcow2", None) and enc.get("format") in ("luks", "luks2"):
            raise ConfigUnsupported(
                "encryption is supported only with 'raw' and 'qcow2' image format"
            )
        if enc.find("cipher") is not None or enc.find("ivgen") is not None:
            raise ConfigUnsupported("supplying <cipher> for domain disk definition is unnecessary")
    if el.find("iotune") is not None and el.find("throttlefilters") is not None:
        raise ConfigUnsupported(
            f"block 'throttlefilters' can't be used together with 'iotune' for disk '{dev}'"
        )
    driver = el.find("driver")
    if driver is not None:
        for attr in ("error_policy", "rerror_policy"):
            value = driver.get(attr)
            if value is not None and value not in ERROR_POLICIES:
                raise XMLError(f"invalid <driver {attr}='{value}'>")
    if disk.type == "network":
        _check_network_source(disk)


def _text(el: Element, tag: str) -> str | None:
    child = el.find(tag)
    return child.text if child is not None and child.text else None


def _has_source(disk: Disk) -> bool:
    if disk.type == "volume":
        return True  # the agent's pool resolves it (a placeholder while validating)
    src = disk.element.find("source")
    if src is None:
        return False
    if disk.type == "network":
        return bool(src.get("protocol"))
    if disk.type in ("nvme", "vhostuser", "vhostvdpa"):
        return True
    return bool(src.get("file") or src.get("dev") or src.get("dir"))


def _check_network_source(disk: Disk) -> None:
    src = disk.element.find("source")
    if src is None:
        return  # an empty network cdrom
    proto = src.get("protocol")
    if proto == "sheepdog":
        raise ConfigUnsupported(
            "'sheepdog' protocol is no longer supported by any hypervisor driver"
        )
    if proto not in PROTOCOL_PORTS and proto not in ("nfs",):
        raise unsupported(f"<source protocol='{proto}'> for disk {disk.target_dev}")
    hosts = src.findall("host")
    if proto in ("iscsi", "nbd", "ssh", "nfs", "vxhs") and len(hosts) != 1:
        if proto == "nbd" and not hosts:
            pass
        else:
            raise ConfigUnsupported(f"{'iSCSI' if proto == 'iscsi' else proto} protocol "
                                    "accepts only one host")  # fmt: skip
    auth = disk.element.find("auth")
    auth = auth if auth is not None else src.find("auth")
    if auth is not None:
        secret = auth.find("secret")
        stype = secret.get("type") if secret is not None else None
        if stype is None:
            raise ConfigUnsupported("unknown secret type '<null>'")
        expected = {"iscsi": "iscsi", "rbd": "ceph"}.get(str(proto))
        if expected is not None and stype != expected:
            raise ConfigUnsupported(f"invalid secret type '{stype}'")


# ---------------------------------------------------------------------------- sources


def _host(host: Element, proto: str) -> dict[str, Any]:
    transport = host.get("transport", "tcp")
    if transport == "unix":
        return {"type": "unix", "path": host.get("socket")}
    if transport not in ("tcp",):
        raise ConfigUnsupported(f"transport protocol '{transport}' is not yet supported")
    port = host.get("port") or str(PROTOCOL_PORTS.get(proto, 0))
    return {"type": "inet", "host": host.get("name"), "port": port}


def _secret(ctx: BuildContext, secret: Element | None, object_id: str) -> str:
    if secret is None:
        raise ConfigUnsupported(f"{object_id}: <secret> needs a uuid or usage")
    key = secret.get("uuid") or secret.get("usage")
    if not key:
        raise ConfigUnsupported(f"{object_id}: <secret> needs a uuid or usage")
    path = secret_path(ctx.settings, key)
    ctx.add("-object", json_arg({"qom-type": "secret", "id": object_id, "format": "base64",
                                 "file": str(path)}))  # fmt: skip
    ctx.secrets.append(SecretRef(object_id, path, key))
    return object_id


def _network_props(ctx: BuildContext, src: Element, node: str, auth: Element | None,
                   readonly: bool) -> dict[str, Any]:  # fmt: skip
    proto = str(src.get("protocol"))
    name = src.get("name") or ""
    hosts = src.findall("host")
    props: dict[str, Any] = {"driver": proto}
    if proto == "nbd":
        props["server"] = _host(hosts[0], proto) if hosts else {"type": "inet",
                                                               "host": "localhost",
                                                               "port": "10809"}  # fmt: skip
        if name:
            props["export"] = name
        tls = src.get("tls")
        if tls == "yes":
            props["tls-creds"] = f"{node}-tls0"
            ctx.add("-object", json_arg({"qom-type": "tls-creds-x509", "id": f"{node}-tls0",
                                         "dir": ctx.settings.nbd_tls_dir, "endpoint": "client",
                                         "verify-peer": True}))  # fmt: skip
            if src.get("tlsHostname"):
                props["tls-hostname"] = src.get("tlsHostname")
        reconnect = src.find("reconnect")
        if reconnect is not None and reconnect.get("delay"):
            props["reconnect-delay"] = _int(reconnect, "delay")
    elif proto == "iscsi":
        target, _, lun = name.partition("/")
        h = hosts[0]
        host_name = h.get("name", "")
        port = port_value(h.get("port") or "3260", "<host port")
        try:
            v6 = isinstance(ipaddress.ip_address(host_name), ipaddress.IPv6Address)
        except ValueError:
            v6 = False
        props |= {
            "portal": f"[{host_name}]:{port}" if v6 else f"{host_name}:{port}",
            "target": target,
            "lun": parse_int(lun or "0", "iSCSI LUN", minimum=0, maximum=16383),
            "transport": "tcp",
        }
        if auth is not None:
            props["user"] = auth.get("username")
            props["password-secret"] = _secret(ctx, auth.find("secret"), f"{node}-auth-secret0")
        initiator = src.find("initiator/iqn")
        if initiator is not None and initiator.get("name"):
            props["initiator-name"] = initiator.get("name")
    elif proto == "rbd":
        pool, _, image = name.partition("/")
        image, _, snapshot = image.partition("@")
        props |= {"pool": pool, "image": image}
        if snapshot:
            props["snapshot"] = snapshot
        config = src.find("config")
        if config is not None and config.get("file"):
            props["conf"] = config.get("file")
        if hosts:
            props["server"] = [{"host": h.get("name"), "port": h.get("port") or "6789"}
                               for h in hosts]  # fmt: skip
        if auth is not None:
            props["user"] = auth.get("username")
            props["auth-client-required"] = ["cephx", "none"]
            props["key-secret"] = _secret(ctx, auth.find("secret"), f"{node}-auth-secret0")
    elif proto == "gluster":
        volume, _, path = name.lstrip("/").partition("/")
        props |= {"volume": volume, "path": "/" + path if not path.startswith("/") else path,
                  "server": [_host(h, proto) for h in hosts]}  # fmt: skip
    elif proto in CURL:
        h = hosts[0] if hosts else None
        host_part = h.get("name", "") if h is not None else ""
        url_port = h.get("port") if h is not None else None
        url = f"{proto}://{host_part}{':' + url_port if url_port else ''}/{name.lstrip('/')}"
        if src.get("query"):
            url += "?" + str(src.get("query"))
        props["url"] = url
        ssl = src.find("ssl")
        if ssl is not None and ssl.get("verify") in ("yes", "no"):
            props["sslverify"] = ssl.get("verify") == "yes"
        for tag, prop in (("readahead", "readahead"), ("timeout", "timeout")):
            child = src.find(tag)
            if child is not None and child.get("size" if tag == "readahead" else "seconds"):
                props[prop] = _int(child, "size" if tag == "readahead" else "seconds")
        cookies = src.find("cookies")
        if cookies is not None:
            props["cookie"] = "; ".join(
                f"{c.get('name')}={c.text or ''}" for c in cookies.findall("cookie")
            )
        if auth is not None:
            props["username"] = auth.get("username")
            props["password-secret"] = _secret(ctx, auth.find("secret"), f"{node}-auth-secret0")
    elif proto == "ssh":
        h = hosts[0]
        props |= {"path": name, "server": {"host": h.get("name"), "port": h.get("port") or "22"}}
        user = auth.get("username") if auth is not None else None
        identity = src.find("identity")
        if user is None and identity is not None:
            user = identity.get("username")
        if user:
            props["user"] = user
        khosts = src.find("knownHosts")
        if khosts is None:
            props["host-key-check"] = {"mode": "none"}
    elif proto == "nfs":
        props |= {"server": {"host": hosts[0].get("name"), "type": "inet"}, "path": name}
        ident = src.find("identity")
        if ident is not None:
            for attr, prop in (("user", "user"), ("group", "group")):
                raw = ident.get(attr, "").lstrip("+")
                if raw.isascii() and raw.isdigit():
                    props[prop] = parse_int(raw, f"<identity {attr}", maximum=0xFFFFFFFF)
    else:
        raise unsupported(f"<source protocol='{proto}'>")
    return props


@dataclass(slots=True)
class _Layer:
    type: str
    source: Element | None
    fmt: str
    element: Element  # <disk> or <backingStore>
    volume: ResolvedVolume | None = None  # a volume disk's resolution


def _chain(disk: Disk, resolved: ResolvedVolume | None = None) -> tuple[list[_Layer], bool]:
    """The layers of a disk's image chain, top first; whether it is terminated
    (``<backingStore/>``: no further backing image, QEMU must not probe one). A volume
    disk's top layer is what its pool resolved it to."""
    if resolved is not None:
        fmt = disk.driver_type or resolved.format or "raw"
        if resolved.kind == "network":
            top = _Layer("volume-network", disk.element.find("source"), fmt, disk.element,
                         resolved)  # fmt: skip
        else:
            attr = "dev" if resolved.kind == "block" else "file"
            src = etree.Element("source", {attr: resolved.path})
            top = _Layer(resolved.kind, src, fmt, disk.element, resolved)
        return [top], True
    layers = [_Layer(disk.type, disk.element.find("source"), disk.driver_type or "raw",
                     disk.element)]  # fmt: skip
    el = disk.element.find("backingStore")
    terminated = False
    while el is not None:
        if el.get("type") is None and el.find("source") is None:
            terminated = True
            break
        fmt_el = el.find("format")
        fmt = fmt_el.get("type", "raw") if fmt_el is not None else "raw"
        layers.append(_Layer(el.get("type", "file"), el.find("source"), fmt, el))
        el = el.find("backingStore")
    return layers, terminated


def _storage_node(ctx: BuildContext, disk: Disk, layer: _Layer, node: str, *, top: bool,
                  common: dict[str, Any], ro: bool) -> dict[str, Any]:  # fmt: skip
    src = layer.source
    if src is None:
        raise ConfigUnsupported(f"disk {disk.target_dev}: a backing layer has no <source>")
    auth = disk.element.find("auth") if top else None
    if auth is None:
        auth = src.find("auth")
    ltype = layer.type
    props: dict[str, Any]
    if ltype == "volume-network":
        assert layer.volume is not None
        props = dict(layer.volume.network)
    elif ltype in ("file", "block"):
        path = src.get("file") or src.get("dev")
        if not path:
            raise ConfigUnsupported(f"disk {disk.target_dev}: <source> has no path")
        driver = "file"
        if ltype == "block":
            driver = "host_cdrom" if disk.device == "cdrom" else "host_device"
        props = {"driver": driver, "filename": path}
        if top and disk.io not in (None, "default"):
            props["aio"] = disk.io
        reservations = src.find("reservations")
        if reservations is not None and reservations.get("enabled") == "yes":
            props["pr-manager"] = _pr_manager(ctx, reservations)
    elif ltype == "dir":
        props = {"driver": "vvfat", "dir": src.get("dir"), "floppy": disk.device == "floppy",
                 "rw": not disk.readonly}  # fmt: skip
    elif ltype == "network":
        props = _network_props(ctx, src, node, auth, disk.readonly)
    elif ltype == "nvme":
        a = src.find("address")
        if a is None:
            raise ConfigUnsupported(f"disk {disk.target_dev}: nvme <source> needs an <address>")
        pci = (f"{_int(a, 'domain'):04x}:{_int(a, 'bus'):02x}:{_int(a, 'slot'):02x}."
               f"{_int(a, 'function'):x}")  # fmt: skip
        props = {"driver": "nvme", "device": pci, "namespace": _int(src, "namespace", 1)}
        ctx.host_devices.append(f"/sys/bus/pci/devices/{pci}")
    elif ltype == "vhostvdpa":
        props = {"driver": "virtio-blk-vhost-vdpa", "path": src.get("dev")}
    else:
        raise unsupported(f"<disk type='{ltype}'>")
    props |= {"node-name": node}
    if top and layer.fmt == "raw" and not _needs_format_node(disk, layer):
        props |= {"read-only": ro} | common
    else:
        props |= {"auto-read-only": True, "discard": "unmap"}
        if "cache" in common:
            props["cache"] = common["cache"]
    return props


def _pr_manager(ctx: BuildContext, reservations: Element) -> str:
    if reservations.get("managed", "yes") == "yes":
        alias = "pr-helper0"
        path = str(ctx.run_dir / f"{ctx.defn.uuid}.pr-helper0.sock")
    else:
        src = reservations.find("source")
        alias = "pr-helper-" + ctx.defn.name
        path = src.get("path", "") if src is not None else ""
    if alias not in ctx.objects:
        ctx.add("-object", json_arg({"qom-type": "pr-manager-helper", "id": alias, "path": path}))
        ctx.objects.add(alias)
    return alias


def _needs_format_node(disk: Disk, layer: _Layer) -> bool:
    src = layer.source
    if src is not None and (src.find("slices") is not None or src.find("encryption") is not None):
        return True
    return disk.element.find("encryption") is not None


def _format_node(ctx: BuildContext, disk: Disk, layer: _Layer, node: str, storage: str,
                 backing: str | None, terminated: bool, top: bool,
                 common: dict[str, Any], ro: bool) -> dict[str, Any]:  # fmt: skip
    fmt = "vvfat" if layer.fmt == "fat" else layer.fmt
    props: dict[str, Any] = {"node-name": node, "read-only": ro if top else True,
                             "driver": fmt}  # fmt: skip
    if top:
        props |= common
    src = layer.source
    enc = disk.element.find("encryption") if top else None
    if enc is None and src is not None:
        enc = src.find("encryption")
    if enc is not None and enc.get("engine") != "librbd":
        secret_id = _secret(ctx, enc.find("secret"), f"{node}-encryption-secret0")
        if fmt == "luks" or (fmt == "raw" and enc.get("format") in ("luks", "luks2")):
            props["driver"] = "luks"
            props["key-secret"] = secret_id
        elif fmt == "qcow2":
            props["encrypt"] = {"format": "luks" if enc.get("format") in ("luks", "luks2",
                                                                          None) else "aes",
                                "key-secret": secret_id}  # fmt: skip
    if src is not None:
        sl = src.find("slices/slice[@type='storage']")
        if sl is not None:
            props |= {"offset": _int(sl, "offset"), "size": _int(sl, "size")}
    if fmt in ("qcow2", "qcow", "qed", "vmdk"):
        metadata = disk.element.find("driver/metadata_cache/max_size") if top else None
        if metadata is not None and metadata.text:
            unit = metadata.get("unit", "bytes")
            from virtbus.domain.units import to_kib

            props["cache-size"] = to_kib(num_text(metadata), unit) * 1024
        if fmt == "qcow2" and top:
            drv = disk.element.find("driver")
            if drv is not None and drv.get("discard_no_unref") in ("on", "off"):
                props["discard-no-unref"] = drv.get("discard_no_unref") == "on"
    props["file"] = storage
    if backing is not None:
        props["backing"] = backing
    elif terminated and fmt in ("qcow2", "qcow", "qed", "vmdk"):
        props["backing"] = None
    return props


def _blockdev(ctx: BuildContext, disk: Disk) -> str | None:
    """Emit every layer's nodes; return the node the device attaches to."""
    if not _has_source(disk):
        return None
    common: dict[str, Any] = {}
    if disk.cache not in (None, "default"):
        direct, no_flush, _ = CACHE_MODES[str(disk.cache)]
        common["cache"] = {"direct": direct, "no-flush": no_flush}
    if disk.discard not in (None, "default"):
        common["discard"] = disk.discard
    drv = disk.element.find("driver")
    dz = drv.get("detect_zeroes") if drv is not None else None
    if dz is not None:
        if dz == "unmap" and disk.discard != "unmap":
            dz = "on"
        common["detect-zeroes"] = dz
    layers, terminated = _chain(disk, volume_of(ctx, disk))
    transient = disk.element.find("transient") is not None
    if transient:
        _check_transient(disk)
    ro = bool(disk.readonly) or transient  # a transient disk's image is only read
    names = [f"disk{disk.index}-storage" if i == 0 else f"disk{disk.index}-{i}-storage"
             for i in range(len(layers))]  # fmt: skip
    top_node: str | None = None
    # lowest layer first, so each format node can name its backing node
    backing: str | None = None
    for i in range(len(layers) - 1, -1, -1):
        layer, storage = layers[i], names[i]
        top = i == 0
        ctx.add("-blockdev", json_arg(_storage_node(ctx, disk, layer, storage, top=top,
                                                    common=common, ro=ro)))  # fmt: skip
        if top and layer.fmt == "raw" and not _needs_format_node(disk, layer):
            top_node = storage
            continue
        fmt_node = storage.replace("-storage", "-format")
        ctx.add("-blockdev", json_arg(
            _format_node(ctx, disk, layer, fmt_node, storage, backing,
                         terminated and i == len(layers) - 1, top, common, ro)
        ))  # fmt: skip
        backing = fmt_node
        if top:
            top_node = fmt_node
    if transient and top_node is not None:
        top_node = _transient_overlay(ctx, disk, layers[0], top_node, common)
    return _throttle(ctx, disk, top_node) if top_node is not None else None


@dataclass(frozen=True, slots=True)
class Overlay:
    """A transient disk's qcow2 overlay: created before QEMU starts, deleted after it
    ends, so the guest's writes never reach the image (libvirt's ``<transient/>``)."""

    path: Path
    backing: str
    backing_format: str


def _check_transient(disk: Disk) -> None:
    """libvirt's qemuValidateDomainDeviceDefDiskTransient."""
    if not _has_source(disk):
        raise ConfigUnsupported(f"transient disk '{disk.target_dev}' must not be empty")
    if disk.readonly:
        raise ConfigUnsupported(f"transient disk '{disk.target_dev}' must not be read-only")
    if disk.type != "file":
        raise ConfigUnsupported(
            f"transient disk supported only with 'file' type ({disk.target_dev})"
        )
    if disk.device != "disk":
        raise ConfigUnsupported(
            f"transient disk supported only with 'disk' device ({disk.target_dev})"
        )
    if disk.shareable:
        raise ConfigUnsupported(
            f"transient disk '{disk.target_dev}' must not be shareable (its writes are private)"
        )


def _transient_overlay(ctx: BuildContext, disk: Disk, layer: _Layer, base: str,
                       common: dict[str, Any]) -> str:  # fmt: skip
    src = layer.source
    image = src.get("file", "") if src is not None else ""
    # next to the image, as libvirt names it; the image's directory must be writable
    path = Path(f"{image}.TRANSIENT-{ctx.defn.uuid}")
    storage, fmt = f"disk{disk.index}-transient-storage", f"disk{disk.index}-transient-format"
    file_props = {"driver": "file", "filename": str(path), "node-name": storage,
                  "auto-read-only": True, "discard": "unmap"}  # fmt: skip
    if "cache" in common:
        file_props["cache"] = common["cache"]
    ctx.add("-blockdev", json_arg(file_props))
    ctx.add("-blockdev", json_arg({"node-name": fmt, "read-only": False, "driver": "qcow2",
                                   "file": storage, "backing": base} | common))  # fmt: skip
    ctx.overlays.append(Overlay(path, image, layer.fmt))
    return fmt


IOTUNE = (
    ("total_bytes_sec", "bps-total"), ("read_bytes_sec", "bps-read"),
    ("write_bytes_sec", "bps-write"), ("total_iops_sec", "iops-total"),
    ("read_iops_sec", "iops-read"), ("write_iops_sec", "iops-write"),
    ("total_bytes_sec_max", "bps-total-max"), ("read_bytes_sec_max", "bps-read-max"),
    ("write_bytes_sec_max", "bps-write-max"), ("total_iops_sec_max", "iops-total-max"),
    ("read_iops_sec_max", "iops-read-max"), ("write_iops_sec_max", "iops-write-max"),
    ("size_iops_sec", "iops-size"),
    ("total_bytes_sec_max_length", "bps-total-max-length"),
    ("read_bytes_sec_max_length", "bps-read-max-length"),
    ("write_bytes_sec_max_length", "bps-write-max-length"),
    ("total_iops_sec_max_length", "iops-total-max-length"),
    ("read_iops_sec_max_length", "iops-read-max-length"),
    ("write_iops_sec_max_length", "iops-write-max-length"),
)  # fmt: skip


def iotune_limits(iotune: Element, where: str) -> dict[str, int]:
    limits: dict[str, int] = {}
    values = {}
    for tag, prop in IOTUNE:
        child = iotune.find(tag)
        if child is not None and child.text is not None:
            try:
                values[tag] = num_text(child)
            except ValueError:
                raise XMLError(f"invalid <{tag}> in {where}") from None
            limits[prop] = values[tag]
    for kind in ("bytes", "iops"):
        total = values.get(f"total_{kind}_sec")
        if total and (values.get(f"read_{kind}_sec") or values.get(f"write_{kind}_sec")):
            raise XMLError(
                f"total and read/write {kind}_sec cannot be set at the same time in {where}"
            )
    return limits


def _throttle(ctx: BuildContext, disk: Disk, node: str) -> str:
    iotune = disk.element.find("iotune")
    filters = disk.element.findall("throttlefilters/throttlefilter")
    groups: list[str] = []
    if iotune is not None:
        group = iotune.find("group_name")
        gname = group.text if group is not None and group.text else f"limits{disk.index}"
        gid = f"throttle-{gname}"
        if gid not in ctx.objects:
            limits = {prop: 0 for _tag, prop in IOTUNE[:13]}
            limits |= iotune_limits(iotune, f"disk {disk.target_dev}")
            ctx.add("-object", json_arg({"qom-type": "throttle-group", "id": gid,
                                         "limits": limits}))  # fmt: skip
            ctx.objects.add(gid)
        groups.append(gid)
    for f in filters:
        gname = f.get("group")
        if gname is None or gname not in ctx.throttle_groups:
            raise ConfigUnsupported(f"throttle filter of disk {disk.target_dev} names an "
                                    f"unknown <throttlegroup> '{gname}'")  # fmt: skip
        groups.append(f"throttle-{gname}")
    for i, gid in enumerate(groups):
        filt = f"disk{disk.index}-throttle{i}"
        ctx.add("-blockdev", json_arg({"driver": "throttle", "node-name": filt,
                                       "throttle-group": gid, "file": node}))  # fmt: skip
        node = filt
    return node


def build_throttle_groups(ctx: BuildContext) -> None:
    for group in ctx.defn.elements("throttlegroups/throttlegroup"):
        name_el = group.find("group_name")
        name = name_el.text if name_el is not None and name_el.text else None
        if name is None:
            raise XMLError("<throttlegroup> needs a <group_name>")
        limits = {prop: 0 for _tag, prop in IOTUNE[:13]}
        limits |= iotune_limits(group, f"<throttlegroup> '{name}'")
        ctx.add("-object", json_arg({"qom-type": "throttle-group", "id": f"throttle-{name}",
                                     "limits": limits}))  # fmt: skip
        ctx.throttle_groups.add(name)
        ctx.objects.add(f"throttle-{name}")


# ---------------------------------------------------------------------------- devices


def _alias(disk: Disk) -> str:
    a = disk.element.find("alias")
    if a is not None and (a.get("name") or "").startswith("ua-"):
        return str(a.get("name"))
    bus = disk_bus(disk)
    idx = disk_name_index(disk.target_dev)
    if bus == "virtio":
        return f"virtio-disk{idx}"
    if bus == "usb":
        return f"usb-disk{idx}"
    if bus == "fdc":
        ctrl, _b, _t, unit = _drive_address(disk)
        return f"fdc{ctrl}-0-{unit}"
    ctrl, dbus, target, unit = _drive_address(disk)
    if bus == "scsi":
        return f"scsi{ctrl}-{dbus}-{target}-{unit}"
    if bus == "sata":
        return f"sata{ctrl}-0-{unit}"
    return f"ide{ctrl}-{dbus}-{unit}"


def _error_policy(disk: Disk) -> tuple[str | None, str | None]:
    drv = disk.element.find("driver")
    if drv is None:
        return None, None
    werror = drv.get("error_policy")
    rerror = drv.get("rerror_policy")
    if werror == "enospace":
        werror = "enospc"
    if rerror is None and werror not in (None, "enospc"):
        rerror = werror
    if rerror == "enospace":
        rerror = "enospc"
    return werror, rerror


def _device(ctx: BuildContext, disk: Disk, node: str | None, dev_id: str) -> dict[str, Any]:
    el = disk.element
    bus = disk_bus(disk)
    cdrom = disk.device == "cdrom"
    drv = el.find("driver")
    target = el.find("target")
    props: dict[str, Any]
    removable = onoff(target, "removable", "<target>")
    if bus == "virtio":
        if disk.type == "vhostuser":
            props = virtio_props("vhost-user-blk", el, el.get("model"))
        else:
            props = virtio_props("virtio-blk", el, el.get("model"))
        if drv is not None:
            if drv.get("iothread"):
                props["iothread"] = f"iothread{drv.get('iothread')}"
            for attr in ("ioeventfd", "event_idx"):
                value = onoff(drv, attr, "<driver>")
                if value is not None:
                    props[attr] = value
            if drv.get("queues"):
                props["num-queues"] = _int(drv, "queues")
            if drv.get("queue_size"):
                props["queue-size"] = _int(drv, "queue_size")
            mapping = drv.findall("iothreads/iothread")
            if mapping:
                props["iothread-vq-mapping"] = [
                    {"iothread": f"iothread{m.get('id')}"}
                    | ({"vqs": [num(q, "id", "0", maximum=1024) for q in m.findall("queue")]}
                       if m.findall("queue") else {})
                    for m in mapping
                ]  # fmt: skip
        props |= ctx.addr_props(el, f"disk {disk.target_dev}")
    elif bus in ("sata", "ide"):
        ctrl, dbus, _target, unit = _drive_address(disk)
        props = {"driver": "ide-cd" if cdrom else "ide-hd"}
        if bus == "ide":
            if ctx.q35:
                raise ConfigUnsupported(f"IDE disk {disk.target_dev}: q35 has no IDE controller")
            if ctrl != 0 or dbus > 1 or unit > 1:
                raise ConfigUnsupported(
                    f"IDE disk {disk.target_dev}: the PIIX IDE has buses 0-1, units 0-1"
                )
            props |= {"bus": f"ide.{dbus}", "unit": unit}
        else:
            if unit > 5:
                raise ConfigUnsupported(f"SATA unit {unit} for {disk.target_dev} (0-5 exist)")
            if _controller(ctx, "sata", ctrl) is None:
                raise ConfigUnsupported(f"no SATA controller {ctrl} for {disk.target_dev}")
            alias = "ide" if ctx.q35 and ctrl == 0 else f"sata{ctrl}"
            props["bus"] = f"{alias}.{unit}"
    elif bus == "scsi":
        ctrl, dbus, target_n, unit = _drive_address(disk)
        cont = _controller(ctx, "scsi", ctrl)
        if cont is None:
            raise ConfigUnsupported(f"unable to find a SCSI controller for idx={ctrl}")
        if disk.device == "lun":
            props = {"driver": "scsi-block"}
        else:
            props = {"driver": "scsi-cd" if cdrom else "scsi-hd"}
        if cont.get("model") in ("lsilogic", "ncr53c90", "dc390", "am53c974"):
            props |= {"bus": f"scsi{ctrl}.{dbus}", "scsi-id": unit}
        else:
            props |= {"bus": f"scsi{ctrl}.0", "channel": dbus, "scsi-id": target_n, "lun": unit}
        if disk.device != "lun":
            serial = disk.serial
            props["device_id"] = serial if serial else f"drive-{dev_id}"
        if disk.device == "disk" and removable is not None:
            props["removable"] = removable
    elif bus == "usb":
        props = {"driver": "usb-storage"} | ctx.addr_props(el, f"disk {disk.target_dev}")
        props["removable"] = bool(removable)
    elif bus == "fdc":
        _ctrl, _b, _t, unit = _drive_address(disk)
        props = {"driver": "floppy", "unit": unit}
    else:
        raise unsupported(f"<target bus='{bus}'> for disk {disk.target_dev}")
    if disk.shareable:
        props["share-rw"] = True
    if disk.type == "vhostuser":
        props["chardev"] = f"chr-vu-{dev_id}"
    elif node is not None:
        props["drive"] = node
    props["id"] = dev_id
    boot = ctx.bootindex.get(("disk", disk.index))
    if boot is not None and disk.device != "floppy":
        props["bootindex"] = boot
    blockio = el.find("blockio")
    if blockio is not None:
        for attr in ("logical_block_size", "physical_block_size", "discard_granularity"):
            if blockio.get(attr):
                props[attr] = _int(blockio, attr)
    wwn = _text(el, "wwn")
    if wwn is not None:
        try:
            props["wwn"] = int(wwn, 16)
        except ValueError:
            raise XMLError(f"Failed to parse wwn '{wwn}' as number") from None
    if target is not None and target.get("rotation_rate"):
        props["rotation_rate"] = _int(target, "rotation_rate")
    vendor, product = _text(el, "vendor"), _text(el, "product")
    if vendor is not None:
        props["vendor"] = vendor
    if product is not None:
        props["model" if bus in ("ide", "sata") else "product"] = product
    if disk.device != "lun" and disk.cache not in (None, "default"):
        props["write-cache"] = "on" if CACHE_MODES[str(disk.cache)][2] else "off"
    geometry = el.find("geometry")
    if geometry is not None:
        for attr, prop in (("cyls", "cyls"), ("heads", "heads"), ("secs", "secs")):
            if geometry.get(attr):
                props[prop] = _int(geometry, attr)
        if geometry.get("trans") and geometry.get("trans") != "default":
            props["bios-chs-trans"] = geometry.get("trans")
    if disk.serial:
        props["serial"] = disk.serial.replace(" ", "\\ ")
    werror, rerror = _error_policy(disk)
    if werror:
        props["werror"] = werror
    if rerror:
        props["rerror"] = rerror
    return props


def build_disks(ctx: BuildContext) -> None:
    floppies: list[tuple[int, str | None]] = []
    for disk in ctx.defn.disks:
        dev_id = _alias(disk)
        if disk.type == "vhostuser":
            src = disk.element.find("source")
            path = src.get("path") if src is not None else None
            if not path:
                raise ConfigUnsupported(f"vhostuser disk {disk.target_dev} needs <source path>")
            ctx.user_socket(Path(path), bind=False)
            ctx.add("-chardev", f"socket,id=chr-vu-{dev_id},path={kv_escape(path)}")
            node = None
        else:
            node = _blockdev(ctx, disk)
        props = _device(ctx, disk, node, dev_id)
        if disk_bus(disk) == "fdc":
            floppies.append((props["unit"], node))
            ctx.disks.append(DiskRuntime(disk.index, disk.target_dev, dev_id, node,
                                         disk.source_path))  # fmt: skip
            fdc_bootindex = ctx.bootindex.get(("disk", disk.index))
            if fdc_bootindex is not None:
                ctx.fdc_boot[props["unit"]] = fdc_bootindex
            ctx.floppy_props.append(props)
            continue
        ctx.device(props)
        path = disk_source_path(disk, volume_of(ctx, disk))
        ctx.disks.append(DiskRuntime(disk.index, disk.target_dev, dev_id, node, path))
    if ctx.floppy_props:
        _floppies(ctx)


def _floppies(ctx: BuildContext) -> None:
    """Floppy drives hang off the ISA FDC: implicit on pc, ``isa-fdc`` on q35."""
    if ctx.q35:
        fdc: dict[str, Any] = {"driver": "isa-fdc", "id": "fdc0"}
        for unit, letter in ((0, "A"), (1, "B")):
            if unit in ctx.fdc_boot:
                fdc[f"bootindex{letter}"] = ctx.fdc_boot[unit]
        ctx.device(fdc)
    else:
        for unit, letter in ((0, "A"), (1, "B")):
            if unit in ctx.fdc_boot:
                ctx.add("-global", f"isa-fdc.bootindex{letter}={ctx.fdc_boot[unit]}")
    for props in ctx.floppy_props:
        ctx.device(props)


# ---------------------------------------------------------------------------- volumes, hot-plug

#: what a volume disk is built with while a definition is only being validated
PLACEHOLDER = ResolvedVolume("", "", "file", "/dev/null", "raw")
HOTPLUG_FORMATS = ("raw", "qcow2")  # what a hot-plugged disk may be


def volume_of(ctx: BuildContext, disk: Disk) -> ResolvedVolume | None:
    """What a volume disk resolved to (the placeholder while validating); None otherwise."""
    if disk.type != "volume":
        return None
    if ctx.volumes is None:
        return PLACEHOLDER
    resolved = ctx.volumes.get(disk.index)
    if resolved is None:
        raise ConfigUnsupported(f"volume disk {disk.target_dev} was not resolved")
    return resolved


def disk_source_path(disk: Disk, resolved: ResolvedVolume | None) -> str | None:
    return resolved.path if resolved is not None else disk.source_path


def blockdev_nodes(
    disk: Disk, storage: str, fmt: str, resolved: ResolvedVolume | None
) -> list[dict[str, Any]]:
    """The storage and format nodes of a hot-plugged disk (``blockdev-add`` arguments): a
    file, a host device, or a network protocol node (a pool's iSCSI LUN)."""
    common: dict[str, Any] = {}
    if disk.cache not in (None, "default"):
        direct, no_flush, _ = CACHE_MODES[str(disk.cache)]
        common["cache"] = {"direct": direct, "no-flush": no_flush}
    if disk.discard not in (None, "default"):
        common["discard"] = disk.discard
    kind = resolved.kind if resolved is not None else disk.type
    node: dict[str, Any]
    if kind == "network":
        assert resolved is not None
        node = dict(resolved.network)
    else:
        driver = "file"
        if kind == "block":
            driver = "host_cdrom" if disk.device == "cdrom" else "host_device"
        node = {"driver": driver, "filename": disk_source_path(disk, resolved)}
        if disk.io not in (None, "default"):
            node["aio"] = disk.io
    node |= {"node-name": storage, "auto-read-only": True} | common
    image_format = disk.driver_type or (resolved.format if resolved is not None else None)
    if image_format is not None and image_format not in HOTPLUG_FORMATS:
        raise unsupported(f"format '{image_format}' of disk {disk.target_dev} (raw and qcow2 are)")
    fmt_node = (
        {"node-name": fmt, "read-only": disk.readonly, "driver": image_format or "raw"}
        | common
        | {"file": storage}
    )
    return [node, fmt_node]


def device_id(disk: Disk) -> str:
    """libvirt's qdev id of a disk's front end (``virtio-disk1``, ``scsi0-0-0-1`` ...)."""
    return _alias(disk)


def hotplug_device(disk: Disk, node: str, pci: dict[str, Any]) -> dict[str, Any]:
    """``device_add`` arguments of a disk plugged into a running domain: virtio disks on a
    free PCI(e) slot, SCSI disks on their (virtio-scsi) controller."""
    if disk.device not in ("disk", "cdrom"):
        raise unsupported(f"hot-plug of <disk device='{disk.device}'>")
    if disk.type not in ("file", "block", "volume"):
        raise unsupported(f"hot-plug of <disk type='{disk.type}'> (file, block, volume are)")
    bus = disk_bus(disk)
    if disk.device == "cdrom":
        raise unsupported("hot-plug of a cdrom (change its medium instead)")
    props: dict[str, Any]
    if bus == "virtio":
        props = {"driver": "virtio-blk-pci"} | pci
    elif bus == "scsi":
        ctrl, dbus, target, unit = _drive_address(disk)
        props = {"driver": "scsi-hd", "bus": f"scsi{ctrl}.0", "channel": dbus,
                 "scsi-id": target, "lun": unit}  # fmt: skip
    else:
        raise ConfigUnsupported(
            f"disk {disk.target_dev} on bus '{bus}' cannot be hot-plugged (virtio and scsi can)"
        )
    props |= {"id": device_id(disk), "drive": node}
    if disk.cache not in (None, "default"):
        props["write-cache"] = "on" if CACHE_MODES[str(disk.cache)][2] else "off"
    if disk.serial:
        props["serial"] = disk.serial.replace(" ", "\\ ")
    return props
