"""A libvirt domain definition: the lxml tree (source of truth) plus parsed, typed views.

Everything virtbus does not act on stays in the tree verbatim, so :meth:`to_xml` gives
back what was defined (plus a generated ``<uuid>`` when there was none). Changes go
through the setters or :meth:`DomainDefinition.edit`, which re-validate and re-parse the
views, and roll the tree back if the change made it invalid.
"""

from __future__ import annotations

import copy as _copy
import uuid as _uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from lxml import etree

from virtbus.domain import model as m
from virtbus.domain import views as v
from virtbus.domain.bandwidth import Bandwidth, bandwidth_element
from virtbus.domain.names import check_domain_name
from virtbus.domain.numbers import parse_int, shown
from virtbus.domain.serialize import dumps
from virtbus.domain.units import parse_memory_element
from virtbus.errors import XMLError

#: children of <devices> that are configuration rather than devices
NON_DEVICE_TAGS = frozenset({"emulator"})
#: the most vCPUs a definition may ask for: KVM's KVM_MAX_VCPUS on current kernels and
#: above every QEMU x86 machine type (pc 255, q35 288 in QEMU 7.2, which QEMU itself
#: enforces at start); the agent checks the host's CPUs under its overcommit ratio
MAX_VCPUS = 4096
#: the namespace of virtbus's own metadata: ``<metadata><virtbus:owner xmlns:virtbus=...>``
OWNER_NS = "https://virtbus.dev/xmlns/owner/1"
OWNER_TAG = f"{{{OWNER_NS}}}owner"
#: ``<metadata><virtbus:placement anti-affinity='a,b'/>``: the scheduler's placement hints
PLACEMENT_NS = "https://virtbus.dev/xmlns/placement/1"
PLACEMENT_TAG = f"{{{PLACEMENT_NS}}}placement"

_T = TypeVar("_T")


class DomainDefinition:
    """One domain's definition. Attributes are read-only views: change the tree instead."""

    hv_type: str
    name: str
    uuid: str
    title: str | None
    description: str | None
    memory_kib: int
    current_memory_kib: int
    vcpus: int
    current_vcpus: int
    os: m.OSConfig
    on_poweroff: str
    on_reboot: str
    on_crash: str
    features: dict[str, dict[str, str]]
    cpu: m.CPUConfig | None
    clock: m.ClockConfig | None
    pm: m.PMConfig | None
    metadata: m.Element | None
    emulator: str | None
    devices: tuple[m.Device, ...]
    disks: tuple[m.Disk, ...]
    interfaces: tuple[m.Interface, ...]
    serials: tuple[m.CharDevice, ...]
    consoles: tuple[m.CharDevice, ...]
    channels: tuple[m.CharDevice, ...]
    parallels: tuple[m.CharDevice, ...]
    graphics: tuple[m.Graphics, ...]
    controllers: tuple[m.Controller, ...]
    inputs: tuple[m.Input, ...]
    videos: tuple[m.Video, ...]
    sounds: tuple[m.Sound, ...]
    watchdogs: tuple[m.Watchdog, ...]
    rngs: tuple[m.RNG, ...]
    panics: tuple[m.Panic, ...]
    memballoon: m.Memballoon | None
    filesystems: tuple[m.Filesystem, ...]
    idmap: m.IdMap | None
    memtune: m.MemTune | None
    cputune: m.CPUTune | None
    capabilities: m.Capabilities | None  # <features><capabilities> (containers)

    def __init__(self, root: m.Element) -> None:
        """Validate ``root`` (a ``<domain>`` element, owned from now on) and parse the views.

        A missing ``<uuid>`` is generated and written into the tree, as libvirt does.
        """
        self._root = root
        self.refresh()

    # ------------------------------------------------------------------ access

    @property
    def root(self) -> m.Element:
        """The ``<domain>`` element (edit through :meth:`edit` so views stay in step)."""
        return self._root

    def element(self, xpath: str) -> m.Element | None:
        """The first element matching ``xpath`` (relative to ``<domain>``), or None."""
        found = self._root.xpath(xpath)
        if isinstance(found, list):
            for node in found:
                if isinstance(node, etree._Element):
                    return node
        return None

    def elements(self, xpath: str) -> list[m.Element]:
        """Every element matching ``xpath`` (relative to ``<domain>``)."""
        found = self._root.xpath(xpath)
        if not isinstance(found, list):
            return []
        return [n for n in found if isinstance(n, etree._Element)]

    def devices_named(self, tag: str) -> tuple[m.Device, ...]:
        """Generic views of ``<devices>`` children with this tag (hostdev, tpm, redirdev...)."""
        return tuple(d for d in self.devices if d.tag == tag)

    @property
    def owner(self) -> str | None:
        """The bus user that defined the domain (its virtbus metadata), or None: read from
        the tree, so dominfo needs no serialisation and no second parse."""
        el = self.metadata.find(OWNER_TAG) if self.metadata is not None else None
        return (el.text or "").strip() or None if el is not None else None

    @property
    def placement_groups(self) -> frozenset[str]:
        """Anti-affinity groups from ``<virtbus:placement anti-affinity='a,b'/>``: read by
        the agent that holds the domain, so a domain list carries them and the scheduler
        needs no definition to place around it."""
        if self.metadata is None:
            return frozenset()
        groups: set[str] = set()
        for el in self.metadata.iter(PLACEMENT_TAG):
            raw = el.get("anti-affinity") or ""
            groups.update(g.strip() for g in raw.split(",") if g.strip())
        return frozenset(groups)

    def has_feature(self, name: str) -> bool:
        """``<features><name/>`` present and not ``state='off'``."""
        attrs = self.features.get(name)
        return attrs is not None and attrs.get("state", "on") not in ("off", "no")

    def to_xml(self, domain_id: int | None = None) -> str:
        """Pretty, stable XML as ``dumpxml`` returns it (two-space indent, ``'`` quotes).

        ``domain_id`` is the hypervisor id of a running domain: libvirt shows it as
        ``<domain id='N'>`` while the domain is active, and so do we.
        """
        if domain_id is None:
            return dumps(self._root)
        root = _copy.deepcopy(self._root)
        root.set("id", str(domain_id))
        return dumps(root)

    def copy(self) -> DomainDefinition:
        """An independent definition (deep copy of the tree; same uuid)."""
        return DomainDefinition(_copy.deepcopy(self._root))

    def __repr__(self) -> str:
        return f"<DomainDefinition {self.hv_type} {self.name!r} {self.uuid}>"

    # ------------------------------------------------------------------ changes

    @contextmanager
    def edit(self) -> Iterator[m.Element]:
        """Change the tree directly; on exit it is re-validated, or rolled back on error."""
        saved = _copy.deepcopy(self._root)
        try:
            yield self._root
            self.refresh()
        except BaseException:
            self._restore(saved)
            raise

    def _restore(self, saved: m.Element) -> None:
        # Restore in place so references to self.root stay valid.
        self._root.clear()
        self._root.text, self._root.tail = saved.text, saved.tail
        self._root.attrib.update(saved.attrib)
        for child in list(saved):
            self._root.append(child)
        self.refresh()

    def set_interface_mac(self, index: int, mac: str) -> None:
        """Write ``<mac address=...>`` into interface ``index`` (e.g. a generated MAC)."""
        where = f"interface #{index}"
        mac = v.normalize_mac(mac, where)
        with self.edit():
            el = self._nth(self.interfaces, index, "interface").element
            mac_el = el.find("mac")
            if mac_el is None:
                mac_el = etree.Element("mac")
                el.insert(0, mac_el)
            mac_el.set("address", mac)

    def set_interface_target_dev(self, index: int, dev: str) -> None:
        """Record the host-side tap name chosen at start (``<target dev=...>``)."""
        with self.edit():
            el = self._nth(self.interfaces, index, "interface").element
            self._child(el, "target").set("dev", dev)

    def set_interface_alias(self, index: int, name: str) -> None:
        """Record the NIC's device id in QEMU (``<alias name=...>``, as libvirt's live XML)."""
        with self.edit():
            el = self._nth(self.interfaces, index, "interface").element
            self._child(el, "alias").set("name", name)

    def set_interface_link(self, index: int, up: bool) -> None:
        """``<link state='up|down'/>`` of interface ``index`` (domif-setlink)."""
        with self.edit():
            el = self._nth(self.interfaces, index, "interface").element
            self._child(el, "link").set("state", "up" if up else "down")

    def set_interface_bandwidth(self, index: int, bandwidth: Bandwidth | None) -> None:
        """Replace interface ``index``'s ``<bandwidth>`` (None: remove it; domiftune)."""
        with self.edit():
            el = self._nth(self.interfaces, index, "interface").element
            for old in el.findall("bandwidth"):
                el.remove(old)
            if bandwidth is not None:
                el.append(bandwidth_element(bandwidth))

    def set_graphics_port(self, index: int, port: int) -> None:
        """Record the port a graphics device got at start."""
        with self.edit():
            self._nth(self.graphics, index, "graphics").element.set("port", str(port))

    def set_chardev_source_path(self, kind: str, index: int, path: str) -> None:
        """Record e.g. the pty a ``<serial type='pty'>`` got (``<source path=...>``)."""
        if kind not in m.CHAR_KINDS:
            raise ValueError(f"unknown character device kind {kind!r}")
        views: tuple[m.CharDevice, ...] = getattr(self, f"{kind}s")
        with self.edit():
            el = self._nth(views, index, kind).element
            self._child(el, "source").set("path", path)

    def set_name(self, name: str) -> None:
        with self.edit():
            self._child(self._root, "name").text = name

    def set_current_memory_kib(self, kib: int) -> None:
        """Set ``<currentMemory unit='KiB'>`` (clamped to ``<memory>`` as libvirt does)."""
        with self.edit():
            cur = self._root.find("currentMemory")
            if cur is None:
                cur = etree.Element("currentMemory")
                mem = self._root.find("memory")
                assert mem is not None  # validated
                mem.addnext(cur)
            cur.set("unit", "KiB")
            cur.text = str(kib)

    def set_memory_kib(self, kib: int) -> None:
        """Set ``<memory unit='KiB'>`` (setmaxmem); ``<currentMemory>`` is lowered to it."""
        if self.element("cpu/numa/cell") is not None:
            raise ValueError("the NUMA cells make up the memory")
        lower = self.current_memory_kib > kib
        with self.edit():
            mem = self._child(self._root, "memory")
            mem.set("unit", "KiB")
            mem.text = str(kib)
            cur = self._root.find("currentMemory")
            if lower and cur is not None:
                cur.set("unit", "KiB")
                cur.text = str(kib)

    def set_current_vcpus(self, count: int) -> None:
        with self.edit():
            vcpu = self._child(self._root, "vcpu", text=str(self.vcpus))
            if count == self.vcpus:
                vcpu.attrib.pop("current", None)
            else:
                vcpu.set("current", str(count))

    @staticmethod
    def _nth(seq: tuple[_T, ...], index: int, what: str) -> _T:
        if not 0 <= index < len(seq):
            raise IndexError(f"no {what} #{index} (there are {len(seq)})")
        return seq[index]

    @staticmethod
    def _child(parent: m.Element, tag: str, text: str | None = None) -> m.Element:
        el = parent.find(tag)
        if el is None:
            el = etree.SubElement(parent, tag)
            if text is not None:
                el.text = text
        return el

    # ------------------------------------------------------------------ parsing

    def refresh(self) -> None:
        """Re-validate the tree and rebuild every view (after changing the tree directly).

        The views are swapped in only when the whole tree is valid, so a failed refresh
        leaves the previous views in place.
        """
        staged = DomainDefinition.__new__(DomainDefinition)
        staged._root = self._root
        staged._load()
        self.__dict__.update(staged.__dict__)

    def _load(self) -> None:
        root = self._root
        if not isinstance(root.tag, str) or etree.QName(root).localname != "domain":
            raise XMLError(f"root element must be <domain>, not <{root.tag}>")
        if etree.QName(root).namespace is not None:
            raise XMLError("<domain> must not be in a namespace")
        hv_type = root.get("type")
        if not hv_type:
            raise XMLError("missing <domain type=...>")
        self.hv_type = hv_type
        self.name = self._parse_name(root)
        self.uuid = self._parse_uuid(root)
        self.title = v.text_of(root, "title")
        self.description = v.text_of(root, "description")
        self.metadata = root.find("metadata")
        self._parse_memory(root)
        self._parse_vcpus(root)
        self.os = v.build_os(root.find("os"))
        for tag, default in m.LIFECYCLE_DEFAULTS.items():
            allowed = m.CRASH_ACTIONS if tag == "on_crash" else m.LIFECYCLE_ACTIONS
            text = v.text_of(root, tag)
            value = text.strip() if text is not None else None
            setattr(self, tag, v.enum_value(value, allowed, f"<{tag}>", default))
        self.features = v.build_features(root.find("features"))
        self.capabilities = v.build_capabilities(root.find("features"))
        self.idmap = v.build_idmap(root.find("idmap"))
        self.memtune = v.build_memtune(root.find("memtune"))
        self.cputune = v.build_cputune(root.find("cputune"))
        self.cpu = v.build_cpu(root.find("cpu"))
        self.clock = v.build_clock(root.find("clock"))
        self.pm = v.build_pm(root.find("pm"))
        self._parse_devices(root.find("devices"))

    @staticmethod
    def _parse_name(root: m.Element) -> str:
        name_el = root.find("name")
        if name_el is None:
            raise XMLError("missing <name>")
        name = name_el.text or ""
        check_domain_name(name)
        return name

    @staticmethod
    def _parse_uuid(root: m.Element) -> str:
        uuid_el = root.find("uuid")
        if uuid_el is None:
            value = str(_uuid.uuid4())
            uuid_el = etree.Element("uuid")
            uuid_el.text = value
            name_el = root.find("name")
            assert name_el is not None  # checked before
            name_el.addnext(uuid_el)
            return value
        raw = (uuid_el.text or "").strip()
        # libvirt's schema: 32 hex digits, or the 8-4-4-4-12 form
        compact = raw.replace("-", "") if len(raw) == 36 else raw
        if len(compact) != 32 or (
            len(raw) == 36 and [len(p) for p in raw.split("-")] != [8, 4, 4, 4, 12]
        ):
            raise XMLError(f"invalid <uuid> '{raw}'")
        try:
            return str(_uuid.UUID(hex=compact))
        except ValueError:
            raise XMLError(f"invalid <uuid> '{raw}'") from None

    def _parse_memory(self, root: m.Element) -> None:
        mem_el = root.find("memory")
        cells = root.findall("cpu/numa/cell")
        if mem_el is None and not cells:
            raise XMLError(
                "Memory size must be specified via <memory> or in the <numa> configuration"
            )
        if mem_el is None:  # libvirt: the NUMA cells' sizes make up the memory
            memory = sum(
                parse_memory_element(c.get("memory"), c.get("unit"), "cell memory") for c in cells
            )
        else:
            memory = parse_memory_element(mem_el.text, mem_el.get("unit"), "memory")
        if memory <= 0:
            raise XMLError("<memory> must be greater than zero")
        cur_el = root.find("currentMemory")
        current = memory
        if cur_el is not None:
            current = parse_memory_element(cur_el.text, cur_el.get("unit"), "currentMemory")
            # libvirt (virDomainDefPostParseMemory) clamps rather than rejects
            if current == 0 or current > memory:
                current = memory
        self.memory_kib, self.current_memory_kib = memory, current

    def _parse_vcpus(self, root: m.Element) -> None:
        vcpu_el = root.find("vcpu")
        if vcpu_el is None:
            self.vcpus = self.current_vcpus = 1  # libvirt's default
            return
        vcpus = _vcpu_count(vcpu_el.text, "<vcpu>")
        current = vcpus
        cur_raw = vcpu_el.get("current")
        if cur_raw is not None:
            current = _vcpu_count(cur_raw, f"<vcpu current='{shown(cur_raw)}'>")
            if current > vcpus:
                raise XMLError(f"<vcpu current='{current}'> exceeds the maximum of {vcpus}")
        self.vcpus, self.current_vcpus = vcpus, current

    def _parse_devices(self, devices_el: m.Element | None) -> None:
        children = [c for c in devices_el if v.is_element(c)] if devices_el is not None else []
        counts: dict[str, int] = {}
        generic: list[m.Device] = []
        by_tag: dict[str, list[m.Element]] = {}
        self.emulator = None
        for el in children:
            tag = v.local_name(el)
            if tag in NON_DEVICE_TAGS:
                self.emulator = (el.text or "").strip() or None
                continue
            idx = counts.get(tag, 0)
            counts[tag] = idx + 1
            generic.append(m.Device(tag=tag, index=idx, type=el.get("type"), element=el))
            by_tag.setdefault(tag, []).append(el)
        self.devices = tuple(generic)

        def get(tag: str) -> list[m.Element]:
            return by_tag.get(tag, [])

        self.disks = tuple(v.build_disk(el, i) for i, el in enumerate(get("disk")))
        seen: dict[str, int] = {}
        for disk in self.disks:
            if disk.target_dev in seen:
                raise XMLError(
                    f"<target dev='{disk.target_dev}'> duplicated for disks "
                    f"#{seen[disk.target_dev]} and #{disk.index}"
                )
            seen[disk.target_dev] = disk.index
        self.interfaces = tuple(v.build_interface(el, i) for i, el in enumerate(get("interface")))
        for kind in m.CHAR_KINDS:
            setattr(
                self,
                f"{kind}s",
                tuple(v.build_chardev(el, kind, i) for i, el in enumerate(get(kind))),
            )
        self.graphics = tuple(v.build_graphics(el, i) for i, el in enumerate(get("graphics")))
        self.controllers = tuple(v.build_controller(el) for el in get("controller"))
        self.inputs = tuple(v.build_input(el) for el in get("input"))
        self.videos = tuple(v.build_video(el) for el in get("video"))
        self.sounds = tuple(
            m.Sound(model=v.build_required_model(el), element=el) for el in get("sound")
        )
        self.watchdogs = tuple(
            m.Watchdog(model=v.build_required_model(el), action=el.get("action"), element=el)
            for el in get("watchdog")
        )
        self.rngs = tuple(v.build_rng(el) for el in get("rng"))
        self.panics = tuple(m.Panic(model=el.get("model"), element=el) for el in get("panic"))
        balloons = get("memballoon")
        if len(balloons) > 1:
            raise XMLError("only one <memballoon> is allowed")
        self.memballoon = v.build_memballoon(balloons[0]) if balloons else None
        self.filesystems = tuple(
            v.build_filesystem(el, i) for i, el in enumerate(get("filesystem"))
        )
        targets: dict[str, int] = {}
        for fs in self.filesystems:
            key = fs.target_dir.rstrip("/") or "/"
            if key in targets:
                raise XMLError(
                    f"<target dir='{fs.target_dir}'> duplicated for filesystems "
                    f"#{targets[key]} and #{fs.index}"
                )
            targets[key] = fs.index


def _vcpu_count(raw: str | None, what: str) -> int:
    """A vCPU count in 1..MAX_VCPUS; libvirt's wording for anything else."""
    try:
        return parse_int(raw, what, minimum=1, maximum=MAX_VCPUS)
    except XMLError:
        raise XMLError(
            f"{what} must be a positive integer of at most {MAX_VCPUS}, "
            f"not '{shown((raw or '').strip())}'"
        ) from None
