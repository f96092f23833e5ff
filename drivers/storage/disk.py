"""``disk`` pools: a whole block device whose partitions are the volumes.

Partitions are made and removed with ``sfdisk`` and the kernel told with ``partx -u``
(hosts without udev, like this project's CI, get no other notice); devtmpfs then shows
the node. As in libvirt, a volume's name is its partition's device name (``loop3p1``,
``sda2``) and a create must name the partition the table will get next; volume formats
are partition types (``linux``, ``linux-swap``, ``linux-lvm`` ...). Pool sizes: the
device's capacity, the partitions' total, and the free extents' total.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiofiles.os

from drivers.storage.base import BackendSettings, ImageSource, PoolScan, UploadSink, VolumeSpec
from drivers.storage.dir import wipe_path
from drivers.storage.tools import Progress, ToolError, image_arg, run, run_with_progress
from virtbus.errors import (
    InvalidArgument,
    NoStorageVol,
    NoSupport,
    OperationFailed,
    OperationInvalid,
)
from virtbus.storage import PoolDefinition, PoolSizes, VolumeFacts

ALIGN = 1 << 20  # sfdisk's default alignment
#: libvirt partition formats -> sfdisk type shortcuts (both labels) or per-label codes
PART_TYPES: dict[str, dict[str, str]] = {
    "none": {"dos": "83", "gpt": "0FC63DAF-8483-4772-8E79-3D69D8477DE4"},
    "linux": {"dos": "83", "gpt": "0FC63DAF-8483-4772-8E79-3D69D8477DE4"},
    "linux-swap": {"dos": "82", "gpt": "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"},
    "linux-lvm": {"dos": "8e", "gpt": "E6D6D379-F507-44C2-A23C-238F2A3DF928"},
    "linux-raid": {"dos": "fd", "gpt": "A19D880F-05FC-4D3B-A006-743F0F84911E"},
    "fat16": {"dos": "6", "gpt": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"},
    "fat32": {"dos": "c", "gpt": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"},
}
CREATE_FORMATS = ("linux", "none", "linux-swap", "linux-lvm", "linux-raid", "fat16", "fat32")
LABELS = ("gpt", "dos")
_MAX_PARTS = {"gpt": 128, "dos": 4}  # primary partitions only on dos


@dataclass(frozen=True, slots=True)
class Partition:
    number: int
    node: str
    start: int  # bytes
    size: int  # bytes
    type: str


@dataclass(frozen=True, slots=True)
class Table:
    label: str
    sector: int
    first: int  # bytes: first usable
    last: int  # bytes: end of the last usable sector
    partitions: tuple[Partition, ...]

    def free_extents(self) -> list[tuple[int, int]]:
        """(start, end) of unpartitioned space, aligned as sfdisk places partitions."""
        extents, pos = [], self.first
        for part in sorted(self.partitions, key=lambda p: p.start):
            if part.start > pos:
                extents.append((pos, part.start))
            pos = max(pos, part.start + part.size)
        if self.last > pos:
            extents.append((pos, self.last))
        aligned = []
        for start, end in extents:
            start = -(-start // ALIGN) * ALIGN
            if end - start >= ALIGN:
                aligned.append((start, end))
        return aligned


class DiskBackend:
    type = "disk"
    create_formats: tuple[str, ...] = CREATE_FORMATS
    files = False

    def __init__(self, settings: BackendSettings | None = None) -> None:
        self.settings = settings or BackendSettings()

    def check(self, pool: PoolDefinition) -> None:
        fmt = pool.source_format
        if fmt not in ("unknown", *LABELS):
            raise NoSupport(
                f"disk pool '{pool.name}': partition table '{fmt}' is not"
                " supported here (gpt and dos are, through sfdisk)"
            )

    def device(self, pool: PoolDefinition) -> str:
        return pool.source.devices[0]

    def part_name(self, pool: PoolDefinition, number: int) -> str:
        """libvirt's rule: ``p`` between device and number when the device ends in a digit
        (or ``part_separator='yes'``)."""
        base = os.path.basename(self.device(pool))
        sep = pool.source.part_separator
        use_p = sep if sep is not None else base[-1:].isdigit()
        return f"{base}{'p' if use_p else ''}{number}"

    async def _check_device(self, pool: PoolDefinition) -> None:
        dev = self.device(pool)
        try:
            st = await aiofiles.os.stat(dev)
        except FileNotFoundError:
            raise OperationFailed(f"pool '{pool.name}': device {dev} does not exist") from None
        if not stat.S_ISBLK(st.st_mode):
            raise OperationFailed(f"pool '{pool.name}': {dev} is not a block device")

    async def table(self, pool: PoolDefinition) -> Table | None:
        """The partition table (None when the device has none)."""
        await self._check_device(pool)
        dev = self.device(pool)
        try:
            out = await run(
                ["sfdisk", "--json", dev],
                timeout=self.settings.tool_timeout,
                what=f"read partitions of {dev}",
            )
        except ToolError as exc:
            if "does not contain a recognized partition table" in exc.stderr:
                return None
            raise
        if not out.strip():
            return None
        try:
            raw: dict[str, Any] = json.loads(out)["partitiontable"]
            sector = int(raw.get("sectorsize", 512))
            parts = tuple(
                Partition(
                    int(p["node"][len(dev) :].lstrip("p") or 0),
                    str(p["node"]),
                    int(p["start"]) * sector,
                    int(p["size"]) * sector,
                    str(p["type"]),
                )
                for p in raw.get("partitions", [])
            )
            size = await self._device_size(dev)
            first = int(raw.get("firstlba", 2048)) * sector
            last = (int(raw["lastlba"]) + 1) * sector if "lastlba" in raw else size
            return Table(str(raw["label"]), sector, first, last, parts)
        except (KeyError, ValueError, TypeError) as exc:
            raise OperationFailed(f"unreadable partition table of {dev}: {exc!r}") from None

    async def _device_size(self, dev: str) -> int:
        real = await asyncio.to_thread(os.path.realpath, dev)
        name = os.path.basename(real)
        raw = await asyncio.to_thread(Path(f"/sys/class/block/{name}/size").read_text)
        return int(raw.strip()) * 512

    async def _partx(self, pool: PoolDefinition) -> None:
        try:
            await run(
                ["partx", "-u", self.device(pool)],
                timeout=self.settings.tool_timeout,
                what="tell the kernel about the partitions",
            )
        except ToolError as exc:
            if "does not make sense" not in exc.stderr:  # an empty table: nothing to tell
                raise

    # ------------------------------------------------------------------ pool
    async def build(self, pool: PoolDefinition, *, overwrite: bool | None) -> None:
        await self._check_device(pool)
        dev, label = self.device(pool), pool.source_format
        if label in (None, "unknown"):
            label = "gpt"
        if overwrite is not True:
            found = await run(
                ["blkid", "-p", "-o", "export", dev],
                timeout=self.settings.tool_timeout,
                what=f"probe {dev}",
                ok_codes=(0, 2),
            )
            if found.strip():
                kind = next(
                    (
                        line.split("=", 1)[1]
                        for line in found.splitlines()
                        if line.startswith(("PTTYPE=", "TYPE="))
                    ),
                    "data",
                )
                raise OperationInvalid(
                    f"device {dev} is not empty (it holds {kind}):"
                    " pool-build --overwrite replaces it"
                )
        await run(
            ["sfdisk", "-q", "--wipe", "always", dev],
            stdin=f"label: {label}\n".encode(),
            timeout=self.settings.tool_timeout,
            what=f"write a {label} label on {dev}",
        )
        await self._partx(pool)

    async def start(self, pool: PoolDefinition) -> None:
        table = await self.table(pool)
        if table is None:
            raise OperationFailed(
                f"cannot start pool '{pool.name}': {self.device(pool)} has no"
                " partition table (pool-build makes one)"
            )
        fmt = pool.source_format
        if fmt not in (None, "unknown") and table.label != fmt:
            raise OperationFailed(
                f"cannot start pool '{pool.name}': {self.device(pool)} has a"
                f" {table.label} partition table, not {fmt}"
            )
        await self._partx(pool)

    async def stop(self, pool: PoolDefinition) -> None:
        return None

    async def delete(self, pool: PoolDefinition) -> None:
        """libvirt zeroes the partition table; ``wipefs -a`` does that (GPT's backup too)."""
        await self._check_device(pool)
        await run(
            ["wipefs", "-q", "-a", self.device(pool)],
            timeout=self.settings.tool_timeout,
            what=f"wipe the partition table of {self.device(pool)}",
        )
        with contextlib.suppress(ToolError):  # none left to forget is fine
            await run(
                ["partx", "-d", self.device(pool)],
                timeout=self.settings.tool_timeout,
                what="forget the partitions",
            )

    async def active(self, pool: PoolDefinition) -> bool:
        try:
            return await self.table(pool) is not None
        except OperationFailed:
            return False

    async def sizes(self, pool: PoolDefinition) -> PoolSizes:
        return (await self.scan(pool, {})).sizes

    async def scan(self, pool: PoolDefinition, known: dict[str, str]) -> PoolScan:
        table = await self.table(pool)
        if table is None:
            raise OperationFailed(f"pool '{pool.name}': {self.device(pool)} lost its table")
        capacity = await self._device_size(self.device(pool))
        used = sum(p.size for p in table.partitions)
        free = sum(end - start for start, end in table.free_extents())
        vols = tuple(self._facts(pool, table, p) for p in table.partitions)
        return PoolScan(PoolSizes(capacity, used, free), vols)

    def _facts(self, pool: PoolDefinition, table: Table, part: Partition) -> VolumeFacts:
        fmt = next(
            (
                f
                for f, codes in PART_TYPES.items()
                if f != "none" and codes.get(table.label, "").lower() == part.type.lower()
            ),
            "none",
        )
        name = self.part_name(pool, part.number)
        return VolumeFacts(
            name=name,
            type="block",
            path=part.node,
            key=part.node,
            format=fmt,
            capacity=part.size,
            allocation=part.size,
            physical=part.size,
        )

    # ------------------------------------------------------------------ volumes
    async def volume(self, pool: PoolDefinition, name: str, fmt: str | None) -> VolumeFacts:
        scan = await self.scan(pool, {})
        for facts in scan.volumes:
            if facts.name == name:
                return facts
        raise NoStorageVol(f"no storage vol with matching name '{name}' in pool '{pool.name}'")

    async def create(
        self, pool: PoolDefinition, spec: VolumeSpec, progress: Progress | None
    ) -> VolumeFacts:
        if spec.format not in self.create_formats:
            raise NoSupport(
                f"cannot create a partition of format '{spec.format}' in pool"
                f" '{pool.name}' ({', '.join(self.create_formats)} can be)"
            )
        if spec.backing is not None:
            raise NoSupport("partitions cannot have a backing store")
        if not spec.capacity:
            raise InvalidArgument(f"volume '{spec.name}': a partition needs a capacity")
        table = await self.table(pool)
        if table is None:
            raise OperationFailed(f"pool '{pool.name}' has no partition table")
        used = {p.number for p in table.partitions}
        number = next(
            (n for n in range(1, _MAX_PARTS.get(table.label, 128) + 1) if n not in used), None
        )
        if number is None:
            raise OperationFailed(f"pool '{pool.name}': the {table.label} table is full")
        expected = self.part_name(pool, number)
        if spec.name != expected:
            raise InvalidArgument(f"invalid partition name '{spec.name}', expected '{expected}'")
        size = -(-spec.capacity // table.sector) * table.sector
        room = max((end - start for start, end in table.free_extents()), default=0)
        if size > room:
            raise OperationFailed(
                f"cannot create volume '{spec.name}': pool '{pool.name}' has no free extent of"
                f" {size} bytes (largest: {room})"
            )
        code = PART_TYPES[spec.format][table.label if table.label in LABELS else "gpt"]
        script = f"{number} : size={size // table.sector}, type={code}\n".encode()
        await run(
            ["sfdisk", "-q", "--no-reread", "--append", self.device(pool)],
            stdin=script,
            timeout=self.settings.tool_timeout,
            what=f"create partition {expected}",
        )
        try:
            await self._partx(pool)
            facts = await self.volume(pool, expected, None)
            await self._wait_node(facts.path)
        except BaseException:
            await self._delete_partition(pool, number)
            raise
        return facts

    async def _wait_node(self, node: str) -> None:
        # No udev here to wait on: devtmpfs makes the node soon after partx; poll (bounded).
        async with asyncio.timeout(self.settings.device_wait):
            while not await aiofiles.os.path.exists(node):  # noqa: ASYNC110
                await asyncio.sleep(self.settings.device_poll)

    async def _delete_partition(self, pool: PoolDefinition, number: int) -> None:
        await run(
            ["sfdisk", "-q", "--no-reread", "--delete", self.device(pool), str(number)],
            timeout=self.settings.tool_timeout,
            what=f"delete partition {number}",
        )
        await self._partx(pool)

    async def clone(
        self,
        pool: PoolDefinition,
        spec: VolumeSpec,
        source: ImageSource,
        progress: Progress | None,
    ) -> VolumeFacts:
        capacity = max(spec.capacity or 0, source.capacity)
        made = await self.create(
            pool,
            VolumeSpec(
                spec.name,
                spec.format if spec.format in self.create_formats else "linux",
                capacity,
                None,
            ),
            None,
        )
        try:
            argv = [
                "qemu-img",
                "convert",
                "-p",
                "-n",
                "-f",
                source.format,
                "-O",
                "raw",
                *image_arg(source.spec),
                *image_arg(made.path),
            ]
            await run_with_progress(
                argv, what=f"clone into '{spec.name}'", total=source.capacity, progress=progress
            )
        except BaseException:
            await self.remove(pool, made)
            raise
        return made

    async def remove(self, pool: PoolDefinition, facts: VolumeFacts) -> None:
        table = await self.table(pool)
        part = next((p for p in (table.partitions if table else ()) if p.node == facts.path), None)
        if part is None:
            raise NoStorageVol(f"no storage vol with matching name '{facts.name}'")
        await self._delete_partition(pool, part.number)

    async def wipe(
        self,
        pool: PoolDefinition,
        facts: VolumeFacts,
        algorithm: str,
        progress: Progress | None,
    ) -> None:
        await wipe_path(facts.path, algorithm, facts.capacity, self.settings, progress)

    async def resize(
        self,
        pool: PoolDefinition,
        facts: VolumeFacts,
        capacity: int,
        *,
        shrink: bool,
        allocate: bool,
    ) -> None:
        raise NoSupport("disk pools cannot resize a partition (libvirt's disk backend cannot)")

    def image(self, pool: PoolDefinition, facts: VolumeFacts) -> ImageSource:
        return ImageSource(facts.path, "raw", facts.capacity, kind="block")

    async def upload(self, pool: PoolDefinition, facts: VolumeFacts, length: int) -> UploadSink:
        raise NoSupport(
            "vol-upload into a partition is not supported: a cut-off upload would leave it"
            " half-written (upload into a dir or fs pool and vol-create-from it)"
        )

    def download_path(self, pool: PoolDefinition, facts: VolumeFacts) -> str:
        return facts.path
