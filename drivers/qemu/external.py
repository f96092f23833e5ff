"""External disk-only snapshots of QEMU domains, as libvirt's qemu_snapshot.c takes them.

Each covered disk goes on to a new qcow2 overlay whose backing file is the image it ran
on; that image then holds the snapshot's data and is no longer written.

- A running or paused domain: for each disk QEMU creates the overlay itself
  (``blockdev-create`` jobs: the file, then the qcow2 format over it, backed by the
  current image), opens it (``blockdev-add``), and one ``transaction`` of
  ``blockdev-snapshot`` actions puts every overlay on top at the same instant. A failure
  before the transaction removes what was added and created: the disks are untouched.
- A shut-off domain: ``qemu-img create -f qcow2 -b <image> -F <format>`` per disk.

Then the live definition (and the persistent one, for disks whose image is the same)
names the overlay with the image before it as its ``<backingStore>``
(:func:`drivers.snapshots.with_overlays`), so the next start opens the same chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from drivers.qemu.argv_storage import device_id
from drivers.qemu.domain import Domain, Run
from drivers.qemu.state import StateStore
from drivers.snapshots import with_overlays
from virtbus.domain import DomainDefinition
from virtbus.domain.model import Disk
from virtbus.errors import OperationFailed, VirtbusError

log = logging.getLogger(__name__)

#: runs one QMP job to its end: (domain, run, command, arguments) (QemuSnapshots._job)
Job = Callable[[Domain, Run, str, dict[str, Any]], Awaitable[None]]


async def new_image(dom: Domain, run: Run, job: Job, path: str, fmt: str, size: int,
                    backing: tuple[str, str] | None, added: list[str]) -> str:  # fmt: skip
    """QEMU creates ``path`` (``blockdev-create`` jobs: the file, then the format over it,
    ``backing`` (image, format) recorded in a qcow2 header) and opens it without its
    backing (``blockdev-add``); the format node's name. Each node added goes to ``added``
    at once, so that a caller's failure path can close them."""
    tag = f"img{secrets.token_hex(4)}"  # unique across agent restarts
    storage, node = f"{tag}-storage", f"{tag}-format"
    await job(dom, run, "blockdev-create", {"options": {
        "driver": "file", "filename": path, "size": size if fmt == "raw" else 0}})  # fmt: skip
    await dom.execute(run, "blockdev-add", {
        "driver": "file", "filename": path, "node-name": storage, "auto-read-only": True,
        "discard": "unmap",
    })  # fmt: skip
    added.append(storage)
    if fmt == "raw":
        await dom.execute(run, "blockdev-add", {"driver": "raw", "node-name": node,
                                                "file": storage})  # fmt: skip
    else:
        options: dict[str, Any] = {"driver": "qcow2", "file": storage, "size": size}
        if backing is not None:
            options |= {"backing-file": backing[0], "backing-fmt": backing[1]}
        await job(dom, run, "blockdev-create", {"options": options})
        await dom.execute(run, "blockdev-add", {"driver": "qcow2", "node-name": node,
                                                "file": storage, "backing": None})  # fmt: skip
    added.append(node)
    return node


async def close_nodes(dom: Domain, run: Run, nodes: list[str]) -> None:
    """``blockdev-del`` each node, the last added first; what fails is only logged."""
    for node in reversed(nodes):
        try:
            await dom.execute(run, "blockdev-del", {"node-name": node})
        except VirtbusError as exc:
            log.warning("domain %s: blockdev-del %s: %s", dom.defn.name, node, exc)


async def take_live(dom: Domain, run: Run, pairs: list[tuple[Disk, str]], job: Job) -> None:
    """Overlays created, opened and put on top in one transaction (module docstring)."""
    infos = await inserted(dom, run, [d for d, _ in pairs])
    added: list[str] = []
    created: list[str] = []
    actions = []
    try:
        for (disk, overlay), info in zip(pairs, infos, strict=True):
            created.append(overlay)
            assert disk.source_path is not None
            node = await new_image(dom, run, job, overlay, "qcow2", virtual_size(info),
                                   (disk.source_path, str(info.get("drv"))), added)  # fmt: skip
            actions.append({"type": "blockdev-snapshot",
                            "data": {"node": str(info["node-name"]), "overlay": node}})  # fmt: skip
        await dom.execute(run, "transaction", {"actions": actions})
    except BaseException:
        await close_nodes(dom, run, added)
        for path in created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise


def virtual_size(info: dict[str, Any]) -> int:
    image = info.get("image")
    return int(image.get("virtual-size") or 0) if isinstance(image, dict) else 0


async def inserted(dom: Domain, run: Run, disks: list[Disk]) -> list[dict[str, Any]]:
    """QEMU's view (``query-block``) of each disk's top node: its node name, format, size."""
    blocks = await dom.execute(run, "query-block")
    by_qdev: dict[str, dict[str, Any]] = {}
    for block in blocks if isinstance(blocks, list) else []:
        qdev = str(block.get("qdev") or block.get("device") or "")
        inserted = block.get("inserted")
        if isinstance(inserted, dict):
            for part in qdev.split("/"):
                by_qdev.setdefault(part, inserted)
    out = []
    for disk in disks:
        inserted = by_qdev.get(device_id(disk))
        if inserted is None or not inserted.get("node-name"):
            raise OperationFailed(f"disk '{disk.target_dev}' of domain '{dom.defn.name}' is"
                                  " not in QEMU's block list (query-block)")  # fmt: skip
        out.append(inserted)
    return out


async def take_offline(pairs: list[tuple[Disk, str]]) -> None:
    """``qemu-img create -b`` per disk (a shut-off domain); created overlays go on error."""
    created: list[str] = []
    try:
        for disk, overlay in pairs:
            assert disk.source_path is not None
            proc = await asyncio.create_subprocess_exec(
                "qemu-img", "create", "-q", "-f", "qcow2", "-b", disk.source_path,
                "-F", disk.driver_type or "raw", overlay,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, err = await proc.communicate()
            if proc.returncode != 0:
                raise OperationFailed(
                    f"qemu-img create of the overlay of disk '{disk.target_dev}' failed:"
                    f" {err.decode(errors='replace').strip()}"
                )
            created.append(overlay)
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise


async def adopt(dom: Domain, run: Run | None, states: StateStore,
                pairs: list[tuple[Disk, str]]) -> None:  # fmt: skip
    """The definitions name the overlays: the live one (a running domain) for every
    disk, the persistent one for the disks whose image it names too."""
    overlays = {d.target_dev: overlay for d, overlay in pairs}
    sources = {d.target_dev: d.source_path for d, _ in pairs}
    if run is not None:
        run.live = with_overlays(run.live, overlays)
        run.live_xml = None
        await dom.save_status(run)
    same = {t: o for t, o in overlays.items() if _source(dom.defn, t) == sources[t]}
    if same:
        dom.defn = with_overlays(dom.defn, same)
        await states.save_definition(dom.defn)


def _source(defn: DomainDefinition, target: str) -> str | None:
    return next((d.source_path for d in defn.disks if d.target_dev == target), None)
