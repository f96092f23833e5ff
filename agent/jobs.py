"""Long operations as jobs: an id, progress events, cancel, and a record that survives.

A job is a named, supervised task running one long operation (a volume clone, wipe,
upload or download today; block jobs and backups later). Starting one returns at once,
so a long operation never holds up other ops on the host: callers follow it by its id
(``info``/``wait``) or by its events on the bus.

Each job has a record, ``<state-dir>/jobs/<id>.json``, written atomically when it starts
and when it ends (progress is not written: it is only news). A restarted agent reads the
records back: a job that was still running when the agent died is marked ``failed``
("agent restarted") and its kind's *recovery* handler is called with the record, so it
can remove what the job left half-done (a temporary file, a partition). A job that is
cancelled, fails or is interrupted by an agent stop cleans up in its own ``finally``.

Events (published by the ``sink`` the agent hands in, numbered like every other event):
``started``, ``progress`` (at most one per ``progress_interval`` per job), ``completed``,
``failed``, ``cancelled``; the body's ``data`` is the job's map.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiofiles.os

from virtbus.aio import TaskGroup
from virtbus.errors import (
    AuthDenied,
    InvalidArgument,
    OperationFailed,
    OperationTimeout,
    VirtbusError,
)
from virtbus.store import atomic_write, quarantine, read_bytes

log = logging.getLogger(__name__)


class JobState(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True, slots=True)
class JobSettings:
    max_running: int = 16  # jobs running at once on a host; more are refused
    progress_interval: float = 0.5  # s between progress events of one job
    keep_finished: int = 200  # finished jobs remembered (records on disk too)


@dataclass(slots=True)
class Job:
    id: str
    kind: str  # e.g. "vol.clone", "vol.wipe", "vol.upload"
    target: dict[str, str]  # what it works on: {"pool", "volume"} or {"domain"}
    state: JobState = JobState.RUNNING
    processed: int = 0
    total: int = 0
    started: float = field(default_factory=time.time)
    ended: float | None = None
    error: dict[str, str] | None = None  # {"code", "message"}
    result: dict[str, Any] | None = None
    recovery: dict[str, Any] = field(default_factory=dict)  # what a recovery handler needs
    owner: str | None = None  # the bus user whose call started it
    bound: bool = False  # a transfer: only its owner may feed, finish or cancel it

    def check_driver(self, user: str | None, verb: str) -> None:
        """Refuse ``user`` driving a bound job (a transfer's chunks, finish, cancel) that
        another user started: like libvirt's stream, which belongs to the connection that
        opened it, a transfer belongs to its caller, whatever another user's role (an
        admin too): a job id is seen in job.list and the job events."""
        if self.bound and user != self.owner:
            raise AuthDenied(
                f"'{user}' may not {verb} job {self.id} ({self.kind}): "
                "a transfer belongs to the user that began it"
            )

    def to_map(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "target": dict(self.target),
            "state": self.state.value,
            "processed": self.processed,
            "total": self.total,
            "started": self.started,
            "ended": self.ended,
            "error": self.error,
            "result": self.result,
            "owner": self.owner,
        }

    def record(self) -> dict[str, Any]:
        return {**self.to_map(), "recovery": self.recovery, "bound": self.bound}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Job:
        return cls(
            id=str(data["id"]),
            kind=str(data["kind"]),
            target={str(k): str(v) for k, v in dict(data.get("target") or {}).items()},
            state=JobState(data["state"]),
            processed=int(data.get("processed") or 0),
            total=int(data.get("total") or 0),
            started=float(data.get("started") or 0.0),
            ended=None if data.get("ended") is None else float(data["ended"]),
            error=data.get("error"),
            result=data.get("result"),
            recovery=dict(data.get("recovery") or {}),
            owner=None if data.get("owner") is None else str(data["owner"]),
            bound=bool(data.get("bound")),
        )


JobSink = Callable[[Job, str], None]  # (job, event name): never blocks
Recovery = Callable[[Job], Awaitable[None]]


class JobContext:
    """What a running job's work gets: progress reporting and its recovery record."""

    def __init__(self, job: Job, manager: JobManager) -> None:
        self.job = job
        self._manager = manager
        self._last_event = 0.0

    def progress(self, processed: int, total: int | None = None) -> None:
        job = self.job
        job.processed = processed
        if total is not None:
            job.total = total
        now = time.monotonic()
        if now - self._last_event >= self._manager.settings.progress_interval:
            self._last_event = now
            self._manager.emit(job, "progress")

    async def remember(self, **recovery: Any) -> None:
        """Record what a restarted agent needs to undo this job (written before use)."""
        self.job.recovery.update(recovery)
        await self._manager.save(self.job)


Work = Callable[[JobContext], Awaitable[dict[str, Any] | None]]


class JobManager:
    """The host's jobs (see module docstring)."""

    def __init__(self, directory: Path, sink: JobSink, settings: JobSettings | None = None) -> None:
        self.directory = directory
        self.settings = settings or JobSettings()
        self._sink = sink
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._done: dict[str, asyncio.Event] = {}
        self._recovery: dict[str, Recovery] = {}
        self._group = TaskGroup("jobs")
        self._closing = False

    def emit(self, job: Job, event: str) -> None:
        self._sink(job, event)

    def register_recovery(self, kind: str, handler: Recovery) -> None:
        """``handler(job)`` undoes what a job of ``kind`` left when the agent died."""
        self._recovery[kind] = handler

    # --- records ----------------------------------------------------------------------
    def _path(self, job_id: str) -> Path:
        return self.directory / f"{job_id}.json"

    async def save(self, job: Job) -> None:
        await aiofiles.os.makedirs(self.directory, exist_ok=True)
        data = json.dumps(job.record(), separators=(",", ":")).encode()
        await atomic_write(self._path(job.id), data, fsync=False)  # survives the agent

    async def load(self) -> list[Job]:
        """Read the records back; jobs that were running are failed and recovered.
        Returns the jobs that were interrupted."""
        await aiofiles.os.makedirs(self.directory, exist_ok=True)
        interrupted: list[Job] = []
        jobs: list[Job] = []
        for entry in sorted(await aiofiles.os.listdir(self.directory)):
            if not entry.endswith(".json"):
                continue
            path = self.directory / entry
            try:
                job = Job.from_record(json.loads((await read_bytes(path)) or b""))
            except (ValueError, KeyError, TypeError) as exc:
                await quarantine(path, f"unreadable job record: {exc!r}")
                continue
            jobs.append(job)
        for job in sorted(jobs, key=lambda j: j.started):
            if job.state is JobState.RUNNING:
                interrupted.append(job)
                job.state, job.ended = JobState.FAILED, time.time()
                job.error = {"code": "OPERATION_FAILED", "message": "the agent restarted"}
                handler = self._recovery.get(job.kind)
                if handler is not None:
                    try:
                        await handler(job)
                    except (VirtbusError, OSError) as exc:
                        log.error("job %s (%s): recovery failed: %s", job.id, job.kind, exc)
                await self.save(job)
                self.emit(job, "failed")
            self._jobs[job.id] = job
        await self._trim()
        return interrupted

    async def _trim(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in FINISHED]
        for job in finished[: max(0, len(finished) - self.settings.keep_finished)]:
            del self._jobs[job.id]
            self._done.pop(job.id, None)
            with contextlib.suppress(FileNotFoundError):
                await aiofiles.os.remove(self._path(job.id))

    # --- running ----------------------------------------------------------------------
    async def start(
        self,
        kind: str,
        target: dict[str, str],
        work: Work,
        *,
        total: int = 0,
        recovery: dict[str, Any] | None = None,
        owner: str | None = None,
        bound: bool = False,
    ) -> Job:
        """Record and start a job; returns at once (the work runs in its own task).
        ``owner`` is the caller that started it; a ``bound`` job (a transfer) is driven by
        that caller only (:meth:`Job.check_driver`)."""
        if self._closing:
            raise OperationFailed("the agent is stopping: no new jobs")
        running = sum(1 for j in self._jobs.values() if j.state is JobState.RUNNING)
        if running >= self.settings.max_running:
            raise OperationFailed(
                f"{running} jobs are running on this host (the limit): try again later"
            )
        job = Job(secrets.token_hex(8), kind, dict(target), total=total,
                  recovery=dict(recovery or {}), owner=owner, bound=bound)  # fmt: skip
        self._jobs[job.id] = job
        self._done[job.id] = asyncio.Event()
        await self.save(job)
        self.emit(job, "started")
        self._tasks[job.id] = self._group.spawn(self._run(job, work), name=f"job-{kind}-{job.id}")
        await asyncio.sleep(0)  # let it enter its work: a cancel then reaches its cleanup
        return job

    async def _run(self, job: Job, work: Work) -> None:
        ctx = JobContext(job, self)
        try:
            job.result = await work(ctx) or {}
            job.state = JobState.COMPLETED
            if job.total and job.processed < job.total:
                job.processed = job.total
        except asyncio.CancelledError:
            job.state = JobState.CANCELLED
            if self._closing:
                job.state = JobState.FAILED
                job.error = {"code": "OPERATION_FAILED", "message": "the agent stopped"}
            await self._finish(job)
            raise
        except VirtbusError as exc:
            job.state, job.error = JobState.FAILED, exc.to_wire()
        except Exception as exc:  # a bug must end the job, not leave it running forever
            log.exception("job %s (%s) failed unexpectedly", job.id, job.kind)
            job.state = JobState.FAILED
            job.error = {"code": "INTERNAL_ERROR", "message": f"{type(exc).__name__}: {exc}"}
        await self._finish(job)

    async def _finish(self, job: Job) -> None:
        job.ended = time.time()
        self._tasks.pop(job.id, None)
        try:
            await asyncio.shield(self.save(job))
        except OSError as exc:
            log.error("job %s: cannot write its record: %s", job.id, exc)
        self.emit(job, job.state.value)
        done = self._done.get(job.id)
        if done is not None:
            done.set()
        await self._trim()

    # --- queries and control ----------------------------------------------------------
    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise InvalidArgument(f"no job with id '{job_id}' on this host")
        return job

    def jobs(self, *, all_jobs: bool = True) -> list[Job]:
        return [j for j in self._jobs.values() if all_jobs or j.state is JobState.RUNNING]

    def running_for(self, **target: str) -> list[Job]:
        """Running jobs whose target includes ``target`` (e.g. pool='p')."""
        return [
            j
            for j in self._jobs.values()
            if j.state is JobState.RUNNING and all(j.target.get(k) == v for k, v in target.items())
        ]

    async def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        task = self._tasks.get(job_id)
        if job.state is not JobState.RUNNING or task is None:
            return job  # already over: cancel is idempotent
        task.cancel()
        await asyncio.wait([task])
        if job.state is JobState.RUNNING:  # cancelled before it ever ran
            job.state = JobState.CANCELLED
            await self._finish(job)
        return job

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Until the job is over (OperationTimeout past ``timeout``)."""
        job = self.get(job_id)
        done = self._done.get(job_id)
        if job.state in FINISHED or done is None:
            return job
        try:
            async with asyncio.timeout(timeout):
                await done.wait()
        except TimeoutError:
            raise OperationTimeout(f"job {job_id} still running after {timeout:g} s") from None
        return job

    async def close(self) -> None:
        """Agent stop: every running job is cancelled (it cleans up) and recorded failed."""
        self._closing = True
        await self._group.cancel_all()
