"""libvirt's LXC domain XML -> an lxc container configuration (lxc.container.conf(5)).

Only what lxc can honour is translated; anything else is refused with CONFIG_UNSUPPORTED
naming it, rather than silently dropped. The translation follows libvirt's LXC driver:
``<memory>`` (or ``<memtune><hard_limit>``) is the memory cgroup's limit, no interface
and no ``<privnet/>`` shares the host's network namespace, the default capability policy
drops sys_module, sys_time, mknod, audit_control and mac_admin, and init gets
``LIBVIRT_LXC_NAME``/``LIBVIRT_LXC_UUID`` in its environment.

:func:`check_supported` and :func:`render` are pure; the driver resolves host paths
(symlinks, ``allowed_roots``), probes block devices and picks veth names first and
passes them in a :class:`RenderContext`. init and its arguments are not in the config:
they go to ``lxc-start`` as its command (argv, never re-split by a shell).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from virtbus.domain import DomainDefinition, Filesystem, Interface, unknown_devices
from virtbus.domain.model import Element
from virtbus.domain.views import local_name
from virtbus.errors import ConfigUnsupported, InvalidArgument

CONTAINER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CPUSET = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
DEFAULT_INIT = "/sbin/init"  # libvirt's, when <init> is absent

TOP_LEVEL = frozenset({
    "name", "uuid", "title", "description", "metadata", "memory", "currentMemory",
    "memtune", "vcpu", "cputune", "os", "idmap", "features", "clock", "on_poweroff",
    "on_reboot", "on_crash", "devices", "seclabel",
})  # fmt: skip
OS_CHILDREN = frozenset({"type", "init", "initarg", "initenv", "initdir", "inituser", "initgroup"})
MEMTUNE_CHILDREN = frozenset({"hard_limit", "soft_limit", "swap_hard_limit"})
CPUTUNE_CHILDREN = frozenset({"shares", "period", "quota"})
FEATURES = frozenset({"privnet", "capabilities"})
SUPPORTED_DEVICES = ("filesystem", "interface:bridge", "interface:ethernet", "console:pty")
INTERFACE_CHILDREN = frozenset({"mac", "source", "target", "guest", "ip", "route", "mtu", "link"})

# libvirt's virDomainProcessCapsFeature (domain_conf.c): capabilities one can switch
CAPABILITIES = frozenset({
    "audit_control", "audit_write", "block_suspend", "chown", "dac_override",
    "dac_read_search", "fowner", "fsetid", "ipc_lock", "ipc_owner", "kill", "lease",
    "linux_immutable", "mac_admin", "mac_override", "mknod", "net_admin", "net_bind_service",
    "net_broadcast", "net_raw", "setgid", "setfcap", "setpcap", "setuid", "sys_admin",
    "sys_boot", "sys_chroot", "sys_module", "sys_nice", "sys_pacct", "sys_ptrace",
    "sys_rawio", "sys_resource", "sys_time", "sys_tty_config", "syslog", "wake_alarm",
})  # fmt: skip
# dropped by libvirt's default policy unless switched on (lxcContainerDropCapabilities)
DEFAULT_DROPPED = ("audit_control", "mac_admin", "mknod", "sys_module", "sys_time")
UNLIMITED_QUOTA = -1


def check_name(name: str) -> None:
    """A name lxc can use as directory, cgroup, hostname and command-socket name."""
    if not CONTAINER_NAME.match(name):
        raise InvalidArgument(
            f"invalid container name {name!r}: use 1-64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )


def root_filesystem(defn: DomainDefinition) -> Filesystem:
    for fs in defn.filesystems:
        if fs.target_dir.rstrip("/") == "":
            return fs
    raise ConfigUnsupported(
        f"domain '{defn.name}' has no root filesystem: a container needs a <filesystem>"
        " with <target dir='/'/> (the host's own root is never shared)"
    )


def _unknown_children(el: Element, known: frozenset[str], where: str) -> list[str]:
    return [
        f"{where}<{local_name(c)}>"
        for c in el
        if isinstance(c.tag, str) and local_name(c) not in known
    ]


def _check_filesystem(fs: Filesystem, root: bool) -> list[str]:
    where = f"<filesystem type='{fs.type}'> (target {fs.target_dir})"
    if fs.type == "volume":
        return [f"{where}: storage volumes are not supported yet"]
    if fs.type not in ("mount", "block", "file", "ram"):
        return [where]
    problems = []
    if fs.accessmode != "passthrough":
        problems.append(f"{where} accessmode='{fs.accessmode}'")
    if not fs.target_dir.startswith("/") or ".." in fs.target_dir.split("/"):
        problems.append(f"{where}: the target must be an absolute path without '..'")
    if fs.type == "ram":
        if root:
            problems.append(f"{where}: a ram filesystem cannot be the root")
        return problems
    if fs.source_path is None:
        problems.append(f"{where} without a source")
    if fs.type == "file":
        if not root:
            problems.append(f"{where}: image files can only be the root filesystem")
        if fs.driver_type not in (None, "loop") or fs.driver_format not in (None, "raw"):
            problems.append(
                f"{where} <driver type='{fs.driver_type}' format='{fs.driver_format}'>"
                " (only loop-mounted raw images)"
            )
    elif fs.driver_type is not None or fs.driver_format is not None:
        problems.append(f"{where} <driver>")
    return problems


def _check_interface(iface: Interface) -> list[str]:
    where = f"<interface type='{iface.type}'> #{iface.index}"
    problems = _unknown_children(iface.element, INTERFACE_CHILDREN, f"{where} ")
    if iface.type == "bridge" and not iface.source_bridge:
        problems.append(f"{where} without <source bridge=...>")
    if iface.type == "network" and not iface.source_network:
        problems.append(f"{where} without <source network=...>")
    for what, dev in (("target", iface.target_dev), ("guest", iface.guest_dev)):
        if dev is not None and not IFNAME.match(dev):
            problems.append(f"{where} <{what} dev='{dev}'> (not a valid interface name)")
    if iface.source_bridge is not None and not IFNAME.match(iface.source_bridge):
        problems.append(f"{where} <source bridge='{iface.source_bridge}'> (not a bridge name)")
    for ip in iface.ips:
        try:
            ipaddress.ip_address(ip.address)
        except ValueError:
            problems.append(f"{where} <ip address='{ip.address}'>")
    for route in iface.routes:
        default = route.address in ("0.0.0.0", "::") and not route.prefix
        try:
            ipaddress.ip_address(route.gateway)
        except ValueError:
            default = False
        if not default:
            problems.append(
                f"{where} <route address='{route.address}'> (only a default route is supported)"
            )
    link = iface.element.find("link")
    if link is not None and link.get("state", "up") != "up":
        problems.append(f"{where} <link state='{link.get('state')}'>")
    return problems


def _check_os(defn: DomainDefinition, host_arch: str | None) -> list[str]:
    os_ = defn.os
    problems = []
    if os_.type != "exe":
        problems.append(f"<os><type>{os_.type}</type> (containers run type 'exe')")
    if os_.arch is not None and host_arch is not None and os_.arch != host_arch:
        problems.append(f"<os><type arch='{os_.arch}'> on a {host_arch} host")
    problems += _unknown_children(os_.element, OS_CHILDREN, "<os>")
    if os_.init is not None and not os_.init.startswith("/"):
        problems.append(f"<init>{os_.init}</init> (an absolute path)")
    for name, _value in os_.initenv:
        if not ENV_NAME.match(name):
            problems.append(f"<initenv name='{name}'>")
    for what, ident in (("inituser", os_.inituser), ("initgroup", os_.initgroup)):
        if ident is not None and not ident.isdigit():
            problems.append(f"<{what}>{ident}</{what}> (numeric ids only)")
    return problems


def _check_tuning(defn: DomainDefinition) -> list[str]:
    problems = []
    if defn.memtune is not None:
        problems += _unknown_children(defn.memtune.element, MEMTUNE_CHILDREN, "<memtune>")
    tune = defn.cputune
    if tune is not None:
        problems += _unknown_children(tune.element, CPUTUNE_CHILDREN, "<cputune>")
        if tune.shares is not None and not 2 <= tune.shares <= 262144:
            problems.append(f"<cputune><shares>{tune.shares}</shares> (2 to 262144)")
        if tune.period is not None and not 1000 <= tune.period <= 1000000:
            problems.append(f"<cputune><period>{tune.period}</period> (1000 to 1000000 us)")
        if tune.quota is not None and tune.quota != UNLIMITED_QUOTA and tune.quota < 1000:
            problems.append(f"<cputune><quota>{tune.quota}</quota> (-1, or at least 1000 us)")
    vcpu = defn.element("vcpu")
    if vcpu is not None:
        if vcpu.get("placement", "static") != "static":
            problems.append(f"<vcpu placement='{vcpu.get('placement')}'>")
        cpuset = vcpu.get("cpuset")
        if cpuset is not None and not CPUSET.match(cpuset):
            problems.append(f"<vcpu cpuset='{cpuset}'> (plain lists and ranges only)")
    return problems


def _check_misc(defn: DomainDefinition) -> list[str]:
    problems = [f"<{t}>" for t in _top_level(defn) if t not in TOP_LEVEL]
    problems += [f"<features><{name}>" for name in defn.features if name not in FEATURES]
    if defn.capabilities is not None:
        problems += [
            f"<capabilities><{cap}>" for cap, _on in defn.capabilities.toggles
            if cap not in CAPABILITIES
        ]  # fmt: skip
    if defn.idmap is not None:
        for what, ranges in (("uid", defn.idmap.uid), ("gid", defn.idmap.gid)):
            if not any(r.start == 0 for r in ranges):
                problems.append(f"<idmap> without a <{what}> range mapping id 0 (container root)")
    clock = defn.clock
    if clock is not None and (clock.offset != "utc" or clock.timers):
        problems.append(f"<clock offset='{clock.offset}'> (containers share the host's clock)")
    for label in defn.elements("seclabel"):
        if label.get("type") != "none":
            problems.append(f"<seclabel type='{label.get('type')}'>")
    if defn.on_poweroff != "destroy":
        problems.append(f"<on_poweroff>{defn.on_poweroff}</on_poweroff>")
    if defn.on_reboot != "restart":
        problems.append(
            f"<on_reboot>{defn.on_reboot}</on_reboot> (lxc restarts a container whose init reboots)"
        )
    if len(defn.consoles) > 1:
        problems.append("more than one <console>")
    return problems


def _top_level(defn: DomainDefinition) -> list[str]:
    return [local_name(c) for c in defn.root if isinstance(c.tag, str)]


def check_supported(
    defn: DomainDefinition, host_arch: str | None = None, *, networks: bool = False
) -> None:
    """Raise CONFIG_UNSUPPORTED naming everything this driver cannot honour (no I/O).

    ``networks``: ``<interface type='network'>`` can be resolved to a bridge.
    """
    check_name(defn.name)
    problems: list[str] = []
    if defn.hv_type != "lxc":
        problems.append(f"<domain type='{defn.hv_type}'> (the lxc driver runs type='lxc')")
    problems += _check_os(defn, host_arch)
    problems += _check_tuning(defn)
    problems += _check_misc(defn)
    devices = (*SUPPORTED_DEVICES, "interface:network") if networks else SUPPORTED_DEVICES
    problems += unknown_devices(defn, devices)
    root = root_filesystem(defn)
    for fs in defn.filesystems:
        problems += _check_filesystem(fs, fs is root)
    for iface in defn.interfaces:
        problems += _check_interface(iface)
    if problems:
        raise ConfigUnsupported("unsupported by the lxc driver: " + ", ".join(problems))


# --- rendering ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RenderContext:
    """What the driver found out before writing a config (host facts, resolved paths)."""

    container_dir: str
    sources: Mapping[int, str]  # filesystem index -> resolved host path
    block_fstypes: Mapping[int, str] = field(default_factory=dict)  # non-root block mounts
    bridges: Mapping[int, str] = field(default_factory=dict)  # interface index -> bridge
    veths: Mapping[int, str] = field(default_factory=dict)  # interface index -> host side
    memory_v2: bool = False  # the memory controller is on cgroup v2 (else v1)
    cpu_v2: bool = False
    cpuset_v2: bool = False
    halt_signal: str = "SIGTERM"
    reboot_signal: str = "SIGHUP"
    log_level: str = "WARN"


def _value(value: str, what: str) -> str:
    """A config value: lxc has no quoting, so refuse what would end the line."""
    if any(c in value for c in "\n\r\0") or value != value.strip():
        raise ConfigUnsupported(f"{what} {value!r} cannot be written to an lxc config")
    return value


def _fstab_field(value: str, what: str) -> str:
    """One field of an fstab-style lxc.mount.entry: blanks and backslashes as octal."""
    if any(c in value for c in "\r\0"):
        raise ConfigUnsupported(f"{what} {value!r} cannot be written to an lxc config")
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in value)


def capability_lines(defn: DomainDefinition) -> list[str]:
    """libvirt's capability policy as lxc.cap.drop / lxc.cap.keep."""
    caps = defn.capabilities
    toggles = dict(caps.toggles) if caps is not None else {}
    policy = caps.policy if caps is not None else "default"
    if policy == "deny":
        keep = sorted(c for c, on in toggles.items() if on)
        return [f"lxc.cap.keep = {' '.join(keep) if keep else 'none'}"]
    drop = {c for c, on in toggles.items() if not on}
    if policy == "default":
        drop |= {c for c in DEFAULT_DROPPED if toggles.get(c) is not True}
    return [f"lxc.cap.drop = {' '.join(sorted(drop))}"] if drop else []


def _cgroup_lines(defn: DomainDefinition, ctx: RenderContext) -> list[str]:
    mem, cpu = (
        ("lxc.cgroup2" if ctx.memory_v2 else "lxc.cgroup"),
        ("lxc.cgroup2" if ctx.cpu_v2 else "lxc.cgroup"),
    )
    tune = defn.memtune
    hard = tune.hard_limit_kib if tune and tune.hard_limit_kib else defn.memory_kib
    lines = []
    if ctx.memory_v2:
        lines.append(f"{mem}.memory.max = {hard * 1024}")
        if tune and tune.soft_limit_kib:
            lines.append(f"{mem}.memory.high = {tune.soft_limit_kib * 1024}")
        if tune and tune.swap_hard_limit_kib:
            swap = max(0, tune.swap_hard_limit_kib - hard)
            lines.append(f"{mem}.memory.swap.max = {swap * 1024}")
    else:
        lines.append(f"{mem}.memory.limit_in_bytes = {hard * 1024}")
        if tune and tune.soft_limit_kib:
            lines.append(f"{mem}.memory.soft_limit_in_bytes = {tune.soft_limit_kib * 1024}")
        if tune and tune.swap_hard_limit_kib:
            lines.append(f"{mem}.memory.memsw.limit_in_bytes = {tune.swap_hard_limit_kib * 1024}")
    ct = defn.cputune
    if ct is not None and ct.shares is not None:
        if ctx.cpu_v2:  # libvirt's virCgroupV2SetCpuShares conversion
            lines.append(f"{cpu}.cpu.weight = {1 + ((ct.shares - 2) * 9999) // 262142}")
        else:
            lines.append(f"{cpu}.cpu.shares = {ct.shares}")
    if ct is not None and (ct.quota is not None or ct.period is not None):
        period = ct.period or 100000
        quota = ct.quota if ct.quota is not None else UNLIMITED_QUOTA
        if ctx.cpu_v2:
            lines.append(f"{cpu}.cpu.max = {'max' if quota < 0 else quota} {period}")
        else:
            lines.append(f"{cpu}.cpu.cfs_period_us = {period}")
            lines.append(f"{cpu}.cpu.cfs_quota_us = {quota}")
    vcpu = defn.element("vcpu")
    if vcpu is not None and vcpu.get("cpuset"):
        prefix = "lxc.cgroup2" if ctx.cpuset_v2 else "lxc.cgroup"
        lines.append(f"{prefix}.cpuset.cpus = {vcpu.get('cpuset')}")
    return lines


def _rootfs_lines(root: Filesystem, ctx: RenderContext) -> list[str]:
    source = _value(ctx.sources[root.index], "root filesystem")
    spec = {"mount": f"dir:{source}", "block": source, "file": f"loop:{source}"}[root.type]
    lines = [f"lxc.rootfs.path = {spec}"]
    if root.readonly:
        lines.append("lxc.rootfs.options = ro")
    return lines


def _mount_lines(defn: DomainDefinition, root: Filesystem, ctx: RenderContext) -> list[str]:
    lines = []
    for fs in defn.filesystems:
        if fs is root:
            continue
        target = _fstab_field(fs.target_dir.strip("/"), "filesystem target")
        ro = ",ro" if fs.readonly else ""
        if fs.type == "ram":
            assert fs.ram_kib is not None
            entry = f"tmpfs {target} tmpfs size={fs.ram_kib}k,create=dir{ro} 0 0"
        elif fs.type == "mount":
            source = _fstab_field(ctx.sources[fs.index], "filesystem source")
            entry = f"{source} {target} none bind,create=dir{ro} 0 0"
        else:  # block
            source = _fstab_field(ctx.sources[fs.index], "filesystem source")
            fstype = _fstab_field(ctx.block_fstypes[fs.index], "filesystem type")
            entry = f"{source} {target} {fstype} defaults,create=dir{ro} 0 0"
        lines.append(f"lxc.mount.entry = {entry}")
    return lines


def _net_lines(defn: DomainDefinition, ctx: RenderContext) -> list[str]:
    if not defn.interfaces:
        # libvirt: a private network namespace only with <privnet/>, else the host's
        return ["lxc.net.0.type = " + ("empty" if defn.has_feature("privnet") else "none")]
    lines = []
    for iface in defn.interfaces:
        n = f"lxc.net.{iface.index}"
        lines += [f"{n}.type = veth", f"{n}.flags = up"]
        bridge = ctx.bridges.get(iface.index)
        if bridge:
            lines.append(f"{n}.link = {_value(bridge, 'bridge')}")
        host_dev = iface.target_dev or ctx.veths.get(iface.index)
        if host_dev:
            lines.append(f"{n}.veth.pair = {_value(host_dev, 'veth name')}")
        lines.append(f"{n}.name = {_value(iface.guest_dev or f'eth{iface.index}', 'guest dev')}")
        if iface.mac:
            lines.append(f"{n}.hwaddr = {iface.mac}")
        if iface.mtu:
            lines.append(f"{n}.mtu = {iface.mtu}")
        for ip in iface.ips:
            addr = ipaddress.ip_address(ip.address)
            family = "ipv6" if addr.version == 6 else "ipv4"
            prefix = ip.prefix if ip.prefix is not None else addr.max_prefixlen
            lines.append(f"{n}.{family}.address = {addr}/{prefix}")
        for route in iface.routes:
            gateway = ipaddress.ip_address(route.gateway)
            lines.append(f"{n}.{'ipv6' if gateway.version == 6 else 'ipv4'}.gateway = {gateway}")
    return lines


def render(defn: DomainDefinition, ctx: RenderContext) -> str:
    """The lxc config text for ``defn`` (check it with :func:`check_supported` first)."""
    root = root_filesystem(defn)
    lines = [
        "# generated by virtbus from the domain's XML: edits are overwritten at each start",
        f"lxc.uts.name = {defn.name}",
        *_rootfs_lines(root, ctx),
        "lxc.autodev = 1",
        "lxc.mount.auto = proc:mixed sys:ro cgroup:mixed",
        "lxc.tty.max = 0",
        "lxc.pty.max = 16",
        f"lxc.console.logfile = {_value(ctx.container_dir, 'directory')}/console.log",
        "lxc.console.size = auto",
        f"lxc.log.file = {ctx.container_dir}/lxc.log",
        f"lxc.log.level = {_value(ctx.log_level, 'log level')}",
        f"lxc.signal.halt = {ctx.halt_signal}",
        f"lxc.signal.reboot = {ctx.reboot_signal}",
        f"lxc.environment = LIBVIRT_LXC_NAME={defn.name}",
        f"lxc.environment = LIBVIRT_LXC_UUID={defn.uuid}",
    ]
    for name, value in defn.os.initenv:
        lines.append(f"lxc.environment = {name}={_value(value, f'<initenv {name}>')}")
    if defn.os.initdir:
        lines.append(f"lxc.init.cwd = {_value(defn.os.initdir, '<initdir>')}")
    if defn.os.inituser:
        lines.append(f"lxc.init.uid = {defn.os.inituser}")
    if defn.os.initgroup:
        lines.append(f"lxc.init.gid = {defn.os.initgroup}")
    if defn.idmap is not None:
        lines += [f"lxc.idmap = u {r.start} {r.target} {r.count}" for r in defn.idmap.uid]
        lines += [f"lxc.idmap = g {r.start} {r.target} {r.count}" for r in defn.idmap.gid]
    lines += capability_lines(defn)
    lines += _cgroup_lines(defn, ctx)
    lines += _mount_lines(defn, root, ctx)
    lines += _net_lines(defn, ctx)
    return "\n".join(lines) + "\n"


def init_argv(defn: DomainDefinition) -> list[str]:
    """init and its arguments, as ``lxc-start ... -- ARGV`` runs them."""
    for arg in defn.os.initargs:
        if "\0" in arg:
            raise ConfigUnsupported("an <initarg> contains a NUL character")
    return [defn.os.init or DEFAULT_INIT, *defn.os.initargs]
