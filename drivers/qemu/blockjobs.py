"""Block jobs of QEMU domains (blockcommit, blockpull, blockjob, domblkerror), as libvirt's
qemu_blockjob.c runs them.

A job is QEMU's (``block-commit``, ``block-stream``), started with ``auto-dismiss`` off and
an id that names what it is and on which disk (``virtbus-commit-vda``,
``virtbus-acommit-vda`` for an active commit, ``virtbus-pull-vda``): a restarted agent
finds it again in ``query-jobs`` and follows it, even one that ended while no agent ran
(it stays ``concluded`` until dismissed). One follower task per job waits on its
``JOB_STATUS_CHANGE`` events, reads its progress (``query-block-jobs``) at most every
``block_job_progress_s`` and publishes ``block_job`` events (``running`` with cur/end,
``ready``, then ``completed``, ``failed`` with QEMU's error, or ``canceled``). When the
job ends the follower reads the disk's chain back from QEMU (``query-block``) into the
live definition (and the persistent one when it named the same image), then dismisses it.

An active commit becomes ready; ``blockjob --pivot`` (``job-complete``) makes the disk
run on the base, ``--abort`` (``job-cancel``) keeps it on the active layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from drivers.blockjobs import disk_chain, plan_commit, plan_pull, with_chain
from drivers.qemu import external
from drivers.qemu.argv_storage import device_id
from drivers.qemu.domain import Domain, Run
from drivers.qemu.launch import Launcher
from drivers.qemu.registry import DomainRegistry
from drivers.qemu.settings import QemuSettings
from drivers.qemu.state import StateStore
from virtbus.aio import log_task_failure
from virtbus.domain.model import Disk
from virtbus.errors import (
    InvalidArgument,
    NoSupport,
    OperationFailed,
    OperationInvalid,
    OperationTimeout,
    VirtbusError,
)
from virtbus.protocol.blockjob import (
    BlockCommit,
    BlockCopy,
    BlockError,
    BlockJobEnd,
    BlockJobInfo,
    BlockJobType,
    BlockPull,
)
from virtbus.protocol.events import DomainState

log = logging.getLogger(__name__)
MIB = 1 << 20
PREFIX = "virtbus-"
_KINDS: dict[str, BlockJobType] = {"commit": "commit", "acommit": "active-commit",
                                   "pull": "pull", "copy": "copy"}  # fmt: skip
_PIVOTS = ("active-commit", "copy")  # the jobs that become ready and can pivot
_ENDED = ("concluded", "null")
_ACTIVE = (DomainState.RUNNING, DomainState.PAUSED)


def job_id(kind: str, target: str) -> str:
    return f"{PREFIX}{kind}-{target}"


def parse_job_id(jid: str) -> tuple[BlockJobType, str] | None:
    """(type, disk target) of one of virtbus's job ids; None for any other job."""
    if not jid.startswith(PREFIX):
        return None
    kind, _, target = jid.removeprefix(PREFIX).partition("-")
    return (_KINDS[kind], target) if kind in _KINDS and target else None


@dataclass(frozen=True, slots=True)
class _Layer:
    node: str  # the format node
    filename: str
    fmt: str


@dataclass(eq=False, slots=True)
class _Job:
    id: str
    type: BlockJobType
    target: str
    done: asyncio.Event = field(default_factory=asyncio.Event)
    aborted: bool = False
    task: asyncio.Task[None] | None = None
    target_nodes: list[str] = field(default_factory=list)  # a copy's destination nodes
    dest: str | None = None  # a copy's destination image


class QemuBlockJobs:
    """The BlockJobs methods of the QEMU driver (see module docstring)."""

    def __init__(self, registry: DomainRegistry, states: StateStore, settings: QemuSettings,
                 launcher: Launcher, job: external.Job) -> None:  # fmt: skip
        self._registry = registry
        self._states = states
        self._settings = settings
        self._launcher = launcher  # where a copy may be written
        self._run_job = job  # one QMP job to its end (blockdev-create)
        self._jobs: dict[tuple[str, str], _Job] = {}  # (uuid, target) -> job
        self._ends: dict[tuple[str, str], BlockJobEnd] = {}  # how each disk's last job ended

    # --- start ------------------------------------------------------------------------
    async def commit(self, ref: str, req: BlockCommit) -> BlockJobInfo:
        dom, run, disk = self._disk(ref, req.disk, "blockcommit")
        chain = await _chain(dom, run, disk)
        top, base = plan_commit(disk.target_dev, [layer.filename for layer in chain], req)
        kind = "acommit" if top == 0 else "commit"
        args: dict[str, Any] = {"device": chain[0].node, "base-node": chain[base].node}
        if top != 0:
            args["top-node"] = chain[top].node
        return await self._start(dom, run, disk, kind, "block-commit", args, req.bandwidth)

    async def pull(self, ref: str, req: BlockPull) -> BlockJobInfo:
        dom, run, disk = self._disk(ref, req.disk, "blockpull")
        chain = await _chain(dom, run, disk)
        args: dict[str, Any] = {"device": chain[0].node}
        base = plan_pull(disk.target_dev, [layer.filename for layer in chain], req)
        if base is not None:
            args["base-node"] = chain[base].node
        return await self._start(dom, run, disk, "pull", "block-stream", args, req.bandwidth)

    async def copy(self, ref: str, req: BlockCopy) -> BlockJobInfo:
        """A mirror onto a new image QEMU creates (libvirt's blockcopy over blockdev): the
        copy is opened first, then ``blockdev-mirror`` fills it; a failure before the
        mirror runs closes and removes what was made."""
        dom, run, disk = self._disk(ref, req.disk, "blockcopy")
        self._check_free(dom, disk)
        await self._launcher.confine_file(run.live, req.dest, f"blockcopy of disk {req.disk}")
        if await asyncio.to_thread(os.path.lexists, req.dest):
            raise OperationInvalid(f"blockcopy destination {req.dest} already exists")
        if req.shallow:
            raise NoSupport("blockcopy --shallow is not supported yet (a full copy is)")
        chain = await _chain(dom, run, disk)
        size = external.virtual_size((await external.inserted(dom, run, [disk]))[0])
        backing = None
        added: list[str] = []
        try:
            node = await external.new_image(dom, run, self._run_job, req.dest, req.format, size,
                                            backing, added)  # fmt: skip
            args = {"target": node, "sync": "full"}
            info = await self._start(dom, run, disk, "copy", "blockdev-mirror",
                                     {"device": chain[0].node, **args}, req.bandwidth)  # fmt: skip
        except BaseException:
            await external.close_nodes(dom, run, added)
            with contextlib.suppress(OSError):
                os.unlink(req.dest)
            raise
        job = self._jobs.get((dom.defn.uuid, disk.target_dev))
        if job is not None:
            job.target_nodes, job.dest = added, req.dest
        return info

    def _check_free(self, dom: Domain, disk: Disk) -> None:
        if (dom.defn.uuid, disk.target_dev) in self._jobs:
            raise OperationInvalid(f"disk '{disk.target_dev}' of domain '{dom.defn.name}'"
                                   " already has a block job")  # fmt: skip

    async def _start(self, dom: Domain, run: Run, disk: Disk, kind: str, cmd: str,
                     args: dict[str, Any], bandwidth: int) -> BlockJobInfo:  # fmt: skip
        self._check_free(dom, disk)
        jid = job_id(kind, disk.target_dev)
        if bandwidth:
            args["speed"] = bandwidth * MIB
        await dom.execute(run, cmd, {"job-id": jid, "auto-dismiss": False, **args})
        run.job_states.setdefault(jid, "created")
        job = self._follow(dom, run, jid)
        assert job is not None
        info = await self.info(dom.defn.name, disk.target_dev)
        return info or BlockJobInfo(disk=disk.target_dev, type=job.type, cur=0, end=0,
                                    bandwidth=bandwidth, ready=False, status="created")  # fmt: skip

    def _disk(self, ref: str, target: str, verb: str) -> tuple[Domain, Run, Disk]:
        dom = self._registry.get(ref)
        if dom.run is None or dom.state not in _ACTIVE:
            raise OperationInvalid(f"{verb}: domain '{dom.defn.name}' is not running")
        disk = next((d for d in dom.run.live.disks if d.target_dev == target), None)
        if disk is None:
            raise InvalidArgument(f"domain '{dom.defn.name}' has no disk '{target}'")
        return dom, dom.run, disk

    # --- follow -----------------------------------------------------------------------
    def _follow(self, dom: Domain, run: Run, jid: str) -> _Job | None:
        parsed = parse_job_id(jid)
        if parsed is None:
            return None
        key = (dom.defn.uuid, parsed[1])
        if key in self._jobs:
            return self._jobs[key]
        job = _Job(jid, parsed[0], parsed[1])
        self._jobs[key] = job
        job.task = asyncio.create_task(self._run(dom, run, job), name=f"qemu-blockjob-{jid}")
        job.task.add_done_callback(log_task_failure)
        return job

    async def adopt(self) -> None:
        """After an agent restart: follow every virtbus job QEMU still has (each domain's
        QEMU asked at once: one round trip for all, not one per domain in turn)."""
        await asyncio.gather(*(self._adopt(dom) for dom in self._registry))

    async def _adopt(self, dom: Domain) -> None:
        run = dom.run
        if run is None or dom.state not in _ACTIVE:
            return
        try:
            jobs = await dom.execute(run, "query-jobs")
        except VirtbusError as exc:
            log.warning("domain %s: query-jobs failed: %s", dom.defn.name, exc)
            return
        for job in jobs if isinstance(jobs, list) else []:
            jid = str(job.get("id", ""))
            if parse_job_id(jid) is not None:
                run.job_states[jid] = str(job.get("status", ""))
                log.info("domain %s: following block job %s again", dom.defn.name, jid)
                self._follow(dom, run, jid)

    async def _run(self, dom: Domain, run: Run, job: _Job) -> None:
        key = (dom.defn.uuid, job.target)
        try:
            await self._watch(dom, run, job)
        finally:
            self._jobs.pop(key, None)
            job.done.set()

    async def _watch(self, dom: Domain, run: Run, job: _Job) -> None:
        last: tuple[Any, ...] | None = None
        while dom.run is run:
            seen = run.job_states.get(job.id)
            if seen in _ENDED:
                await self._finish(dom, run, job)
                return
            info = await self._query(dom, run, job)
            now = (info.status, info.cur, info.end) if info else None
            if info is not None and now != last:
                status = "ready" if info.ready else "running"
                dom.emit("block_job", None, {"disk": job.target, "type": job.type,
                                             "status": status, "cur": info.cur,
                                             "end": info.end})  # fmt: skip
                last = now
            with contextlib.suppress(OperationTimeout):
                await dom.wait(run, _changed(run, job.id, seen), "block job",
                               timeout=self._settings.block_job_progress_s)  # fmt: skip

    async def _query(self, dom: Domain, run: Run, job: _Job) -> BlockJobInfo | None:
        try:
            jobs = await dom.execute(run, "query-block-jobs")
        except VirtbusError:
            return None
        for j in jobs if isinstance(jobs, list) else []:
            if j.get("device") == job.id:
                return BlockJobInfo(
                    disk=job.target, type=job.type, cur=int(j.get("offset", 0)),
                    end=int(j.get("len", 0)), bandwidth=int(j.get("speed", 0)) // MIB,
                    ready=bool(j.get("ready")), status=str(j.get("status", "")),
                )  # fmt: skip
        return None

    async def _finish(self, dom: Domain, run: Run, job: _Job) -> None:
        """The job ended: its error, the chain QEMU now runs written back, dismissed."""
        error = None
        for j in await dom.execute(run, "query-jobs"):
            if j.get("id") == job.id:
                error = j.get("error")
        if job.aborted and "cancel" in str(error).lower():
            error = None  # QEMU's "Operation canceled" of a job we cancelled is no failure
        # dismissed first: QEMU 7.2 crashes on query-named-block-nodes while a concluded
        # stream job still holds its (removed) filter node
        with contextlib.suppress(VirtbusError):
            await dom.execute(run, "job-dismiss", {"id": job.id})
        disk = next((d for d in run.live.disks if d.target_dev == job.target), None)
        if disk is not None and error is None:
            try:
                chain = await _chain(dom, run, disk)
                before = [f for f, _fmt in disk_chain(disk)]
                await _drop_unused(dom, run, before, [layer.filename for layer in chain])
                await self._adopt_chain(dom, run, disk, chain)
            except VirtbusError as exc:
                log.warning("domain %s: reading the chain of %s after %s failed: %s",
                            dom.defn.name, job.target, job.id, exc)  # fmt: skip
        if job.target_nodes and job.dest not in [f for f, _ in disk_chain_of(run, job.target)]:
            await external.close_nodes(dom, run, job.target_nodes)  # not pivoted onto it
        run.job_states.pop(job.id, None)
        status: Literal["completed", "canceled", "failed"] = (
            "failed" if error else "canceled" if job.aborted else "completed"
        )
        self._ends[(dom.defn.uuid, job.target)] = BlockJobEnd(
            type=job.type, status=status, error=str(error) if error else None
        )
        data: dict[str, Any] = {"disk": job.target, "type": job.type, "status": status}
        if error:
            data["error"] = str(error)
        dom.emit("block_job", None, data)

    async def _adopt_chain(self, dom: Domain, run: Run, disk: Disk,
                           chain: list[_Layer]) -> None:  # fmt: skip
        before = disk.source_path
        files = [(layer.filename, layer.fmt) for layer in chain]
        run.live = with_chain(run.live, disk.target_dev, files)
        run.live_xml = None
        await dom.save_status(run)
        persistent = next((d for d in dom.defn.disks if d.target_dev == disk.target_dev), None)
        if persistent is not None and persistent.source_path == before:
            dom.defn = with_chain(dom.defn, disk.target_dev, files)
            await self._states.save_definition(dom.defn)

    # --- control ----------------------------------------------------------------------
    async def info(self, ref: str, target: str) -> BlockJobInfo | None:
        dom, run, _disk = self._disk(ref, target, "blockjob")
        job = self._jobs.get((dom.defn.uuid, target))
        if job is None:
            return None
        # QEMU no longer lists a job whose follower is still finishing it: it is not over
        # until its outcome is recorded (block_job_end)
        return await self._query(dom, run, job) or BlockJobInfo(
            disk=target, type=job.type, cur=0, end=0, bandwidth=0, ready=False,
            status="concluded",
        )  # fmt: skip

    async def abort(self, ref: str, target: str, pivot: bool) -> None:
        dom, run, _disk = self._disk(ref, target, "blockjob")
        job = self._jobs.get((dom.defn.uuid, target))
        if job is None:
            raise OperationInvalid(f"disk '{target}' of domain '{dom.defn.name}' has no block job")
        if pivot:
            info = await self._query(dom, run, job)
            if job.type not in _PIVOTS or info is None or not info.ready:
                raise OperationInvalid(f"block job of disk '{target}' is not ready to pivot"
                                       " (an active commit or a copy is, once it copied"
                                       " everything)")  # fmt: skip
            await dom.execute(run, "job-complete", {"id": job.id})
        else:
            job.aborted = True
            await dom.execute(run, "job-cancel", {"id": job.id})
        try:
            async with asyncio.timeout(self._settings.snapshot_timeout):
                await job.done.wait()
        except TimeoutError:
            raise OperationTimeout(f"block job {job.id} did not end after"
                                   f" {'pivot' if pivot else 'abort'}") from None  # fmt: skip

    def end(self, ref: str, target: str) -> BlockJobEnd | None:
        return self._ends.get((self._registry.get(ref).defn.uuid, target))

    async def speed(self, ref: str, target: str, bandwidth: int) -> BlockJobInfo:
        dom, run, _disk = self._disk(ref, target, "blockjob")
        job = self._jobs.get((dom.defn.uuid, target))
        if job is None:
            raise OperationInvalid(f"disk '{target}' of domain '{dom.defn.name}' has no block job")
        await dom.execute(run, "block-job-set-speed", {"device": job.id, "speed": bandwidth * MIB})
        info = await self._query(dom, run, job)
        if info is None:
            raise OperationFailed(f"block job of disk '{target}' ended")
        return info

    async def errors(self, ref: str) -> list[BlockError]:
        """libvirt's virDomainGetDiskErrors: each disk's I/O status since it started."""
        dom = self._registry.get(ref)
        run = dom.run
        if run is None or dom.state not in _ACTIVE:
            raise OperationInvalid(f"domblkerror: domain '{dom.defn.name}' is not running")
        blocks = await dom.execute(run, "query-block")
        status: dict[str, str] = {}
        for block in blocks if isinstance(blocks, list) else []:
            for part in str(block.get("qdev") or block.get("device") or "").split("/"):
                status.setdefault(part, str(block.get("io-status", "ok")))
        out = []
        for disk in run.live.disks:
            io = status.get(device_id(disk), "ok")
            if io != "ok":
                out.append(
                    BlockError(
                        disk=disk.target_dev, error="no_space" if io == "nospace" else "unspec"
                    )
                )
        return out

    async def close(self) -> None:
        """Stop following (agent stop): the jobs go on in QEMU, a restart adopts them."""
        tasks = [j.task for j in self._jobs.values() if j.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._jobs.clear()


def _changed(run: Run, jid: str, seen: str | None) -> Callable[[], bool]:
    return lambda: run.job_states.get(jid) != seen


def disk_chain_of(run: Run, target: str) -> list[tuple[str, str]]:
    disk = next((d for d in run.live.disks if d.target_dev == target), None)
    return disk_chain(disk) if disk is not None else []


async def _drop_unused(dom: Domain, run: Run, before: list[str], after: list[str]) -> None:
    """The nodes of the images a job took out of the chain are closed (``blockdev-del``,
    format node then its file node), as libvirt does: nothing holds them open after."""
    gone = [f for f in before if f not in after]
    if not gone:
        return
    nodes = await dom.execute(run, "query-named-block-nodes")
    fmt_nodes: dict[str, str] = {}
    file_nodes: dict[str, str] = {}
    for node in nodes if isinstance(nodes, list) else []:
        name, filename = str(node.get("node-name")), str(node.get("file"))
        if node.get("drv") in ("file", "host_device"):
            file_nodes.setdefault(filename, name)
        else:
            fmt_nodes.setdefault(filename, name)
    for filename in gone:
        for name in (fmt_nodes.get(filename, ""), file_nodes.get(filename, "")):
            if name:
                try:
                    await dom.execute(run, "blockdev-del", {"node-name": name})
                except VirtbusError as exc:
                    log.warning("domain %s: blockdev-del %s (%s): %s", dom.defn.name, name,
                                filename, exc)  # fmt: skip


async def _chain(dom: Domain, run: Run, disk: Disk) -> list[_Layer]:
    """The disk's image chain as QEMU runs it, top first: format node, file, format."""
    blocks = await dom.execute(run, "query-block")
    inserted: dict[str, Any] | None = None
    for block in blocks if isinstance(blocks, list) else []:
        if device_id(disk) in str(block.get("qdev") or block.get("device") or "").split("/"):
            inserted = block.get("inserted")
    if not isinstance(inserted, dict):
        raise OperationFailed(f"disk '{disk.target_dev}' is not in QEMU's block list")
    nodes = await dom.execute(run, "query-named-block-nodes")
    by_file: dict[str, str] = {}
    for node in nodes if isinstance(nodes, list) else []:
        if node.get("drv") not in ("file", "host_device", "host_cdrom"):
            by_file.setdefault(str(node.get("file")), str(node.get("node-name")))
    out = [_Layer(str(inserted["node-name"]), str(inserted.get("file")),
                  str(inserted.get("drv")))]  # fmt: skip
    image = inserted.get("image", {}).get("backing-image")
    while isinstance(image, dict):
        filename = str(image.get("filename"))
        node = by_file.get(filename)
        if node is None:
            raise OperationFailed(f"no QEMU node for {filename} in the chain of disk"
                                  f" '{disk.target_dev}'")  # fmt: skip
        out.append(_Layer(node, filename, str(image.get("format"))))
        image = image.get("backing-image")
    return out
