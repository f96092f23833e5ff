"""Machine-level options: machine type and its properties, firmware, CPU model, SMP
topology, RTC/timers and power management, mapped the way libvirt maps them.
"""

from __future__ import annotations

from drivers.qemu.argv_common import BuildContext, json_arg, token, unsupported
from drivers.qemu.capabilities import QemuCapabilities
from virtbus.domain import DomainDefinition
from virtbus.errors import ConfigUnsupported, XMLError

_CPU_CHILDREN = frozenset({"model", "topology", "feature", "vendor"})
_FEATURES = frozenset({"acpi", "apic", "pae", "vmport", "smm", "vmcoreinfo"})


def machine_type(defn: DomainDefinition, caps: QemuCapabilities | None) -> str:
    machine = token(defn.os.machine or "pc", "<os><type machine")
    if not (machine in ("pc", "q35") or machine.startswith(("pc-i440fx-", "pc-q35-"))):
        raise unsupported(f"machine type '{machine}' (pc, q35, pc-i440fx-*, pc-q35-* are)")
    if caps is not None and caps.machines and machine not in caps.machines:
        raise ConfigUnsupported(f"this QEMU has no machine type '{machine}'")
    return machine


def machine_opts(ctx: BuildContext, machine: str) -> str:
    defn = ctx.defn
    for name, attrs in defn.features.items():
        if name not in _FEATURES:
            raise unsupported(f"<features><{name}>")
        if name == "apic" and "eoi" in attrs:
            raise unsupported("<features><apic eoi=...>")
    opts = [machine, "usb=off", "dump-guest-core=off"]
    opts.append("acpi=on" if defn.has_feature("acpi") else "acpi=off")
    if "vmport" in defn.features:
        opts.append("vmport=" + ("on" if defn.has_feature("vmport") else "off"))
    if "smm" in defn.features:
        opts.append("smm=" + ("on" if defn.has_feature("smm") else "off"))
    for timer in defn.clock.timers if defn.clock is not None else ():
        if timer.name == "hpet" and timer.present is not None:
            opts.append("hpet=" + ("on" if timer.present else "off"))
    opts += firmware(ctx)
    return ",".join(opts)


def firmware(ctx: BuildContext) -> list[str]:
    """``-bios`` or pflash blockdevs; returns machine options (pflash0/pflash1)."""
    os_ = ctx.defn.os
    if os_.firmware not in (None, "bios"):
        raise unsupported(
            f"<os firmware='{os_.firmware}'> (no firmware autoselection here; give "
            "<loader type='pflash'> and <nvram> paths)"
        )
    loader = os_.loader
    if loader is None or not loader.path:
        if os_.nvram:
            raise unsupported("<nvram> without <loader type='pflash'>")
        return []
    if loader.secure:
        raise unsupported("<loader secure='yes'>")
    if loader.type in (None, "rom"):
        ctx.add("-bios", loader.path)
        return []
    opts = []
    images = [(loader.path, bool(loader.readonly))]
    if os_.nvram:  # without one: a single pflash (code and vars in one image)
        images.append((os_.nvram, False))
    for unit, (path, readonly) in enumerate(images):
        node = f"pflash{unit}"
        ctx.add(
            "-blockdev",
            json_arg(
                {"driver": "file", "filename": path, "node-name": f"{node}-storage",
                 "auto-read-only": True, "discard": "unmap"}
            ),
            "-blockdev",
            json_arg(
                {"node-name": f"{node}-format", "read-only": readonly, "driver": "raw",
                 "file": f"{node}-storage"}
            ),
        )  # fmt: skip
        opts.append(f"{node}={node}-format")
    return opts


def cpu(ctx: BuildContext) -> str | None:
    cpu = ctx.defn.cpu
    if cpu is None:
        return None
    for child in cpu.element:
        if isinstance(child.tag, str) and child.tag not in _CPU_CHILDREN:
            raise unsupported(f"<cpu><{child.tag}>")
    if cpu.mode == "host-passthrough":
        if not ctx.kvm:
            # libvirt: "CPU mode 'host-passthrough' ... is not supported by hypervisor"
            raise unsupported("<cpu mode='host-passthrough'> without KVM (TCG)")
        base = "host" + (",migratable=off" if cpu.migratable is False else "")
    elif cpu.mode == "host-model":
        base = "host" if ctx.kvm else "max"  # libvirt expands it; this is the closest here
    elif cpu.mode == "maximum":
        base = "max"
    elif cpu.model:
        base = token(cpu.model, "<cpu><model")
    elif cpu.features:
        raise unsupported("<cpu> features without a <model>")
    else:
        return None
    for feat in cpu.features:  # -cpu splits on ',' with no escaping: names are checked
        token(feat.name, "<cpu><feature name")
        policy = feat.policy or "require"
        if policy in ("force", "require", "optional"):
            base += f",{feat.name}=on"
        elif policy in ("disable", "forbid"):
            base += f",{feat.name}=off"
        else:
            raise unsupported(f"<feature policy='{policy}'>")
    return base


def smp(defn: DomainDefinition) -> str:
    topo = defn.cpu.topology if defn.cpu is not None else None
    if topo is None:
        return f"{defn.current_vcpus},maxcpus={defn.vcpus},sockets={defn.vcpus},cores=1,threads=1"
    total = topo.sockets * topo.dies * topo.cores * topo.threads
    if total != defn.vcpus:
        raise XMLError(f"<topology> gives {total} CPUs but <vcpu> is {defn.vcpus}")
    return (
        f"{defn.current_vcpus},maxcpus={defn.vcpus},sockets={topo.sockets},dies={topo.dies},"
        f"cores={topo.cores},threads={topo.threads}"
    )


def clock(ctx: BuildContext) -> None:
    clock = ctx.defn.clock
    offset = clock.offset if clock is not None else "utc"
    if offset not in ("utc", "localtime"):
        raise unsupported(f"<clock offset='{offset}'>")
    rtc = [f"base={offset}"]
    for t in clock.timers if clock is not None else ():
        if t.name == "rtc":
            if t.tickpolicy == "catchup":
                rtc.append("driftfix=slew")
            elif t.tickpolicy not in (None, "delay"):
                raise unsupported(f"<timer name='rtc' tickpolicy='{t.tickpolicy}'>")
            if t.track == "guest":
                rtc.append("clock=vm")
            elif t.track not in (None, "boot", "wall"):
                raise unsupported(f"<timer name='rtc' track='{t.track}'>")
        elif t.name == "pit":
            if t.tickpolicy in ("delay", "discard"):
                if ctx.kvm:
                    ctx.add("-global", f"kvm-pit.lost_tick_policy={t.tickpolicy}")
            elif t.tickpolicy is not None or t.present is False:
                raise unsupported(f"<timer name='pit' tickpolicy='{t.tickpolicy}'>")
        elif t.name != "hpet":  # hpet is a machine option
            raise unsupported(f"<timer name='{t.name}'>")
    ctx.add("-rtc", ",".join(rtc))


def pm(ctx: BuildContext) -> None:
    pm = ctx.defn.pm
    if pm is None:
        return
    dev = "ICH9-LPC" if ctx.q35 else "PIIX4_PM"
    for state, enabled in (("s3", pm.suspend_to_mem), ("s4", pm.suspend_to_disk)):
        if enabled is not None:
            ctx.add("-global", f"{dev}.disable_{state}={0 if enabled else 1}")
