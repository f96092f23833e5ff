"""``dir`` pools: a directory of image files (and the file-volume logic ``fs`` reuses).

Volumes are files named after the volume. Every file the pool writes for a volume is
first written under a hidden temporary name (``.NAME.<op>-<token>``) and then linked into
place, so a volume either exists complete or not at all: a failed create (the pool is
full, qemu-img failed, the job was cancelled) or an upload cut off halfway leaves nothing,
or the previous content. Two creates of one name cannot both win: the final link refuses
an existing name (the manager also serialises them).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any

import aiofiles.os

from drivers.storage.base import (
    BackendSettings,
    ImageSource,
    PoolScan,
    UploadSink,
    VolumeSpec,
)
from drivers.storage.tools import (
    Progress,
    ToolError,
    image_arg,
    qemu_img_info,
    run,
    run_with_progress,
)
from virtbus.errors import (
    InvalidArgument,
    NoStorageVol,
    NoSupport,
    OperationFailed,
    OperationInvalid,
)
from virtbus.storage import Backing, PoolDefinition, PoolSizes, VolumeFacts, check_name
from virtbus.store import fsync_path

TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?:create|clone|upload)-[0-9a-f]{12}$")
CREATE_FORMATS = ("raw", "qcow2")
_QCOW2_MAGIC = b"QFI\xfb"
_ZEROS = bytes(1 << 20)  # an all-zero chunk of the usual size is not written (a hole)


def temp_name(name: str, op: str) -> str:
    return f".{name}.{op}-{secrets.token_hex(6)}"


def _stamp(value: float) -> str:
    whole = int(value)
    return f"{whole}.{round((value - whole) * 1e9):09d}".rstrip("0").rstrip(".")


class DirBackend:
    """A directory of files (see module docstring)."""

    type = "dir"
    create_formats: tuple[str, ...] = CREATE_FORMATS
    files = True

    def __init__(self, settings: BackendSettings | None = None) -> None:
        self.settings = settings or BackendSettings()

    # ------------------------------------------------------------------ pool
    def check(self, pool: PoolDefinition) -> None:
        return None

    def target(self, pool: PoolDefinition) -> Path:
        assert pool.target_path is not None  # required for file pools (XML check)
        return Path(pool.target_path)

    async def build(self, pool: PoolDefinition, *, overwrite: bool | None) -> None:
        target = self.target(pool)
        await aiofiles.os.makedirs(target, exist_ok=True)
        perms = pool.target_permissions
        if perms is not None and perms.mode is not None:
            await aiofiles.os.wrap(os.chmod)(target, perms.mode)
        if perms is not None and (perms.owner is not None or perms.group is not None):
            owner = -1 if perms.owner is None else perms.owner
            group = -1 if perms.group is None else perms.group
            await aiofiles.os.wrap(os.chown)(target, owner, group)

    async def start(self, pool: PoolDefinition) -> None:
        target = self.target(pool)
        if not await aiofiles.os.path.isdir(target):
            raise OperationFailed(
                f"cannot start pool '{pool.name}': directory {target} does not exist"
                " (pool-build creates it)"
            )
        await self._remove_stale_temps(target)

    async def stop(self, pool: PoolDefinition) -> None:
        return None

    async def delete(self, pool: PoolDefinition) -> None:
        try:
            await aiofiles.os.rmdir(self.target(pool))
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise OperationInvalid(
                    f"cannot delete pool '{pool.name}': {self.target(pool)} is not empty"
                    " (delete its volumes first)"
                ) from None
            raise OperationFailed(f"cannot delete pool '{pool.name}': {exc}") from None

    async def active(self, pool: PoolDefinition) -> bool:
        return bool(await aiofiles.os.path.isdir(self.target(pool)))

    async def _remove_stale_temps(self, target: Path) -> None:
        """Temporaries of operations that died with an agent: never a volume."""
        for entry in await aiofiles.os.listdir(target):
            if TEMP_NAME.match(entry):
                with contextlib.suppress(FileNotFoundError):
                    await aiofiles.os.remove(target / entry)

    async def sizes(self, pool: PoolDefinition) -> PoolSizes:
        st = await aiofiles.os.wrap(os.statvfs)(self.target(pool))
        capacity = st.f_blocks * st.f_frsize
        available = st.f_bavail * st.f_frsize
        return PoolSizes(capacity, capacity - st.f_bfree * st.f_frsize, available)

    async def scan(self, pool: PoolDefinition, known: dict[str, str]) -> PoolScan:
        target = self.target(pool)
        try:
            entries = await aiofiles.os.listdir(target)
        except FileNotFoundError:
            raise OperationFailed(
                f"pool '{pool.name}': directory {target} does not exist any more"
            ) from None
        volumes = []
        for entry in sorted(entries):
            if TEMP_NAME.match(entry):
                continue
            try:
                check_name(entry)
            except InvalidArgument:
                continue  # a file no volume name can reach ("-x", control characters)
            try:
                volumes.append(await self.volume(pool, entry, known.get(entry)))
            except (NoStorageVol, NoSupport):
                continue  # vanished meanwhile, or not a file (a socket, a sub-directory)
        return PoolScan(await self.sizes(pool), tuple(volumes))

    # ------------------------------------------------------------------ volumes
    def path(self, pool: PoolDefinition, name: str) -> Path:
        return self.target(pool) / check_name(name)

    async def volume(self, pool: PoolDefinition, name: str, fmt: str | None) -> VolumeFacts:
        path = self.path(pool, name)
        try:
            st = await aiofiles.os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            raise NoStorageVol(
                f"no storage vol with matching name '{name}' in pool '{pool.name}'"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise NoSupport(f"{path} is not a regular file")
        fmt = fmt or await self._probe(path)
        capacity, backing = st.st_size, None
        if fmt != "raw":
            info = await qemu_img_info(str(path), timeout=self.settings.tool_timeout, fmt=fmt)
            capacity = int(info.get("virtual-size", st.st_size))
            bpath = info.get("full-backing-filename") or info.get("backing-filename")
            if isinstance(bpath, str) and bpath:
                bfmt = info.get("backing-filename-format")
                backing = Backing(bpath, bfmt if isinstance(bfmt, str) else None)
        return VolumeFacts(
            name=name,
            type="file",
            path=str(path),
            key=str(path),
            format=fmt,
            capacity=capacity,
            allocation=st.st_blocks * 512,
            physical=st.st_size,
            backing=backing,
            mode=stat.S_IMODE(st.st_mode),
            owner=st.st_uid,
            group=st.st_gid,
            timestamps={
                "atime": _stamp(st.st_atime),
                "mtime": _stamp(st.st_mtime),
                "ctime": _stamp(st.st_ctime),
            },
        )

    async def _probe(self, path: Path) -> str:
        """A file adopted without a stored format: qcow2 by its magic, else raw."""

        def head() -> bytes:
            with open(path, "rb") as fh:
                return fh.read(4)

        return "qcow2" if await asyncio.to_thread(head) == _QCOW2_MAGIC else "raw"

    def _create_argv(self, spec: VolumeSpec, dest: Path) -> list[str]:
        argv = ["qemu-img", "create", "-q", "-f", spec.format]
        opts: list[str] = []
        if spec.format == "qcow2":
            if spec.compat:
                opts.append(f"compat={spec.compat}")
            if spec.lazy_refcounts:
                opts.append("lazy_refcounts=on")
            if spec.cluster_size:
                opts.append(f"cluster_size={spec.cluster_size}")
            if spec.prealloc_metadata:
                opts.append("preallocation=metadata")
        elif spec.format == "raw" and spec.capacity and spec.allocation is None:
            opts.append("preallocation=falloc")  # libvirt: absent allocation = capacity
        elif spec.format == "raw" and spec.capacity and spec.allocation == spec.capacity:
            opts.append("preallocation=falloc")
        if opts:
            argv += ["-o", ",".join(opts)]
        if spec.backing is not None:
            argv += ["-b", spec.backing.path]
            if spec.backing.format:
                argv += ["-F", spec.backing.format]
        argv += image_arg(str(dest))
        if spec.capacity is not None:
            argv.append(str(spec.capacity))
        return argv

    async def create(
        self, pool: PoolDefinition, spec: VolumeSpec, progress: Progress | None
    ) -> VolumeFacts:
        final = self.path(pool, spec.name)
        if spec.format not in self.create_formats:
            raise NoSupport(
                f"cannot create volume '{spec.name}' in {self.type} pool '{pool.name}' with"
                f" format '{spec.format}' ({', '.join(self.create_formats)} can be created)"
            )
        if spec.backing is not None and spec.format == "raw":
            raise InvalidArgument(f"a raw volume cannot have a backing store ('{spec.name}')")
        temp = final.with_name(temp_name(spec.name, "create"))

        async def make() -> None:
            await run(
                self._create_argv(spec, temp),
                timeout=self.settings.tool_timeout,
                what=f"create volume '{spec.name}'",
            )
            if (
                spec.format == "raw"
                and spec.allocation
                and spec.capacity
                and (0 < spec.allocation < spec.capacity)
            ):
                await asyncio.to_thread(_fallocate, temp, spec.allocation)

        return await self._in_place(pool, spec, temp, final, make)

    async def clone(
        self,
        pool: PoolDefinition,
        spec: VolumeSpec,
        source: ImageSource,
        progress: Progress | None,
    ) -> VolumeFacts:
        final = self.path(pool, spec.name)
        if spec.format not in self.create_formats:
            raise NoSupport(f"cannot write format '{spec.format}' in pool '{pool.name}'")
        temp = final.with_name(temp_name(spec.name, "clone"))

        async def make() -> None:
            argv = ["qemu-img", "convert", "-p", "-f", source.format, "-O", spec.format]
            if spec.format == "qcow2" and spec.compat:
                argv += ["-o", f"compat={spec.compat}"]
            argv += [*image_arg(source.spec), *image_arg(str(temp))]
            await run_with_progress(
                argv, what=f"clone into '{spec.name}'", total=source.capacity, progress=progress
            )
            if spec.capacity is not None and spec.capacity > source.capacity:
                grow = ["qemu-img", "resize", "-q", "-f", spec.format, *image_arg(str(temp))]
                await run(
                    [*grow, str(spec.capacity)],
                    timeout=self.settings.tool_timeout,
                    what=f"grow '{spec.name}'",
                )

        return await self._in_place(pool, spec, temp, final, make)

    async def _in_place(
        self, pool: PoolDefinition, spec: VolumeSpec, temp: Path, final: Path, make: Any
    ) -> VolumeFacts:
        """Run ``make`` (writes ``temp``), then link ``temp`` to ``final`` (never replacing
        a volume); on any failure, cancellation included, nothing is left behind.

        The data is not fsynced (as qemu-img and libvirt do not): the link comes after
        every write, so a crashed agent never leaves a half volume under its name; a lost
        host may lose what the page cache held, as for any qemu-img copy.
        """
        try:
            await make()
            if spec.mode is not None:
                await aiofiles.os.wrap(os.chmod)(temp, spec.mode)
            try:
                await aiofiles.os.link(temp, final)
            except FileExistsError:
                raise OperationFailed(
                    f"storage volume '{spec.name}' already exists in pool '{pool.name}'"
                ) from None
        except ToolError as exc:
            if exc.no_space:
                raise OperationFailed(
                    f"cannot create volume '{spec.name}': pool '{pool.name}' is full"
                    f" (No space left on device)"
                ) from None
            raise
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OperationFailed(
                    f"cannot create volume '{spec.name}': pool '{pool.name}' is full"
                    " (No space left on device)"
                ) from None
            raise OperationFailed(f"cannot create volume '{spec.name}': {exc}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                await aiofiles.os.remove(temp)
        await aiofiles.os.wrap(fsync_path)(final.parent)
        return await self._made(pool, spec, final)

    async def _made(self, pool: PoolDefinition, spec: VolumeSpec, path: Path) -> VolumeFacts:
        """The facts of a volume just made: what the spec says plus a stat (no qemu-img
        info unless the capacity came from a backing store)."""
        if spec.capacity is None:
            return await self.volume(pool, spec.name, spec.format)
        st = await aiofiles.os.stat(path)
        return VolumeFacts(
            name=spec.name, type="file", path=str(path), key=str(path), format=spec.format,
            capacity=spec.capacity if spec.format != "raw" else st.st_size,
            allocation=st.st_blocks * 512, physical=st.st_size, backing=spec.backing,
            mode=stat.S_IMODE(st.st_mode), owner=st.st_uid, group=st.st_gid,
        )  # fmt: skip

    async def remove(self, pool: PoolDefinition, facts: VolumeFacts) -> None:
        try:
            await aiofiles.os.remove(self.path(pool, facts.name))
        except FileNotFoundError:
            raise NoStorageVol(f"no storage vol with matching name '{facts.name}'") from None

    async def wipe(
        self,
        pool: PoolDefinition,
        facts: VolumeFacts,
        algorithm: str,
        progress: Progress | None,
    ) -> None:
        path = self.path(pool, facts.name)
        await wipe_path(
            str(path),
            algorithm,
            facts.physical,
            self.settings,
            progress,
            sparse=facts.allocation < facts.physical,
        )

    async def resize(
        self,
        pool: PoolDefinition,
        facts: VolumeFacts,
        capacity: int,
        *,
        shrink: bool,
        allocate: bool,
    ) -> None:
        argv = ["qemu-img", "resize", "-q", "-f", facts.format]
        if shrink:
            argv.append("--shrink")
        if allocate:
            argv.append("--preallocation=falloc")
        argv += [*image_arg(facts.path), str(capacity)]
        try:
            await run(argv, timeout=self.settings.tool_timeout, what=f"resize '{facts.name}'")
        except ToolError as exc:
            if exc.no_space:
                raise OperationFailed(
                    f"cannot resize '{facts.name}': pool '{pool.name}' is full"
                ) from None
            raise

    def image(self, pool: PoolDefinition, facts: VolumeFacts) -> ImageSource:
        return ImageSource(facts.path, facts.format, facts.capacity, kind="file")

    async def upload(self, pool: PoolDefinition, facts: VolumeFacts, length: int) -> UploadSink:
        final = self.path(pool, facts.name)
        temp = final.with_name(temp_name(facts.name, "upload"))
        return await FileUpload.open(temp, final, length, facts.mode)

    def download_path(self, pool: PoolDefinition, facts: VolumeFacts) -> str:
        return facts.path


def _fallocate(path: Path, length: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, length)
    finally:
        os.close(fd)


class FileUpload:
    """An upload into a temporary file renamed over the volume on commit."""

    def __init__(self, fd: int, temp: Path, final: Path) -> None:
        self._fd: int | None = fd
        self.temp, self.final = temp, final

    @classmethod
    async def open(cls, temp: Path, final: Path, length: int, mode: int | None) -> FileUpload:
        def make() -> int:
            fd = os.open(
                temp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                mode if mode is not None else 0o600,
            )
            try:
                os.ftruncate(fd, length)  # sparse: all-zero chunks need no write
            except BaseException:
                os.close(fd)
                os.unlink(temp)
                raise
            return fd

        return cls(await asyncio.to_thread(make), temp, final)

    async def write(self, offset: int, data: bytes) -> None:
        if self._fd is None:
            raise OperationInvalid("upload already finished")
        if len(data) == len(_ZEROS) and data == _ZEROS:
            return  # a hole: the file was truncated to its length
        fd = self._fd

        def put() -> None:
            view = memoryview(data)
            pos = offset
            while view:
                done = os.pwrite(fd, view, pos)
                view, pos = view[done:], pos + done

        try:
            await asyncio.to_thread(put)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OperationFailed(
                    "upload: the pool is full (No space left on device)"
                ) from None
            raise OperationFailed(f"upload: {exc}") from None

    async def commit(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            raise OperationInvalid("upload already finished")

        def finish() -> None:
            os.close(fd)  # every write is done: the rename can only show a whole upload
            os.replace(self.temp, self.final)
            fsync_path(self.final.parent)

        try:
            await asyncio.to_thread(finish)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp)
            raise

    async def abort(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            await aiofiles.os.remove(self.temp)


async def wipe_path(
    path: str,
    algorithm: str,
    size: int,
    settings: BackendSettings,
    progress: Progress | None,
    *,
    sparse: bool = False,
) -> None:
    """libvirt's wipe: ``zero`` writes zeros (a sparse file is punched instead), the other
    algorithms are scrub's patterns (``scrub -f -p ALG``), ``trim`` is not supported."""
    if algorithm == "trim":
        raise NoSupport("wipe algorithm 'trim' is not supported (as in libvirt)")
    if algorithm != "zero":
        await run_with_progress(
            ["scrub", "-f", "-p", algorithm, path],
            what=f"wipe {path} ({algorithm})",
            total=size,
            progress=progress,
        )
        return
    chunk = settings.io_chunk

    def punch() -> None:
        with open(path, "r+b") as fh:
            fh.truncate(0)
            fh.truncate(size)
            os.fsync(fh.fileno())

    if sparse:
        await asyncio.to_thread(punch)
        if progress is not None:
            progress(size, size)
        return
    fd = await asyncio.to_thread(os.open, path, os.O_WRONLY | os.O_CLOEXEC)
    zeros = bytes(chunk)
    try:
        done = 0
        while done < size:  # cancellable between chunks
            n = min(chunk, size - done)
            await asyncio.to_thread(os.pwrite, fd, zeros[:n], done)
            done += n
            if progress is not None:
                progress(done, size)
        await asyncio.to_thread(os.fsync, fd)
    finally:
        os.close(fd)
