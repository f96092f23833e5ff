"""Machine-level options: machine type and its properties, firmware (ROM, pflash code and
NVRAM, secure boot), CPU model with its features and enlightenments (Hyper-V, KVM
paravirt, PMU, caches, physical address bits), SMP topology, RTC/timers and power
management, mapped the way libvirt maps them.
"""

from __future__ import annotations

import time
from typing import Any

from drivers.qemu.argv_common import BuildContext, json_arg, token, unsupported
from drivers.qemu.capabilities import QemuCapabilities
from drivers.qemu.xmlnum import num, num_text
from virtbus.domain import MAX_VCPUS, DomainDefinition, parse_int
from virtbus.domain.model import Element
from virtbus.errors import ConfigUnsupported, XMLError

_CPU_CHILDREN = frozenset({"model", "topology", "feature", "vendor", "numa", "cache",
                           "maxphysaddr"})  # fmt: skip
_FEATURES = frozenset({
    "acpi", "apic", "pae", "vmport", "smm", "vmcoreinfo", "hyperv", "kvm", "pvspinlock",
    "pmu", "ioapic", "ps2", "hap", "privnet", "viridian", "gic", "htm", "nested-hv",
    "ccf-assist", "cfpc", "sbbc", "ibs", "tcg", "async-teardown", "hpt", "ras", "aia",
    "xen", "capabilities", "msrs",
})  # fmt: skip
_PSERIES = ("hpt", "htm", "nested-hv", "ccf-assist", "cfpc", "sbbc", "ibs")
HYPERV = (
    "relaxed",
    "vapic",
    "vpindex",
    "runtime",
    "synic",
    "stimer",
    "reset",
    "frequencies",
    "reenlightenment",
    "tlbflush",
    "ipi",
    "evmcs",
    "avic",
    "emsr_bitmap",
    "xmm_input",
)
_HV_QEMU = {"emsr_bitmap": "hv-emsr-bitmap", "xmm_input": "hv-xmm-input"}


def machine_type(defn: DomainDefinition, caps: QemuCapabilities | None) -> str:
    machine = token(defn.os.machine or "pc", "<os><type machine")
    if not (machine in ("pc", "q35") or machine.startswith(("pc-i440fx-", "pc-q35-", "pc-0.",
                                                            "pc-1."))):  # fmt: skip
        raise unsupported(f"machine type '{machine}' (pc, q35, pc-i440fx-*, pc-q35-* are)")
    if caps is not None and caps.machines and machine not in caps.machines:
        raise ConfigUnsupported(f"this QEMU has no machine type '{machine}'")
    return machine


def _state(el: Element | None, attr: str = "state") -> bool | None:
    if el is None:
        return None
    raw = el.get(attr)
    if raw is None:
        return True if attr == "state" else None
    if raw not in ("on", "off", "yes", "no"):
        raise XMLError(f"invalid <{el.tag} {attr}='{raw}'>")
    return raw in ("on", "yes")


def _feature(ctx: BuildContext, name: str) -> Element | None:
    return ctx.defn.root.find(f"features/{name}")


def check_features(ctx: BuildContext) -> None:
    feats = ctx.defn.root.find("features")
    if feats is None:
        return
    for child in feats:
        if not isinstance(child.tag, str):
            continue
        name = child.tag
        if name not in _FEATURES:
            raise unsupported(f"<features><{name}>")
        where = (f"The '{name}' feature is not supported for architecture 'x86_64' or "
                 f"machine type '{ctx.machine}'")  # fmt: skip
        if (name in _PSERIES or name in ("gic", "aia")) and (
            name != "gic" or _state(child) is not False
        ):
            raise ConfigUnsupported(where)
        if name == "ras":
            raise ConfigUnsupported("ras feature is only supported with ARM Virt machines")
        if name in ("hap", "privnet", "viridian", "xen"):
            raise unsupported(f"<features><{name}> (a Xen feature)")
        if name == "capabilities":
            raise unsupported("<features><capabilities> (process capabilities: LXC only)")
        if name == "msrs":
            raise unsupported("<features><msrs> (a host-wide KVM setting)")
        if name == "tcg" and ctx.kvm:
            raise ConfigUnsupported("TCG features are incompatible with domain type 'kvm'")
        if name == "tcg":
            tb = child.find("tb-cache")
            if tb is not None and tb.text:
                from virtbus.domain.units import to_kib

                size = to_kib(num_text(tb), tb.get("unit", "MiB"))
                if size % 1024:
                    raise ConfigUnsupported("tb-cache size must be an integer multiple of MiB")
    vmport = _state(_feature(ctx, "vmport"))
    ps2 = _state(_feature(ctx, "ps2"))
    if vmport is True and ps2 is False:
        raise ConfigUnsupported("vmport feature requires the ps2 feature not to be disabled")
    if ps2 is False and any(i.get("bus", "ps2") == "ps2" and i.get("type") in ("mouse",
                            "keyboard") for i in ctx.defn.elements("devices/input")):  # fmt: skip
        raise ConfigUnsupported("ps2 bus inputs require the ps2 feature not to be disabled")
    smm = _feature(ctx, "smm")
    if smm is not None:
        tseg = smm.find("tseg")
        if tseg is not None:
            if not ctx.q35:
                raise ConfigUnsupported("SMM TSEG is only supported with q35 machine type")
            from virtbus.domain.units import to_kib

            size = to_kib(num_text(tseg, "0"), tseg.get("unit", "MiB"))
            if size % 1024:
                raise ConfigUnsupported("SMM TSEG size must be divisible by 1 MiB")
            if _state(smm) is False:
                raise ConfigUnsupported("SMM TSEG can only be specified with SMM enabled")
    hv = _feature(ctx, "hyperv")
    if hv is not None:
        mode = hv.get("mode", "custom")
        if mode not in ("custom", "passthrough"):
            raise XMLError(f"invalid <hyperv mode='{mode}'>")
        for child in hv:
            if not isinstance(child.tag, str):
                continue
            if child.tag not in (*HYPERV, "spinlocks", "vendor_id"):
                raise unsupported(f"<hyperv><{child.tag}>")
            retries = child.get("retries") if child.tag == "spinlocks" and _state(child) else None
            if retries is not None and num(child, "retries") < 4095:
                raise XMLError("HyperV spinlock retry count must be at least 4095")
            if child.tag == "vendor_id" and _state(child):
                value = child.get("value", "")
                if not value or len(value) > 12:
                    raise XMLError("HyperV vendor_id value must be 1-12 characters")
                if "," in value or "=" in value:  # -cpu has no escaping
                    raise XMLError(f"invalid HyperV vendor_id '{value}': no ',' or '='")


def machine_opts(ctx: BuildContext, machine: str, extra: list[str]) -> str:
    defn = ctx.defn
    check_features(ctx)
    opts = [machine, "usb=off"]
    vmport = _state(_feature(ctx, "vmport"))
    if vmport is not None:
        opts.append("vmport=" + ("on" if vmport else "off"))
    smm = _state(_feature(ctx, "smm"))
    if smm is not None:
        opts.append("smm=" + ("on" if smm else "off"))
    ioapic = _feature(ctx, "ioapic")
    if ioapic is not None and ioapic.get("driver"):
        opts.append("kernel_irqchip=" + ("split" if ioapic.get("driver") == "qemu" else "on"))
    ps2 = _state(_feature(ctx, "ps2"))
    if ps2 is not None:
        opts.append("i8042=" + ("on" if ps2 else "off"))
    dump = ctx.defn.root.find("memory")
    dump_core = dump.get("dumpCore") if dump is not None else None
    core = dump_core == "on" if dump_core in ("on", "off") else ctx.settings.dump_guest_core
    opts.append(f"dump-guest-core={'on' if core else 'off'}")
    opts += extra
    opts += firmware(ctx)
    if ctx.defn.root.find("launchSecurity") is not None:
        opts.append("confidential-guest-support=lsec0")
    bios = defn.os.element.find("bios")
    if bios is not None and bios.get("useserial") == "yes":
        opts.append("graphics=off")
    for timer in defn.clock.timers if defn.clock is not None else ():
        if timer.name == "hpet" and timer.present is not None:
            opts.append("hpet=" + ("on" if timer.present else "off"))
    for sound in defn.sounds:
        if sound.model == "pcspk":
            audio = sound.element.find("audio")
            opts.append(
                f"pcspk-audiodev=audio{num(audio, 'id', maximum=255) if audio is not None else 1}"
            )
            break
    opts.append("acpi=on" if defn.has_feature("acpi") else "acpi=off")
    tseg = ctx.defn.root.find("features/smm/tseg")
    if tseg is not None:
        from virtbus.domain.units import to_kib

        size = to_kib(num_text(tseg, "0"), tseg.get("unit", "MiB"))
        ctx.globals.append(f"mch.extended-tseg-mbytes={size // 1024}")
    return ",".join(opts)


# ---------------------------------------------------------------------------- firmware


def _nvram_source(ctx: BuildContext, nvram: Element) -> dict[str, Any]:
    """The storage node of an NVRAM store: a file path, or a ``<source>`` of its type."""
    ntype = nvram.get("type", "file")
    path = (nvram.text or "").strip()
    src = nvram.find("source")
    if ntype == "file":
        filename = path or (src.get("file") if src is not None else None)
        return {"driver": "file", "filename": filename}
    if ntype == "block":
        return {"driver": "host_device", "filename": src.get("dev") if src is not None else path}
    if ntype == "network" and src is not None:
        from drivers.qemu.argv_storage import _network_props

        return _network_props(ctx, src, "pflash1-storage", src.find("auth"), False)
    raise unsupported(f"<nvram type='{ntype}'>")


def firmware(ctx: BuildContext) -> list[str]:
    """``-bios`` or pflash blockdevs; returns machine options (pflash0/pflash1)."""
    os_ = ctx.defn.os
    if os_.firmware not in (None, "bios", "efi"):
        raise unsupported(f"<os firmware='{os_.firmware}'>")
    loader = os_.loader
    if loader is None or not loader.path:
        return []
    el = loader.element
    if loader.type in (None, "rom"):
        ctx.add("-bios", loader.path)
        return []
    if (ctx.defn.root.find("features/acpi") is None and ctx.q35 and os_.firmware == "efi") or (
        ctx.defn.root.find("features/acpi") is None and ctx.q35 and "OVMF" in loader.path
        and os_.firmware is None
    ):  # fmt: skip
        raise ConfigUnsupported("UEFI requires ACPI on this architecture")
    if loader.secure:
        if not ctx.q35:
            raise ConfigUnsupported("Secure boot is supported with q35 machine types only")
        if not ctx.defn.has_feature("smm"):
            raise ConfigUnsupported("Secure boot requires SMM feature enabled")
        ctx.globals.append("driver=cfi.pflash01,property=secure,value=on")
    fmt = el.get("format", "raw")
    opts = ["pflash0=pflash0-format"]
    readonly = bool(loader.readonly)
    ctx.add(
        "-blockdev",
        json_arg({"driver": "file", "filename": loader.path, "node-name": "pflash0-storage",
                  "auto-read-only": True, "discard": "unmap"}),
        "-blockdev",
        json_arg({"node-name": "pflash0-format", "read-only": readonly, "driver": fmt,
                  "file": "pflash0-storage"}),
    )  # fmt: skip
    nvram = os_.element.find("nvram")
    if nvram is not None and el.get("stateless") != "yes":
        storage = _nvram_source(ctx, nvram) | {"node-name": "pflash1-storage"}
        nfmt = nvram.get("format", "raw")
        if nfmt == "raw":
            storage["read-only"] = False
            ctx.add("-blockdev", json_arg(storage))
            opts.append("pflash1=pflash1-storage")
        else:
            storage |= {"auto-read-only": True, "discard": "unmap"}
            ctx.add("-blockdev", json_arg(storage), "-blockdev", json_arg(
                {"node-name": "pflash1-format", "read-only": False, "driver": nfmt,
                 "file": "pflash1-storage"}))  # fmt: skip
            opts.append("pflash1=pflash1-format")
    return opts


def nvram_file(defn: DomainDefinition) -> tuple[str, str | None] | None:
    """(NVRAM file, template) the driver must provide before start (a local file only)."""
    nvram = defn.os.element.find("nvram")
    loader = defn.os.element.find("loader")
    if nvram is None or (loader is not None and loader.get("stateless") == "yes"):
        return None
    if nvram.get("type", "file") != "file":
        return None
    path = (nvram.text or "").strip()
    src = nvram.find("source")
    if not path and src is not None:
        path = src.get("file") or ""
    return (path, nvram.get("template")) if path else None


# ---------------------------------------------------------------------------- CPU


def _cpu_flags(ctx: BuildContext) -> str:
    """Flags that go after the CPU model: timers, enlightenments, PMU, caches."""
    defn = ctx.defn
    out = ""
    for t in defn.clock.timers if defn.clock is not None else ():
        if t.name == "kvmclock" and t.present is not None:
            out += f",kvmclock={'on' if t.present else 'off'}"
        elif t.name == "hypervclock" and t.present:
            out += ",hv-time=on"
        elif t.name == "tsc" and t.element.get("frequency"):
            out += f",tsc-frequency={num(t.element, 'frequency')}"
    apic = _feature(ctx, "apic")
    if apic is not None and apic.get("eoi"):
        out += f",kvm-pv-eoi={'on' if apic.get('eoi') == 'on' else 'off'}"
    pvs = _feature(ctx, "pvspinlock")
    if pvs is not None:
        out += f",kvm-pv-unhalt={'on' if _state(pvs) else 'off'}"
    hv = _feature(ctx, "hyperv")
    if hv is not None:
        if hv.get("mode") == "passthrough":
            out += ",hv-passthrough=on"
        for name in (*HYPERV, "spinlocks", "vendor_id"):
            child = hv.find(name)
            if child is None or not _state(child):
                continue
            if name == "spinlocks":
                out += f",hv-spinlocks={num(child, 'retries', '4095', maximum=0xFFFFFFFF):#x}"
            elif name == "vendor_id":
                out += f",hv-vendor-id={child.get('value')}"
            else:
                if name == "vpindex" and not ctx.kvm:  # QEMU: "kernel doesn't allow setting"
                    raise ConfigUnsupported(
                        "<hyperv><vpindex> needs KVM: QEMU cannot set the Hyper-V VP index "
                        "under TCG (the other enlightenments run there)"
                    )
                out += f",{_HV_QEMU.get(name, 'hv-' + name)}=on"
                if name == "stimer" and _state(child.find("direct")):
                    out += ",hv-stimer-direct=on"
                if name == "tlbflush":
                    if _state(child.find("direct")):
                        out += ",hv-tlbflush-direct=on"
                    if _state(child.find("extended")):
                        out += ",hv-tlbflush-ext=on"
    if any(p.model == "hyperv" for p in defn.panics):
        out += ",hv-crash"
    kvm = _feature(ctx, "kvm")
    if kvm is not None:
        for child, flag in (("hidden", ",kvm=off"), ("hint-dedicated", ",kvm-hint-dedicated=on"),
                            ("poll-control", ",kvm-poll-control=on")):  # fmt: skip
            if _state(kvm.find(child)):
                out += flag
        pvipi = kvm.find("pv-ipi")
        if pvipi is not None and _state(pvipi) is False:
            out += ",kvm-pv-ipi=off"
    pmu = _feature(ctx, "pmu")
    if pmu is not None:
        out += f",pmu={'on' if _state(pmu) else 'off'}"
    cpu = defn.cpu
    cache = cpu.element.find("cache") if cpu is not None else None
    if cpu is not None and cache is not None:
        mode, level = cache.get("mode"), cache.get("level")
        host_mode = cpu.mode in ("host-passthrough", "maximum")
        if mode == "emulate":
            if level not in (None, "3"):
                raise ConfigUnsupported("CPU cache mode 'emulate' can only be used with level='3'")
            out += ",l3-cache=on" + (",host-cache-info=off" if host_mode else "")
        elif mode == "passthrough":
            if level is not None:
                raise ConfigUnsupported("unsupported CPU cache level for mode 'passthrough'")
            if not host_mode:
                raise ConfigUnsupported(
                    "CPU cache mode 'passthrough' can only be used with 'host-passthrough' / "
                    "'maximum' CPUs"
                )
            out += ",host-cache-info=on,l3-cache=off"
        elif mode == "disable":
            if level is not None:
                raise ConfigUnsupported("unsupported CPU cache level for mode 'disable'")
            out += (",host-cache-info=off" if host_mode else "") + ",l3-cache=off"
        else:
            raise XMLError(f"invalid <cache mode='{mode}'>")
    addr = cpu.element.find("maxphysaddr") if cpu is not None else None
    if cpu is not None and addr is not None:
        amode = addr.get("mode")
        if amode == "passthrough":
            if cpu.mode not in ("host-passthrough", "maximum"):
                raise ConfigUnsupported(
                    "CPU maximum physical address bits mode 'passthrough' can only be used "
                    "with 'host-passthrough' / 'maximum' CPUs"
                )
            if addr.get("bits"):
                raise ConfigUnsupported(
                    "CPU maximum physical address bits number specification cannot be used "
                    "with mode='passthrough'"
                )
            out += ",host-phys-bits=on"
            if addr.get("limit"):
                out += f",host-phys-bits-limit={num(addr, 'limit')}"
        elif amode == "emulate":
            bits = addr.get("bits")
            out += f",phys-bits={num(addr, 'bits', maximum=64)}" if bits else ",host-phys-bits=off"
        else:
            raise XMLError(f"invalid <maxphysaddr mode='{amode}'>")
    return out


def cpu(ctx: BuildContext) -> str | None:
    cpu = ctx.defn.cpu
    base: str | None = None
    if cpu is not None:
        for child in cpu.element:
            if isinstance(child.tag, str) and child.tag not in _CPU_CHILDREN:
                raise unsupported(f"<cpu><{child.tag}>")
        if cpu.mode == "host-passthrough":
            if not ctx.kvm:
                raise ConfigUnsupported(
                    "CPU mode 'host-passthrough' for x86_64 qemu domain on x86_64 host is not "
                    "supported by hypervisor"
                )
            base = "host"
            if cpu.migratable is not None:
                base += f",migratable={'on' if cpu.migratable else 'off'}"
        elif cpu.mode == "host-model":
            base = "host" if ctx.kvm else "max"  # libvirt expands it; this is the closest here
        elif cpu.mode == "maximum":
            base = "max"
            if cpu.migratable is not None:
                base += f",migratable={'on' if cpu.migratable else 'off'}"
        elif cpu.model:
            base = token(cpu.model, "<cpu><model")
        elif cpu.features:
            raise unsupported("<cpu> features without a <model>")
        if base is not None:
            if cpu.vendor and cpu.mode == "custom":
                base += f",vendor={token(cpu.vendor, '<cpu><vendor')}"
            for feat in cpu.features:  # -cpu splits on ',' with no escaping: names are checked
                token(feat.name, "<cpu><feature name")
                policy = feat.policy or "require"
                if policy in ("force", "require"):
                    base += f",{feat.name}=on"
                elif policy in ("disable", "forbid"):
                    base += f",{feat.name}=off"
                elif policy != "optional":
                    raise unsupported(f"<feature policy='{policy}'>")
    if base is None and ctx.defn.os.arch == "i686":
        base = "qemu32"
    flags = _cpu_flags(ctx)
    if flags and base is None:
        base = "qemu32" if ctx.defn.os.arch == "i686" else "qemu64"
    return None if base is None else base + flags


def smp(defn: DomainDefinition) -> str:
    hotpluggable = 0
    enabled = defn.current_vcpus
    vcpus_el = defn.root.find("vcpus")
    if vcpus_el is not None:
        entries = vcpus_el.findall("vcpu")
        enabled = sum(1 for v in entries if v.get("enabled", "yes") == "yes")
        hotpluggable = sum(1 for v in entries if v.get("enabled", "yes") == "yes"
                           and v.get("hotpluggable") == "yes")  # fmt: skip
    boot = enabled - hotpluggable
    out = str(boot)
    if boot != defn.vcpus:
        out += f",maxcpus={defn.vcpus}"
    topo_el = defn.cpu.element.find("topology") if defn.cpu is not None else None
    if topo_el is None:
        return out + f",sockets={defn.vcpus},cores=1,threads=1"
    counts = {k: num(topo_el, k, "1", minimum=1, maximum=MAX_VCPUS)
              for k in ("sockets", "dies", "clusters", "cores", "threads")}  # fmt: skip
    total = 1
    for v in counts.values():
        total *= v
    if total != defn.vcpus:
        raise XMLError(
            f"Maximum CPUs greater than specified topology {total} (<vcpu> {defn.vcpus})"
            if total < defn.vcpus else
            f"CPU topology doesn't match maximum vcpu count ({total} != {defn.vcpus})"
        )  # fmt: skip
    return out + (f",sockets={counts['sockets']},dies={counts['dies']},"
                  f"clusters={counts['clusters']},cores={counts['cores']},"
                  f"threads={counts['threads']}")  # fmt: skip


def clock(ctx: BuildContext) -> None:
    clock = ctx.defn.clock
    offset = clock.offset if clock is not None else "utc"
    if offset == "utc":
        rtc = ["base=utc"]
    elif offset in ("localtime", "timezone"):
        rtc = ["base=localtime"]
        if offset == "timezone" and clock is not None and clock.timezone:
            ctx.env["TZ"] = clock.timezone
    elif offset == "variable":
        assert clock is not None
        adjustment = parse_int(clock.adjustment or "0", "<clock adjustment", minimum=-(10**12),
                               maximum=10**12)  # fmt: skip
        if clock.basis == "localtime":
            adjustment += time.localtime().tm_gmtoff
        then = time.gmtime(time.time() + adjustment)
        rtc = ["base=" + time.strftime("%Y-%m-%dT%H:%M:%S", then)]
    elif offset == "absolute":
        assert clock is not None
        start = num(clock.element, "start", "0")
        rtc = ["base=" + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start))]
    else:
        raise unsupported(f"<clock offset='{offset}'>")
    for t in clock.timers if clock is not None else ():
        if t.name == "rtc":
            if t.track == "guest":
                rtc.append("clock=vm")
            elif t.track == "wall":
                rtc.append("clock=host")
            elif t.track == "realtime":
                rtc.append("clock=rt")
            elif t.track not in (None,):
                raise unsupported(f"<timer name='rtc' track='{t.track}'>")
            if t.tickpolicy == "catchup":
                rtc.append("driftfix=slew")
            elif t.tickpolicy not in (None, "delay"):
                raise unsupported(f"<timer name='rtc' tickpolicy='{t.tickpolicy}'>")
        elif t.name == "pit":
            if t.tickpolicy in (None, "delay"):
                ctx.globals.append("kvm-pit.lost_tick_policy=delay")
            elif t.tickpolicy == "discard":
                ctx.globals.append("kvm-pit.lost_tick_policy=discard")
            elif t.tickpolicy != "catchup" or t.present is False:
                raise unsupported(f"<timer name='pit' tickpolicy='{t.tickpolicy}'>")
        elif t.name == "platform":
            raise unsupported("<timer name='platform'>")
        elif t.name == "tsc":
            mode = t.element.get("mode")
            if mode not in (None, "auto", "native"):
                raise unsupported(f"<timer name='tsc' mode='{mode}'>")
        elif t.name not in ("hpet", "kvmclock", "hypervclock"):
            raise unsupported(f"<timer name='{t.name}'>")
    ctx.add("-rtc", ",".join(rtc))
    for g in list(ctx.globals):
        if g.startswith("kvm-pit."):
            ctx.globals.remove(g)
            ctx.add("-global", g)


def pm(ctx: BuildContext) -> None:
    pm = ctx.defn.pm
    if pm is None:
        return
    dev = "ICH9-LPC" if ctx.q35 else "PIIX4_PM"
    for state, enabled in (("s3", pm.suspend_to_mem), ("s4", pm.suspend_to_disk)):
        if enabled is not None:
            ctx.add("-global", f"{dev}.disable_{state}={0 if enabled else 1}")
