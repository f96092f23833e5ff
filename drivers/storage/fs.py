"""``fs`` pools: a block device holding a file system the pool mounts on its target.

Once mounted it is a directory pool (:class:`DirBackend`). ``pool-build`` makes the
target directory; with ``--overwrite`` it also makes the file system (``mkfs -t FORMAT``),
with ``--no-overwrite`` only when ``blkid`` finds none on the device (libvirt's rule).
Mounts get ``nodev,nosuid,noexec`` (libvirt's defaults) plus the pool's ``<fs:mount_opts>``.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
from pathlib import Path

import aiofiles.os

from drivers.storage.dir import DirBackend
from drivers.storage.tools import ToolError, run
from virtbus.errors import InvalidArgument, OperationFailed, OperationInvalid
from virtbus.storage import PoolDefinition, PoolSizes

FS_NS = "http://libvirt.org/schemas/storagepool/fs/1.0"
DEFAULT_MOUNT_OPTIONS = ("nodev", "nosuid", "noexec")
_OPTION = re.compile(r"^[A-Za-z0-9_.=:-]+$")
#: mkfs' "overwrite whatever is there" flag per file system
_FORCE = {"ext2": "-F", "ext3": "-F", "ext4": "-F", "xfs": "-f", "btrfs": "-f", "gfs2": "-O"}


def mount_options(pool: PoolDefinition) -> list[str]:
    opts = list(DEFAULT_MOUNT_OPTIONS)
    for el in pool.root.iter(f"{{{FS_NS}}}option"):
        name = el.get("name") or ""
        if not _OPTION.match(name):
            raise InvalidArgument(f"invalid mount option {name!r} in pool '{pool.name}'")
        opts.append(name)
    return opts


async def mounted_device(target: Path) -> int | None:
    """The st_rdev of the device mounted on ``target`` (per /proc/self/mountinfo), or None."""

    def read() -> str:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            return fh.read()

    text = await asyncio.to_thread(read)
    found = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4].replace("\\040", " ") == str(target):
            major, _, minor = fields[2].partition(":")
            found = os.makedev(int(major), int(minor))  # the last mount on top wins
    return found


class FsBackend(DirBackend):
    type = "fs"

    def device(self, pool: PoolDefinition) -> str:
        return pool.source.devices[0]

    async def _device_rdev(self, pool: PoolDefinition) -> int:
        dev = self.device(pool)
        try:
            st = await aiofiles.os.stat(dev)
        except FileNotFoundError:
            raise OperationFailed(
                f"pool '{pool.name}': source device {dev} does not exist"
            ) from None
        if not stat.S_ISBLK(st.st_mode):
            raise OperationFailed(f"pool '{pool.name}': {dev} is not a block device")
        return int(st.st_rdev)

    async def build(self, pool: PoolDefinition, *, overwrite: bool | None) -> None:
        await super().build(pool, overwrite=overwrite)
        if overwrite is None:
            return
        await self._device_rdev(pool)
        fmt = pool.source_format
        if fmt in (None, "auto"):
            raise InvalidArgument(
                f"cannot make a file system on pool '{pool.name}': <source><format> is auto"
            )
        dev = self.device(pool)
        if overwrite is False:
            found = await self._probe_fs(dev)
            if found:
                raise OperationInvalid(
                    f"device {dev} already holds a {found} file system: pool-build"
                    " --overwrite replaces it"
                )
        argv = [f"mkfs.{fmt}"]
        if fmt in _FORCE:
            argv.append(_FORCE[fmt])
        await run([*argv, dev], timeout=self.settings.mkfs_timeout, what=f"mkfs on {dev}")

    async def _probe_fs(self, dev: str) -> str | None:
        try:
            out = await run(
                ["blkid", "-p", "-o", "value", "-s", "TYPE", dev],
                timeout=self.settings.tool_timeout,
                what=f"probe {dev}",
                ok_codes=(0, 2),
            )
        except ToolError:
            return None
        return out.strip() or None

    async def start(self, pool: PoolDefinition) -> None:
        rdev = await self._device_rdev(pool)
        target = self.target(pool)
        if not await aiofiles.os.path.isdir(target):
            raise OperationFailed(
                f"cannot start pool '{pool.name}': mount point {target}"
                " does not exist (pool-build creates it)"
            )
        current = await mounted_device(target)
        if current == rdev:
            return  # already mounted (an agent restart)
        if current is not None:
            raise OperationInvalid(
                f"cannot start pool '{pool.name}': another file system is mounted on {target}"
            )
        argv = ["mount"]
        fmt = pool.source_format
        if fmt not in (None, "auto"):
            argv += ["-t", fmt]
        argv += ["-o", ",".join(mount_options(pool)), self.device(pool), str(target)]
        await run(argv, timeout=self.settings.tool_timeout, what=f"mount pool '{pool.name}'")
        await self._remove_stale_temps(target)

    async def stop(self, pool: PoolDefinition) -> None:
        target = self.target(pool)
        if await mounted_device(target) is None:
            return
        await run(
            ["umount", str(target)],
            timeout=self.settings.tool_timeout,
            what=f"unmount pool '{pool.name}'",
        )

    async def active(self, pool: PoolDefinition) -> bool:
        try:
            rdev = await self._device_rdev(pool)
        except OperationFailed:
            return False
        return await mounted_device(self.target(pool)) == rdev

    async def sizes(self, pool: PoolDefinition) -> PoolSizes:
        if not await self.active(pool):
            raise OperationFailed(
                f"pool '{pool.name}': {self.device(pool)} is not mounted on {self.target(pool)}"
            )
        return await super().sizes(pool)
