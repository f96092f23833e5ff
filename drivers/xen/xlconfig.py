"""libvirt domain XML -> an xl domain configuration file (xl.cfg(5)).

Only what xl can honour is translated; any other device or setting is refused with a
CONFIG_UNSUPPORTED error that names it, rather than silently dropped. libvirt's Xen
flavours: ``<os><type>xen`` is PV, ``xenpvh`` PVH, ``hvm`` HVM.
"""

from __future__ import annotations

from virtbus.domain import DomainDefinition, unknown_devices
from virtbus.errors import ConfigUnsupported

OS_TYPES = {"xen": "pv", "linux": "pv", "xenpvh": "pvh", "hvm": "hvm"}
SUPPORTED_DEVICES = (
    "disk:disk", "disk:cdrom", "interface:bridge", "interface:ethernet",
    "console:pty", "serial:pty", "memballoon",
)  # fmt: skip
LIFECYCLE = {
    "destroy": "destroy",
    "restart": "restart",
    "preserve": "preserve",
    "rename-restart": "rename-restart",
    "coredump-destroy": "coredump-destroy",
    "coredump-restart": "coredump-restart",
}
DISK_FORMATS = {None: "raw", "raw": "raw", "qcow2": "qcow2", "vhd": "vhd", "qcow": "qcow"}


def _q(value: str, what: str) -> str:
    """A quoted xl string; xl's config syntax has no escapes, so refuse what needs one."""
    if any(c in value for c in '"\n\r\0'):
        raise ConfigUnsupported(f"{what} {value!r} contains a quote or control character")
    return f'"{value}"'


def _spec_value(value: str, what: str) -> str:
    """A value inside a disk/vif spec string (comma and '=' separate there)."""
    if any(c in value for c in ",=\"'\n\0"):
        raise ConfigUnsupported(f"{what} {value!r} cannot be expressed in an xl spec")
    return value


def _disks(defn: DomainDefinition) -> list[str]:
    specs: list[str] = []
    for disk in defn.disks:
        if disk.type not in ("file", "block"):
            raise ConfigUnsupported(f"<disk type='{disk.type}'> is not supported by xen")
        fmt = DISK_FORMATS.get(disk.driver_type)
        if fmt is None:
            raise ConfigUnsupported(f"disk format '{disk.driver_type}' is not supported by xl")
        parts = [f"format={fmt}", f"vdev={_spec_value(disk.target_dev, 'disk target')}"]
        parts.append("access=ro" if disk.readonly else "access=rw")
        if disk.device == "cdrom":
            parts.append("devtype=cdrom")
        if disk.type == "block":
            parts.append("backendtype=phy")
        if disk.source_path:
            parts.append(f"target={_spec_value(disk.source_path, 'disk source')}")
        elif disk.device != "cdrom":
            raise ConfigUnsupported(f"disk {disk.target_dev} has no source")
        specs.append(", ".join(parts))
    return specs


def _vifs(defn: DomainDefinition) -> list[str]:
    specs: list[str] = []
    for iface in defn.interfaces:
        parts: list[str] = []
        if iface.mac:
            parts.append(f"mac={iface.mac}")
        if iface.type == "bridge":
            if not iface.source_bridge:
                raise ConfigUnsupported(f"<interface type='bridge'> #{iface.index} has no bridge")
            parts.append(f"bridge={_spec_value(iface.source_bridge, 'bridge')}")
        script = iface.element.find("script")
        if script is not None and script.get("path"):
            parts.append(f"script={_spec_value(str(script.get('path')), 'vif script')}")
        if iface.target_dev:
            parts.append(f"vifname={_spec_value(iface.target_dev, 'vif name')}")
        if iface.model and defn.os.type == "hvm":
            parts.append(f"model={_spec_value(iface.model, 'nic model')}")
        specs.append(", ".join(parts))
    return specs


def check_supported(defn: DomainDefinition) -> None:
    """Raise ConfigUnsupported naming everything this driver cannot honour."""
    problems: list[str] = []
    if defn.hv_type != "xen":
        problems.append(f"<domain type='{defn.hv_type}'> (the xen driver runs type='xen')")
    if defn.os.type not in OS_TYPES:
        problems.append(f"<os><type>{defn.os.type}</type>")
    if defn.os.type in ("xen", "linux", "xenpvh") and not defn.os.kernel:
        problems.append("<os> without <kernel> (PV/PVH need a kernel; no pygrub here)")
    problems += unknown_devices(defn, SUPPORTED_DEVICES)
    if problems:
        raise ConfigUnsupported("unsupported by the xen driver: " + ", ".join(problems))


def to_xl_config(defn: DomainDefinition, extra_cmdline: str = "", reap: bool = False) -> str:
    """The xl.cfg text for ``defn`` (validated first).

    ``reap``: a ``destroy`` on_poweroff/on_crash becomes ``preserve`` so the xl monitor
    leaves the shut-down domain for the driver to see (and report exactly) and destroy.
    """
    check_supported(defn)
    poweroff, crash = defn.on_poweroff, defn.on_crash
    if reap:
        poweroff = "preserve" if poweroff == "destroy" else poweroff
        crash = "preserve" if crash == "destroy" else crash
    lines = [
        f"name = {_q(defn.name, 'name')}",
        f"uuid = {_q(defn.uuid, 'uuid')}",
        f"type = {_q(OS_TYPES[defn.os.type], 'type')}",
        f"memory = {max(1, defn.current_memory_kib // 1024)}",
        f"maxmem = {max(1, defn.memory_kib // 1024)}",
        f"vcpus = {defn.current_vcpus}",
        f"maxvcpus = {defn.vcpus}",
        f"on_poweroff = {_q(LIFECYCLE[poweroff], 'on_poweroff')}",
        f"on_reboot = {_q(LIFECYCLE[defn.on_reboot], 'on_reboot')}",
        f"on_crash = {_q(LIFECYCLE[crash], 'on_crash')}",
    ]
    if defn.os.kernel:
        lines.append(f"kernel = {_q(defn.os.kernel, 'kernel')}")
    if defn.os.initrd:
        lines.append(f"ramdisk = {_q(defn.os.initrd, 'initrd')}")
    cmdline = " ".join(p for p in (defn.os.cmdline or "", extra_cmdline) if p)
    if cmdline:
        lines.append(f"extra = {_q(cmdline, 'cmdline')}")
    disks = _disks(defn)
    if disks:
        lines.append("disk = [ " + ", ".join(_q(d, "disk") for d in disks) + " ]")
    vifs = _vifs(defn)
    if vifs:
        lines.append("vif = [ " + ", ".join(_q(v, "vif") for v in vifs) + " ]")
    return "\n".join(lines) + "\n"
