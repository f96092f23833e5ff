"""Internal snapshots of QEMU domains, as libvirt's qemu_snapshot.c takes them.

- A running or paused domain: QMP's ``snapshot-save``/``snapshot-load``/``snapshot-delete``
  jobs (QEMU >= 6.0) over the format nodes of its writable disks, the memory in the first
  one's image. Each job is followed by its ``JOB_STATUS_CHANGE`` events (never polled),
  then read once with ``query-jobs`` for its error and dismissed.
- A shut-off domain: ``qemu-img snapshot -c/-a/-d`` on each disk image.

Events are QEMU's, mapped with the ``snapshot``/``revert`` pending flags
(:mod:`drivers.qemu.events`): taking a snapshot shows nothing (the guest never looked
paused); a revert gives libvirt's ``suspended``/``resumed``/``started``/``stopped`` with
detail ``from_snapshot`` and leaves the state reason ``from_snapshot``.

Internal snapshots need qcow2: a raw (or any other format) writable disk is a
CONFIG_UNSUPPORTED naming the disk, before anything is written. External disk-only
snapshots (``--disk-only``, or disks asked ``snapshot='external'``) are taken by
:mod:`drivers.qemu.external`, with the memory in a save image first when it is asked
external (``--memspec file=...``: :meth:`QemuSnapshots._with_memory`); ``--quiesce``
needs a guest agent, which virtbus does not speak to yet: refused before anything is
written.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.qemu import events as ev
from drivers.qemu import external
from drivers.qemu.domain import Domain, Run
from drivers.qemu.launch import Launcher
from drivers.qemu.registry import DomainRegistry
from drivers.qemu.saves import QemuSaves
from drivers.qemu.settings import QemuSettings
from drivers.qemu.state import StateStore
from drivers.snapshots import (
    SnapshotStore,
    check_live,
    check_memory_file,
    check_quiesce,
    external_disks,
    snapshot_disks,
)
from virtbus.domain import DomainDefinition
from virtbus.domain.model import Disk
from virtbus.domain.snapshot import (
    SnapshotDef,
    SnapshotRequest,
    check_snapshot_name,
    default_name,
)
from virtbus.domain.snapshot import parse_snapshot_request as parse_request
from virtbus.errors import (
    ConfigUnsupported,
    InvalidArgument,
    NoSupport,
    OperationFailed,
    OperationInvalid,
    OperationTimeout,
    VirtbusError,
)
from virtbus.protocol.events import DomainState
from virtbus.protocol.snapshot import SnapshotInfo

log = logging.getLogger(__name__)
S = DomainState
_JOB_IDS = itertools.count(1)
_STATE_NAMES = {S.RUNNING: "running", S.PAUSED: "paused", S.SHUTOFF: "shutoff"}


@dataclass(frozen=True, slots=True)
class _Node:
    """A disk as QMP sees it: its target and the format node holding the snapshot."""

    target: str
    node: str


class QemuSnapshots:
    """The Snapshots methods of the QEMU driver (see module docstring)."""

    def __init__(self, registry: DomainRegistry, launcher: Launcher, store: SnapshotStore,
                 settings: QemuSettings, states: StateStore, saves: QemuSaves) -> None:  # fmt: skip
        self._registry = registry
        self._launcher = launcher
        self._store = store
        self._settings = settings
        self._states = states  # the definitions an external snapshot changes
        self._saves = saves  # writes an external snapshot's memory, as a save image

    # --- metadata -------------------------------------------------------------------
    def all(self, ref: str) -> list[SnapshotInfo]:
        dom = self._registry.get(ref)
        return self._store.infos(dom.defn.uuid, dom.defn.name)

    def info(self, ref: str, name: str | None) -> SnapshotInfo:
        dom = self._registry.get(ref)
        uuid, dname = dom.defn.uuid, dom.defn.name
        if name is None:
            name = self._store.current(uuid, dname).name
        return self._store.info(uuid, dname, name)

    def xml(self, ref: str, name: str) -> str:
        dom = self._registry.get(ref)
        return self._store.get(dom.defn.uuid, dom.defn.name, name).to_xml()

    # --- create ---------------------------------------------------------------------
    async def create(self, ref: str, xml: str | None, disk_only: bool = False,
                     quiesce: bool = False, halt: bool = False,
                     live: bool = False) -> SnapshotInfo:  # fmt: skip
        """Take the snapshot; with ``halt`` the domain is stopped afterwards, once its
        record is written (stopped(from_snapshot), as libvirt's _HALT)."""
        dom = self._registry.get(ref)
        req = parse_request(xml)
        state, dname = _STATE_NAMES.get(dom.state), dom.defn.name
        if state is None:
            raise OperationInvalid(f"cannot snapshot domain '{dname}': it is {dom.state.label}")
        active = dom.run is not None and dom.state != S.SHUTOFF
        check_live(req, active, live)
        if req.external(disk_only):
            info = await self._create_external(dom, req, active, state, quiesce, live, halt)
        else:
            info = await self._create_internal(dom, req, active, state, quiesce)
        if halt and dom.run is not None and dom.state != S.SHUTOFF:
            await self._stop_from_snapshot(dom, dom.run)
        return info

    async def _create_internal(self, dom: Domain, req: SnapshotRequest, active: bool,
                               state: str, quiesce: bool) -> SnapshotInfo:  # fmt: skip
        uuid, dname = dom.defn.uuid, dom.defn.name
        if quiesce:
            raise InvalidArgument("--quiesce needs an external disk-only snapshot (--disk-only)")
        memory = req.memory != "no" if active else False
        if req.memory == "internal" and not active:
            raise OperationInvalid(f"domain '{dname}' is shut off: it has no memory to snapshot")
        if active and not memory:
            raise NoSupport("a disk-only snapshot of a running domain needs an external"
                            " snapshot (--disk-only), not supported yet")  # fmt: skip
        defn = dom.run.live if active and dom.run is not None else dom.defn
        disks = snapshot_disks(defn, req.disks)
        taken = set(self._store.of(uuid).records)
        name = check_snapshot_name(req.name) if req.name else default_name(taken)
        self._store.check_new(uuid, dname, name)
        if active and dom.run is not None:
            await self._save(dom, dom.run, name, disks)
        else:
            await _each_image(disks, "-c", name)
        parent = self._store.of(uuid).current
        snap = SnapshotDef(
            name=name, state=state, creation_time=int(time.time()), memory=memory,
            disks=tuple(d.target_dev for d in disks), domain_xml=defn.to_xml(),
            parent=parent if parent in self._store.of(uuid).records else None,
            description=req.description,
        )  # fmt: skip
        await self._store.add(uuid, snap)
        return self._store.info(uuid, dname, name)

    async def _create_external(self, dom: Domain, req: SnapshotRequest, active: bool,
                               state: str, quiesce: bool, live: bool,
                               halt: bool) -> SnapshotInfo:  # fmt: skip
        """A snapshot onto new overlays (:mod:`drivers.qemu.external`), with the memory
        in a save image first when asked (:meth:`_with_memory`)."""
        uuid, dname = dom.defn.uuid, dom.defn.name
        if quiesce:
            check_quiesce(dom.run.live if active and dom.run is not None else dom.defn)
        run = dom.run if active else None
        defn = run.live if run is not None else dom.defn
        taken = set(self._store.of(uuid).records)
        name = check_snapshot_name(req.name) if req.name else default_name(taken)
        self._store.check_new(uuid, dname, name)
        memory = req.memory_file if req.memory == "external" else None
        pairs = external_disks(defn, req.files, req.disks, name, memory=memory is not None)
        if memory is not None:
            await asyncio.to_thread(check_memory_file, defn, memory, run is not None, pairs)
            await self._launcher.confine_file(defn, memory, "external snapshot memory file")
        for disk, overlay in pairs:
            await self._launcher.confine_file(
                defn, overlay, f"external snapshot file of disk {disk.target_dev}"
            )
        if run is not None and memory is not None:
            await self._with_memory(dom, run, Path(memory), pairs, live=live, resume=not halt)
        elif run is not None:
            await external.take_live(dom, run, pairs, self.run_job)
        else:
            await external.take_offline(pairs)
        parent = self._store.of(uuid).current
        snap = SnapshotDef(
            name=name, state=state if memory else "disk-snapshot" if active else state,
            creation_time=int(time.time()), memory=memory is not None,
            disks=tuple(d.target_dev for d, _ in pairs), domain_xml=defn.to_xml(),
            parent=parent if parent in self._store.of(uuid).records else None,
            description=req.description, overlays=tuple((d.target_dev, o) for d, o in pairs),
            memory_file=memory,
        )  # fmt: skip
        await external.adopt(dom, run, self._states, pairs)
        await self._store.add(uuid, snap)
        return self._store.info(uuid, dname, name)

    async def _with_memory(self, dom: Domain, run: Run, file: Path,
                           pairs: list[tuple[Disk, str]], *, live: bool,
                           resume: bool) -> None:  # fmt: skip
        """libvirt's qemuSnapshotCreateActiveExternal: pause a running guest (``live``:
        QEMU pauses it when the stream converges), write its memory to ``file`` (a save
        image), put the overlays on top while it is still paused (so they start where the
        memory image stops), resume it (not when it is to halt). The guest never looks
        paused (no events); a failure removes the file and resumes it."""
        was_running = dom.state == S.RUNNING
        run.pending.add(ev.Pending.SNAPSHOT)
        ok = False
        try:
            if was_running and not live:
                await dom.execute(run, "stop")
            await self._saves.write_image(dom, run, file, was_running, "memory snapshot")
            try:
                if pairs:
                    await external.take_live(dom, run, pairs, self.run_job)
            except BaseException:
                await asyncio.to_thread(file.unlink, missing_ok=True)
                raise
            ok = True
        finally:
            try:
                if was_running and dom.run is run and (resume or not ok):
                    await dom.execute(run, "cont")  # also takes the disks back from migration
            finally:
                run.pending.discard(ev.Pending.SNAPSHOT)

    async def _save(self, dom: Domain, run: Run, name: str, disks: list[Disk]) -> None:
        nodes = await self._nodes(dom, run, disks)
        run.pending.add(ev.Pending.SNAPSHOT)
        try:
            await self.run_job(dom, run, "snapshot-save", {
                "tag": name, "vmstate": nodes[0].node, "devices": [n.node for n in nodes]
            })  # fmt: skip
        finally:
            run.pending.discard(ev.Pending.SNAPSHOT)

    async def _nodes(self, dom: Domain, run: Run, disks: list[Disk]) -> list[_Node]:
        """The format node of each disk, from ``query-block`` (QEMU's own view: the format
        it really opened is checked again, whatever the XML said)."""
        out = []
        for disk, inserted in zip(disks, await external.inserted(dom, run, disks), strict=True):
            if inserted.get("drv") != "qcow2":
                raise ConfigUnsupported(
                    f"internal snapshot of disk '{disk.target_dev}' needs qcow2; QEMU opened it"
                    f" as {inserted.get('drv')}"
                )
            out.append(_Node(disk.target_dev, str(inserted["node-name"])))
        return out

    async def run_job(self, dom: Domain, run: Run, cmd: str, args: dict[str, Any]) -> None:
        """Run one QMP job to its end, following JOB_STATUS_CHANGE; its error raised."""
        job_id = f"virtbus-{cmd}-{next(_JOB_IDS)}"
        await dom.execute(run, cmd, {"job-id": job_id, **args})
        try:
            await dom.wait(run, lambda: run.job_states.get(job_id) in ("concluded", "null"),
                           cmd, timeout=self._settings.snapshot_timeout)  # fmt: skip
        except OperationTimeout:
            raise OperationTimeout(
                f"{cmd} on '{dom.defn.name}' did not finish in {self._settings.snapshot_timeout}s"
            ) from None
        if dom.run is not run:
            raise OperationFailed(f"QEMU of '{dom.defn.name}' exited during {cmd}")
        error = None
        for job in await dom.execute(run, "query-jobs"):
            if job.get("id") == job_id:
                error = job.get("error")
        try:
            await dom.execute(run, "job-dismiss", {"id": job_id})
        except VirtbusError as exc:
            log.debug("job-dismiss %s: %s", job_id, exc)
        run.job_states.pop(job_id, None)
        if error:
            raise OperationFailed(f"{cmd} of domain '{dom.defn.name}' failed: {error}")

    # --- revert ---------------------------------------------------------------------
    async def revert(self, ref: str, name: str, running: bool, paused: bool) -> None:
        dom = self._registry.get(ref)
        uuid, dname = dom.defn.uuid, dom.defn.name
        snap = self._store.for_revert(uuid, dname, name)
        if dom.state not in _STATE_NAMES:
            raise OperationInvalid(f"cannot revert domain '{dname}': it is {dom.state.label}")
        want_paused = paused or (snap.state == "paused" and not running)
        disks = self._disks_of(dom.defn, snap)
        if snap.memory:
            if dom.run is None or dom.state == S.SHUTOFF:
                await self._start_from(dom, snap, disks, want_paused)
            else:
                await self._load(dom, dom.run, snap, disks, want_paused)
        else:
            if dom.run is not None and dom.state != S.SHUTOFF:
                await self._stop_from_snapshot(dom, dom.run)
            await _each_image(disks, "-a", snap.name)
            if running or paused:
                await self._start_from(dom, None, disks, paused)
        await self._store.set_current(uuid, name)

    def _disks_of(self, defn: DomainDefinition, snap: SnapshotDef) -> list[Disk]:
        by_target = {d.target_dev: d for d in defn.disks}
        missing = [t for t in snap.disks if t not in by_target]
        if missing:
            raise OperationInvalid(
                f"snapshot '{snap.name}' covers disk(s) {', '.join(missing)} that domain"
                f" '{defn.name}' no longer has"
            )
        return [by_target[t] for t in snap.disks]

    async def _load(self, dom: Domain, run: Run, snap: SnapshotDef, disks: list[Disk],
                    want_paused: bool) -> None:  # fmt: skip
        """libvirt's order: stop the vCPUs (suspended(from_snapshot)), load, and start them
        again unless the result is paused (resumed(from_snapshot))."""
        nodes = await self._nodes(dom, run, disks)
        run.pending.add(ev.Pending.REVERT)
        try:
            if dom.state == S.RUNNING:
                await dom.execute(run, "stop")
                await dom.wait(run, lambda: dom.state == S.PAUSED, "revert")
            await self.run_job(dom, run, "snapshot-load", {
                "tag": snap.name, "vmstate": nodes[0].node, "devices": [n.node for n in nodes]
            })  # fmt: skip
            if want_paused:
                dom.state, dom.reason = S.PAUSED, "from_snapshot"
            else:
                await dom.execute(run, "cont")
                await dom.wait(run, lambda: dom.state == S.RUNNING, "revert")
        finally:
            run.pending.discard(ev.Pending.REVERT)
        await dom.save_status(run)

    async def _start_from(self, dom: Domain, snap: SnapshotDef | None, disks: list[Disk],
                          want_paused: bool) -> None:  # fmt: skip
        """Boot the shut-off domain into the snapshot (``snap`` None: the disks were
        reverted already, boot them): started(from_snapshot), then suspended(from_snapshot)
        when it stays paused."""
        name = dom.defn.name

        def failure(detail: str) -> OperationFailed:
            return OperationFailed(f"cannot start domain '{name}' from its snapshot: {detail}")

        async with self._launcher.launch(
            dom, dom.defn.copy(), pending=ev.Pending.START, reason="from_snapshot",
            failure=failure,
        ) as launched:  # fmt: skip
            run = launched.run
            run.pending.add(ev.Pending.REVERT)
            try:
                if snap is not None:
                    nodes = await self._nodes(dom, run, disks)
                    await self.run_job(dom, run, "snapshot-load", {
                        "tag": snap.name, "vmstate": nodes[0].node,
                        "devices": [n.node for n in nodes],
                    })  # fmt: skip
                await dom.come_up(run, want_paused, "from_snapshot", "revert")
            finally:
                run.pending.discard(ev.Pending.REVERT)
            await dom.save_status(run)

    async def _stop_from_snapshot(self, dom: Domain, run: Run) -> None:
        """A revert to a shut-off snapshot, or a snapshot with ``halt``: the running
        domain is destroyed (stopped(from_snapshot), shut off with that reason)."""
        run.pending |= {ev.Pending.DESTROY, ev.Pending.REVERT}
        await dom.stop_process(run)
        await dom.wait_ended(run)

    # --- delete ---------------------------------------------------------------------
    async def delete(self, ref: str, name: str, children: bool, children_only: bool,
                     metadata: bool) -> list[str]:  # fmt: skip
        dom = self._registry.get(ref)
        uuid, dname = dom.defn.uuid, dom.defn.name
        names = self._store.plan_delete(uuid, dname, name, children=children,
                                        children_only=children_only, metadata=metadata)  # fmt: skip
        done: list[str] = []
        try:
            for victim in names:
                if not metadata:
                    await self._delete_data(dom, self._store.get(uuid, dname, victim))
                done.append(victim)
        finally:
            if done:
                await self._store.remove(uuid, done)
        return done

    async def _delete_data(self, dom: Domain, snap: SnapshotDef) -> None:
        disks = [d for d in dom.defn.disks if d.target_dev in snap.disks and d.source_path]
        run = dom.run
        if run is not None and dom.state != S.SHUTOFF:
            nodes = await self._nodes(dom, run, disks)
            await self.run_job(dom, run, "snapshot-delete",
                            {"tag": snap.name, "devices": [n.node for n in nodes]})  # fmt: skip
        else:
            await _each_image(disks, "-d", snap.name, missing_ok=True)


async def _each_image(disks: list[Disk], flag: str, name: str, *, missing_ok: bool = False) -> None:
    """``qemu-img snapshot <flag> <name>`` on every disk's image (a shut-off domain)."""
    for disk in disks:
        assert disk.source_path is not None
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "snapshot", flag, name, "--image-opts",
            f"driver=qcow2,file.filename={disk.source_path.replace(',', ',,')}",  # never probed
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        text = err.decode(errors="replace").strip()
        if proc.returncode != 0:
            if missing_ok and "not found" in text:
                continue
            raise OperationFailed(
                f"qemu-img snapshot {flag} '{name}' of disk '{disk.target_dev}' failed: {text}"
            )
