"""Storage in the client: a host's pools, their volumes, and jobs (``Host.pool(name)``).

Transfers (vol-upload, vol-download) move bounded chunks with flow control: at most the
agent's ``window`` chunks in flight, so memory on both sides stays at ``window`` x
``chunk_size`` whatever the file's size. A failed or interrupted upload cancels its job:
the volume keeps its previous content.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from virtbus.errors import OperationFailed, VirtbusError, error_from_wire
from virtbus.protocol import ops
from virtbus.protocol.base import Empty
from virtbus.protocol.storage import (
    DownloadChunkRequest,
    JobInfo,
    JobWait,
    PoolAutostart,
    PoolBuild,
    PoolInfo,
    PoolStart,
    PoolTarget,
    TransferTarget,
    UploadChunk,
    UploadRequest,
    VolumeCreate,
    VolumeCreateFrom,
    VolumeInfo,
    VolumePoolRequest,
    VolumeResize,
    VolumeTarget,
    VolumeWipe,
    WipeAlgorithm,
)

if TYPE_CHECKING:
    from virtbus.client.core import Host

Progress = Callable[[int, int], None]  # (bytes done, total)
JOB_POLL = 5.0  # s the agent may hold a job.wait (well under a call deadline)


class Job:
    """A long operation on one host."""

    def __init__(self, host: Host, info: JobInfo) -> None:
        self.host = host
        self.id = info.id
        self.last = info

    async def info(self) -> JobInfo:
        self.last = await self.host.call(ops.JOB_INFO, TransferTarget(job=self.id))
        return self.last

    async def follow(self) -> AsyncIterator[JobInfo]:
        """The job's state every few seconds (a long poll), until it has ended."""
        while True:
            self.last = await self.host.call(ops.JOB_WAIT, JobWait(job=self.id, timeout=JOB_POLL))
            yield self.last
            if self.last.state != "running":
                return

    async def wait(self, progress: Progress | None = None) -> JobInfo:
        """Until the job ends; its error raised as the virtbus error it was."""
        async for info in self.follow():
            if progress is not None:
                progress(info.processed, info.total)
        if self.last.state != "completed":
            if self.last.error:
                raise error_from_wire(self.last.error)
            raise OperationFailed(f"job {self.id} was {self.last.state}")
        return self.last

    async def cancel(self) -> JobInfo:
        self.last = await self.host.call(ops.JOB_CANCEL, TransferTarget(job=self.id))
        return self.last


class Pool:
    """One storage pool of one host (``ref``: name or UUID)."""

    def __init__(self, host: Host, ref: str) -> None:
        self.host = host
        self.ref = ref

    def __repr__(self) -> str:
        return f"Pool({self.ref!r} on {self.host.name!r})"

    @property
    def _target(self) -> PoolTarget:
        return PoolTarget(pool=self.ref)

    async def info(self) -> PoolInfo:
        return await self.host.call(ops.STORAGE_POOL_INFO, self._target)

    async def xml(self) -> str:
        return (await self.host.call(ops.STORAGE_POOL_XML, self._target)).xml

    async def build(self, overwrite: bool | None = None) -> None:
        await self.host.call(ops.STORAGE_POOL_BUILD, PoolBuild(pool=self.ref, overwrite=overwrite))

    async def start(self, build: bool = False, overwrite: bool | None = None) -> PoolInfo:
        request = PoolStart(pool=self.ref, build=build, overwrite=overwrite)
        return await self.host.call(ops.STORAGE_POOL_START, request)

    async def destroy(self) -> None:
        await self.host.call(ops.STORAGE_POOL_DESTROY, self._target)

    async def delete(self) -> None:
        await self.host.call(ops.STORAGE_POOL_DELETE, self._target)

    async def undefine(self) -> None:
        await self.host.call(ops.STORAGE_POOL_UNDEFINE, self._target)

    async def refresh(self) -> PoolInfo:
        return await self.host.call(ops.STORAGE_POOL_REFRESH, self._target)

    async def set_autostart(self, autostart: bool = True) -> PoolInfo:
        request = PoolAutostart(pool=self.ref, autostart=autostart)
        return await self.host.call(ops.STORAGE_POOL_AUTOSTART, request)

    async def volumes(self) -> list[VolumeInfo]:
        return (
            await self.host.call(ops.STORAGE_VOL_LIST, VolumePoolRequest(pool=self.ref))
        ).volumes

    def volume(self, name: str) -> Volume:
        return Volume(self, name)

    async def create_volume(self, xml: str, prealloc_metadata: bool = False) -> VolumeInfo:
        request = VolumeCreate(pool=self.ref, xml=xml, prealloc_metadata=prealloc_metadata)
        return await self.host.call(ops.STORAGE_VOL_CREATE, request)

    async def create_volume_from(self, xml: str, source_pool: str, source: str) -> Job:
        """vol-create-from: a job copying ``source`` into the new volume."""
        request = VolumeCreateFrom(pool=self.ref, xml=xml, source_pool=source_pool,
                                   source=source)  # fmt: skip
        return Job(self.host, await self.host.call(ops.STORAGE_VOL_CREATE_FROM, request))


class Volume:
    """One volume of one pool."""

    def __init__(self, pool: Pool, name: str) -> None:
        self.pool = pool
        self.name = name

    def __repr__(self) -> str:
        return f"Volume({self.name!r} in {self.pool!r})"

    @property
    def host(self) -> Host:
        return self.pool.host

    @property
    def _target(self) -> VolumeTarget:
        return VolumeTarget(pool=self.pool.ref, volume=self.name)

    async def info(self) -> VolumeInfo:
        return await self.host.call(ops.STORAGE_VOL_INFO, self._target)

    async def xml(self) -> str:
        return (await self.host.call(ops.STORAGE_VOL_XML, self._target)).xml

    async def delete(self) -> None:
        await self.host.call(ops.STORAGE_VOL_DELETE, self._target)

    async def wipe(self, algorithm: WipeAlgorithm = "zero") -> Job:
        request = VolumeWipe(pool=self.pool.ref, volume=self.name, algorithm=algorithm)
        return Job(self.host, await self.host.call(ops.STORAGE_VOL_WIPE, request))

    async def resize(self, capacity: int, *, delta: bool = False, shrink: bool = False,
                     allocate: bool = False) -> VolumeInfo:  # fmt: skip
        request = VolumeResize(pool=self.pool.ref, volume=self.name, capacity=capacity,
                               delta=delta, shrink=shrink, allocate=allocate)  # fmt: skip
        return await self.host.call(ops.STORAGE_VOL_RESIZE, request)

    async def upload(self, path: Path, progress: Progress | None = None) -> VolumeInfo:
        """vol-upload: the file becomes the volume's content (all of it, or none)."""
        length = (await asyncio.to_thread(os.stat, path)).st_size
        request = UploadRequest(pool=self.pool.ref, volume=self.name, length=length)
        start = await self.host.call(ops.STORAGE_VOL_UPLOAD, request)
        job = start.job.id
        size, window = start.chunk_size, max(1, start.window)
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pending: set[asyncio.Task[object]] = set()
            offset = done = 0
            while offset < length or pending:
                while offset < length and len(pending) < window:
                    data = await asyncio.to_thread(os.pread, fd, min(size, length - offset), offset)
                    if not data:
                        raise OperationFailed(f"{path} shrank while it was uploaded")
                    chunk = UploadChunk(job=job, offset=offset, data=data)
                    pending.add(asyncio.ensure_future(
                        self.host.call(ops.STORAGE_VOL_UPLOAD_CHUNK, chunk)))  # fmt: skip
                    offset += len(data)
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    task.result()  # an error ends the upload
                    done = min(length, done + size)
                if progress is not None:
                    progress(min(done, length), length)
            return await self.host.call(ops.STORAGE_VOL_UPLOAD_FINISH, TransferTarget(job=job))
        except BaseException:
            for task in pending:
                task.cancel()
            with contextlib.suppress(VirtbusError):
                await self.host.call(ops.JOB_CANCEL, TransferTarget(job=job))
            raise
        finally:
            os.close(fd)

    async def download(self, path: Path, progress: Progress | None = None) -> int:
        """vol-download into ``path``; the number of bytes written."""
        start = await self.host.call(ops.STORAGE_VOL_DOWNLOAD, self._target)
        job, length = start.job.id, start.length
        size, window = start.chunk_size, max(1, start.window)
        fd = await asyncio.to_thread(
            os.open, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644
        )
        try:
            offsets = list(range(0, length, size))
            done = 0
            for first in range(0, len(offsets), window):
                batch = offsets[first : first + window]
                chunks = await asyncio.gather(*(
                    self.host.call(ops.STORAGE_VOL_DOWNLOAD_CHUNK,
                                   DownloadChunkRequest(job=job, offset=o)) for o in batch
                ))  # fmt: skip
                for o, chunk in zip(batch, chunks, strict=True):
                    await asyncio.to_thread(os.pwrite, fd, chunk.data, o)
                    done += len(chunk.data)
                if progress is not None:
                    progress(done, length)
            await asyncio.to_thread(os.ftruncate, fd, length)
            await self.host.call(ops.STORAGE_VOL_DOWNLOAD_FINISH, TransferTarget(job=job))
            return done
        except BaseException:
            with contextlib.suppress(VirtbusError):
                await self.host.call(ops.JOB_CANCEL, TransferTarget(job=job))
            raise
        finally:
            os.close(fd)


async def host_jobs(host: Host) -> list[JobInfo]:
    return (await host.call(ops.JOB_LIST, Empty())).jobs
