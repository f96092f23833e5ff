"""The destination's volumes of a copy-storage migration (libvirt's
qemuMigrationDstPrecreateStorage): made before the incoming instance starts, removed
again if the migration does not finish here.

Each disk the source copies (``MigrationPrepare.disks``, from its ``begin``) is placed
where the destination's own definition puts it: a ``<disk type='volume'>`` in its pool
and volume, a ``<disk type='file'>`` in the active pool whose directory holds the path.
Nothing that exists is ever reused or overwritten: a volume of that name already there
is OPERATION_INVALID. The pools must have room for what the copy will write (the
source's allocation), else OPERATION_FAILED before anything is made. For
``--copy-storage-inc`` a disk's volume is made over the base the source names, which must
be a volume of the same pool here already (NO_STORAGE_VOL).

The volumes are owned by the migrated domain's owner (``DomainDefinition.owner``, its
virtbus metadata), as the volumes its owner made on the source are.

What was made is recorded on disk under the domain's uuid before it is made, so a
rollback (``finish(success=false)``), also one after an agent restart, removes exactly
those volumes and no others; a finished migration forgets the record (the volumes are
the domain's now).
"""

from __future__ import annotations

import json
import logging
import os.path
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from agent.storage import StoragePools
from virtbus.domain import DomainDefinition
from virtbus.errors import (
    InvalidArgument,
    NoStoragePool,
    NoStorageVol,
    OperationInvalid,
    VirtbusError,
)
from virtbus.protocol.migration import CopyDisk
from virtbus.storage.volume import Backing, volume_xml
from virtbus.store import SnapshotFile

log = logging.getLogger(__name__)
KEY = "copied_volumes"  # its key in AgentContext.extras


def placement(defn: DomainDefinition, disk: CopyDisk, storage: StoragePools) -> tuple[str, str]:
    """(pool, volume) where this host's definition puts a copied disk."""
    found = next((d for d in defn.disks if d.target_dev == disk.target), None)
    if found is None:
        raise InvalidArgument(f"domain '{defn.name}' has no disk '{disk.target}' here to copy into")
    source = found.element.find("source")
    if found.type == "volume" and source is not None:
        pool, volume = source.get("pool"), source.get("volume")
        if pool and volume:
            return pool, volume
    if found.type == "file" and found.source_path:
        directory, name = os.path.split(found.source_path)
        pool = storage.pool_at(directory)
        if pool is None:
            raise NoStoragePool(
                f"no active storage pool holds {directory} on this host: copy-storage makes"
                f" disk '{disk.target}' ({found.source_path}) as a volume of one"
            )
        return pool, name
    raise InvalidArgument(
        f"disk '{disk.target}' of domain '{defn.name}' is type='{found.type}' here:"
        " copy-storage copies into file and volume disks only"
    )


@dataclass(slots=True)
class CopiedVolumes:
    """Volumes made for incoming copy-storage migrations, by domain uuid (on disk)."""

    path: Path
    storage: StoragePools
    made: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    _file: SnapshotFile = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._file = SnapshotFile(self.path)

    def load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("copy-storage volumes not read from %s: %s", self.path, exc)
            return
        if isinstance(data, dict):
            self.made = {str(k): [(str(p), str(v)) for p, v in vols] for k, vols in data.items()}

    async def _save(self) -> None:
        # two incoming copies at once: an older snapshot must not land after a newer one
        await self._file.write(lambda: json.dumps(self.made).encode())

    async def precreate(self, defn: DomainDefinition, disks: list[CopyDisk]) -> None:
        """Check every place, the names and the room first, then make the volumes; a
        failure part-way removes the ones made."""
        if defn.uuid in self.made:
            raise OperationInvalid(f"domain '{defn.name}' already has volumes being copied in")
        places = [placement(defn, disk, self.storage) for disk in disks]
        if len(set(places)) != len(places):
            raise InvalidArgument(f"two disks of domain '{defn.name}' share one volume here")
        need: dict[str, int] = defaultdict(int)
        backings: list[Backing | None] = []
        for (pool, volume), disk in zip(places, disks, strict=True):
            backings.append(await self._backing(pool, disk))
            try:
                await self.storage.volume(pool, volume)
            except VirtbusError as exc:
                if exc.code != "NO_STORAGE_VOL":
                    raise
            else:
                raise OperationInvalid(
                    f"storage volume '{volume}' already exists in pool '{pool}': copy-storage"
                    " never overwrites a volume"
                )
            need[pool] += max(disk.allocation, 0)
        for pool, size in need.items():
            names = ", ".join(v for p, v in places if p == pool)
            await self.storage.check_room(pool, size, names)
        self.made[defn.uuid] = []
        try:
            for (pool, volume), disk, backing in zip(places, disks, backings, strict=True):
                self.made[defn.uuid].append((pool, volume))
                await self._save()  # recorded before it exists: a crash still removes it
                xml = volume_xml(volume, disk.capacity, format=disk.format, backing=backing)
                # the domain's owner owns its disks here as on the source (its operator
                # may remove them after the migration; another operator may not)
                await self.storage.create_volume(pool, xml, owner=defn.owner)
        except BaseException:
            await self.remove(defn.uuid)
            raise

    async def _backing(self, pool: str, disk: CopyDisk) -> Backing | None:
        """copy-storage-inc: the top image goes over the base already in the same pool."""
        if disk.backing is None:
            return None
        try:
            facts = await self.storage.volume(pool, disk.backing)
        except NoStorageVol:
            raise NoStorageVol(
                f"backing volume '{disk.backing}' of disk '{disk.target}' is not in pool"
                f" '{pool}' here: copy-storage-inc copies only the top image, the base must"
                " be on the destination already"
            ) from None
        return Backing(facts.path, disk.backing_format or "raw")

    async def remove(self, uuid: str) -> None:
        """The migration did not finish here: remove the volumes made for it."""
        volumes = self.made.get(uuid)
        if volumes is None:
            return
        self.storage.release(uuid)  # the incoming instance is gone: its leases too
        for pool, volume in reversed(volumes):
            try:
                await self.storage.delete_volume(pool, volume)
            except VirtbusError as exc:
                if exc.code != "NO_STORAGE_VOL":
                    log.error("copy-storage volume %s/%s not removed: %s", pool, volume, exc)
                    continue  # kept in the record: a later rollback tries again
            volumes.remove((pool, volume))
        if not volumes:
            del self.made[uuid]
        await self._save()

    async def forget(self, uuid: str) -> None:
        """The migration finished: the volumes belong to the domain now."""
        if self.made.pop(uuid, None) is not None:
            await self._save()
