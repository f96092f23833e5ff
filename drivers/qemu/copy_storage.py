"""Live migration with non-shared disks (libvirt's ``--copy-storage-all``), QMP side.

The flow is libvirt's (qemu_migration.c, qemuMigrationSrcNBDStorageCopy):

- destination (after ``prepare``): :func:`serve` starts QEMU's NBD server on a free port
  of the listen address (``nbd-server-start``) and exports each copied disk's node
  writable (``block-export-add``); QEMU activates the incoming images for that and
  defers the devices' shared permissions until the migration completes;
- source: :class:`Mirrors` opens an NBD client node per export (``blockdev-add``) and
  mirrors the disk onto it (``blockdev-mirror``, ``sync=full``; ``sync=top`` for
  ``--copy-storage-inc``, whose destination image has the base already; ``auto-dismiss`` off so
  an end and its error stay readable in ``query-jobs``). Memory is sent only once every
  mirror is ``ready``. The source runs with ``pause-before-switchover``: at
  ``pre-switchover`` the guest is stopped and its disks are still active, so the ready
  mirrors are cancelled there (``block-job-cancel``: a ready mirror that is cancelled
  completes, the target holds a consistent copy) and then ``migrate-continue`` lets the
  switchover happen. Any failure cancels the mirrors (``force``) and closes the NBD
  nodes: the source's images were only read.

A restarted source agent finds the mirrors and NBD nodes by their names
(:meth:`Mirrors.found`) and aborts them: the migration is rolled back
(``MigrationSteps._roll_back_copy`` says why).

Jobs are read from ``query-jobs`` whenever one of their ``JOB_STATUS_CHANGE`` events
arrives (``changed``: the domain's event task wakes us), and every ``poll`` s for the
bytes copied so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from drivers.copy_storage import copied_disks
from drivers.qemu.migration import Execute, free_port
from virtbus.errors import InvalidArgument, MigrateFailed, VirtbusError
from virtbus.protocol.migration import NbdTarget

log = logging.getLogger(__name__)
MIB = 1 << 20
__all__ = ["Mirrors", "copied_disks", "serve", "stop_serving"]


JOB_PREFIX = "virtbus-migrate-"  # not a blockjobs.py kind: that module leaves it be
NBD_PREFIX = "virtbus-nbd-"


def job_id(target: str) -> str:
    return f"{JOB_PREFIX}{target}"


def nbd_node(target: str) -> str:
    return f"{NBD_PREFIX}{target}"


def export_id(target: str) -> str:
    return f"virtbus-export-{target}"


async def serve(
    execute: Execute, nodes: dict[str, str], listen: str, attempts: int,
    tls_creds: str | None = None,
) -> NbdTarget:  # fmt: skip
    """``nbd-server-start`` on a free port of ``listen`` (retried on another port if it
    was taken meanwhile), one writable export per disk (target dev -> node); with
    ``tls_creds`` (a server tls-creds-x509 object) clients must start TLS first."""
    port = 0
    last: Exception | None = None
    tls = {"tls-creds": tls_creds} if tls_creds else {}
    for _attempt in range(attempts):
        port = free_port(listen)
        addr = {"type": "inet", "data": {"host": listen, "port": str(port)}}
        try:
            await execute("nbd-server-start", {"addr": addr, **tls})
            break
        except VirtbusError as exc:
            if "in use" not in str(exc).lower():
                raise MigrateFailed(f"nbd-server-start on {listen}:{port}: {exc}") from exc
            last = exc
    else:
        raise MigrateFailed(f"no free port for the NBD server on {listen}: {last}")
    try:
        for target, node in nodes.items():
            await execute("block-export-add", {
                "type": "nbd", "id": export_id(target), "node-name": node, "name": target,
                "writable": True,
            })  # fmt: skip
    except VirtbusError as exc:
        await stop_serving(execute, list(nodes))
        raise MigrateFailed(f"cannot export the disks over NBD: {exc}") from exc
    return NbdTarget(host=listen, port=port, exports=list(nodes))


async def stop_serving(execute: Execute, targets: list[str]) -> None:
    """Drop the exports (``hard``: any client left is disconnected) and stop the server;
    what fails is only logged (the incoming QEMU may be on its way out)."""
    for target in targets:
        try:
            await execute("block-export-del", {"id": export_id(target), "mode": "hard"})
        except VirtbusError as exc:
            log.info("block-export-del %s: %s", export_id(target), exc)
    try:
        await execute("nbd-server-stop")
    except VirtbusError as exc:
        log.info("nbd-server-stop: %s", exc)


def _by_id(reply: Any) -> dict[str, dict[str, Any]]:
    jobs = reply if isinstance(reply, list) else []
    return {str(j.get("id")): j for j in jobs if isinstance(j, dict)}


@dataclass(eq=False)
class Mirrors:
    """The source's mirrors of one migration (see module docstring).

    ``nodes``: target dev -> the disk's top node in the source QEMU. ``nbd`` is None for
    the mirrors a restarted agent found (:meth:`found`): they can only be aborted.
    """

    nbd: NbdTarget | None
    nodes: dict[str, str]
    poll: float = 0.2
    # returns when a job's status changed, or after the seconds given (None: just sleep)
    changed: Callable[[float], Awaitable[None]] | None = None
    top_only: bool = False  # copy-storage-inc: sync=top (the base is on the destination)
    speed: int = 0  # bytes/s per mirror; 0: unlimited
    tls: tuple[str, str] | None = None  # (client tls-creds object, the server's name)
    transferred: int = 0
    total: int = 0
    ready: bool = False
    done: bool = False  # finished or aborted: nothing of ours left in QEMU
    _started: list[str] = field(default_factory=list)  # targets with a mirror job
    _opened: list[str] = field(default_factory=list)  # targets with an NBD client node

    async def start(self, execute: Execute) -> None:
        """NBD client nodes and one mirror per disk; on failure what was made is undone."""
        if self.nbd is None:
            raise InvalidArgument("no NBD target to mirror the disks to")
        missing = sorted(set(self.nodes) - set(self.nbd.exports))
        if missing:
            raise InvalidArgument(f"the destination exports no disk {', '.join(missing)}")
        server = {"type": "inet", "host": self.nbd.host, "port": str(self.nbd.port)}
        tls = {"tls-creds": self.tls[0], "tls-hostname": self.tls[1]} if self.tls else {}
        try:
            for target, node in self.nodes.items():
                await execute("blockdev-add", {
                    "driver": "nbd", "node-name": nbd_node(target), "server": server,
                    "export": target, **tls,
                })  # fmt: skip
                self._opened.append(target)
                args: dict[str, Any] = {
                    "job-id": job_id(target), "device": node, "target": nbd_node(target),
                    "sync": "top" if self.top_only else "full", "auto-dismiss": False,
                }  # fmt: skip
                if self.speed:
                    args["speed"] = self.speed
                await execute("blockdev-mirror", args)
                self._started.append(target)
        except VirtbusError as exc:
            await self.abort(execute)
            raise MigrateFailed(f"cannot mirror the disks to {self.nbd.host}:{self.nbd.port}:"
                                f" {exc}") from exc  # fmt: skip

    @classmethod
    async def found(cls, execute: Execute, poll: float) -> Mirrors | None:
        """After an agent restart: the mirror jobs and NBD client nodes a copy-storage
        migration left in QEMU, by their names (as blockjobs.py finds its jobs again);
        None when there are none."""
        jobs = _by_id(await execute("query-jobs"))
        nodes = await execute("query-named-block-nodes")
        listed = nodes if isinstance(nodes, list) else []
        names = {str(n.get("node-name")) for n in listed if isinstance(n, dict)}
        started = sorted(i.removeprefix(JOB_PREFIX) for i in jobs if i.startswith(JOB_PREFIX))
        opened = sorted(n.removeprefix(NBD_PREFIX) for n in names if n.startswith(NBD_PREFIX))
        if not started and not opened:
            return None
        mirrors = cls(None, {}, poll=poll)
        mirrors._started, mirrors._opened = started, opened
        return mirrors

    async def _pause(self, seconds: float) -> None:
        if self.changed is None:
            await asyncio.sleep(seconds)
        else:
            await self.changed(seconds)

    def job_ids(self) -> list[str]:
        return [job_id(t) for t in self._started]

    async def _jobs(self, execute: Execute) -> dict[str, dict[str, Any]]:
        return _by_id(await execute("query-jobs"))

    def _failed(self, jobs: dict[str, dict[str, Any]]) -> str | None:
        for target in self._started:
            job = jobs.get(job_id(target))
            if job is None:
                return f"the mirror of disk '{target}' is gone"
            if job.get("status") in ("aborting", "concluded", "null"):
                why = job.get("error") or "it ended before the copy was complete"
                return f"the mirror of disk '{target}' failed: {why}"
        return None

    async def wait_ready(
        self, execute: Execute, progress: Callable[[], None], stop: Callable[[], bool]
    ) -> bool:
        """Poll until every mirror is ready (True) or ``stop()`` says to give up (False);
        ``progress`` is called with fresh ``transferred``/``total``; MigrateFailed when a
        mirror fails (the destination went away, an I/O error)."""
        while not stop():
            jobs = await self._jobs(execute)
            failed = self._failed(jobs)
            if failed:
                raise MigrateFailed(failed)
            mine = [jobs[job_id(t)] for t in self._started]
            self.transferred = sum(int(j.get("current-progress") or 0) for j in mine)
            self.total = sum(int(j.get("total-progress") or 0) for j in mine)
            progress()
            if all(j.get("status") == "ready" for j in mine):
                self.ready = True
                return True
            await self._pause(self.poll)
        return False

    async def _wait_ended(self, execute: Execute, timeout: float) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            jobs = await self._jobs(execute)
            mine = [jobs.get(job_id(t)) for t in self._started]
            if all(j is None or j.get("status") in ("concluded", "null") for j in mine):
                return jobs
            if time.monotonic() >= deadline:
                raise MigrateFailed(f"the disk mirrors did not end within {timeout:g} s")
            await self._pause(self.poll)

    async def finish(self, execute: Execute, timeout: float) -> None:
        """At ``pre-switchover`` (the guest stopped): cancel the ready mirrors, so each
        completes with the destination holding the disk as it is now; MigrateFailed when
        one is not ready or ends with an error."""
        failed = self._failed(await self._jobs(execute))
        if failed:
            raise MigrateFailed(failed)
        for target in self._started:
            await execute("block-job-cancel", {"device": job_id(target)})
        jobs = await self._wait_ended(execute, timeout)
        errors = [f"disk '{t}': {jobs[job_id(t)]['error']}" for t in self._started
                  if jobs.get(job_id(t), {}).get("error")]  # fmt: skip
        await self._close(execute)
        if errors:
            raise MigrateFailed(f"the disk mirrors did not complete: {'; '.join(errors)}")

    async def abort(self, execute: Execute, timeout: float = 10.0) -> None:
        """Cancel every mirror (``force``: no last sync) and close the NBD nodes; what
        fails is only logged (the QEMU may be gone)."""
        if self.done:
            return
        for target in self._started:
            try:
                await execute("block-job-cancel", {"device": job_id(target), "force": True})
            except VirtbusError as exc:
                log.info("block-job-cancel %s: %s", job_id(target), exc)
        with contextlib.suppress(VirtbusError):
            await self._wait_ended(execute, timeout)
        await self._close(execute)

    async def _close(self, execute: Execute) -> None:
        for target in self._started:
            try:
                await execute("job-dismiss", {"id": job_id(target)})
            except VirtbusError as exc:
                log.info("job-dismiss %s: %s", job_id(target), exc)
        for target in self._opened:
            try:
                await execute("blockdev-del", {"node-name": nbd_node(target)})
            except VirtbusError as exc:
                log.info("blockdev-del %s: %s", nbd_node(target), exc)
        self._started.clear()
        self._opened.clear()
        self.done = True
