"""The checks of a block job on a disk's image chain, shared by the QEMU and test drivers
(the QEMU driver checks QEMU's own chain, the test driver the definition's): which layer
a commit merges into which, what a pull keeps (INVALID_ARG naming the images); and how
a definition names a chain (the source, then nested ``<backingStore>`` elements)."""

from __future__ import annotations

from lxml import etree

from virtbus.domain import DomainDefinition
from virtbus.domain.model import Disk
from virtbus.errors import InvalidArgument
from virtbus.protocol.blockjob import BlockCommit, BlockPull


def plan_commit(target: str, files: list[str], req: BlockCommit) -> tuple[int, int]:
    """(top, base) indexes in ``files`` (top first) of a commit, as libvirt resolves them:
    top defaults to the active layer (which needs ``active``), base to the bottom image
    (``shallow``: the one right below top)."""
    if len(files) < 2:
        raise InvalidArgument(f"disk '{target}' has no backing image to commit into")
    top = _index(target, files, req.top, "top") if req.top else 0
    if top == 0 and not req.active:
        raise InvalidArgument(f"commit of the active layer of disk '{target}' needs --active")
    if req.active and top != 0:
        raise InvalidArgument(f"--active commits the active layer of '{target}', not {files[top]}")
    if top == len(files) - 1:
        raise InvalidArgument(f"image {files[top]} has no backing image to commit into")
    base = top + 1 if req.shallow else len(files) - 1
    if req.base:
        base = _index(target, files, req.base, "base")
        if base <= top:
            raise InvalidArgument(f"base {req.base} is not below top {files[top]}")
    return top, base


def plan_pull(target: str, files: list[str], req: BlockPull) -> int | None:
    """The index of the image a pull keeps (None: it pulls the whole chain)."""
    if len(files) < 2:
        raise InvalidArgument(f"disk '{target}' has no backing image to pull")
    if not req.base:
        return None
    base = _index(target, files, req.base, "base")
    if base == 0:
        raise InvalidArgument(f"base {req.base} is the active layer itself")
    return base


def _index(target: str, files: list[str], path: str, what: str) -> int:
    if path not in files:
        raise InvalidArgument(f"{what} {path} is not in the image chain of disk"
                              f" '{target}' ({' <- '.join(files)})")  # fmt: skip
    return files.index(path)


def disk_chain(disk: Disk) -> list[tuple[str, str]]:
    """(image, format) of each layer of a disk's chain as its definition names it, top
    first."""
    out = [(disk.source_path, disk.driver_type or "raw")] if disk.source_path else []
    el = disk.element.find("backingStore")
    while el is not None:
        src, fmt = el.find("source"), el.find("format")
        if src is not None and src.get("file"):
            out.append((str(src.get("file")), fmt.get("type", "raw") if fmt is not None else "raw"))
        el = el.find("backingStore")
    return out


def with_chain(defn: DomainDefinition, target: str,
               chain: list[tuple[str, str]]) -> DomainDefinition:  # fmt: skip
    """A copy of ``defn`` whose disk ``target`` names ``chain`` ((image, format), top
    first) as its source and ``<backingStore>`` elements, ended by an empty one as libvirt
    writes it."""
    new = defn.copy()
    with new.edit():
        disk = next(d for d in new.disks if d.target_dev == target)
        el = disk.element
        for old in el.findall("backingStore"):
            el.remove(old)
        driver = el.find("driver")
        if driver is None:
            driver = etree.SubElement(el, "driver", name="qemu")
        driver.set("type", chain[0][1])
        source = el.find("source")
        if source is None:
            source = etree.SubElement(el, "source")
        source.set("file", chain[0][0])
        top = etree.Element("backingStore")
        at = top
        for filename, fmt in chain[1:]:
            at.set("type", "file")
            etree.SubElement(at, "format", type=fmt)
            etree.SubElement(at, "source", file=filename)
            at = etree.SubElement(at, "backingStore")
        source.addnext(top)
    return new
