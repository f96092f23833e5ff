"""Build the typed views of :mod:`virtbus.domain.model` from lxml elements, validating.

Every failure is an :class:`~virtbus.errors.XMLError` whose message names the element
and the offending value, so a user can find the line to fix.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Collection

from lxml import etree

from virtbus.domain import model as m
from virtbus.domain.bandwidth import parse_bandwidth
from virtbus.domain.numbers import optional_int
from virtbus.domain.units import parse_memory_element
from virtbus.errors import XMLError

_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def local_name(el: m.Element) -> str:
    """The element's tag without namespace, with its prefix if it has one."""
    qname = etree.QName(el)
    return f"{el.prefix}:{qname.localname}" if el.prefix else qname.localname


def is_element(node: object) -> bool:
    """True for real elements (not comments, PIs or entities)."""
    return isinstance(node, etree._Element) and isinstance(node.tag, str)


def describe(el: m.Element) -> str:
    """A short human label such as ``<disk type='file'> (source /x.qcow2)``."""
    tag = local_name(el)
    kind = el.get("type")
    label = f"<{tag} type='{kind}'>" if kind else f"<{tag}>"
    src = el.find("source")
    if src is not None:
        for key in ("file", "dev", "dir", "path", "name", "bridge", "network"):
            if src.get(key):
                return f"{label} (source {src.get(key)})"
    return label


def text_of(parent: m.Element, path: str) -> str | None:
    el = parent.find(path)
    return el.text if el is not None else None


def attr_of(parent: m.Element, path: str, attr: str) -> str | None:
    el = parent.find(path)
    return el.get(attr) if el is not None else None


def yes_no(value: str | None, what: str) -> bool | None:
    """libvirt's tristate yes/no attribute (absent -> None)."""
    if value is None:
        return None
    if value in ("yes", "on"):
        return True
    if value in ("no", "off"):
        return False
    raise XMLError(f"invalid {what}='{value}': expected 'yes' or 'no'")


def int_value(
    value: str | None, what: str, *, minimum: int | None = None, maximum: int | None = None
) -> int | None:
    """An optional integer attribute (decimal or 0x hex), bounded (virtbus.domain.numbers)."""
    return optional_int(value, what, minimum=minimum, maximum=maximum, hex_ok=True)


def enum_value(
    value: str | None, allowed: Collection[str], what: str, default: str | None = None
) -> str | None:
    if value is None:
        return default
    if value not in allowed:
        raise XMLError(f"invalid {what}='{value}': expected one of {', '.join(sorted(allowed))}")
    return value


def normalize_mac(mac: str, where: str = "<mac>") -> str:
    """Lower-case unicast MAC; XMLError otherwise (libvirt rejects multicast addresses)."""
    if not _MAC_RE.match(mac.strip()):
        raise XMLError(f"invalid <mac address='{mac}'> in {where}")
    mac = mac.strip().lower()
    if int(mac[:2], 16) & 1:
        raise XMLError(f"<mac address='{mac}'> in {where} is multicast: expected unicast")
    return mac


def boot_order(el: m.Element, where: str) -> int | None:
    return int_value(attr_of(el, "boot", "order"), f"{where} <boot order", minimum=1, maximum=65535)


# ---------------------------------------------------------------------------- top-level


def build_os(el: m.Element | None) -> m.OSConfig:
    if el is None:
        raise XMLError("missing <os>")
    type_el = el.find("type")
    if type_el is None or not (type_el.text or "").strip():
        raise XMLError("missing <os><type>")
    os_type = (type_el.text or "").strip()
    enum_value(os_type, m.OS_TYPES, "<os><type>")
    boots = tuple(
        enum_value(b.get("dev"), m.BOOT_DEVS, "<boot dev") or "" for b in el.findall("boot")
    )
    if "" in boots:
        raise XMLError("missing dev attribute in <os><boot>")
    loader_el = el.find("loader")
    loader = None
    if loader_el is not None:
        loader = m.Loader(
            path=(loader_el.text or "").strip() or None,
            readonly=yes_no(loader_el.get("readonly"), "<loader readonly"),
            type=enum_value(loader_el.get("type"), {"rom", "pflash"}, "<loader type"),
            secure=yes_no(loader_el.get("secure"), "<loader secure"),
            element=loader_el,
        )
    nvram_el = el.find("nvram")
    initenv = []
    for env in el.findall("initenv"):
        name = env.get("name")
        if not name:
            raise XMLError("missing name in <os><initenv>")
        initenv.append((name, env.text or ""))
    return m.OSConfig(
        type=os_type,
        arch=type_el.get("arch"),
        machine=type_el.get("machine"),
        boot_devs=boots,
        kernel=text_of(el, "kernel"),
        initrd=text_of(el, "initrd"),
        cmdline=text_of(el, "cmdline"),
        dtb=text_of(el, "dtb"),
        loader=loader,
        nvram=(nvram_el.text or "").strip() or None if nvram_el is not None else None,
        nvram_template=nvram_el.get("template") if nvram_el is not None else None,
        firmware=el.get("firmware"),
        bootmenu=yes_no(attr_of(el, "bootmenu", "enable"), "<bootmenu enable"),
        init=_stripped(text_of(el, "init")),
        initargs=tuple(a.text or "" for a in el.findall("initarg")),
        initenv=tuple(initenv),
        initdir=_stripped(text_of(el, "initdir")),
        inituser=_stripped(text_of(el, "inituser")),
        initgroup=_stripped(text_of(el, "initgroup")),
        element=el,
    )


def _stripped(text: str | None) -> str | None:
    return (text or "").strip() or None if text is not None else None


def build_features(el: m.Element | None) -> dict[str, dict[str, str]]:
    if el is None:
        return {}
    return {local_name(c): dict(c.attrib) for c in el if is_element(c)}


def build_cpu(el: m.Element | None) -> m.CPUConfig | None:
    if el is None:
        return None
    topo_el = el.find("topology")
    topology = None
    if topo_el is not None:
        counts = {
            k: int_value(topo_el.get(k, "1"), f"<topology {k}", minimum=1, maximum=4096) or 1
            for k in ("sockets", "dies", "cores", "threads")
        }
        topology = m.CPUTopology(**counts)
    model_el = el.find("model")
    return m.CPUConfig(
        mode=enum_value(el.get("mode"), m.CPU_MODES, "<cpu mode", "custom") or "custom",
        match=el.get("match"),
        check=el.get("check"),
        migratable=yes_no(el.get("migratable"), "<cpu migratable"),
        model=(model_el.text or "").strip() or None if model_el is not None else None,
        fallback=model_el.get("fallback") if model_el is not None else None,
        vendor=text_of(el, "vendor"),
        topology=topology,
        features=tuple(
            m.CPUFeature(name=f.get("name", ""), policy=f.get("policy"))
            for f in el.findall("feature")
        ),
        element=el,
    )


def build_clock(el: m.Element | None) -> m.ClockConfig | None:
    if el is None:
        return None
    timers = []
    for t in el.findall("timer"):
        name = t.get("name")
        if not name:
            raise XMLError("missing name in <clock><timer>")
        timers.append(
            m.Timer(
                name=name,
                present=yes_no(t.get("present"), f"<timer name='{name}' present"),
                tickpolicy=t.get("tickpolicy"),
                track=t.get("track"),
                element=t,
            )
        )
    return m.ClockConfig(
        offset=el.get("offset", "utc"),
        timezone=el.get("timezone"),
        adjustment=el.get("adjustment"),
        basis=el.get("basis"),
        timers=tuple(timers),
        element=el,
    )


def build_pm(el: m.Element | None) -> m.PMConfig | None:
    if el is None:
        return None
    return m.PMConfig(
        suspend_to_mem=yes_no(attr_of(el, "suspend-to-mem", "enabled"), "<suspend-to-mem enabled"),
        suspend_to_disk=yes_no(
            attr_of(el, "suspend-to-disk", "enabled"), "<suspend-to-disk enabled"
        ),
        element=el,
    )


# ---------------------------------------------------------------------------- devices


def build_disk(el: m.Element, index: int) -> m.Disk:
    where = describe(el)
    dtype = enum_value(el.get("type"), m.DISK_TYPES, "<disk type", "file") or "file"
    device = enum_value(el.get("device"), m.DISK_DEVICES, "<disk device", "disk") or "disk"
    target = el.find("target")
    dev = target.get("dev") if target is not None else None
    if not dev:
        raise XMLError(f"missing <target dev=...> in {where} (disk #{index})")
    driver = el.find("driver")
    src = el.find("source")
    path = None
    if src is not None:
        path = src.get("file") or src.get("dev") or src.get("dir")
    return m.Disk(
        index=index,
        type=dtype,
        device=device,
        driver_name=driver.get("name") if driver is not None else None,
        driver_type=driver.get("type") if driver is not None else None,
        cache=enum_value(
            driver.get("cache") if driver is not None else None,
            m.DISK_CACHE_MODES,
            f"{where} <driver cache",
        ),
        io=enum_value(
            driver.get("io") if driver is not None else None,
            m.DISK_IO_MODES,
            f"{where} <driver io",
        ),
        discard=enum_value(
            driver.get("discard") if driver is not None else None,
            m.DISK_DISCARD_MODES,
            f"{where} <driver discard",
        ),
        source_path=path,
        source_protocol=src.get("protocol") if src is not None else None,
        source_name=src.get("name") if src is not None else None,
        target_dev=dev,
        target_bus=target.get("bus") if target is not None else None,
        readonly=el.find("readonly") is not None or device == "cdrom",
        shareable=el.find("shareable") is not None,
        boot_order=boot_order(el, where),
        serial=text_of(el, "serial"),
        address=el.find("address"),
        element=el,
    )


def _ips(el: m.Element, where: str) -> tuple[m.IPAddress, ...]:
    ips = []
    for ip in el.findall("ip"):
        address = ip.get("address")
        if not address:
            raise XMLError(f"missing address in <ip> of {where}")
        ips.append(
            m.IPAddress(
                address=address,
                family=enum_value(ip.get("family"), {"ipv4", "ipv6"}, f"{where} <ip family"),
                prefix=int_value(ip.get("prefix"), f"{where} <ip prefix", minimum=0, maximum=128),
            )
        )
    return tuple(ips)


def _routes(el: m.Element, where: str) -> tuple[m.Route, ...]:
    routes = []
    for route in el.findall("route"):
        address, gateway = route.get("address"), route.get("gateway")
        if not address or not gateway:
            raise XMLError(f"<route> of {where} needs address and gateway")
        routes.append(
            m.Route(
                family=enum_value(route.get("family"), {"ipv4", "ipv6"}, f"{where} <route family"),
                address=address,
                prefix=int_value(
                    route.get("prefix"), f"{where} <route prefix", minimum=0, maximum=128
                ),
                gateway=gateway,
            )
        )
    return tuple(routes)


def build_interface(el: m.Element, index: int) -> m.Interface:
    where = f"{describe(el)} (interface #{index})"
    mac = attr_of(el, "mac", "address")
    return m.Interface(
        index=index,
        type=el.get("type", "user"),
        mac=normalize_mac(mac, where) if mac is not None else None,
        model=attr_of(el, "model", "type"),
        source_bridge=attr_of(el, "source", "bridge"),
        source_network=attr_of(el, "source", "network"),
        source_dev=attr_of(el, "source", "dev"),
        target_dev=attr_of(el, "target", "dev"),
        boot_order=boot_order(el, where),
        guest_dev=attr_of(el, "guest", "dev"),
        ips=_ips(el, where),
        routes=_routes(el, where),
        mtu=int_value(attr_of(el, "mtu", "size"), f"{where} <mtu size", minimum=1, maximum=65535),
        bandwidth=parse_bandwidth(el.find("bandwidth"), where),
        address=el.find("address"),
        element=el,
    )


def build_chardev(el: m.Element, kind: str, index: int) -> m.CharDevice:
    where = f"<{kind}>"
    ctype = enum_value(el.get("type"), m.CHAR_TYPES, f"{where} type", "pty") or "pty"
    src = el.find("source")
    target = el.find("target")
    return m.CharDevice(
        kind=kind,
        index=index,
        type=ctype,
        source_path=src.get("path") if src is not None else None,
        source_mode=src.get("mode") if src is not None else None,
        source_host=src.get("host") if src is not None else None,
        source_service=src.get("service") if src is not None else None,
        protocol=attr_of(el, "protocol", "type"),
        target_type=target.get("type") if target is not None else None,
        target_port=int_value(
            target.get("port") if target is not None else None,
            f"{where} <target port",
            minimum=0,
            maximum=65535,
        )
        if kind != "channel"
        else None,
        target_name=target.get("name") if target is not None else None,
        element=el,
    )


def build_graphics(el: m.Element, index: int) -> m.Graphics:
    gtype = el.get("type")
    if not gtype:
        raise XMLError("missing type in <graphics>")
    enum_value(gtype, m.GRAPHICS_TYPES, "<graphics type")
    listen = el.get("listen")
    if listen is None:
        listen = attr_of(el, "listen", "address")
    return m.Graphics(
        index=index,
        type=gtype,
        port=int_value(el.get("port"), f"<graphics type='{gtype}' port", minimum=-1, maximum=65535),
        autoport=yes_no(el.get("autoport"), f"<graphics type='{gtype}' autoport"),
        listen=listen,
        element=el,
    )


def build_controller(el: m.Element) -> m.Controller:
    ctype = el.get("type")
    if not ctype:
        raise XMLError("missing type in <controller>")
    return m.Controller(
        type=ctype,
        index=int_value(
            el.get("index"), f"<controller type='{ctype}' index", minimum=0, maximum=65535
        ),
        model=el.get("model"),
        element=el,
    )


def build_input(el: m.Element) -> m.Input:
    itype = el.get("type")
    if not itype:
        raise XMLError("missing type in <input>")
    return m.Input(type=itype, bus=el.get("bus"), element=el)


def build_video(el: m.Element) -> m.Video:
    model_el = el.find("model")
    get = model_el.get if model_el is not None else (lambda _k: None)
    return m.Video(
        model=get("type"),
        vram=int_value(get("vram"), "<video><model vram", minimum=0, maximum=1 << 32),
        heads=int_value(get("heads"), "<video><model heads", minimum=1, maximum=16),
        primary=bool(yes_no(get("primary"), "<video><model primary")),
        element=el,
    )


def build_required_model(el: m.Element) -> str:
    model = el.get("model")
    if not model:
        raise XMLError(f"missing model in <{local_name(el)}>")
    return str(model)


def build_rng(el: m.Element) -> m.RNG:
    backend = el.find("backend")
    return m.RNG(
        model=build_required_model(el),
        backend_model=backend.get("model") if backend is not None else None,
        backend_path=(backend.text or "").strip() or None if backend is not None else None,
        element=el,
    )


def build_memballoon(el: m.Element) -> m.Memballoon:
    return m.Memballoon(
        model=build_required_model(el),
        autodeflate=yes_no(el.get("autodeflate"), "<memballoon autodeflate"),
        element=el,
    )


def build_filesystem(el: m.Element, index: int) -> m.Filesystem:
    where = f"{describe(el)} (filesystem #{index})"
    fstype = enum_value(el.get("type"), m.FILESYSTEM_TYPES, "<filesystem type", "mount") or "mount"
    mode = enum_value(
        el.get("accessmode"), m.FILESYSTEM_ACCESS_MODES, f"{where} accessmode", "passthrough"
    )
    target = attr_of(el, "target", "dir")
    if not target:
        raise XMLError(f"missing <target dir=...> in {where}")
    src = el.find("source")
    get = src.get if src is not None else (lambda _k: None)
    ram_kib = None
    if fstype == "ram":
        usage = get("usage")
        if usage is None:
            raise XMLError(f"missing <source usage=...> in {where}")
        ram_kib = parse_memory_element(usage, get("units"), "filesystem source usage")
    driver = el.find("driver")
    return m.Filesystem(
        index=index,
        type=fstype,
        accessmode=mode or "passthrough",
        driver_type=driver.get("type") if driver is not None else None,
        driver_format=driver.get("format") if driver is not None else None,
        source_dir=get("dir"),
        source_file=get("file"),
        source_dev=get("dev"),
        source_pool=get("pool"),
        source_volume=get("volume"),
        ram_kib=ram_kib,
        target_dir=target,
        readonly=el.find("readonly") is not None,
        element=el,
    )


ID_LIMIT = 1 << 32  # uids and gids are 32-bit


def _id_ranges(el: m.Element, tag: str) -> tuple[m.IdRange, ...]:
    ranges = []
    for r in el.findall(tag):
        values = {}
        for key in ("start", "target", "count"):
            least = 1 if key == "count" else 0
            value = int_value(r.get(key), f"<idmap><{tag} {key}", minimum=least,
                              maximum=ID_LIMIT)  # fmt: skip
            if value is None:
                raise XMLError(f"missing {key} in <idmap><{tag}>")
            values[key] = value
        ranges.append(m.IdRange(**values))
    for side in ("start", "target"):  # container ids, then host ids: each mapped once
        ordered = sorted(ranges, key=lambda r: getattr(r, side))
        for a, b in itertools.pairwise(ordered):
            if getattr(a, side) + a.count > getattr(b, side):
                raise XMLError(
                    f"<idmap> {tag} ranges overlap: {side} {getattr(a, side)} count {a.count}"
                    f" and {side} {getattr(b, side)} count {b.count}"
                )
    return tuple(ranges)


def build_idmap(el: m.Element | None) -> m.IdMap | None:
    if el is None:
        return None
    return m.IdMap(uid=_id_ranges(el, "uid"), gid=_id_ranges(el, "gid"), element=el)


def build_memtune(el: m.Element | None) -> m.MemTune | None:
    if el is None:
        return None

    def limit(tag: str) -> int | None:
        child = el.find(tag)
        if child is None:
            return None
        return parse_memory_element(child.text, child.get("unit"), tag)

    return m.MemTune(
        hard_limit_kib=limit("hard_limit"),
        soft_limit_kib=limit("soft_limit"),
        swap_hard_limit_kib=limit("swap_hard_limit"),
        min_guarantee_kib=limit("min_guarantee"),
        element=el,
    )


def build_cputune(el: m.Element | None) -> m.CPUTune | None:
    if el is None:
        return None
    return m.CPUTune(
        shares=int_value(text_of(el, "shares"), "<cputune><shares", minimum=0, maximum=1 << 32),
        period=int_value(text_of(el, "period"), "<cputune><period", minimum=0, maximum=1 << 32),
        quota=int_value(text_of(el, "quota"), "<cputune><quota", minimum=-1, maximum=1 << 44),
        element=el,
    )


def build_capabilities(features: m.Element | None) -> m.Capabilities | None:
    el = features.find("capabilities") if features is not None else None
    if el is None:
        return None
    policy = enum_value(el.get("policy"), m.CAPABILITY_POLICIES, "<capabilities policy", "default")
    toggles = []
    for cap in el:
        if not is_element(cap):
            continue
        state = yes_no(cap.get("state"), f"<capabilities><{local_name(cap)} state")
        if state is None:
            raise XMLError(f"missing state in <capabilities><{local_name(cap)}>")
        toggles.append((local_name(cap), state))
    return m.Capabilities(policy=policy or "default", toggles=tuple(toggles), element=el)
