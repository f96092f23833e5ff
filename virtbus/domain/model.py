"""Typed, read-only views of the parts of a domain definition virtbus acts on.

The lxml tree inside :class:`~virtbus.domain.definition.DomainDefinition` is the source of
truth; these views are parsed from it and each keeps ``element``, the lxml element it came
from, so a driver can look further (unknown attributes, addresses) or write back through
the definition's setters. Views never change the tree themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

from lxml import etree

if TYPE_CHECKING:
    from virtbus.domain.bandwidth import Bandwidth

Element: TypeAlias = etree._Element

# libvirt's enumerations, used for validation (domain_conf.c / domaincommon.rng)
LIFECYCLE_ACTIONS = frozenset({"destroy", "restart", "preserve", "rename-restart"})
CRASH_ACTIONS = LIFECYCLE_ACTIONS | {"coredump-destroy", "coredump-restart"}
LIFECYCLE_DEFAULTS = {"on_poweroff": "destroy", "on_reboot": "restart", "on_crash": "destroy"}
OS_TYPES = frozenset({"hvm", "xen", "xenpvh", "linux", "exe", "uml"})
BOOT_DEVS = frozenset({"fd", "hd", "cdrom", "network"})
CPU_MODES = frozenset({"custom", "host-model", "host-passthrough", "maximum"})
DISK_TYPES = frozenset(
    {"file", "block", "dir", "network", "volume", "nvme", "vhostuser", "vhostvdpa"}
)
DISK_DEVICES = frozenset({"disk", "cdrom", "floppy", "lun"})
DISK_CACHE_MODES = frozenset(
    {"default", "none", "writethrough", "writeback", "directsync", "unsafe"}
)
DISK_IO_MODES = frozenset({"default", "threads", "native", "io_uring"})
DISK_DISCARD_MODES = frozenset({"default", "unmap", "ignore"})
CHAR_TYPES = frozenset(
    {
        "null",
        "vc",
        "pty",
        "dev",
        "file",
        "pipe",
        "stdio",
        "udp",
        "tcp",
        "unix",
        "spicevmc",
        "spiceport",
        "nmdm",
        "qemu-vdagent",
        "dbus",
    }
)
GRAPHICS_TYPES = frozenset({"sdl", "vnc", "rdp", "desktop", "spice", "egl-headless", "dbus"})
CHAR_KINDS = ("serial", "console", "channel", "parallel")
FILESYSTEM_TYPES = frozenset({"mount", "block", "file", "template", "ram", "bind", "volume"})
FILESYSTEM_ACCESS_MODES = frozenset({"passthrough", "mapped", "squash"})
CAPABILITY_POLICIES = frozenset({"default", "allow", "deny"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Loader:
    path: str | None
    readonly: bool | None
    type: str | None  # rom | pflash
    secure: bool | None
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class OSConfig:
    type: str  # hvm | xen | xenpvh | linux | exe
    arch: str | None
    machine: str | None
    boot_devs: tuple[str, ...]  # <boot dev=...> in order
    kernel: str | None
    initrd: str | None
    cmdline: str | None
    dtb: str | None
    loader: Loader | None
    nvram: str | None  # the path (element text)
    nvram_template: str | None
    firmware: str | None  # <os firmware='efi'>
    bootmenu: bool | None
    # containers (<os><type>exe</type>): the init and how it is run
    init: str | None = None
    initargs: tuple[str, ...] = ()
    initenv: tuple[tuple[str, str], ...] = ()  # (name, value) in document order
    initdir: str | None = None
    inituser: str | None = None
    initgroup: str | None = None
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class CPUFeature:
    name: str
    policy: str | None  # force | require | optional | disable | forbid


@dataclass(frozen=True, slots=True, kw_only=True)
class CPUTopology:
    sockets: int
    dies: int
    cores: int
    threads: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CPUConfig:
    mode: str  # custom (libvirt's default) | host-model | host-passthrough | maximum
    match: str | None
    check: str | None
    migratable: bool | None
    model: str | None
    fallback: str | None  # <model fallback=...>
    vendor: str | None
    topology: CPUTopology | None
    features: tuple[CPUFeature, ...]
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Timer:
    name: str
    present: bool | None
    tickpolicy: str | None
    track: str | None
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClockConfig:
    offset: str  # utc (default) | localtime | timezone | variable | absolute
    timezone: str | None
    adjustment: str | None
    basis: str | None
    timers: tuple[Timer, ...]
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class PMConfig:
    suspend_to_mem: bool | None
    suspend_to_disk: bool | None
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    """Any child of ``<devices>`` (``tag`` is the local name, ``index`` its rank per tag)."""

    tag: str
    index: int
    type: str | None
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Disk:
    index: int
    type: str  # file (default) | block | dir | network | volume | ...
    device: str  # disk (default) | cdrom | floppy | lun
    driver_name: str | None
    driver_type: str | None  # raw | qcow2 | ...
    cache: str | None
    io: str | None
    discard: str | None
    source_path: str | None  # source@file, @dev or @dir; None for an empty cdrom
    source_protocol: str | None  # network disks
    source_name: str | None  # network disks
    target_dev: str
    target_bus: str | None
    readonly: bool  # <readonly/>, or implied by device='cdrom' as in libvirt
    shareable: bool
    boot_order: int | None
    serial: str | None
    address: Element | None = field(default=None, repr=False, compare=False)
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class IPAddress:
    """``<ip address=... prefix=... family=...>`` of an interface (containers set them)."""

    address: str
    family: str | None  # ipv4 | ipv6 (None: from the address)
    prefix: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """``<route family=... address=... prefix=... gateway=...>`` of an interface."""

    family: str | None
    address: str
    prefix: int | None
    gateway: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Interface:
    index: int
    type: str  # user (libvirt's default) | bridge | network | ethernet | ...
    mac: str | None  # lower-case; None when absent (the driver generates and writes back)
    model: str | None
    source_bridge: str | None
    source_network: str | None
    source_dev: str | None
    target_dev: str | None
    boot_order: int | None
    guest_dev: str | None = None  # <guest dev=...>: the name inside a container
    ips: tuple[IPAddress, ...] = ()
    routes: tuple[Route, ...] = ()
    mtu: int | None = None
    bandwidth: Bandwidth | None = None  # <bandwidth>: the tap's shaping (domiftune)
    address: Element | None = field(default=None, repr=False, compare=False)
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Filesystem:
    """A ``<filesystem>``: for containers, the root (``target dir='/'``) and other mounts."""

    index: int
    type: str  # mount (libvirt's default) | block | file | ram | bind | template | volume
    accessmode: str  # passthrough (default) | mapped | squash
    driver_type: str | None  # <driver type=...>: path | handle | loop | nbd | ploop
    driver_format: str | None  # <driver format=...>: raw | qcow2 | ...
    source_dir: str | None
    source_file: str | None
    source_dev: str | None
    source_pool: str | None  # type='volume'
    source_volume: str | None
    ram_kib: int | None  # type='ram': <source usage=... units=...>
    target_dir: str
    readonly: bool
    element: Element = field(repr=False, compare=False)

    @property
    def source_path(self) -> str | None:
        """The host path it exposes (directory, image file or block device), if any."""
        return self.source_dir or self.source_file or self.source_dev


@dataclass(frozen=True, slots=True, kw_only=True)
class IdRange:
    """One ``<uid>``/``<gid>`` of ``<idmap>``: container ids [start, start+count) are host
    ids [target, target+count)."""

    start: int
    target: int
    count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class IdMap:
    uid: tuple[IdRange, ...]
    gid: tuple[IdRange, ...]
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class MemTune:
    """``<memtune>`` limits in KiB (None: not set)."""

    hard_limit_kib: int | None
    soft_limit_kib: int | None
    swap_hard_limit_kib: int | None
    min_guarantee_kib: int | None
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class CPUTune:
    """The ``<cputune>`` values a cgroup can enforce (others stay in ``element``)."""

    shares: int | None
    period: int | None  # us
    quota: int | None  # us per period; -1 = unlimited
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Capabilities:
    """``<features><capabilities policy=...>``: the container's Linux capabilities."""

    policy: str  # default | allow | deny
    toggles: tuple[tuple[str, bool], ...]  # (capability, state on?) in document order
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class CharDevice:
    kind: str  # serial | console | channel | parallel
    index: int  # rank among devices of the same kind
    type: str  # pty (libvirt's default) | file | unix | tcp | null | spicevmc | ...
    source_path: str | None
    source_mode: str | None  # bind | connect
    source_host: str | None
    source_service: str | None
    protocol: str | None  # <protocol type='telnet'>
    target_type: str | None  # isa-serial | serial | virtio | guestfwd | ...
    target_port: int | None
    target_name: str | None  # channels, e.g. org.qemu.guest_agent.0
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Graphics:
    index: int
    type: str  # vnc | spice | ...
    port: int | None  # -1 or None when chosen at start
    autoport: bool | None
    listen: str | None  # listen attribute, else <listen type='address' address=...>
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Controller:
    type: str
    index: int | None
    model: str | None
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Input:
    type: str  # tablet | mouse | keyboard | passthrough | evdev
    bus: str | None
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Video:
    model: str | None  # <model type=...>: virtio | qxl | vga | cirrus | bochs | none
    vram: int | None
    heads: int | None
    primary: bool
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Sound:
    model: str
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Watchdog:
    model: str  # i6300esb | ib700 | diag288 | itco
    action: str | None  # reset | shutdown | poweroff | pause | none | dump | inject-nmi
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class RNG:
    model: str
    backend_model: str | None  # random | egd | builtin
    backend_path: str | None  # <backend model='random'>/dev/urandom</backend>
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Panic:
    model: str | None  # isa (pvpanic) | pseries | hyperv | s390 | pvpanic
    element: Element = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Memballoon:
    model: str  # virtio | xen | none
    autodeflate: bool | None
    element: Element = field(repr=False, compare=False)
