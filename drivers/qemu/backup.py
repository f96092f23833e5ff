"""Checkpoints and push-mode backups of QEMU domains, as libvirt's qemu_checkpoint.c and
qemu_backup.c do them over blockdev.

- A checkpoint is a persistent dirty bitmap named after it on each covered disk's format
  node: one ``transaction`` of ``block-dirty-bitmap-add`` (persistent: QEMU writes it
  into the qcow2 image when it closes it) for a running domain, ``qemu-img bitmap --add``
  for a shut-off one. Every checkpoint's bitmap stays active (libvirt >= 6.0), so a
  checkpoint's bitmap alone holds all that was written since it; deleting one removes its
  bitmaps (``block-dirty-bitmap-remove`` / ``qemu-img bitmap --remove``) and its children
  take its parent (:mod:`drivers.checkpoints`).
- A backup: QEMU creates each target image (``blockdev-create`` jobs, as a blockcopy's),
  opens it, and one ``transaction`` starts a ``blockdev-backup`` job per disk
  (``sync=full``, or ``sync=incremental`` over a temporary bitmap the checkpoint's is
  merged into, as libvirt does) and adds the new checkpoint's bitmaps at the same instant.
  The jobs copy the point in time of the transaction (copy-before-write) while the guest
  runs on. A follower waits on their ``JOB_STATUS_CHANGE`` events, then closes the target
  nodes, removes the temporary bitmaps, and publishes ``job_completed`` (completed, failed
  with QEMU's error, or cancelled); the targets of a failed or cancelled backup are
  removed. One backup per domain; ``backup_bandwidth`` caps each job's rate.

A running backup is recorded in the state dir (``backups/<uuid>.json``: its jobs, nodes
and images): an agent that stops leaves QEMU's jobs running, and the restarted agent
follows them again (a job that ended meanwhile stays concluded until it is dismissed).

Not done yet: pull mode (an NBD export), checkpoints whose bitmaps went into a backing
image after an external snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from drivers.checkpoints import CheckpointStore, backup_disks, checkpoint_disks
from drivers.qemu import external
from drivers.qemu.domain import Domain, Run
from drivers.qemu.launch import Launcher
from drivers.qemu.registry import DomainRegistry
from drivers.qemu.settings import QemuSettings
from virtbus.aio import log_task_failure
from virtbus.domain import DomainDefinition
from virtbus.domain.checkpoint import (
    BackupDisk,
    CheckpointDef,
    backup_xml,
    parse_backup_request,
    parse_checkpoint_request,
)
from virtbus.domain.model import Disk
from virtbus.errors import (
    ConfigUnsupported,
    NoSupport,
    OperationFailed,
    OperationInvalid,
    OperationTimeout,
    VirtbusError,
)
from virtbus.protocol.backup import BackupStarted, CheckpointInfo, DomainJobInfo
from virtbus.protocol.events import DomainState
from virtbus.store import atomic_write, quarantine, read_bytes

log = logging.getLogger(__name__)
_ACTIVE = (DomainState.RUNNING, DomainState.PAUSED)
_ENDED = ("concluded", "null")
_TMP = "virtbus-backup-tmp"  # the temporary bitmap of an incremental backup


@dataclass(eq=False, slots=True)
class _Backup:
    incremental: str | None
    disks: list[BackupDisk]
    started: float = field(default_factory=time.time)
    jobs: list[str] = field(default_factory=list)  # QMP job ids
    nodes: list[str] = field(default_factory=list)  # the targets' nodes, in adding order
    tmp_nodes: list[str] = field(default_factory=list)  # nodes holding a temporary bitmap
    aborted: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def to_json(self) -> dict[str, object]:
        return {"incremental": self.incremental, "started": self.started, "jobs": self.jobs,
                "nodes": self.nodes, "tmp_nodes": self.tmp_nodes,
                "disks": [[d.target, d.file, d.format] for d in self.disks]}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Backup:
        inc = data.get("incremental")
        return cls(
            incremental=str(inc) if inc is not None else None,
            disks=[BackupDisk(str(t), str(f), str(fmt)) for t, f, fmt in data["disks"]],
            started=float(data["started"]), jobs=[str(j) for j in data["jobs"]],
            nodes=[str(n) for n in data["nodes"]], tmp_nodes=[str(n) for n in data["tmp_nodes"]],
        )  # fmt: skip


class QemuBackups:
    """The Backups methods of the QEMU driver (see module docstring)."""

    def __init__(self, registry: DomainRegistry, launcher: Launcher, store: CheckpointStore,
                 settings: QemuSettings, job: external.Job, directory: Path) -> None:  # fmt: skip
        self._registry = registry
        self._dir = directory  # one record per running backup (<uuid>.json)
        self._launcher = launcher
        self._store = store
        self._settings = settings
        self._run_job = job
        self._backups: dict[str, _Backup] = {}  # by domain uuid
        self._last: dict[str, DomainJobInfo] = {}  # the last backup that ended, by uuid

    # --- checkpoints ------------------------------------------------------------------
    def all(self, ref: str) -> list[CheckpointInfo]:
        dom = self._registry.get(ref)
        return self._store.infos(dom.defn.uuid, dom.defn.name)

    def info(self, ref: str, name: str) -> CheckpointInfo:
        dom = self._registry.get(ref)
        return self._store.info(dom.defn.uuid, dom.defn.name, name)

    def xml(self, ref: str, name: str) -> str:
        dom = self._registry.get(ref)
        return self._store.get(dom.defn.uuid, dom.defn.name, name).to_xml()

    def _defn(self, dom: Domain) -> tuple[Run | None, DomainDefinition]:
        run = dom.run if dom.state in _ACTIVE else None
        return run, run.live if run is not None else dom.defn

    async def create(self, ref: str, xml: str | None) -> CheckpointInfo:
        dom = self._registry.get(ref)
        req = parse_checkpoint_request(xml)
        run, defn = self._defn(dom)
        disks = checkpoint_disks(defn, req.disks)
        cp = self._store.new(dom.defn.uuid, dom.defn.name, req, disks)
        if run is not None:
            infos = await external.inserted(dom, run, disks)
            await dom.execute(run, "transaction", {"actions": [
                _bitmap_add(str(info["node-name"]), cp.name) for info in infos]})  # fmt: skip
        else:
            await _offline_bitmaps(disks, "--add", cp.name)
        await self._store.add(dom.defn.uuid, cp)
        return self._store.info(dom.defn.uuid, dom.defn.name, cp.name)

    async def delete(self, ref: str, name: str, metadata: bool) -> list[str]:
        dom = self._registry.get(ref)
        cp = self._store.get(dom.defn.uuid, dom.defn.name, name)
        backup = self._backups.get(dom.defn.uuid)
        if backup is not None and backup.incremental == name:
            raise OperationInvalid(f"checkpoint '{name}' of domain '{dom.defn.name}' is in use"
                                   " by the running backup")  # fmt: skip
        if not metadata:
            run, defn = self._defn(dom)
            disks = [d for d in defn.disks if d.target_dev in cp.disks]
            if run is not None:
                where = await _bitmap_nodes(dom, run, name)
                actions = [{"type": "block-dirty-bitmap-remove",
                            "data": {"node": node, "name": name}} for node in where]  # fmt: skip
                if actions:
                    await dom.execute(run, "transaction", {"actions": actions})
            else:
                await _offline_bitmaps(disks, "--remove", name, missing_ok=True)
        await self._store.remove(dom.defn.uuid, name)
        return [name]

    # --- backups ----------------------------------------------------------------------
    async def begin(self, ref: str, xml: str | None, checkpoint_xml: str | None) -> BackupStarted:
        dom = self._registry.get(ref)
        if dom.run is None or dom.state not in _ACTIVE:
            raise OperationInvalid(f"backup-begin: domain '{dom.defn.name}' is not running")
        run = dom.run
        uuid = dom.defn.uuid
        if uuid in self._backups:
            raise OperationInvalid(f"domain '{dom.defn.name}' already has an active backup job")
        req = parse_backup_request(xml)
        base: CheckpointDef | None = None
        if req.incremental is not None:
            base = self._store.get(uuid, dom.defn.name, req.incremental)
        pairs = backup_disks(run.live, req, time.time())
        if base is not None:
            for disk, _t in pairs:
                if disk.target_dev not in base.disks:
                    raise ConfigUnsupported(f"checkpoint '{base.name}' does not cover disk"
                                            f" '{disk.target_dev}'")  # fmt: skip
        cp: CheckpointDef | None = None
        cp_disks: list[Disk] = []
        if checkpoint_xml is not None:
            creq = parse_checkpoint_request(checkpoint_xml)
            cp_disks = checkpoint_disks(run.live, creq.disks)
            cp = self._store.new(uuid, dom.defn.name, creq, cp_disks)
        for disk, target in pairs:
            assert target.file is not None
            await self._launcher.confine_file(run.live, target.file,
                                              f"backup of disk {disk.target_dev}")  # fmt: skip
            if await asyncio.to_thread(os.path.lexists, target.file):
                raise OperationInvalid(f"backup file {target.file} of disk '{disk.target_dev}'"
                                       " already exists")  # fmt: skip
        backup = _Backup(req.incremental, [t for _d, t in pairs])
        self._backups[uuid] = backup
        created: list[str] = []
        try:
            actions = await self._prepare(dom, run, pairs, base, backup, created)
            if cp is not None:
                for info in await external.inserted(dom, run, cp_disks):
                    actions.append(_bitmap_add(str(info["node-name"]), cp.name))
            for jid in backup.jobs:
                run.job_states[jid] = "created"
            await dom.execute(run, "transaction", {"actions": actions})
        except BaseException:
            self._backups.pop(uuid, None)
            for jid in backup.jobs:
                run.job_states.pop(jid, None)
            await self._cleanup(dom, run, backup)
            for path in created:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        await self._save_record(uuid, backup)
        if cp is not None:
            await self._store.add(uuid, cp)
        backup.task = asyncio.create_task(self._follow(dom, run, backup),
                                          name=f"qemu-backup-{dom.defn.name}")  # fmt: skip
        backup.task.add_done_callback(log_task_failure)
        return BackupStarted(xml=backup_xml(req.incremental, backup.disks),
                             checkpoint=cp.name if cp is not None else None)  # fmt: skip

    async def _prepare(self, dom: Domain, run: Run, pairs: list[tuple[Disk, BackupDisk]],
                       base: CheckpointDef | None, backup: _Backup,
                       created: list[str]) -> list[dict[str, Any]]:  # fmt: skip
        """Targets created and opened; the transaction's actions that start the jobs."""
        infos = await external.inserted(dom, run, [d for d, _t in pairs])
        where = await _bitmap_nodes(dom, run, base.name) if base is not None else []
        actions: list[dict[str, Any]] = []
        for (disk, target), info in zip(pairs, infos, strict=True):
            assert target.file is not None
            node = str(info["node-name"])
            created.append(target.file)
            tnode = await external.new_image(dom, run, self._run_job, target.file, target.format,
                                             external.virtual_size(info), None,
                                             backup.nodes)  # fmt: skip
            jid = f"virtbus-backup-{disk.target_dev}"
            args: dict[str, Any] = {"job-id": jid, "device": node, "target": tnode,
                                    "sync": "full", "auto-dismiss": False}  # fmt: skip
            if self._settings.backup_bandwidth:
                args["speed"] = self._settings.backup_bandwidth << 20
            if base is not None:
                if node not in where:
                    raise NoSupport(
                        f"the bitmap of checkpoint '{base.name}' is not on the active image of"
                        f" disk '{disk.target_dev}' (an external snapshot since?): incremental"
                        " backup across a backing chain is not supported yet"
                    )
                await dom.execute(run, "block-dirty-bitmap-add",
                                  {"node": node, "name": _TMP, "persistent": False,
                                   "disabled": True})  # fmt: skip
                backup.tmp_nodes.append(node)
                merge = {"node": node, "target": _TMP, "bitmaps": [base.name]}
                await dom.execute(run, "block-dirty-bitmap-merge", merge)
                args |= {"sync": "incremental", "bitmap": _TMP}
            backup.jobs.append(jid)
            actions.append({"type": "blockdev-backup", "data": args})
        return actions

    async def _follow(self, dom: Domain, run: Run, backup: _Backup) -> None:
        """Until every job concluded (or QEMU exited), then :meth:`_finish`. Cancelled
        (the agent stops), it leaves QEMU's jobs and the record to a restarted agent."""
        await dom.wait(run, lambda: all(run.job_states.get(j) in _ENDED
                                        for j in backup.jobs), "backup")  # fmt: skip
        await self._finish(dom, run, backup)

    async def _finish(self, dom: Domain, run: Run, backup: _Backup) -> None:
        uuid = dom.defn.uuid
        status: Literal["completed", "failed", "cancelled"] = "failed"
        error: str | None = None
        total = 0
        try:
            if dom.run is not run:
                error = "QEMU exited during the backup"
            else:
                errors: list[str] = []
                for j in await dom.execute(run, "query-jobs"):
                    if j.get("id") in backup.jobs:
                        total += int(j.get("total-progress", 0))
                        if j.get("error"):
                            errors.append(f"{j.get('id')}: {j.get('error')}")
                for jid in backup.jobs:
                    with contextlib.suppress(VirtbusError):
                        await dom.execute(run, "job-dismiss", {"id": jid})
                if backup.aborted:
                    status = "cancelled"
                elif errors:
                    error = "; ".join(errors)
                else:
                    status = "completed"
        except VirtbusError as exc:
            error = str(exc)
        for jid in backup.jobs:
            run.job_states.pop(jid, None)
        if dom.run is run:
            await self._cleanup(dom, run, backup)
        self._ended(dom, backup, status, error, total)
        await self._drop_record(uuid)

    def _ended(self, dom: Domain, backup: _Backup,
               status: Literal["completed", "failed", "cancelled"], error: str | None,
               total: int) -> None:  # fmt: skip
        """The outcome recorded and published; a failed or cancelled backup's images go."""
        if status != "completed":
            for disk in backup.disks:
                with contextlib.suppress(OSError):
                    os.unlink(disk.file or "")
        elapsed = max(int((time.time() - backup.started) * 1000), 0)
        self._last[dom.defn.uuid] = DomainJobInfo(
            type=status, operation="backup", time_elapsed_ms=elapsed,
            data_processed=total if status == "completed" else 0, data_total=total,
            error=error,
        )  # fmt: skip
        if self._backups.get(dom.defn.uuid) is backup:
            del self._backups[dom.defn.uuid]
        backup.done.set()
        data: dict[str, Any] = {"operation": "backup", "status": status,
                                "time_elapsed_ms": elapsed, "data_total": total}  # fmt: skip
        if error:
            data["error"] = error
        dom.emit("job_completed", None, data)

    # --- the record a restarted agent follows again -----------------------------------
    async def _save_record(self, uuid: str, backup: _Backup) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        await atomic_write(self._dir / f"{uuid}.json", json.dumps(backup.to_json()).encode())

    async def _drop_record(self, uuid: str) -> None:
        await asyncio.to_thread((self._dir / f"{uuid}.json").unlink, missing_ok=True)

    async def adopt(self) -> None:
        """After an agent restart: follow each recorded backup again (its jobs as QEMU
        has them, ``query-jobs``); one whose QEMU is gone failed with it."""
        if not self._dir.is_dir():
            return
        for path in sorted(self._dir.glob("*.json")):
            data = await read_bytes(path)
            if data is None:
                continue
            try:
                backup = _Backup.from_json(json.loads(data))
            except (ValueError, KeyError, TypeError) as exc:
                await quarantine(path, f"unreadable backup record: {exc}")
                continue
            dom = self._registry.find(path.stem)
            run = dom.run if dom is not None and dom.state in _ACTIVE else None
            if dom is None or run is None:
                if dom is not None:
                    self._ended(dom, backup, "failed", "QEMU exited during the backup", 0)
                else:
                    for disk in backup.disks:
                        with contextlib.suppress(OSError):
                            os.unlink(disk.file or "")
                path.unlink(missing_ok=True)
                continue
            try:
                jobs = await dom.execute(run, "query-jobs")
            except VirtbusError as exc:
                log.warning("domain %s: query-jobs failed: %s", dom.defn.name, exc)
                continue
            states = {str(j.get("id")): str(j.get("status", ""))
                      for j in (jobs if isinstance(jobs, list) else [])}  # fmt: skip
            for jid in backup.jobs:
                run.job_states[jid] = states.get(jid, "null")
            log.info("domain %s: following its backup again", dom.defn.name)
            self._backups[dom.defn.uuid] = backup
            backup.task = asyncio.create_task(self._follow(dom, run, backup),
                                              name=f"qemu-backup-{dom.defn.name}")  # fmt: skip
            backup.task.add_done_callback(log_task_failure)

    async def _cleanup(self, dom: Domain, run: Run, backup: _Backup) -> None:
        await external.close_nodes(dom, run, backup.nodes)
        backup.nodes = []
        for node in backup.tmp_nodes:
            try:
                await dom.execute(run, "block-dirty-bitmap-remove", {"node": node, "name": _TMP})
            except VirtbusError as exc:
                log.warning("domain %s: removing bitmap %s of %s: %s", dom.defn.name, _TMP,
                            node, exc)  # fmt: skip
        backup.tmp_nodes = []

    def dumpxml(self, ref: str) -> str:
        dom = self._registry.get(ref)
        backup = self._backups.get(dom.defn.uuid)
        if backup is None:
            raise OperationInvalid(f"domain '{dom.defn.name}' has no backup job")
        return backup_xml(backup.incremental, backup.disks)

    async def job_info(self, ref: str, completed: bool) -> DomainJobInfo:
        dom = self._registry.get(ref)
        if completed:
            return self._last.get(dom.defn.uuid) or DomainJobInfo(type="none")
        backup = self._backups.get(dom.defn.uuid)
        if backup is None or dom.run is None:
            return DomainJobInfo(type="none")
        done = total = 0
        for j in await dom.execute(dom.run, "query-jobs"):
            if j.get("id") in backup.jobs:
                done += int(j.get("current-progress", 0))
                total += int(j.get("total-progress", 0))
        return DomainJobInfo(
            type="unbounded", operation="backup",
            time_elapsed_ms=max(int((time.time() - backup.started) * 1000), 0),
            data_processed=done, data_total=total, data_remaining=max(total - done, 0),
        )  # fmt: skip

    async def job_abort(self, ref: str) -> DomainJobInfo:
        dom = self._registry.get(ref)
        backup = self._backups.get(dom.defn.uuid)
        if backup is None or dom.run is None:
            raise OperationInvalid(f"no job is active on domain '{dom.defn.name}'")
        backup.aborted = True
        for jid in backup.jobs:
            with contextlib.suppress(VirtbusError):  # one that already concluded
                await dom.execute(dom.run, "job-cancel", {"id": jid})
        try:
            async with asyncio.timeout(self._settings.snapshot_timeout):
                await backup.done.wait()
        except TimeoutError:
            raise OperationTimeout(f"the backup of '{dom.defn.name}' did not end after its"
                                   " abort") from None  # fmt: skip
        return self._last[dom.defn.uuid]

    def has_checkpoints(self, uuid: str) -> bool:
        return self._store.has_any(uuid)

    async def close(self) -> None:
        tasks = [b.task for b in self._backups.values() if b.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._backups.clear()


def _bitmap_add(node: str, name: str) -> dict[str, Any]:
    return {"type": "block-dirty-bitmap-add",
            "data": {"node": node, "name": name, "persistent": True}}  # fmt: skip


async def _bitmap_nodes(dom: Domain, run: Run, name: str) -> list[str]:
    """The format nodes that hold a bitmap called ``name`` (query-named-block-nodes)."""
    nodes = await dom.execute(run, "query-named-block-nodes")
    out = []
    for node in nodes if isinstance(nodes, list) else []:
        bitmaps = node.get("dirty-bitmaps") or []
        if any(b.get("name") == name for b in bitmaps):
            out.append(str(node.get("node-name")))
    return out


async def _offline_bitmaps(disks: list[Disk], flag: str, name: str, *,
                           missing_ok: bool = False) -> None:  # fmt: skip
    """``qemu-img bitmap <flag> <image> <name>`` on each disk (a shut-off domain)."""
    for disk in disks:
        assert disk.source_path is not None
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "bitmap", flag, disk.source_path, name,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _out, err = await proc.communicate()
        text = err.decode(errors="replace").strip()
        if proc.returncode != 0 and not (missing_ok and "not found" in text.lower()):
            raise OperationFailed(f"qemu-img bitmap {flag} {name} on disk"
                                  f" '{disk.target_dev}' failed: {text}")  # fmt: skip
