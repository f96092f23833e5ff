"""Path confinement: every host path a domain names must be one the host lets it use.

A definition arrives over the bus from any client, and the agent acts on it as root: a
``<disk><source file='/etc/shadow'/>`` would hand the host's shadow file to the guest, a
``<serial type='file'>`` would overwrite any file, a unix chardev would unlink one. So
before a definition is accepted (define, a device hot-plug) and again before its QEMU
starts (pools and symlinks change), :func:`check` resolves every host path the XML names
(symlinks and ``..`` followed, as the kernel would) and refuses, with AUTH_DENIED naming
the path, any that lies outside what its kind may use:

- files (disk images and their backing chain, kernel, initrd, dtb, chardev files and
  logs, filesystem sources, ROMs, ACPI tables, NVDIMM/pstore backing files): a storage
  pool's target, the domain's own run dir ``<run_dir>/<uuid>/``, or ``allowed_dirs``;
- UNIX sockets (chardevs, vhost-user, virtiofs, VNC/SPICE, TPM, ivshmem, NBD):
  the domain's own run dir or ``allowed_dirs`` only (never a pool: a socket there would
  let one domain reach another's);
- host device nodes (chardev ``type='dev'``, evdev, rng, render nodes, TPM passthrough,
  tap/vhost fds): ``allowed_devices`` (exact paths or globs) or the file roots;
- NVRAM: the file roots or the driver's ``nvram_dir``; firmware (loader, NVRAM
  template): the file roots, ``firmware_roots`` or a path a firmware descriptor names;
- programs the agent runs as root (interface scripts, a virtiofsd binary): only
  ``program_dirs``.

What a domain listens on is the host's to decide as well: VNC/SPICE displays, TCP/UDP
chardevs in server mode and socket NICs (``<interface type='server'>``), and the
incoming migration (:func:`check_listen`) listen on a loopback address unless the host's
``listen_allowed`` names the address (or ``*``); anything else is AUTH_DENIED naming it.

The rules live here and nowhere else; the driver calls :func:`check` from define,
hot-plug and start (:meth:`drivers.qemu.launch.Launcher.confine`). ``enforce=False`` is
the operator's explicit opt-out (and the compatibility harness's, which builds libvirt's
test inputs with their arbitrary paths).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from virtbus.domain import DomainDefinition
from virtbus.domain.model import Element
from virtbus.errors import AuthDenied


class Kind(Enum):
    """What a host path is used as, which decides where it may be."""

    FILE = "file"
    SOCKET = "socket"
    DEVICE = "device"
    NVRAM = "nvram"
    FIRMWARE = "firmware"
    PROGRAM = "program"
    SHM = "shm"


@dataclass(frozen=True, slots=True)
class HostPath:
    """One host path of a definition: where it was named, the path, its kind."""

    what: str  # e.g. "<disk> vda source", "<serial> 0 source"
    path: str
    kind: Kind


#: host device nodes any domain may name (exact paths or fnmatch globs)
DEFAULT_DEVICES = (
    "/dev/urandom", "/dev/random", "/dev/hwrng", "/dev/net/tun", "/dev/vhost-net",
    "/dev/vhost-vsock", "/dev/dri/renderD*",
)  # fmt: skip
#: where read-only firmware (loader, NVRAM templates) may come from
DEFAULT_FIRMWARE_ROOTS = (
    Path("/usr/share/qemu"), Path("/usr/share/OVMF"), Path("/usr/share/ovmf"),
    Path("/usr/share/seabios"), Path("/usr/share/AAVMF"), Path("/usr/share/edk2"),
    Path("/usr/lib/ipxe"),
)  # fmt: skip
#: where programs the agent runs as root (interface scripts, virtiofsd) may be
DEFAULT_PROGRAM_DIRS = (
    Path("/etc/qemu"), Path("/etc/virtbus/scripts"), Path("/usr/lib/qemu"), Path("/usr/libexec"),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ConfineSettings:
    """Where a domain's host paths may be (from the QEMU driver's settings)."""

    #: False accepts any path (libvirt without sVirt): the operator's explicit opt-out
    enforce: bool = True
    #: extra directories any domain may name files and sockets in
    allowed_dirs: tuple[Path, ...] = ()
    allowed_devices: tuple[str, ...] = DEFAULT_DEVICES
    firmware_roots: tuple[Path, ...] = DEFAULT_FIRMWARE_ROOTS
    program_dirs: tuple[Path, ...] = DEFAULT_PROGRAM_DIRS
    #: addresses besides loopback a domain may listen on ("*": any)
    listen_allowed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Roots:
    """This host's places at the time of a check (pools change: built per check)."""

    settings: ConfineSettings
    own_dir: Path  # the domain's run dir, <run_dir>/<uuid>
    pools: tuple[Path, ...] = ()  # targets of the active storage pools
    nvram_dir: Path | None = None
    firmware: frozenset[str] = field(default_factory=frozenset)  # descriptor-named files

    def allowed(self, kind: Kind) -> tuple[Path, ...]:
        s = self.settings
        files = (*self.pools, self.own_dir, *s.allowed_dirs)
        if kind is Kind.SOCKET:
            return (self.own_dir, *s.allowed_dirs)
        if kind is Kind.PROGRAM:
            return s.program_dirs
        if kind is Kind.SHM:
            return (Path("/dev/shm"),)
        if kind is Kind.NVRAM:
            return (*files, *((self.nvram_dir,) if self.nvram_dir else ()))
        if kind is Kind.FIRMWARE:
            return (*files, *s.firmware_roots)
        return files


def own_dir(run_dir: Path, uuid: str) -> Path:
    """The domain's own run dir: its chardev files and sockets may live here."""
    return run_dir / uuid


# ----------------------------------------------------------------------- the check


def check(defn: DomainDefinition, roots: Roots, *, images: bool = False) -> None:
    """AUTH_DENIED naming the first host path of ``defn`` outside what ``roots`` allow.

    ``images``: also read each local qcow2 image's header for a backing file the XML does
    not name (QEMU would open it): at start, when the images exist.
    """
    if not roots.settings.enforce:
        return
    resolved: dict[Path, str] = {}  # each root resolved once per check
    for hp in host_paths(defn.root):
        check_path(hp, roots, defn.name, resolved)
    for what, address in listen_addresses(defn.root):
        check_listen(defn.name, what, address, roots.settings)
    if images:
        for hp in image_backing_paths(defn):
            check_path(hp, roots, defn.name, resolved)


def check_path(hp: HostPath, roots: Roots, domain: str,
               resolved: dict[Path, str] | None = None) -> None:  # fmt: skip
    """AUTH_DENIED unless ``hp`` resolves inside a root its kind may use (``resolved``:
    the roots' real paths found so far, filled in)."""
    resolved = {} if resolved is None else resolved
    if not os.path.isabs(hp.path):
        raise AuthDenied(f"domain '{domain}': {hp.what} '{hp.path}' is not an absolute path")
    real = os.path.realpath(hp.path)  # symlinks and '..' followed, as the kernel would
    if hp.kind is Kind.DEVICE and any(
        fnmatch.fnmatchcase(real, pat) for pat in roots.settings.allowed_devices
    ):
        return
    if hp.kind is Kind.FIRMWARE and real in roots.firmware:
        return
    allowed = roots.allowed(hp.kind)
    for root in allowed:
        base = resolved.get(root)
        if base is None:
            base = resolved[root] = os.path.realpath(root)
        if real == base or real.startswith(base.rstrip("/") + "/"):
            return
    shown = f"'{hp.path}'" + (f" (resolves to '{real}')" if real != hp.path else "")
    where = ", ".join(str(r) for r in allowed) or "nowhere"
    raise AuthDenied(
        f"domain '{domain}': {hp.what} {shown} is outside the host paths a domain may use "
        f"as a {hp.kind.value} ({where}); put it in a storage pool or the domain's run dir "
        "or ask the host's operator to allow it (QEMU driver option allowed_dirs)"
    )


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost`` (a host name is not resolved: it is not loopback)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(domain: str, what: str, address: str, settings: ConfineSettings) -> None:
    """AUTH_DENIED unless ``address`` is loopback or allowed by ``listen_allowed``."""
    if not settings.enforce or is_loopback(address):
        return
    if "*" in settings.listen_allowed or address in settings.listen_allowed:
        return
    allowed = ", ".join(settings.listen_allowed) or "none"
    raise AuthDenied(
        f"domain '{domain}': {what} may not listen on '{address}': this host allows loopback "
        f"only besides {allowed} (QEMU driver option listen_allowed)"
    )


def listen_addresses(root: Element) -> list[tuple[str, str]]:
    """(what, address) of every listening address a ``<domain>`` (or one device) names."""
    out: list[tuple[str, str]] = []
    if root.tag == "domain":
        devices = root.find("devices")
        children: Iterable[Element] = devices if devices is not None else ()
    else:
        children = (root,)
    for el in children:
        if not isinstance(el.tag, str):
            continue
        tag = str(el.tag)
        if tag == "graphics":
            what = f"<graphics type='{el.get('type')}'>"
            if address := el.get("listen"):
                out.append((what, address))
            for listen in el.findall("listen"):
                if listen.get("type", "address") == "address" and (a := listen.get("address")):
                    out.append((what, a))
        elif tag in _CHARDEV_TAGS and el.get("type") in ("tcp", "udp"):
            for src in el.findall("source"):
                server = el.get("type") == "udp" or src.get("mode") == "bind"
                if server and src.get("mode") != "connect":
                    out.append((f"<{tag} type='{el.get('type')}'>", src.get("host") or "0.0.0.0"))
        elif tag == "interface" and el.get("type") == "server":
            src = el.find("source")
            if src is not None:
                out.append(("<interface type='server'>", src.get("address") or "0.0.0.0"))
    return out


# ------------------------------------------------------------- what a definition names


def host_paths(root: Element) -> list[HostPath]:
    """Every host path a ``<domain>`` (or one ``<devices>`` child) names, by kind."""
    out: list[HostPath] = []
    if root.tag == "domain":
        out += _os_paths(root)
        devices = root.find("devices")
        children: Iterable[Element] = devices if devices is not None else ()
    else:
        children = (root,)
    for el in children:
        if not isinstance(el.tag, str):
            continue  # comments
        out += _device_paths(el)
    return out


def _text(el: Element | None) -> str | None:
    return el.text.strip() if el is not None and el.text and el.text.strip() else None


def _os_paths(root: Element) -> Iterator[HostPath]:
    os_ = root.find("os")
    if os_ is None:
        return
    for tag in ("kernel", "initrd", "dtb"):
        if path := _text(os_.find(tag)):
            yield HostPath(f"<os><{tag}>", path, Kind.FILE)
    if path := _text(os_.find("loader")):
        yield HostPath("<os><loader>", path, Kind.FIRMWARE)
    nvram = os_.find("nvram")
    if nvram is not None:
        if path := _text(nvram):
            yield HostPath("<os><nvram>", path, Kind.NVRAM)
        if template := nvram.get("template"):
            yield HostPath("<os><nvram template>", template, Kind.FIRMWARE)
        src = nvram.find("source")
        if src is not None:
            for attr in ("file", "dev"):
                if path := src.get(attr):
                    yield HostPath(f"<os><nvram><source {attr}>", path, Kind.NVRAM)
    for table in os_.findall("acpi/table"):
        if path := _text(table):
            yield HostPath("<os><acpi><table>", path, Kind.FILE)
    for entry in root.findall("sysinfo/entry"):
        if path := entry.get("file"):
            yield HostPath("<sysinfo><entry file>", path, Kind.FILE)


_CHARDEV_TAGS = frozenset({"serial", "console", "channel", "parallel", "smartcard", "redirdev"})


def _chardev(el: Element, what: str) -> Iterator[HostPath]:
    """A chardev's host paths: file/pipe sources, device nodes, UNIX sockets, its log."""
    ctype = el.get("type")
    for src in el.findall("source"):
        path = src.get("path")
        if not path:
            continue
        if ctype in ("file", "pipe"):
            yield HostPath(f"{what} source", path, Kind.FILE)
        elif ctype in ("dev", "nmdm"):
            yield HostPath(f"{what} source", path, Kind.DEVICE)
        elif ctype == "unix":
            yield HostPath(f"{what} source", path, Kind.SOCKET)
    log = el.find("log")
    if log is not None and (path := log.get("file")):
        yield HostPath(f"{what} log", path, Kind.FILE)


def _device_paths(el: Element) -> Iterator[HostPath]:
    tag = str(el.tag)
    if tag == "disk":
        yield from _disk(el)
    elif tag in _CHARDEV_TAGS:
        yield from _chardev(el, f"<{tag}>")
        if tag == "smartcard" and (path := _text(el.find("database"))):
            yield HostPath("<smartcard><database>", path, Kind.FILE)
    elif tag == "rng":
        backend = el.find("backend")
        if backend is not None:
            if backend.get("model") == "random":
                if path := _text(backend):
                    yield HostPath("<rng> backend", path, Kind.DEVICE)
            else:
                yield from _chardev(backend, "<rng> backend")
    elif tag == "filesystem":
        src = el.find("source")
        if src is not None:
            for attr in ("dir", "file", "dev"):
                if path := src.get(attr):
                    yield HostPath(f"<filesystem> source {attr}", path, Kind.FILE)
            if path := src.get("socket"):
                yield HostPath("<filesystem> source socket", path, Kind.SOCKET)
        binary = el.find("binary")
        if binary is not None and (path := binary.get("path")):
            yield HostPath("<filesystem><binary>", path, Kind.PROGRAM)
    elif tag == "interface":
        yield from _interface(el)
    elif tag == "tpm":
        backend = el.find("backend")
        if backend is not None:
            dev = backend.find("device")
            if backend.get("type") == "passthrough":
                path = (dev.get("path") if dev is not None else None) or "/dev/tpm0"
                yield HostPath("<tpm> device", path, Kind.DEVICE)
            src = backend.find("source")
            if src is not None and (path := src.get("path")):
                kind = Kind.SOCKET if backend.get("type") == "external" else Kind.FILE
                yield HostPath("<tpm> backend source", path, kind)
    elif tag == "input":
        src = el.find("source")
        if src is not None:
            for attr in ("evdev", "dev"):
                if path := src.get(attr):
                    yield HostPath(f"<input> source {attr}", path, Kind.DEVICE)
    elif tag == "graphics":
        if path := el.get("socket"):
            yield HostPath("<graphics socket>", path, Kind.SOCKET)
        for listen in el.findall("listen"):
            if path := listen.get("socket"):
                yield HostPath("<graphics><listen socket>", path, Kind.SOCKET)
        for gl in el.findall("gl"):
            if path := gl.get("rendernode"):
                yield HostPath("<graphics><gl rendernode>", path, Kind.DEVICE)
    elif tag == "video":
        for acc in el.iterfind("model/acceleration"):
            if path := acc.get("rendernode"):
                yield HostPath("<video> rendernode", path, Kind.DEVICE)
    elif tag == "audio":
        if path := el.get("path"):
            yield HostPath("<audio path>", path, Kind.FILE)
        for sub in (*el.findall("input"), *el.findall("output")):
            if path := sub.get("dev"):
                yield HostPath(f"<audio><{sub.tag} dev>", path, Kind.DEVICE)
    elif tag == "hostdev":
        rom = el.find("rom")
        if rom is not None and (path := rom.get("file")):
            yield HostPath("<hostdev><rom file>", path, Kind.FILE)
        for sub in ("source/block", "source/char"):
            if path := _text(el.find(sub)):
                yield HostPath(f"<hostdev><{sub}>", path, Kind.DEVICE)
    elif tag == "memory":
        if path := _text(el.find("source/path")):
            yield HostPath("<memory><source><path>", path, Kind.FILE)
    elif tag == "pstore":
        if path := _text(el.find("path")):
            yield HostPath("<pstore><path>", path, Kind.FILE)
    elif tag == "shmem":
        name = el.get("name", "")
        yield HostPath("<shmem name>", f"/dev/shm/{name}", Kind.SHM)
        model = el.find("model")
        if model is not None and model.get("type") == "ivshmem-doorbell":
            server = el.find("server")
            path = server.get("path") if server is not None else None
            yield HostPath(
                "<shmem><server path>", path or f"/var/lib/libvirt/shmem-{name}-sock", Kind.SOCKET
            )


def _disk(el: Element) -> Iterator[HostPath]:
    target = el.find("target")
    what = f"<disk> {target.get('dev') if target is not None else ''}".rstrip()
    dtype = el.get("type", "file")
    for src in el.iter("source"):
        parent = src.getparent()
        if parent is not None and parent.tag == "reservations":
            if path := src.get("path"):
                yield HostPath(f"{what} reservations socket", path, Kind.SOCKET)
            continue
        for attr in ("file", "dev", "dir"):
            if path := src.get(attr):
                kind = Kind.DEVICE if dtype == "vhostvdpa" else Kind.FILE
                yield HostPath(f"{what} source", path, kind)
        if path := src.get("path"):  # vhost-user disk
            yield HostPath(f"{what} source", path, Kind.SOCKET)
        for host in src.findall("host"):
            if path := host.get("socket"):
                yield HostPath(f"{what} source host socket", path, Kind.SOCKET)
        config = src.find("config")
        if config is not None and (path := config.get("file")):
            yield HostPath(f"{what} source config", path, Kind.FILE)


def _interface(el: Element) -> Iterator[HostPath]:
    for tag in ("script", "downscript"):
        sub = el.find(tag)
        if sub is not None and (path := sub.get("path")):
            yield HostPath(f"<interface><{tag}>", path, Kind.PROGRAM)
    src = el.find("source")
    if src is not None:
        if el.get("type") == "vhostuser" and (path := src.get("path")):
            yield HostPath("<interface> vhost-user socket", path, Kind.SOCKET)
        if el.get("type") == "vdpa" and (path := src.get("dev")):
            yield HostPath("<interface> vdpa device", path, Kind.DEVICE)
    backend = el.find("backend")
    if backend is not None:
        for attr in ("tap", "vhost"):
            if path := backend.get(attr):
                yield HostPath(f"<interface><backend {attr}>", path, Kind.DEVICE)
    rom = el.find("rom")
    if rom is not None and (path := rom.get("file")):
        yield HostPath("<interface><rom file>", path, Kind.FILE)


# ------------------------------------------------------------ what the images name

_QCOW_MAGIC = b"QFI\xfb"


def image_backing_paths(defn: DomainDefinition) -> list[HostPath]:
    """Backing files named inside local qcow2 images whose chain the XML leaves open.

    QEMU opens a qcow2 image's backing file by itself when ``<backingStore>`` does not
    spell the chain out: a guest-writable image could name ``/etc/shadow`` there.
    """
    out: list[HostPath] = []
    for disk in defn.disks:
        if disk.type not in ("file", "block") or not disk.source_path:
            continue
        if disk.element.find("backingStore") is not None:
            continue  # spelled out (or terminated) in the XML: checked as a path
        if (disk.driver_type or "raw") != "qcow2":
            continue
        path = disk.source_path
        while path:
            backing = _qcow2_backing(path)
            if backing is None:
                break
            if not os.path.isabs(backing):
                backing = os.path.join(os.path.dirname(path), backing)
            hp = HostPath(f"<disk> {disk.target_dev} backing file of '{path}'", backing, Kind.FILE)
            out.append(hp)
            if len(out) > 64 or hp.path == path:
                break  # a loop: QEMU refuses it, and so does the check's bound
            path = backing
    return out


def _qcow2_backing(path: str) -> str | None:
    """The backing file name in a qcow2 header, or None (not qcow2, none, unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
            if len(head) < 20 or head[:4] != _QCOW_MAGIC:
                return None
            offset, size = struct.unpack(">QI", head[8:20])
            if offset == 0 or size == 0 or size > 4096:
                return None
            f.seek(offset)
            return f.read(size).decode("utf-8", errors="replace")
    except OSError:
        return None
