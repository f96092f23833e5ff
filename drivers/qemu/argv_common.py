"""Shared state of one command-line build: argv, id/address allocators, runtime records.

The builder honours ``<address>`` elements where they are given and otherwise assigns
addresses itself (PCI slots on the root bus, virtio-serial port numbers), so that a device
QEMU would auto-place can never take a slot a later, explicitly addressed device needs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.base import ResolvedTap, ResolvedVolume
from drivers.qemu.capabilities import QemuCapabilities
from virtbus.domain import DomainDefinition, parse_int
from virtbus.domain.model import Element
from virtbus.domain.numbers import shown
from virtbus.errors import ConfigUnsupported, XMLError
from virtbus.netaddr import is_host

#: UNIX socket paths longer than this do not fit ``sockaddr_un.sun_path``
MAX_SOCKET_PATH = 107


@dataclass(frozen=True, slots=True)
class ArgvSettings:
    """Tunables of the command line (a typed setting, not literals in code)."""

    #: autoport VNC: QEMU tries displays 0..N-1 (ports 5900..5900+N-1) and takes the first free
    vnc_autoport_displays: int = 100
    #: listen address when a ``<graphics>`` gives none (libvirt's vnc_listen/spice_listen)
    default_graphics_listen: str = "127.0.0.1"
    #: libvirt's locally administered OUI for generated MACs
    mac_prefix: str = "52:54:00"
    #: what a libvirt network name means on this host: "user" (QEMU's NAT, like libvirt's
    #: 'default' network gives a guest) or "bridge:<name>". virt-install writes
    #: <interface type='network'><source network='default'/> into every guest.
    networks: Mapping[str, str] = field(default_factory=lambda: {"default": "user"})
    #: where the driver keeps secret values (base64), one file per libvirt secret uuid or
    #: usage; QEMU reads them through ``-object secret,file=``
    secrets_dir: Path = Path("/etc/virtbus/secrets")
    #: x509 credentials for NBD disks with ``tls='yes'`` (libvirt's nbd_tls_x509_cert_dir)
    nbd_tls_dir: str = "/etc/pki/qemu"
    #: x509 credentials of TLS chardevs (libvirt's chardev_tls_x509_cert_dir), and whether
    #: TCP chardevs use TLS unless the XML says tls='no' (libvirt's chardev_tls)
    chardev_tls_dir: str = "/etc/pki/libvirt-chardev"
    chardev_tls: bool = False
    #: display security (libvirt's qemu.conf vnc_tls, spice_tls, *_sasl, ...)
    vnc_tls: bool = False
    vnc_tls_dir: str = "/etc/pki/libvirt-vnc"
    vnc_tls_verify: bool = False
    vnc_sasl: bool = False
    spice_tls: bool = False
    spice_tls_dir: str = "/etc/pki/libvirt-spice"
    spice_sasl: bool = False
    sasl_dir: str = "/etc/sasl2"
    #: a display with no listen address listens on a UNIX socket in the run dir
    vnc_auto_unix_socket: bool = False
    spice_auto_unix_socket: bool = False
    #: include guest memory in QEMU core dumps (libvirt's dump_guest_core)
    dump_guest_core: bool = False
    #: per-domain helper programs, and where an emulated TPM keeps its state
    virtiofsd: str = "/usr/lib/qemu/virtiofsd"
    swtpm: str = "swtpm"
    swtpm_setup: str = "swtpm_setup"
    dbus_daemon: str = "dbus-daemon"
    vhost_user_gpu: str = "/usr/lib/qemu/vhost-user-gpu"
    swtpm_state_dir: Path = Path("/var/lib/virtbus/swtpm")
    #: where NVRAM (UEFI variable store) files live when a definition names none
    nvram_dir: Path = Path("/var/lib/virtbus/nvram")
    #: where file-backed guest RAM (<memoryBacking><source type='file'/>) is created
    memory_backing_dir: Path = Path("/var/lib/virtbus/ram")

    @classmethod
    def under(cls, state_dir: Path, **options: Any) -> ArgvSettings:
        """The agent's settings: the files QEMU needs kept (NVRAM, file-backed RAM, secrets,
        swtpm state) live under the agent's state dir unless ``options`` say otherwise."""
        kept = {
            "nvram_dir": state_dir / "nvram",
            "memory_backing_dir": state_dir / "ram",
            "secrets_dir": state_dir / "secrets",
            "swtpm_state_dir": state_dir / "swtpm",
        }
        return cls(**{**kept, **options})


def secret_path(settings: ArgvSettings, key: str) -> Path:
    """The file holding a libvirt secret (by uuid or usage name), base64 as
    ``virsh secret-set-value`` takes it; one name per secret, no path tricks."""
    return settings.secrets_dir / "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


@dataclass(frozen=True, slots=True)
class ChardevRuntime:
    """A character device the driver may need after start (pty path, socket path)."""

    kind: str  # serial | console | channel | redirdev
    index: int  # rank among the XML elements of that kind
    chardev_id: str  # query-chardev label; a pty's path is its "filename" minus "pty:"
    type: str  # pty | file | unix | tcp | null | spicevmc
    path: Path | None  # file/unix path; None for a pty until the driver asks QEMU
    device_id: str | None  # qdev id of the front end (None when shared, e.g. console=serial)


@dataclass(frozen=True, slots=True)
class DiskRuntime:
    index: int
    target_dev: str
    device_id: str  # qdev id (query-block "qdev", block stats)
    node_name: str | None  # format node (None: empty cdrom)
    path: str | None


@dataclass(frozen=True, slots=True)
class NetRuntime:
    index: int
    netdev_id: str
    device_id: str
    mac: str
    ifname: str | None  # tap name when the XML gives one


def json_arg(props: dict[str, Any]) -> str:
    """A JSON ``-device``/``-blockdev``/``-object`` value (no keyval comma escaping needed)."""
    return json.dumps(props, separators=(",", ":"))


def kv_escape(value: str) -> str:
    """Escape a value for QEMU's keyval/QemuOpts syntax (``,`` doubles).

    Every free-form string (paths, names, bridge and tap names) that goes into a QemuOpts
    option is passed through this; every other value is type-checked below first.
    """
    return value.replace(",", ",,")


# Values that go into QEMU options unescaped must be checked against their type first:
# options such as -cpu are split on commas with no escape at all.
_USB_PORT = re.compile(r"[0-9]{1,3}(\.[0-9]{1,3}){0,4}")
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def token(value: str | None, what: str) -> str:
    """A QEMU identifier (machine type, CPU model or feature): letters, digits, ``._+-``."""
    if value is None or not _TOKEN.fullmatch(value):
        raise XMLError(f"invalid {what}='{shown(value or '')}': expected a name of letters, "
                       "digits, '.', '_', '+' and '-'")  # fmt: skip
    return value


def host_value(value: str, what: str) -> str:
    """An IP address or a DNS host name (virtbus.netaddr), else XMLError."""
    if not is_host(value):
        raise XMLError(f"invalid {what}='{shown(value)}': expected an IP address or a host name")
    return value


def port_value(value: str | None, what: str) -> int:
    """A TCP port, 1-65535."""
    return parse_int(value, what, minimum=1, maximum=65535)


def _check_socket_length(path: Path) -> None:
    if len(str(path).encode()) > MAX_SOCKET_PATH:
        raise ConfigUnsupported(
            f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes (UNIX limit)"
        )


def unsupported(what: str) -> ConfigUnsupported:
    return ConfigUnsupported(f"unsupported {what}")


def int_attr(el: Element, name: str, what: str, default: str = "0", maximum: int = 0xFFFF) -> int:
    """An integer attribute of an element the builder reads (decimal or 0x hex, bounded)."""
    return parse_int(el.get(name, default), f"{what} {name}", minimum=0, maximum=maximum,
                     hex_ok=True)  # fmt: skip


@dataclass
class BuildContext:
    """Everything the per-device builders share while one argv is built."""

    defn: DomainDefinition
    run_dir: Path
    socket_dir: Path | None  # the domain's own sockets go here, not in run_dir (QemuPaths)
    q35: bool
    kvm: bool
    settings: ArgvSettings
    caps: QemuCapabilities | None
    machine: str = "pc"
    host: Any = None  # drivers.qemu.host.HostFacts (None at define)
    #: ``<disk type='volume'>`` by disk index, resolved by the agent's pools; None while
    #: validating a definition (a placeholder stands in for each volume)
    volumes: Mapping[int, ResolvedVolume] | None = None
    #: NICs on the agent's networks by interface index: their taps (drivers/qemu/taps.py)
    taps: Mapping[int, ResolvedTap] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)
    chardevs: list[ChardevRuntime] = field(default_factory=list)
    disks: list[DiskRuntime] = field(default_factory=list)
    nets: list[NetRuntime] = field(default_factory=list)
    sockets: list[Path] = field(default_factory=list)  # our own, in run_dir: removed when stale
    bind_paths: list[Path] = field(default_factory=list)  # user paths QEMU binds: never removed
    generated_macs: dict[int, str] = field(default_factory=dict)
    bootindex: dict[tuple[str, int], int] = field(default_factory=dict)  # (tag, index) -> n
    pci_buses: dict[int, str] = field(default_factory=dict)  # controller index -> qdev bus
    virtio_serial: set[int] = field(default_factory=set)  # controller indices emitted
    usb_bus: str | None = None
    usb_aliases: dict[int, str] = field(default_factory=dict)  # USB controller index -> id
    vser_aliases: dict[int, str] = field(default_factory=dict)  # virtio-serial index -> id
    spice: bool = False
    audio_ids: list[str] = field(default_factory=list)
    secrets: list[Any] = field(default_factory=list)  # argv_storage.SecretRef
    host_devices: list[str] = field(default_factory=list)  # sysfs paths start must find
    overlays: list[Any] = field(default_factory=list)  # argv_storage.Overlay
    directories: list[Path] = field(default_factory=list)  # the driver creates them first
    objects: set[str] = field(default_factory=set)  # -object ids already emitted
    throttle_groups: set[str] = field(default_factory=set)
    fdc_boot: dict[int, int] = field(default_factory=dict)  # floppy unit -> bootindex
    floppy_props: list[dict[str, Any]] = field(default_factory=list)
    iothreads: set[int] = field(default_factory=set)
    globals: list[str] = field(default_factory=list)  # -global values of machine options
    net_scripts: list[Any] = field(default_factory=list)  # argv_net.IfScript
    links_down: list[str] = field(default_factory=list)  # NIC ids to set_link down at start
    passwords: list[Any] = field(default_factory=list)  # argv_graphics.Password
    displays: list[str] = field(default_factory=list)  # -display values (sdl, dbus, ...)
    dbus_address: str | None = None  # the per-domain D-Bus a dbus display needs
    helpers: list[Any] = field(default_factory=list)  # helpers.HelperSpec
    sev_files: list[tuple[Path, str]] = field(default_factory=list)  # files SEV reads
    env: dict[str, str] = field(default_factory=dict)  # environment of the QEMU process
    sgx_epc: list[str] = field(default_factory=list)
    _used_slots: set[tuple[int, int]] = field(default_factory=set)
    _vser_ports: dict[tuple[int, int], set[int]] = field(default_factory=dict)

    # ------------------------------------------------------------ argv helpers

    def add(self, *args: str) -> None:
        self.argv.extend(args)

    def device(self, props: dict[str, Any]) -> None:
        self.require_device(str(props["driver"]))
        self.add("-device", json_arg(props))

    def require_device(self, driver: str) -> None:
        if self.caps is not None and not self.caps.has_device(driver):
            raise ConfigUnsupported(f"this QEMU has no device '{driver}'")

    def socket_path(self, suffix: str) -> Path:
        """``<run_dir>/<uuid>.<suffix>`` (or ``<socket_dir>/<suffix>``): a socket of our
        own, checked against the UNIX socket path limit; a stale one is removed before
        start and it is removed after."""
        if self.socket_dir is not None:
            path = self.socket_dir / suffix
        else:
            path = self.run_dir / f"{self.defn.uuid}.{suffix}"
        self.check_socket(path)
        return path

    def check_socket(self, path: Path) -> None:
        """Record one of our own sockets (see :meth:`socket_path`)."""
        _check_socket_length(path)
        self.sockets.append(path)

    def user_socket(self, path: Path, *, bind: bool) -> Path:
        """A socket path the definition chose. Never removed by the agent: QEMU binds it
        (``bind``; anything already there is refused before start, because QEMU would
        unlink it) or connects to it."""
        _check_socket_length(path)
        if bind:
            self.bind_paths.append(path)
        return path

    # ------------------------------------------------------------ PCI addresses

    @property
    def root_bus(self) -> str:
        return "pcie.0" if self.q35 else "pci.0"

    def reserve_explicit_addresses(self) -> None:
        """Reserve every slot named by an ``<address type='pci'>`` before auto-assignment."""
        reserved = {(0, 0), (0, 0x1F)} if self.q35 else {(0, 0), (0, 1)}
        self._used_slots |= reserved
        for addr in self.defn.elements("devices/*/address[@type='pci']"):
            if int_attr(addr, "domain", "<address type='pci'>") != 0:
                raise unsupported("<address type='pci'> with a PCI domain other than 0")
            bus = int_attr(addr, "bus", "<address type='pci'>", maximum=0xFF)
            slot = int_attr(addr, "slot", "<address type='pci'>", maximum=0x1F)
            self._used_slots.add((bus, slot))
        for addr in self.defn.elements("devices/*/address[@type='virtio-serial']"):
            key = (int_attr(addr, "controller", "<address>"), int_attr(addr, "bus", "<address>"))
            self._vser_ports.setdefault(key, set()).add(int_attr(addr, "port", "<address>"))

    def pci_props(
        self, address: Element | None, what: str, prefer_slot: int | None = None
    ) -> dict[str, Any]:
        """``bus``/``addr`` for a PCI device: its ``<address>`` or a free root-bus slot."""
        if address is not None and address.get("type") not in (None, "pci"):
            raise unsupported(f"<address type='{address.get('type')}'> for {what}")
        if address is not None and address.get("type") == "pci":
            bus = int_attr(address, "bus", "<address>", maximum=0xFF)
            slot = int_attr(address, "slot", "<address>", maximum=0x1F)
            fn = int_attr(address, "function", "<address>", maximum=7)
            if bus == 0:
                bus_name = self.root_bus
            elif bus in self.pci_buses:
                bus_name = self.pci_buses[bus]
            else:
                raise ConfigUnsupported(
                    f"{what}: <address bus='{bus:#04x}'> names no PCI controller of this domain"
                )
            props: dict[str, Any] = {"bus": bus_name, "addr": f"{slot:#x}.{fn:#x}"}
            if fn == 0:
                props["addr"] = f"{slot:#x}"
            if address.get("multifunction") in ("on", "off"):
                props["multifunction"] = address.get("multifunction") == "on"
            return props
        if prefer_slot is not None and (0, prefer_slot) not in self._used_slots:
            slot = prefer_slot
        else:
            free = [s for s in range(1, 0x20) if (0, s) not in self._used_slots]
            if not free:
                raise ConfigUnsupported(f"no free PCI slot on {self.root_bus} for {what}")
            slot = free[0]
        self._used_slots.add((0, slot))
        return {"bus": self.root_bus, "addr": f"{slot:#x}"}

    def addr_props(self, el: Element, what: str) -> dict[str, Any]:
        """``bus``/``addr``/``port``/``nr``... for a device's completed ``<address>``
        (``qemuBuildDeviceAddressProps``), plus its ``<acpi index>``."""
        a = el.find("address")
        props: dict[str, Any] = {}
        atype = a.get("type") if a is not None else None
        if atype == "pci":
            props = self.pci_props(a, what)
        elif atype == "usb":
            assert a is not None
            bus = int_attr(a, "bus", "<address type='usb'>", maximum=255)
            alias = self.usb_aliases.get(bus)
            if alias is None:
                raise ConfigUnsupported(f"{what}: no USB controller with index {bus}")
            props = {"bus": f"{alias}.0"}
            if a.get("port"):
                port = str(a.get("port"))
                if not _USB_PORT.fullmatch(port):
                    raise XMLError(f"invalid <address type='usb' port='{shown(port)}'>")
                props["port"] = port
        elif atype == "virtio-serial":
            assert a is not None
            ctrl = int_attr(a, "controller", "<address>", maximum=255)
            alias = self.vser_aliases.get(ctrl)
            if alias is None:
                raise ConfigUnsupported(f"no <controller type='virtio-serial' index='{ctrl}'>")
            props = {"bus": f"{alias}.{int_attr(a, 'bus', '<address>', maximum=255)}",
                     "nr": int_attr(a, "port", "<address>", maximum=511)}  # fmt: skip
        elif atype == "isa":
            assert a is not None
            props = {"iobase": int_attr(a, "iobase", "<address type='isa'>")}
            if a.get("irq"):
                props["irq"] = int_attr(a, "irq", "<address type='isa'>", maximum=255)
        elif atype == "dimm":
            assert a is not None
            props = {"slot": int_attr(a, "slot", "<address type='dimm'>", maximum=255)}
            if a.get("base"):
                props["addr"] = int_attr(a, "base", "<address type='dimm'>", maximum=(1 << 64) - 1)
        elif atype not in (None, "drive", "ccid", "unassigned"):
            raise ConfigUnsupported(f"unsupported <address type='{atype}'> for {what}")
        acpi = el.find("acpi")
        if acpi is not None and acpi.get("index") is not None:
            props["acpi-index"] = int_attr(acpi, "index", "<acpi>", maximum=16383)
        return props

    # ------------------------------------------------------------ virtio-serial

    def virtio_serial_props(self, address: Element | None, *, console: bool) -> dict[str, Any]:
        """``bus``/``nr`` of a virtio-serial port (port 0 is only for a virtconsole)."""
        if address is not None and address.get("type") not in (None, "virtio-serial"):
            raise unsupported(f"<address type='{address.get('type')}'> for a virtio port")
        if address is not None and address.get("type") == "virtio-serial":
            ctrl = int_attr(address, "controller", "<address>")
            bus = int_attr(address, "bus", "<address>")
            nr = int_attr(address, "port", "<address>")
        else:
            ctrl, bus = 0, 0
            used = self._vser_ports.setdefault((0, 0), set())
            nr = next(n for n in range(0 if console else 1, 10_000) if n not in used)
            used.add(nr)
        if ctrl not in self.virtio_serial:
            raise ConfigUnsupported(f"no <controller type='virtio-serial' index='{ctrl}'>")
        return {"bus": f"virtio-serial{ctrl}.{bus}", "nr": nr}
