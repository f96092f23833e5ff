"""Guest memory: ``-m`` (with hotplug slots and ``maxMemory``), the memory backends of
the guest RAM and of each NUMA cell (hugepages, memfd, file, shared, locked, discard,
prealloc, host node binding from ``<numatune>``), ``-numa`` cells and distances, and the
memory devices (DIMM, NVDIMM, virtio-mem, virtio-pmem), as libvirt's
``qemuBuildMemCommandLine``/``qemuBuildNumaCommandLine`` build them.

Host-dependent checks (a hugetlbfs mount for each page size, host NUMA nodes) need
:class:`~drivers.qemu.host.HostFacts`; at define there are none and they wait for start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from drivers.qemu.argv_common import BuildContext, json_arg, unsupported
from drivers.qemu.argv_virtio import virtio_props
from drivers.qemu.bitmap import format_bitmap, parse_bitmap
from drivers.qemu.host import HostFacts
from drivers.qemu.xmlnum import num, num_text
from virtbus.domain import MAX_VCPUS
from virtbus.domain.model import Element
from virtbus.domain.units import to_kib
from virtbus.errors import ConfigUnsupported, XMLError

NUMA_MODES = ("strict", "preferred", "interleave", "restrictive")
POLICY = {"strict": "bind", "preferred": "preferred", "interleave": "interleave"}
DEFAULT_RAM_ID = "pc.ram"


def _size(el: Element | None, what: str) -> int | None:
    if el is None or el.text is None:
        return None
    try:
        return to_kib(num_text(el), el.get("unit", "KiB"))
    except (ValueError, KeyError):
        raise XMLError(f"invalid {what} '{el.text}'") from None


@dataclass(slots=True)
class Page:
    size_kib: int
    nodes: frozenset[int] | None  # None: the default page size of the guest


@dataclass(slots=True)
class Cell:
    id: int
    cpus: frozenset[int] | None
    memory_kib: int
    access: str | None
    discard: bool | None
    distances: dict[int, int] = field(default_factory=dict)


@dataclass(slots=True)
class MemNode:
    mode: str
    nodeset: frozenset[int]


@dataclass(slots=True)
class Memory:
    """The memory configuration of one definition, validated as libvirt validates it."""

    pages: list[Page]
    source: str | None  # anonymous | file | memfd
    access: str | None  # shared | private
    locked: bool
    nosharepages: bool
    discard: bool | None
    prealloc: bool
    threads: int | None
    cells: list[Cell]
    mode: str
    placement: str
    nodeset: frozenset[int] | None
    memnodes: dict[int, MemNode]
    max_kib: int | None
    slots: int | None


def parse(ctx: BuildContext) -> Memory:
    root = ctx.defn.root
    mb = root.find("memoryBacking")
    pages: list[Page] = []
    source = access = None
    locked = nosharepages = False
    discard: bool | None = None
    prealloc = False
    threads = None
    if mb is not None:
        for child in mb:
            if isinstance(child.tag, str) and child.tag not in (
                "hugepages", "nosharepages", "locked", "source", "access", "allocation",
                "discard",
            ):  # fmt: skip
                raise unsupported(f"<memoryBacking><{child.tag}>")
        hp = mb.find("hugepages")
        if hp is not None:
            page_els = hp.findall("page")
            if not page_els:
                pages.append(Page(0, None))
            for p in page_els:
                size = to_kib(num(p, "size", "0"), p.get("unit", "KiB"))
                nodes = (
                    parse_bitmap(p.get("nodeset", ""), "<page nodeset>")
                    if p.get("nodeset")
                    else None
                )
                pages.append(Page(size, nodes))
        nosharepages = mb.find("nosharepages") is not None
        locked = mb.find("locked") is not None
        src = mb.find("source")
        source = src.get("type") if src is not None else None
        if source not in (None, "anonymous", "file", "memfd"):
            raise XMLError(f"invalid <memoryBacking><source type='{source}'>")
        acc = mb.find("access")
        access = acc.get("mode") if acc is not None else None
        if access not in (None, "shared", "private"):
            raise XMLError(f"invalid <memoryBacking><access mode='{access}'>")
        alloc = mb.find("allocation")
        if alloc is not None:
            prealloc = alloc.get("mode") == "immediate"
            if alloc.get("threads"):
                threads = num(alloc, "threads")
        discard = True if mb.find("discard") is not None else None
    cells = _cells(root)
    mode, placement, nodeset, memnodes = _numatune(root, cells, ctx.defn.vcpus)
    max_el = root.find("maxMemory")
    max_kib = _size(max_el, "<maxMemory>")
    slots = num(max_el, "slots") if max_el is not None and max_el.get("slots") else None
    mem = Memory(pages, source, access, locked, nosharepages, discard, prealloc, threads,
                 cells, mode, placement, nodeset, memnodes, max_kib, slots)  # fmt: skip
    for cell in cells:  # libvirt aligns cells to 1 MiB; sizes are bounded by 2^53-1 KiB
        if -(-cell.memory_kib // 1024) * 1024 > 2**53 - 1:
            raise ConfigUnsupported(
                f"memory size of NUMA node '{cell.id}' overflowed after alignment"
            )
    _check_pages(mem, ctx.host)
    return mem


def _cells(root: Element) -> list[Cell]:
    """The guest NUMA cells, by id; ids must be exactly 0..n-1 (in any order)."""
    els = root.findall("cpu/numa/cell")
    ids = [num(c, "id", str(i), maximum=MAX_VCPUS) for i, c in enumerate(els)]
    if sorted(ids) != list(range(len(els))):
        raise XMLError(
            "Exactly one 'cell' element per guest NUMA cell allowed, non-contiguous ranges "
            "or ranges not starting from 0 are not allowed"
        )
    by_id = dict(zip(ids, els, strict=True))
    cells: list[Cell] = []
    for cid in range(len(els)):
        c = by_id[cid]
        cpus = parse_bitmap(c.get("cpus", ""), "<cell cpus>") if c.get("cpus") else None
        mem_raw = c.get("memory")
        if mem_raw is None:
            raise XMLError(f"missing 'memory' attribute in NUMA cell {cid}")
        memory = to_kib(num(c, "memory"), c.get("unit", "KiB"))
        access = c.get("memAccess")
        if access not in (None, "shared", "private"):
            raise XMLError(
                f"Invalid value for attribute 'memAccess' in element 'cell': '{access}'."
            )
        disc = c.get("discard")
        cells.append(Cell(cid, cpus, memory, access, None if disc is None else disc == "yes"))
    for cell in cells:
        for sib in by_id[cell.id].findall("distances/sibling"):
            sid = num(sib, "id", "-1", minimum=-1)
            if not 0 <= sid < len(cells):
                raise XMLError(
                    f"'sibling_id {sid}' does not refer to a valid cell within NUMA "
                    f"'cell id {cell.id}'"
                )
            cell.distances[sid] = num(sib, "value", "10")
    return cells


def _numatune(root: Element, cells: list[Cell], vcpus: int) -> tuple[
    str, str, frozenset[int] | None, dict[int, MemNode]
]:  # fmt: skip
    nt = root.find("numatune")
    if nt is None:
        return "strict", "static", None, {}
    mem = nt.find("memory")
    mode = mem.get("mode", "strict") if mem is not None else "strict"
    if mode not in NUMA_MODES:
        raise XMLError(f"invalid <numatune><memory mode='{mode}'>")
    placement = mem.get("placement") if mem is not None else None
    nodeset = None
    if mem is not None and mem.get("nodeset"):
        try:
            nodeset = parse_bitmap(str(mem.get("nodeset")), "<numatune nodeset>")
        except XMLError:
            raise ConfigUnsupported(f"Invalid value of 'nodeset': {mem.get('nodeset')}") from None
    vcpu = root.find("vcpu")
    if placement is None:
        placement = "static" if nodeset is not None or (
            vcpu is None or vcpu.get("placement") != "auto"
        ) else "auto"  # fmt: skip
    if placement == "static" and nodeset is None and mem is not None:
        raise ConfigUnsupported(
            "nodeset for NUMA memory tuning must be set if 'placement' is 'static'"
        )
    memnodes: dict[int, MemNode] = {}
    for mn in nt.findall("memnode"):
        if not cells:
            raise XMLError("Element 'memnode' is invalid without any guest NUMA cells")
        cellid = num(mn, "cellid", "-1", minimum=-1)
        if not 0 <= cellid < len(cells):
            raise XMLError(f"Argument 'cellid' in memnode element must correspond to existing "
                           f"guest's NUMA cell (cellid {cellid})")  # fmt: skip
        mmode = mn.get("mode", "strict")
        if mode == "restrictive" and mmode != "restrictive":
            raise XMLError(
                "'restrictive' mode is required in memnode element when mode is 'restrictive' "
                "in memory element"
            )
        if mmode == "restrictive" and mode != "restrictive":
            raise XMLError(
                "'restrictive' mode is required in memory element when mode is 'restrictive' "
                "in memnode element"
            )
        if placement == "auto":
            raise ConfigUnsupported(
                "Per-node binding is not compatible with automatic NUMA placement."
            )
        memnodes[cellid] = MemNode(mmode, parse_bitmap(mn.get("nodeset", ""), "<memnode>"))
    return mode, placement, nodeset, memnodes


def _check_pages(mem: Memory, host: HostFacts | None) -> None:
    defaults = [p for p in mem.pages if p.nodes is None]
    if not mem.cells:  # without NUMA, a page for node 0 covers all memory too
        defaults += [p for p in mem.pages if p.nodes is not None and 0 in p.nodes]
    if len(defaults) > 1:
        raise ConfigUnsupported(
            f"two master hugepages detected: {defaults[0].size_kib} and {defaults[1].size_kib}"
        )
    for p in mem.pages:
        if p.nodes is None:
            continue
        for node in sorted(p.nodes):
            if node >= max(len(mem.cells), 1) or (not mem.cells and node > 0):
                raise ConfigUnsupported(f"hugepages: node {node} not found")
    if host is None:
        return
    for p in mem.pages:
        size = p.size_kib or host.default_hugepage_kib or 0
        if size and size != host.page_size_kib and host.hugepage_mount(size) is None:
            raise ConfigUnsupported(f"Unable to find any usable hugetlbfs mount for {size} KiB")
    for nodes in [mem.nodeset, *(m.nodeset for m in mem.memnodes.values())]:
        for node in sorted(nodes or ()):
            if node not in host.numa_nodes:
                raise ConfigUnsupported(f"NUMA node {node} is unavailable")


# ---------------------------------------------------------------------------- backends


def _page_for(mem: Memory, node: int | None, explicit: int | None, host: HostFacts | None
              ) -> tuple[int, bool]:  # fmt: skip
    """(page size KiB or 0, huge pages wanted) for a memory region on guest ``node``."""
    if explicit:
        size = explicit
    else:
        chosen = None
        master = None
        for p in mem.pages:
            if p.nodes is None:
                master = p
            elif node is not None and node in p.nodes:
                chosen = p
                break
        chosen = chosen or master
        if chosen is None:
            return 0, False
        size = chosen.size_kib
    system = host.page_size_kib if host is not None else 4
    if size == system:
        return 0, False
    if size == 0:
        size = (host.default_hugepage_kib if host is not None else None) or 2048
    return size, True


def backend(ctx: BuildContext, mem: Memory, alias: str, size_kib: int, *, node: int | None,
            model: str | None = None, el: Element | None = None, force: bool = False,
            system: bool = False) -> dict[str, Any] | None:  # fmt: skip
    """A ``memory-backend-*`` object, or None when plain ``-m`` memory does the job."""
    access = None
    discard = mem.discard
    if el is not None and el.get("access"):
        access = el.get("access")
    if el is not None and el.get("discard") in ("yes", "no"):
        discard = el.get("discard") == "yes"
    if node is not None and node < len(mem.cells):
        cell = mem.cells[node]
        access = access or cell.access
        discard = cell.discard if discard is None else discard
    access = access or mem.access
    src = el.find("source") if el is not None else None
    explicit = _size(src.find("pagesize"), "<pagesize>") if src is not None else None
    pagesize, huge = _page_for(mem, node, explicit, ctx.host)
    path = None
    if src is not None and src.find("path") is not None:
        path = (src.find("path").text or "").strip()
    prealloc = mem.prealloc or huge
    if path and model == "nvdimm" and src is not None and src.find("pmem") is None:
        prealloc = True
    elif path:
        prealloc = mem.prealloc
    props: dict[str, Any] = {}
    if model == "sgx-epc":
        qom = "memory-backend-epc"
        prealloc = True
    elif not path and mem.source == "memfd":
        qom = "memory-backend-memfd"
        if huge:
            props |= {"hugetlb": True, "hugetlbsize": pagesize * 1024}
        if access is not None:
            props["share"] = access == "shared"
        if system:
            props["x-use-canonical-path-for-ramblock-id"] = False
    elif huge or path or access or mem.source == "file":
        qom = "memory-backend-file"
        if path:
            props["mem-path"] = path
        elif huge:
            mount = ctx.host.hugepage_mount(pagesize) if ctx.host is not None else None
            props["mem-path"] = mount or f"/dev/hugepages{pagesize // 1024}M"
        else:
            props["mem-path"] = str(ctx.settings.memory_backing_dir)
            ctx.directories.append(ctx.settings.memory_backing_dir)
        if not path and discard is not None:
            props["discard-data"] = discard
        if access is not None:
            props["share"] = access == "shared"
        if system:
            props["x-use-canonical-path-for-ramblock-id"] = False
    else:
        qom = "memory-backend-ram"
    if model == "virtio-mem":
        props["reserve"] = False
    else:
        if prealloc:
            props["prealloc"] = True
            if mem.threads:
                props["prealloc-threads"] = mem.threads
    props["size"] = size_kib * 1024
    if model == "nvdimm" and src is not None:
        align = _size(src.find("alignsize"), "<alignsize>")
        if align:
            props["align"] = align * 1024
        if src.find("pmem") is not None:
            props["pmem"] = True
    nodemask = None
    if src is not None and src.find("nodemask") is not None:
        nodemask = parse_bitmap(src.find("nodemask").text or "", "<nodemask>")
    has_source_nodes = nodemask is not None
    mode = mem.mode
    if node is not None and node in mem.memnodes:
        mode = mem.memnodes[node].mode
        nodemask = nodemask or mem.memnodes[node].nodeset
    elif nodemask is None and mem.placement == "static":
        nodemask = mem.nodeset
    if nodemask is not None and mode != "restrictive":
        props |= {"host-nodes": sorted(nodemask), "policy": POLICY[mode]}
    node_specified = node is not None and node in mem.memnodes
    needed = huge or has_source_nodes or node_specified or path or access is not None or (
        mem.source in ("file", "memfd")
    ) or force  # fmt: skip
    if not needed and nodemask is None:
        return None
    return {"qom-type": qom, "id": alias} | props


def initial_kib(ctx: BuildContext, mem: Memory) -> int:
    if mem.cells:
        return sum(c.memory_kib for c in mem.cells)
    return ctx.defn.memory_kib - sum(_dev_size(d) for d in ctx.defn.elements("devices/memory"))


def _dev_size(el: Element) -> int:
    return _size(el.find("target/size"), "<memory><target><size>") or 0


def _ram_size(ctx: BuildContext, mem: Memory) -> int:
    size = initial_kib(ctx, mem)
    return size if mem.max_kib is not None else size & ~0x1FF


def ram_backend(ctx: BuildContext, mem: Memory) -> dict[str, Any] | None:
    """The backend of the guest RAM without NUMA cells, when plain RAM will not do."""
    if mem.cells:
        return None
    return backend(ctx, mem, DEFAULT_RAM_ID, _ram_size(ctx, mem), node=None, system=True)


def machine_options(ctx: BuildContext, mem: Memory, ram: dict[str, Any] | None) -> list[str]:
    opts: list[str] = []
    if ram is not None:
        opts.append(f"memory-backend={DEFAULT_RAM_ID}")
    if mem.nosharepages:
        opts.append("mem-merge=off")
    if any(el.get("model") == "nvdimm" for el in ctx.defn.elements("devices/memory")):
        opts.append("nvdimm=on")
    return opts


def build_memory(ctx: BuildContext, mem: Memory, ram: dict[str, Any] | None) -> None:
    """``-m`` (with hotplug slots), the guest RAM's backend, ``-overcommit``."""
    opts = f"size={_ram_size(ctx, mem)}k"
    if mem.max_kib is not None:
        if mem.slots:
            opts += f",slots={mem.slots}"
        opts += f",maxmem={mem.max_kib}k"
    ctx.add("-m", opts)
    if ram is not None:
        ctx.add("-object", json_arg(ram))
    ctx.add("-overcommit", f"mem-lock={'on' if mem.locked else 'off'}")


def build_numa(ctx: BuildContext, mem: Memory) -> None:
    if not mem.cells:
        return
    cpus_seen: set[int] = set()
    for cell in mem.cells:
        if cell.cpus is not None:
            if cpus_seen & cell.cpus:
                raise XMLError(f"NUMA cells overlap in their CPUs (cell {cell.id})")
            cpus_seen |= cell.cpus
            if max(cell.cpus) >= ctx.defn.vcpus:
                raise XMLError(
                    f"NUMA cell {cell.id} names CPU {max(cell.cpus)}, beyond <vcpu> "
                    f"{ctx.defn.vcpus}"
                )
    if not any(c.cpus for c in mem.cells):
        raise ConfigUnsupported("At least one NUMA node has to have CPUs")
    for cell in mem.cells:
        props = backend(ctx, mem, f"ram-node{cell.id}", cell.memory_kib, node=cell.id,
                        force=True)  # fmt: skip
        assert props is not None
        ctx.add("-object", json_arg(props))
        opts = f"node,nodeid={cell.id}"
        if cell.cpus:
            opts += "".join(f",cpus={r}" for r in format_bitmap(cell.cpus).split(","))
        ctx.add("-numa", opts + f",memdev=ram-node{cell.id}")
    if any(c.distances for c in mem.cells):
        for a in mem.cells:
            for b in mem.cells:
                dist = a.distances.get(b.id) or b.distances.get(a.id)
                if dist is None:
                    dist = 10 if a.id == b.id else 20
                ctx.add("-numa", f"dist,src={a.id},dst={b.id},val={dist}")


def check_hotplug(ctx: BuildContext, mem: Memory) -> None:
    devs = ctx.defn.elements("devices/memory")
    if mem.max_kib is not None and not mem.cells:
        raise ConfigUnsupported(
            "At least one numa node has to be configured when enabling memory hotplug"
        )
    if devs and mem.max_kib is None and any(
        d.get("model") in ("dimm", "nvdimm", "virtio-mem") for d in devs
    ):  # fmt: skip
        raise ConfigUnsupported(
            "cannot use/hotplug a memory device when domain 'maxMemory' is not defined"
        )
    total = initial_kib(ctx, mem) + sum(_dev_size(d) for d in devs)
    if mem.max_kib is not None and total > mem.max_kib:
        raise ConfigUnsupported(
            f"Total size of memory devices exceeds the total memory size (maxMemory "
            f"{mem.max_kib} KiB)"
        )
    used: list[tuple[int, int]] = []
    for d in devs:
        node_el = d.find("target/node")
        if node_el is not None and node_el.text is not None:
            node = num_text(node_el)
            if node >= len(mem.cells):
                raise ConfigUnsupported(
                    f"can't add memory backend for guest node '{node}' as the guest has only "
                    f"'{len(mem.cells)}' NUMA nodes configured"
                )
        base = d.find("target/address")
        if base is not None and base.get("base"):
            start = num(base, "base", hex_ok=True)
            end = start + _dev_size(d) * 1024
            for s, e in used:
                if start < e and s < end:
                    raise ConfigUnsupported(
                        f"memory device address [{start:#x}:{end:#x}] overlaps with other "
                        f"memory device ({s:#x})"
                    )
            used.append((start, end))


def build_memory_devices(ctx: BuildContext, mem: Memory) -> None:
    counters: dict[str, int] = {}
    dimm_slot = 0
    for d in ctx.defn.elements("devices/memory"):
        model = d.get("model", "")
        if model not in ("dimm", "nvdimm", "virtio-mem", "virtio-pmem", "sgx-epc"):
            raise unsupported(f"<memory model='{model}'>")
        prefix = {"dimm": "dimm", "nvdimm": "nvdimm", "virtio-mem": "virtiomem",
                  "virtio-pmem": "virtiopmem", "sgx-epc": "epc"}[model]  # fmt: skip
        n = counters.get(prefix, 0)
        counters[prefix] = n + 1
        alias = f"{prefix}{n}"
        node_el = d.find("target/node")
        node = num_text(node_el) if node_el is not None and node_el.text else None
        size = _dev_size(d)
        if model == "virtio-pmem" and d.get("access") is None:
            d.set("access", "shared")
        props = backend(ctx, mem, f"mem{alias}", size, node=node, model=model, el=d,
                        force=True)  # fmt: skip
        assert props is not None
        ctx.add("-object", json_arg(props))
        if model == "sgx-epc":
            ctx.sgx_epc.append(f"mem{alias}")
            continue
        dev: dict[str, Any]
        if model in ("virtio-pmem", "virtio-mem"):
            dev = virtio_props(model, d)
        else:
            dev = {"driver": "pc-dimm" if model == "dimm" else "nvdimm"}
        if node is not None:
            dev["node"] = node
        target = d.find("target")
        if model == "nvdimm" and target is not None:
            label = _size(target.find("label/size"), "<label><size>")
            if label:
                dev["label-size"] = label * 1024
            uuid = d.find("uuid")
            if uuid is not None and uuid.text:
                dev["uuid"] = uuid.text
            if target.find("readonly") is not None:
                dev["unarmed"] = True
        if model == "virtio-mem" and target is not None:
            for tag, prop in (("block", "block-size"), ("requested", "requested-size")):
                value = _size(target.find(tag), f"<{tag}>")
                if value:
                    dev[prop] = value * 1024
        dev["memdev"] = f"mem{alias}"
        if model == "virtio-mem":
            huge = props.get("qom-type") == "memory-backend-file" and "hugepages" in str(
                props.get("mem-path", "")
            )
            if mem.prealloc or huge:
                dev["prealloc"] = True
        if model in ("virtio-mem", "virtio-pmem") and target is not None:
            base = target.find("address")
            if base is not None and base.get("base"):
                dev["memaddr"] = num(base, "base", hex_ok=True)
            if model == "virtio-mem" and target.get("dynamicMemslots") in ("yes", "no"):
                dev["dynamic-memslots"] = target.get("dynamicMemslots") == "yes"
        dev["id"] = alias
        if model in ("dimm", "nvdimm"):
            a = d.find("address")
            if a is None:
                dev["slot"] = dimm_slot
            dimm_slot += 1
        ctx.device(dev | ctx.addr_props(d, f"<memory model='{model}'>"))
