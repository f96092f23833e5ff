"""The QEMU command line for a libvirt domain definition (a pure function).

:func:`build_command` turns a :class:`~virtbus.domain.DomainDefinition` into the argv of
``qemu-system-x86_64`` plus what the driver needs at run time (QMP socket, pidfile, the
MACs it must write back, chardev/socket paths, the balloon target). It does no I/O: a
missing disk image is the driver's to catch (see :func:`disk_paths`), and ports a QEMU
cannot pick itself (SPICE) are allocated by the driver (see :func:`graphics_needing_ports`).

It follows libvirt's ``qemu_command.c`` choices: ``-nodefaults``, ``-S``, ``-blockdev`` with
separate storage/format nodes, JSON ``-device`` values, libvirt's device ids, ``-no-shutdown``
(the driver applies on_poweroff/on_crash itself), ``-boot strict=on`` with per-device
``bootindex``, and a CONFIG_UNSUPPORTED error naming anything it cannot honour rather than
a guest that silently differs from its XML.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from drivers.base import ResolvedTap, ResolvedVolume
from drivers.qemu import argv_chardev as chardev
from drivers.qemu import argv_controllers as ctl
from drivers.qemu import argv_devices as devices
from drivers.qemu import argv_fs as fs
from drivers.qemu import argv_graphics as graphics
from drivers.qemu import argv_hostdev as hostdev
from drivers.qemu import argv_machine as mach
from drivers.qemu import argv_memory as memory
from drivers.qemu import argv_misc as misc
from drivers.qemu import argv_net as net
from drivers.qemu import argv_storage as storage
from drivers.qemu import cputune, postparse
from drivers.qemu.argv_chardev import SpiceRuntime, VncRuntime
from drivers.qemu.argv_common import (
    ArgvSettings,
    BuildContext,
    ChardevRuntime,
    DiskRuntime,
    NetRuntime,
    kv_escape,
    unsupported,
)
from drivers.qemu.capabilities import QemuCapabilities
from drivers.qemu.helpers import HelperSpec
from drivers.qemu.host import HostFacts
from drivers.qemu.xmlnum import num
from virtbus.domain import DomainDefinition, unknown_devices
from virtbus.domain.devices import volume_sources
from virtbus.errors import ConfigUnsupported, XMLError

__all__ = [
    "ArgvSettings",
    "ChardevRuntime",
    "DiskRuntime",
    "NetRuntime",
    "QemuLaunch",
    "QemuPaths",
    "SpiceRuntime",
    "VncRuntime",
    "build_command",
    "disk_paths",
    "graphics_needing_ports",
    "volume_disks",
]

SUPPORTED_DEVICES = (
    "disk", "controller", "interface", "serial", "console", "channel", "input", "graphics",
    "video", "sound", "audio", "watchdog", "rng", "panic", "memballoon", "redirdev", "hub",
    "memory", "hostdev", "smartcard", "parallel", "redirfilter", "filesystem", "tpm",
    "iommu", "vsock", "shmem", "crypto", "pstore",
)  # fmt: skip
_TOP_LEVEL = frozenset(
    {
        "name", "uuid", "title", "description", "metadata", "memory", "currentMemory",
        "vcpu", "os", "features", "cpu", "clock", "on_poweroff", "on_reboot", "on_crash",
        "pm", "devices", "resource", "seclabel", "throttlegroups", "maxMemory",
        "memoryBacking", "numatune", "cputune", "iothreads", "iothreadids",
        "defaultiothread", "vcpus", "idmap", "sysinfo", "genid", "launchSecurity",
    }
)  # fmt: skip
_OS_CHILDREN = frozenset(
    {
        "type",
        "boot",
        "kernel",
        "initrd",
        "cmdline",
        "loader",
        "nvram",
        "bootmenu",
        "smbios",
        "firmware",
        "bios",
        "acpi",
    }
)
DEFAULT_SETTINGS = ArgvSettings()
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True, slots=True)
class QemuPaths:
    """Where a domain's runtime files live: ``<run_dir>/<uuid>.{qmp,pid,log,...}``, or,
    ``private`` (each QEMU under a uid of its own, drivers/qemu/dac.py), what QEMU itself
    creates (QMP socket, pidfile, the sockets the agent names) in the domain's own dir
    ``<run_dir>/<uuid>/``, which is its uid's; the log stays the agent's."""

    run_dir: Path
    private: bool = False

    def socket_dir(self, uuid: str) -> Path | None:
        """The dir of the domain's own sockets when private (None: the run dir)."""
        return self.run_dir / uuid if self.private else None

    def qmp_socket(self, uuid: str) -> Path:
        return self.run_dir / uuid / "qmp.sock" if self.private else self.run_dir / f"{uuid}.qmp"

    def pidfile(self, uuid: str) -> Path:
        return self.run_dir / uuid / "qemu.pid" if self.private else self.run_dir / f"{uuid}.pid"

    def logfile(self, uuid: str) -> Path:
        return self.run_dir / f"{uuid}.log"


@dataclass(frozen=True, slots=True)
class QemuLaunch:
    """A command line plus the runtime facts the driver needs once QEMU is up."""

    argv: list[str]
    qmp_socket: Path
    pidfile: Path
    logfile: Path  # not passed to QEMU: the driver sends QEMU's stdout/stderr there
    generated_macs: dict[int, str]  # interface index -> MAC to write back (set_interface_mac)
    balloon: bool  # a virtio balloon device exists (id "balloon0")
    balloon_target_kib: int | None  # set after start when currentMemory < memory
    vnc: VncRuntime | None
    spice: SpiceRuntime | None
    guest_agent_socket: Path | None
    chardevs: tuple[ChardevRuntime, ...]
    disks: tuple[DiskRuntime, ...]
    nets: tuple[NetRuntime, ...]
    sockets: tuple[Path, ...]  # our UNIX sockets QEMU creates in run_dir (QMP first): remove after
    bind_paths: tuple[Path, ...]  # sockets QEMU binds at paths the XML chose: must not exist
    incoming_uri: str | None  # QEMU started with "-incoming defer": run migrate-incoming
    accel: str  # "kvm" | "tcg"
    #: applied to QEMU's threads at start
    cpu_tuning: cputune.CpuTuning = field(default_factory=cputune.CpuTuning)
    secrets: tuple[storage.SecretRef, ...] = ()  # secret files QEMU reads: must exist
    nvram: tuple[str, str | None] | None = None  # (NVRAM path, template to copy if missing)
    host_devices: tuple[str, ...] = ()  # host sysfs devices that must exist at start
    env: dict[str, str] = field(default_factory=dict)  # extra environment for QEMU (TZ)
    net_scripts: tuple[net.IfScript, ...] = ()  # interface scripts the driver runs
    links_down: tuple[str, ...] = ()  # NICs whose link starts down (QMP set_link)
    passwords: tuple[graphics.Password, ...] = ()  # display passwords set over QMP
    dbus_address: str | None = None  # the D-Bus a dbus display or channel talks on
    helpers: tuple[HelperSpec, ...] = ()  # per-domain processes to start before QEMU
    overlays: tuple[storage.Overlay, ...] = ()  # transient disks: create before, delete after
    directories: tuple[Path, ...] = ()  # directories QEMU creates files in (memory backing)


def volume_disks(defn: DomainDefinition) -> list[tuple[int, str, str]]:
    """(disk index, pool, volume) of every ``<disk type='volume'>``: the agent resolves
    them before launch (a missing one is a clear error naming the pool and volume)."""
    return volume_sources(defn)


def disk_paths(defn: DomainDefinition) -> list[str]:
    """Host paths QEMU opens for this domain (disk sources, kernel, initrd, firmware).

    The driver checks they exist before launch (a clear error instead of a QEMU one). The
    NVRAM is not among them: a missing one is created from its template at start
    (:mod:`drivers.qemu.companions`); nor are volume disks: their pool checked them when
    they were resolved.
    """
    paths = [d.source_path for d in defn.disks if d.source_path]
    os_ = defn.os
    paths += [p for p in (os_.kernel, os_.initrd) if p]
    if os_.loader is not None and os_.loader.path:
        paths.append(os_.loader.path)
    return paths


def graphics_needing_ports(defn: DomainDefinition) -> list[int]:
    """Indices of ``<graphics>`` whose port the driver must allocate (autoport SPICE).

    VNC autoport needs none: QEMU takes the first free display itself (``to=``).
    """
    return [
        g.index
        for g in defn.graphics
        if g.type == "spice" and (g.autoport is True or g.port is None or g.port <= 0)
    ]


def build_command(
    defn: DomainDefinition,
    paths: QemuPaths,
    *,
    kvm_available: bool,
    incoming: str | None = None,
    emulator: str = "qemu-system-x86_64",
    graphics_ports: Mapping[int, int] | None = None,
    caps: QemuCapabilities | None = None,
    settings: ArgvSettings = DEFAULT_SETTINGS,
    daemonize: bool = False,
    host: HostFacts | None = None,
    completed: bool = False,
    volumes: Mapping[int, ResolvedVolume] | None = None,
    taps: Mapping[int, ResolvedTap] | None = None,
    monitor_fd: int | None = None,
) -> QemuLaunch:
    """The argv for ``defn``; ConfigUnsupported naming anything it cannot honour.

    ``emulator`` is the driver's choice; the XML's ``<emulator>`` is deliberately ignored
    (a definition must not pick the binary the host runs). ``graphics_ports`` maps a
    ``<graphics>`` index to a port the driver allocated (see :func:`graphics_needing_ports`).
    ``defn`` is completed in place first, as libvirt completes a definition at define and
    at start (:mod:`drivers.qemu.postparse`: implicit controllers, defaults, addresses).
    ``host`` (:func:`drivers.qemu.host.probe`) enables the checks against this host's
    hugepages, NUMA nodes, CPUs and firmware; without it they wait for start.
    ``volumes`` holds what each ``<disk type='volume'>`` resolved to (None: validating);
    ``taps`` the tap (its inherited fd) of each NIC on one of the agent's networks.
    ``monitor_fd``: QEMU inherits the QMP socket already listening at ``qmp_socket``
    under this number (as libvirt hands its monitor over), so the agent connects at once
    instead of waiting for QEMU to create it; None: QEMU binds the path itself.
    ``completed``: ``defn`` was just completed at define; what libvirt assigns only at
    start (USB ports, console ports) is then left out too (define's own validation).
    """
    mach.machine_type(defn, caps)  # before completing: addresses depend on the machine
    if not completed:
        postparse.complete(
            defn, live=True, firmware=host.firmware if host is not None else None,
            nvram_dir=settings.nvram_dir, caps=caps,
        )  # fmt: skip
    _check_top_level(defn)
    accel = _accel(defn, kvm_available)
    machine = mach.machine_type(defn, caps)
    ctx = BuildContext(
        defn=defn,
        run_dir=paths.run_dir,
        socket_dir=paths.socket_dir(defn.uuid),
        q35="q35" in machine,
        kvm=accel == "kvm",
        settings=settings,
        caps=caps,
        volumes=volumes,
        taps=taps or {},
        machine=machine,
        host=host,
    )
    qmp = paths.qmp_socket(defn.uuid)
    ctx.check_socket(qmp)
    ctx.spice = any(g.type == "spice" for g in defn.graphics)
    if ctx.spice and caps is not None and not caps.spice:
        raise unsupported("<graphics type='spice'>: this QEMU has no SPICE support")
    _assign_boot_order(ctx)

    mem = memory.parse(ctx)
    memory.check_hotplug(ctx, mem)
    tuning = cputune.plan(ctx)
    if host is not None:
        cputune.check_host(tuning, host.cpus)

    ctx.add(emulator, "-name", f"guest={kv_escape(defn.name)},debug-threads=on", "-S")
    ram = memory.ram_backend(ctx, mem)
    machine_opts = mach.machine_opts(ctx, machine, memory.machine_options(ctx, mem, ram))
    ctx.add("-machine", machine_opts, "-accel", accel)
    cpu = mach.cpu(ctx)
    if cpu:
        ctx.add("-cpu", cpu)
    for value in ctx.globals:
        ctx.add("-global", value)
    ctx.globals.clear()
    memory.build_memory(ctx, mem, ram)
    ctx.add("-smp", mach.smp(defn))
    cputune.build_iothreads(ctx)
    cputune.check_iothread_refs(ctx)
    storage.build_throttle_groups(ctx)
    memory.build_numa(ctx, mem)
    misc.build_sysinfo(ctx)
    ctx.add("-uuid", defn.uuid, "-no-user-config", "-nodefaults")
    where = f"fd={monitor_fd}" if monitor_fd is not None else f"path={kv_escape(str(qmp))}"
    ctx.add("-chardev", f"socket,id=charmonitor,{where},server=on,wait=off")
    ctx.add("-mon", "chardev=charmonitor,id=monitor,mode=control")
    mach.clock(ctx)
    _lifecycle(ctx)
    mach.pm(ctx)
    _boot(ctx)
    misc.build_acpi_tables(ctx)
    misc.build_iommu(ctx)

    ctl.check_types(ctx)
    ctl.usb_master_checks(ctx)
    ctl.register_aliases(ctx)
    storage.check_disks(ctx)
    hostdev.check_hostdevs(ctx)
    ctl.build_controllers(ctx)
    memory.build_memory_devices(ctx, mem)
    ctl.build_hubs(ctx)
    ctl.build_ccid(ctx)
    storage.build_disks(ctx)
    fs.build_filesystems(ctx)
    net.build_interfaces(ctx)
    chardev.build_smartcards(ctx)
    chardev.build_serials(ctx)
    chardev.build_parallels(ctx)
    agent = chardev.build_channels(ctx)
    fs.build_tpms(ctx)
    devices.build_inputs(ctx)
    graphics.build_audio(ctx)
    vnc, spice = graphics.build_graphics(ctx, graphics_ports or {})
    devices.build_videos(ctx)
    devices.build_sounds(ctx)
    devices.build_watchdogs(ctx)
    chardev.build_redirdevs(ctx)
    hostdev.build_hostdevs(ctx)
    balloon = devices.build_memballoon(ctx)
    devices.build_rngs(ctx)
    misc.build_genid(ctx)
    misc.build_launch_security(ctx)
    devices.build_panics(ctx)
    misc.build_shmem(ctx)
    misc.build_vsock(ctx)
    misc.build_crypto(ctx)
    misc.build_pstore(ctx)
    if defn.has_feature("vmcoreinfo"):
        ctx.device({"driver": "vmcoreinfo", "id": "vmcoreinfo0"})
    if incoming is not None:
        ctx.add("-incoming", "defer")
    pidfile = paths.pidfile(defn.uuid)
    ctx.add("-pidfile", str(pidfile))
    for display in ctx.displays or ["none"]:
        ctx.add("-display", display)
    if daemonize:
        ctx.add("-daemonize")
    ctx.add("-sandbox", SANDBOX, "-msg", "timestamp=on")

    target = defn.current_memory_kib if defn.current_memory_kib < defn.memory_kib else None
    if target is not None and not balloon:
        # nothing can take memory from the guest: it runs with all of <memory>, and the
        # live definition says so (as libvirt's does)
        if not completed:
            defn.set_current_memory_kib(defn.memory_kib)
        target = None
    return QemuLaunch(
        argv=ctx.argv,
        qmp_socket=qmp,
        pidfile=pidfile,
        logfile=paths.logfile(defn.uuid),
        generated_macs=dict(ctx.generated_macs),
        balloon=balloon,
        balloon_target_kib=target,
        vnc=vnc,
        spice=spice,
        guest_agent_socket=agent,
        chardevs=tuple(ctx.chardevs),
        disks=tuple(ctx.disks),
        nets=tuple(ctx.nets),
        sockets=tuple(ctx.sockets),
        bind_paths=tuple(ctx.bind_paths),
        incoming_uri=incoming,
        accel=accel,
        cpu_tuning=tuning,
        secrets=tuple(ctx.secrets),
        nvram=mach.nvram_file(defn),
        env=dict(ctx.env),
        net_scripts=tuple(ctx.net_scripts),
        links_down=tuple(ctx.links_down),
        passwords=tuple(ctx.passwords),
        dbus_address=ctx.dbus_address,
        helpers=(*ctx.helpers, *graphics.dbus_daemon(ctx)),
        host_devices=tuple(ctx.host_devices),
        overlays=tuple(ctx.overlays),
        directories=tuple(dict.fromkeys(ctx.directories)),
    )


# ---------------------------------------------------------------------------- pieces


def _check_top_level(defn: DomainDefinition) -> None:
    for child in defn.root:
        if not isinstance(child.tag, str):
            continue
        if child.prefix == "qemu" or "libvirt.org/schemas/domain/qemu" in child.tag:
            raise ConfigUnsupported(
                "unsupported <qemu:commandline>/<qemu:*>: raw QEMU arguments are not allowed"
            )
        if child.tag not in _TOP_LEVEL:
            raise unsupported(f"<{child.tag}>")
    extra = unknown_devices(defn, SUPPORTED_DEVICES)
    if extra:
        raise unsupported(f"device {', '.join(extra)}")
    _check_seclabels(defn)
    if defn.os.type != "hvm":
        raise unsupported(f"<os><type>{defn.os.type}</type>")
    if defn.os.arch not in (None, "x86_64", "i686"):
        raise unsupported(f"<os><type arch='{defn.os.arch}'>")
    for child in defn.os.element:
        if isinstance(child.tag, str) and child.tag not in _OS_CHILDREN:
            raise unsupported(f"<os><{child.tag}>")


def _check_seclabels(defn: DomainDefinition) -> None:
    """libvirt's seclabel rules; then only ``type='none'`` (virtbus has no security
    driver, like libvirt with ``security_driver = "none"``)."""
    labels = defn.root.findall("seclabel")
    models: set[str] = set()
    for label in labels:
        model = label.get("model")
        if model is None and len(labels) > 1:
            raise XMLError("missing security model when using multiple labels")
        if model is not None:
            if model in models:
                raise XMLError(f"seclabel for model {model} is already provided")
            models.add(model)
        if (
            label.get("relabel") == "yes"
            and label.get("type") == "static"
            and (label.find("label") is None)
        ):
            raise XMLError(f"Cannot specify relabel if label is missing. model={model}")
    for el in defn.elements("devices//seclabel"):
        if el.get("relabel") == "yes" and el.find("label") is None and el.get("model"):
            raise XMLError(f"Cannot specify relabel if label is missing. model={el.get('model')}")
        if len(labels) > 1 and el.get("model") is None:
            raise XMLError("missing security model when using multiple labels")
    for label in labels:
        if label.get("type", "dynamic") != "none":
            raise unsupported(
                f"<seclabel type='{label.get('type', 'dynamic')}'> (no security driver here)"
            )


def _accel(defn: DomainDefinition, kvm_available: bool) -> str:
    if defn.hv_type == "kvm":
        if not kvm_available:
            raise ConfigUnsupported(
                "<domain type='kvm'> but KVM is not available on this host (/dev/kvm)"
            )
        return "kvm"
    if defn.hv_type == "qemu":
        return "tcg"
    raise unsupported(f"<domain type='{defn.hv_type}'> for the QEMU driver")


def _lifecycle(ctx: BuildContext) -> None:
    """libvirt's way: QEMU never exits on guest poweroff; the driver applies the actions."""
    defn = ctx.defn
    if defn.on_poweroff == "rename-restart":
        raise unsupported("<on_poweroff>rename-restart</on_poweroff>")
    if defn.on_reboot not in ("restart", "destroy"):
        raise unsupported(f"<on_reboot>{defn.on_reboot}</on_reboot>")
    if defn.on_crash not in ("destroy", "restart", "preserve"):
        raise unsupported(f"<on_crash>{defn.on_crash}</on_crash>")
    ctx.add("-no-shutdown")
    if defn.on_reboot == "destroy":
        ctx.add("-action", "reboot=shutdown")


def _assign_boot_order(ctx: BuildContext) -> None:
    """Per-device ``<boot order>``, or libvirt's mapping of ``<os><boot dev>`` to bootindex."""
    defn = ctx.defn
    per_device = {("disk", d.index): d.boot_order for d in defn.disks if d.boot_order}
    per_device |= {("interface", i.index): i.boot_order for i in defn.interfaces if i.boot_order}
    if per_device:
        if defn.os.boot_devs:
            raise XMLError("per-device <boot order> cannot be used with <os><boot dev>")
        ctx.bootindex.update({k: v for k, v in per_device.items() if v is not None})
        return
    order = 1
    for dev in defn.os.boot_devs:
        key: tuple[str, int] | None = None
        if dev == "hd":
            key = next((("disk", d.index) for d in defn.disks if d.device == "disk"), None)
        elif dev == "cdrom":
            key = next((("disk", d.index) for d in defn.disks if d.device == "cdrom"), None)
        elif dev == "network":
            key = ("interface", 0) if defn.interfaces else None
        elif dev == "fd":
            key = next((("disk", d.index) for d in defn.disks if d.device == "floppy"), None)
        else:
            raise unsupported(f"<boot dev='{dev}'>")
        if key is not None and key not in ctx.bootindex:
            ctx.bootindex[key] = order
            order += 1


def _boot(ctx: BuildContext) -> None:
    os_ = ctx.defn.os
    opts = "strict=on"
    if os_.bootmenu is not None:
        opts = ("menu=on," if os_.bootmenu else "menu=off,") + opts
    menu = os_.element.find("bootmenu")
    timeout = menu.get("timeout") if menu is not None else None
    if timeout is not None:
        if (
            not timeout.isascii()
            or not timeout.isdigit()
            or len(timeout) > 5
            or (int(timeout) > 65535)
        ):
            raise ConfigUnsupported(
                "invalid value for boot menu timeout, must be in range [0,65535]"
            )
        if os_.bootmenu:
            opts += f",splash-time={int(timeout)}"
    bios = os_.element.find("bios")
    if bios is not None and bios.get("rebootTimeout") is not None:
        reboot = num(bios, "rebootTimeout", minimum=None)
        if not -1 <= reboot <= 65535:
            raise ConfigUnsupported("invalid value for rebootTimeout, must be in range [-1,65535]")
        opts += f",reboot-timeout={reboot}"
    ctx.add("-boot", opts)
    if os_.dtb:
        raise unsupported("<os><dtb>")
    if os_.kernel:
        ctx.add("-kernel", os_.kernel)
        if os_.initrd:
            ctx.add("-initrd", os_.initrd)
        if os_.cmdline:
            ctx.add("-append", os_.cmdline)
    elif os_.initrd or os_.cmdline:
        raise unsupported("<initrd>/<cmdline> without <kernel>")
