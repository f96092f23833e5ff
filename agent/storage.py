"""The host's storage pools and volumes: libvirt's storage driver, composed from backends.

:class:`StoragePools` owns what the backends (drivers/storage) do not: definitions and
their files, names and locks, the pools' runtime state, autostart, lifecycle events, the
security boundary (pool targets only inside ``storage.roots``, block devices only from
``storage.devices``), the bounds on sizes, jobs for long operations, volume transfers,
and the leases that keep a volume in use by a domain from being deleted. It is also the
:class:`~drivers.base.VolumeResolver` the agent hands the hypervisor driver.

Files under ``<state-dir>/storage/``, each written atomically:

- ``pools/<uuid>.xml`` the definition; ``pools/<uuid>.json`` ``{autostart, active,
  persistent, owner}`` (a transient pool, from pool-create, is kept only while active;
  ``owner``: the bus user that defined or created it, see :mod:`agent.owners`);
- ``volumes/<pool-uuid>/<digest>.json`` ``{name, format, xml, owner}`` for each volume
  this agent created: the format it was created with (never re-probed, so a guest cannot
  turn its raw disk into a qcow2 with a backing file), the definition vol-dumpxml extends
  and the user that created it (none for a volume found by a scan).

At agent start every pool is re-adopted: an active pool that is still usable (mounted,
present) stays active, an autostart pool is started, one that went away is marked
inactive with a ``stopped`` event marked ``reconciled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles.os

from agent.jobs import Job, JobContext, JobManager
from agent.owners import stored_owner
from drivers.base import ResolvedVolume
from drivers.storage import (
    WIPE_ALGORITHMS,
    BackendSettings,
    ImageSource,
    StorageBackend,
    UploadSink,
    VolumeSpec,
    backend_for,
)
from virtbus.domain import DomainDefinition
from virtbus.errors import (
    ConfigUnsupported,
    InvalidArgument,
    NoStoragePool,
    NoStorageVol,
    NoSupport,
    OperationFailed,
    OperationInvalid,
    OperationTimeout,
    VirtbusError,
)
from virtbus.settings import StorageSettings
from virtbus.storage import (
    Backing,
    PoolDefinition,
    PoolSizes,
    VolumeDefinition,
    VolumeFacts,
    check_name,
    format_bytes,
    parse_pool_xml,
    parse_volume_xml,
    volume_xml,
)
from virtbus.store import atomic_write, quarantine, read_bytes

log = logging.getLogger(__name__)

FILE_POOLS = frozenset({"dir", "fs"})
DEVICE_POOLS = frozenset({"fs", "disk"})


@dataclass(frozen=True, slots=True)
class PoolEvent:
    pool: str
    uuid: str
    event: str  # defined, undefined, started, stopped, created, deleted, refreshed
    detail: str | None = None
    reconciled: bool = False


PoolSink = Callable[[PoolEvent], None]


@dataclass(slots=True)
class Pool:
    defn: PoolDefinition
    backend: StorageBackend
    support: str | None  # why this host cannot run it (NO_SUPPORT), or None
    persistent: bool = True
    autostart: bool = False
    active: bool = False
    stopping: bool = False
    owner: str | None = None  # the bus user that defined or created it (agent/owners.py)
    sizes: PoolSizes = field(default_factory=PoolSizes)
    volumes: dict[str, VolumeFacts] = field(default_factory=dict)  # as of the last scan/op
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> metadata
    busy: dict[str, str] = field(default_factory=dict)  # volume name -> operation
    # a volume still being made (a clone's job) -> who makes it: its owner before its
    # record is written at the end, so the owner rules see it as theirs meanwhile
    making: dict[str, str | None] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return self.defn.name

    @property
    def state(self) -> str:
        return "running" if self.active else "inactive"

    def volume_owner(self, name: str) -> str | None:
        """Who created volume ``name`` (its record's owner, or who is making it; None:
        nobody's)."""
        record = self.stored.get(name)
        if record is None:
            return self.making.get(name)
        return stored_owner(record)

    def info(self) -> dict[str, Any]:
        """virsh pool-info."""
        return {
            "name": self.defn.name,
            "uuid": self.defn.uuid,
            "type": self.defn.type,
            "state": self.state,
            "persistent": self.persistent,
            "autostart": self.autostart,
            "capacity": self.sizes.capacity if self.active else 0,
            "allocation": self.sizes.allocation if self.active else 0,
            "available": self.sizes.available if self.active else 0,
            "volumes": len(self.volumes) if self.active else 0,
            "supported": self.support is None,
            "owner": self.owner,
        }


@dataclass(slots=True)
class Transfer:
    """A vol-upload or vol-download in progress (its job waits on it)."""

    pool: Pool
    volume: str
    upload: bool
    length: int
    sink: UploadSink | None = None
    path: str | None = None  # download: the file or device read
    offset: int = 0  # upload: next byte expected
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    activity: asyncio.Event = field(default_factory=asyncio.Event)
    moved: asyncio.Condition = field(default_factory=asyncio.Condition)
    error: VirtbusError | None = None
    result: dict[str, Any] | None = None


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class StoragePools:
    """Every storage pool of this host (see module docstring)."""

    def __init__(
        self,
        state_dir: Path,
        settings: StorageSettings,
        jobs: JobManager,
        sink: PoolSink,
        backend_settings: BackendSettings | None = None,
    ) -> None:
        self.dir = state_dir / "storage"
        self.settings = settings
        self.jobs = jobs
        self._sink = sink
        self._backend_settings = backend_settings or BackendSettings()
        self._pools: dict[str, Pool] = {}  # by uuid
        self._by_name: dict[str, str] = {}
        self._leases: dict[tuple[str, str], set[str]] = {}  # (pool uuid, volume) -> holders
        self._transfers: dict[str, Transfer] = {}  # by job id
        jobs.register_recovery("vol.clone", self._recover_clone)
        # uploads and downloads leave only temporaries, which pool start removes

    # ================================================================== lifecycle
    async def open(self) -> None:
        """Load every pool and re-adopt it (see module docstring)."""
        pools_dir = self.dir / "pools"
        await aiofiles.os.makedirs(pools_dir, exist_ok=True)
        for entry in sorted(await aiofiles.os.listdir(pools_dir)):
            if not entry.endswith(".xml"):
                continue
            path = pools_dir / entry
            try:
                defn = parse_pool_xml((await read_bytes(path)) or b"")
                state = json.loads((await read_bytes(path.with_suffix(".json"))) or b"{}")
            except (VirtbusError, ValueError) as exc:
                await quarantine(path, str(exc))
                continue
            pool = self._add(defn)
            pool.persistent = bool(state.get("persistent", True))
            pool.autostart = bool(state.get("autostart", False))
            pool.owner = stored_owner(state)
            pool.stored = await self._load_volume_records(defn.uuid)
            await self._adopt(pool, bool(state.get("active", False)))

    async def _adopt(self, pool: Pool, was_active: bool) -> None:
        if pool.support is not None:
            if was_active or pool.autostart:
                log.warning("pool %s cannot run here: %s", pool.name, pool.support)
            return
        try:
            if was_active and await pool.backend.active(pool.defn):
                await self._scan(pool)
                pool.active = True
                return
            if pool.autostart:
                await pool.backend.start(pool.defn)
                await self._scan(pool)
                pool.active = True
                await self._save_state(pool)
                self._emit(pool, "started")
                return
        except VirtbusError as exc:
            log.error("pool %s could not be started: %s", pool.name, exc)
        if was_active:
            await self._save_state(pool)
            self._emit(pool, "stopped", reconciled=True)
        if not pool.persistent:
            await self._forget(pool)

    async def close(self) -> None:
        for transfer in list(self._transfers.values()):
            transfer.error = OperationFailed("the agent stopped")
            transfer.finished.set()

    def _emit(self, pool: Pool, event: str, detail: str | None = None,
              reconciled: bool = False) -> None:  # fmt: skip
        self._sink(PoolEvent(pool.name, pool.defn.uuid, event, detail, reconciled))

    # ================================================================== files
    def _pool_path(self, uuid: str, suffix: str) -> Path:
        return self.dir / "pools" / f"{uuid}{suffix}"

    async def _save_definition(self, pool: Pool) -> None:
        await atomic_write(self._pool_path(pool.defn.uuid, ".xml"), pool.defn.to_xml().encode())

    async def _save_state(self, pool: Pool) -> None:
        state = {"autostart": pool.autostart, "active": pool.active,
                 "persistent": pool.persistent, "owner": pool.owner}  # fmt: skip
        await atomic_write(self._pool_path(pool.defn.uuid, ".json"), json.dumps(state).encode())

    async def _forget(self, pool: Pool) -> None:
        for suffix in (".xml", ".json"):
            with contextlib.suppress(FileNotFoundError):
                await aiofiles.os.remove(self._pool_path(pool.defn.uuid, suffix))
        volumes = self.dir / "volumes" / pool.defn.uuid
        if await aiofiles.os.path.isdir(volumes):
            for entry in await aiofiles.os.listdir(volumes):
                with contextlib.suppress(FileNotFoundError):
                    await aiofiles.os.remove(volumes / entry)
            with contextlib.suppress(OSError):
                await aiofiles.os.rmdir(volumes)
        self._pools.pop(pool.defn.uuid, None)
        if self._by_name.get(pool.name) == pool.defn.uuid:
            del self._by_name[pool.name]

    def _volume_record_path(self, pool: Pool, name: str) -> Path:
        return self.dir / "volumes" / pool.defn.uuid / f"{_digest(name)}.json"

    async def _load_volume_records(self, uuid: str) -> dict[str, dict[str, Any]]:
        directory = self.dir / "volumes" / uuid
        if not await aiofiles.os.path.isdir(directory):
            return {}
        out: dict[str, dict[str, Any]] = {}
        for entry in await aiofiles.os.listdir(directory):
            path = directory / entry
            try:
                record = json.loads((await read_bytes(path)) or b"")
                out[str(record["name"])] = record
            except (ValueError, KeyError, TypeError) as exc:
                await quarantine(path, f"unreadable volume record: {exc!r}")
        return out

    async def _store_volume(
        self, pool: Pool, name: str, fmt: str, xml: str, owner: str | None
    ) -> None:
        record = {"name": name, "format": fmt, "xml": xml, "owner": owner}
        path = self._volume_record_path(pool, name)
        await aiofiles.os.makedirs(path.parent, exist_ok=True)
        await atomic_write(path, json.dumps(record).encode(), fsync=False)  # refresh rebuilds
        pool.stored[name] = record

    async def _drop_volume(self, pool: Pool, name: str) -> None:
        pool.stored.pop(name, None)
        pool.volumes.pop(name, None)
        with contextlib.suppress(FileNotFoundError):
            await aiofiles.os.remove(self._volume_record_path(pool, name))

    # ================================================================== pools
    def _add(self, defn: PoolDefinition) -> Pool:
        backend = backend_for(defn.type, self._backend_settings)
        support = None
        try:
            backend.check(defn)
        except NoSupport as exc:
            support = exc.message
        pool = Pool(defn, backend, support)
        self._pools[defn.uuid] = pool
        self._by_name[defn.name] = defn.uuid
        return pool

    def get(self, ref: str) -> Pool:
        """A pool by name or uuid; NO_STORAGE_POOL naming it."""
        if not isinstance(ref, str) or not ref:
            raise InvalidArgument("a pool name or uuid is required")
        pool = self._find(ref)
        if pool is None:
            raise NoStoragePool(
                f"storage pool not found: no storage pool with matching name '{ref}'"
            )
        return pool

    def _find(self, ref: str) -> Pool | None:
        """A pool by uuid or name, None when none is defined here."""
        return self._pools.get(ref) or self._pools.get(self._by_name.get(ref, ""))

    def pools(self) -> list[Pool]:
        return sorted(self._pools.values(), key=lambda p: p.name)

    async def pool_owner(self, ref: str) -> str | None:
        """The owner lookup of pools (agent/owners.py): None for a pool not defined here."""
        pool = self._find(ref)
        return pool.owner if pool is not None else None

    async def volume_owner(self, target: str) -> str | None:
        """The owner lookup of volumes, by the policy's ``pool/volume`` name. A volume
        create names its pool alone (the volume is new: nobody's yet, so creating one in a
        pool someone else made stays allowed, as it was); a volume this agent did not
        create has no record, and no owner."""
        pool_ref, slash, name = target.partition("/")
        if not slash or not name:
            return None
        pool = self._find(pool_ref)
        return pool.volume_owner(name) if pool is not None else None

    def _running(self, ref: str) -> Pool:
        pool = self.get(ref)
        if not pool.active or pool.stopping:
            raise OperationInvalid(f"storage pool '{pool.name}' is not active")
        return pool

    def _inactive(self, pool: Pool, verb: str) -> None:
        if pool.active:
            raise OperationInvalid(f"cannot {verb} storage pool '{pool.name}': it is active")

    def _supported(self, pool: Pool) -> None:
        if pool.support is not None:
            raise NoSupport(pool.support)

    def _check_place(self, defn: PoolDefinition) -> None:
        """The security boundary: targets inside storage.roots, devices from storage.devices,
        no two pools on the same storage."""
        if defn.type in FILE_POOLS:
            assert defn.target_path is not None
            real = os.path.realpath(defn.target_path)
            roots = [os.path.realpath(r) for r in self.settings.roots]
            if not any(os.path.commonpath([real, r]) == r for r in roots):
                allowed = ", ".join(str(r) for r in self.settings.roots) or "none"
                raise OperationInvalid(
                    f"pool target {defn.target_path} is outside the directories allowed for"
                    f" storage pools (storage.roots: {allowed})"
                )
        if defn.type in DEVICE_POOLS:
            for dev in defn.source.devices:
                if not any(fnmatch.fnmatchcase(dev, pat) for pat in self.settings.devices):
                    allowed = ", ".join(self.settings.devices) or "none"
                    raise OperationInvalid(
                        f"block device {dev} is not allowed for storage pools"
                        f" (storage.devices: {allowed})"
                    )
        for other in self._pools.values():
            if other.defn.uuid == defn.uuid:
                continue
            same = (
                (defn.type in FILE_POOLS and other.defn.type in FILE_POOLS
                 and defn.target_path == other.defn.target_path)
                or (set(defn.source.devices) & set(other.defn.source.devices)
                    and defn.type in DEVICE_POOLS | {"iscsi-direct"})
            )  # fmt: skip
            if same:
                raise OperationFailed(
                    f"storage pool '{defn.name}' would use the same storage as pool '{other.name}'"
                )

    def _parse_new(self, xml: str) -> tuple[PoolDefinition, Pool | None]:
        defn = parse_pool_xml(xml)
        existing = self._pools.get(defn.uuid)
        by_name = self._by_name.get(defn.name)
        if by_name is not None and by_name != defn.uuid:
            raise OperationFailed(f"pool '{defn.name}' already exists with uuid {by_name}")
        if existing is not None and existing.name != defn.name:
            raise OperationFailed(
                f"pool '{existing.name}' is already defined with uuid {defn.uuid}"
            )
        self._check_place(defn)
        return defn, existing

    async def define(self, xml: str, owner: str | None = None) -> Pool:
        """pool-define: a persistent, inactive pool (or a new definition of an inactive one,
        which keeps its owner; ``owner`` owns a new one, or one that had no owner)."""
        defn, existing = self._parse_new(xml)
        if existing is not None:
            self._inactive(existing, "redefine")
        pool = self._add(defn)
        pool.owner = owner
        if existing is not None:
            pool.autostart, pool.stored = existing.autostart, existing.stored
            pool.owner = existing.owner or owner
        await self._save_definition(pool)
        await self._save_state(pool)
        self._emit(pool, "defined")
        return pool

    async def create(self, xml: str, *, build: bool = False, overwrite: bool | None = None,
                     owner: str | None = None) -> Pool:  # fmt: skip
        """pool-create: a transient pool, started at once (built first with ``build``),
        owned by ``owner``."""
        defn, existing = self._parse_new(xml)
        if existing is not None:
            raise OperationFailed(f"storage pool '{defn.name}' already exists")
        pool = self._add(defn)
        pool.persistent, pool.owner = False, owner
        try:
            self._supported(pool)
            if build:
                await pool.backend.build(defn, overwrite=overwrite)
            await pool.backend.start(defn)
            await self._scan(pool)
        except BaseException:
            await self._forget(pool)
            raise
        pool.active = True
        await self._save_definition(pool)
        await self._save_state(pool)
        self._emit(pool, "started")
        return pool

    async def undefine(self, ref: str) -> None:
        pool = self.get(ref)
        async with pool.lock:
            self._inactive(pool, "undefine")
            await self._forget(pool)
        self._emit(pool, "undefined")

    async def build(self, ref: str, *, overwrite: bool | None = None) -> None:
        pool = self.get(ref)
        self._supported(pool)
        async with pool.lock:
            self._inactive(pool, "build")
            await pool.backend.build(pool.defn, overwrite=overwrite)

    async def start(self, ref: str, *, build: bool = False, overwrite: bool | None = None) -> Pool:
        pool = self.get(ref)
        self._supported(pool)
        async with pool.lock:
            if pool.active:
                raise OperationInvalid(f"storage pool '{pool.name}' is already active")
            if build:
                await pool.backend.build(pool.defn, overwrite=overwrite)
            await pool.backend.start(pool.defn)
            try:
                await self._scan(pool)
            except BaseException:
                with contextlib.suppress(VirtbusError):
                    await pool.backend.stop(pool.defn)
                raise
            pool.active = True
            await self._save_state(pool)
        self._emit(pool, "started")
        return pool

    async def destroy(self, ref: str) -> None:
        """pool-destroy: stop the pool (its volumes stay; a transient pool is forgotten)."""
        pool = self.get(ref)
        async with pool.lock:
            if not pool.active:
                raise OperationInvalid(f"storage pool '{pool.name}' is not active")
            self._idle(pool, "destroy")
            pool.stopping = True
            try:
                await pool.backend.stop(pool.defn)
            finally:
                pool.stopping = False
            pool.active = False
            pool.volumes.clear()
            if pool.persistent:
                await self._save_state(pool)
            else:
                await self._forget(pool)
        self._emit(pool, "stopped")

    def _idle(self, pool: Pool, verb: str) -> None:
        if pool.busy or self.jobs.running_for(pool=pool.name):
            raise OperationInvalid(
                f"cannot {verb} storage pool '{pool.name}': operations are in progress"
                f" on {', '.join(sorted(pool.busy)) or 'its volumes'}"
            )
        used = [v for (p, v), holders in self._leases.items() if p == pool.defn.uuid and holders]
        if used:
            raise OperationInvalid(
                f"cannot {verb} storage pool '{pool.name}': volume {used[0]!r} is in use"
            )

    async def delete(self, ref: str) -> None:
        """pool-delete: remove what pool-build made (inactive pools only)."""
        pool = self.get(ref)
        self._supported(pool)
        async with pool.lock:
            self._inactive(pool, "delete")
            await pool.backend.delete(pool.defn)
        self._emit(pool, "deleted")

    async def refresh(self, ref: str) -> Pool:
        """pool-refresh: rescan. A pool whose storage went away becomes inactive."""
        pool = self._running(ref)
        async with pool.lock:
            if not await pool.backend.active(pool.defn):
                return await self._lost(pool, "its storage is gone")
            try:
                await self._scan(pool)
            except OperationFailed as exc:
                if not await pool.backend.active(pool.defn):
                    return await self._lost(pool, exc.message)
                raise
        self._emit(pool, "refreshed")
        return pool

    async def _lost(self, pool: Pool, why: str) -> Pool:
        pool.active = False
        pool.volumes.clear()
        await self._save_state(pool)
        self._emit(pool, "stopped")
        raise OperationFailed(
            f"cannot refresh storage pool '{pool.name}': {why}; the pool is now inactive"
        )

    async def set_autostart(self, ref: str, autostart: bool) -> Pool:
        pool = self.get(ref)
        if not pool.persistent:
            raise OperationInvalid(f"transient storage pool '{pool.name}' cannot autostart")
        pool.autostart = autostart
        await self._save_state(pool)
        return pool

    def xml(self, ref: str) -> str:
        pool = self.get(ref)
        return pool.defn.to_xml(pool.sizes if pool.active else None)

    async def _scan(self, pool: Pool) -> None:
        known = {n: str(r["format"]) for n, r in pool.stored.items()}
        scan = await pool.backend.scan(pool.defn, known)
        pool.sizes = scan.sizes
        pool.volumes = {v.name: v for v in scan.volumes}
        for name in [n for n in pool.stored if n not in pool.volumes]:
            await self._drop_volume(pool, name)  # deleted behind our back

    async def _update_sizes(self, pool: Pool) -> None:
        with contextlib.suppress(VirtbusError, OSError):
            pool.sizes = await pool.backend.sizes(pool.defn)

    async def inventory(self) -> list[dict[str, Any]]:
        """Pools for the heartbeat: name, type, state, sizes (fresh for file pools)."""
        out = []
        for pool in self.pools():
            if pool.active and pool.backend.files:
                await self._update_sizes(pool)
            info = pool.info()
            out.append({k: info[k] for k in ("name", "uuid", "type", "state", "capacity",
                                              "allocation", "available", "volumes")})  # fmt: skip
        return out

    # ================================================================== volumes
    def _reserve(self, pool: Pool, name: str, what: str) -> None:
        """Claim a name for an operation (synchronously: of two creates one wins here)."""
        check_name(name)
        if name in pool.busy:
            raise OperationFailed(
                f"storage volume '{name}' of pool '{pool.name}' is busy ({pool.busy[name]})"
            )
        pool.busy[name] = what

    def _release(self, pool: Pool, name: str) -> None:
        pool.busy.pop(name, None)
        pool.making.pop(name, None)

    async def _exists(self, pool: Pool, name: str) -> bool:
        try:
            await pool.backend.volume(pool.defn, name, None)
        except NoStorageVol:
            return False
        except NoSupport:
            return True  # something that is not a volume holds the name
        return True

    async def volume(self, pool_ref: str, name: str) -> VolumeFacts:
        """vol-info: the volume's facts, read now."""
        pool = self._running(pool_ref)
        check_name(name)
        fmt = pool.stored.get(name, {}).get("format")
        facts = await pool.backend.volume(pool.defn, name, fmt)
        pool.volumes[name] = facts
        return facts

    def volumes(self, pool_ref: str) -> list[VolumeFacts]:
        """vol-list: as of the last refresh and the operations since."""
        pool = self._running(pool_ref)
        return [pool.volumes[n] for n in sorted(pool.volumes)]

    async def volume_xml(self, pool_ref: str, name: str) -> str:
        facts = await self.volume(pool_ref, name)
        record = self.get(pool_ref).stored.get(name)
        defn = parse_volume_xml(record["xml"]) if record else parse_volume_xml(
            volume_xml(name, None))  # fmt: skip
        return defn.to_xml(facts)

    def find_by_path(self, path: str) -> tuple[Pool, VolumeFacts] | None:
        """The volume whose path or key is ``path`` (vol-key, vol-pool, --remove-all-storage)."""
        for pool in self.pools():
            if not pool.active:
                continue
            for facts in pool.volumes.values():
                if path in (facts.path, facts.key):
                    return pool, facts
        return None

    def _check_capacity(self, capacity: int, what: str) -> None:
        if capacity > self.settings.max_capacity:
            raise InvalidArgument(
                f"{what} of {format_bytes(capacity)} is more than the largest volume accepted"
                f" ({format_bytes(self.settings.max_capacity)}, storage.max_capacity)"
            )

    async def _check_space(self, pool: Pool, need: int, name: str) -> None:
        await self._update_sizes(pool)
        if need > pool.sizes.available:
            raise OperationFailed(
                f"cannot create volume '{name}': not enough space in storage pool"
                f" '{pool.name}' ({format_bytes(need)} needed, {format_bytes(pool.sizes.available)}"
                " available)"
            )

    async def check_room(self, pool_ref: str, need: int, what: str) -> None:
        """OPERATION_FAILED unless the running pool has ``need`` bytes free (a
        copy-storage migration checks the room for every disk it will write first)."""
        pool = self._running(pool_ref)
        self._supported(pool)
        await self._check_space(pool, need, what)

    def pool_at(self, directory: str) -> str | None:
        """The active pool whose target directory is ``directory`` (a file disk's pool)."""
        for pool in self.pools():
            if pool.active and pool.defn.target_path == directory:
                return pool.name
        return None

    def _backing(self, backing: Backing | None) -> Backing | None:
        """A backing store must be a volume of an active pool here (never any host file)."""
        if backing is None:
            return None
        found = self.find_by_path(backing.path)
        if found is None:
            raise InvalidArgument(
                f"backing store {backing.path} is not a volume of an active storage pool"
            )
        pool, facts = found
        stored = pool.stored.get(facts.name, {}).get("format")
        return Backing(facts.path, backing.format or stored or facts.format)

    def _spec(self, pool: Pool, vol: VolumeDefinition, *, default_format: str | None,
              prealloc_metadata: bool, clone: bool = False) -> VolumeSpec:  # fmt: skip
        if vol.encrypted:
            raise ConfigUnsupported("encrypted volumes need libvirt's secrets (not in virtbus)")
        fmt = vol.format or default_format or (pool.backend.create_formats or ("raw",))[0]
        backing = self._backing(vol.backing)
        capacity, allocation = vol.capacity, vol.allocation
        if capacity is None and backing is None and not clone:
            raise InvalidArgument(f"volume '{vol.name}' needs a capacity")
        if capacity is not None:
            self._check_capacity(capacity, f"capacity of volume '{vol.name}'")
            if allocation is not None and allocation > capacity:
                allocation = capacity  # libvirt clamps
        perms = vol.permissions
        return VolumeSpec(
            vol.name, fmt, capacity, allocation, backing, vol.compat, vol.lazy_refcounts,
            vol.cluster_size, prealloc_metadata, perms.mode if perms else None,
        )  # fmt: skip

    async def create_volume(self, pool_ref: str, xml: str, *, prealloc_metadata: bool = False,
                            owner: str | None = None) -> VolumeFacts:  # fmt: skip
        """vol-create: a volume from its XML (qemu-img, sfdisk ...), owned by ``owner``;
        all or nothing."""
        pool = self._running(pool_ref)
        self._supported(pool)
        vol = parse_volume_xml(xml)
        spec = self._spec(pool, vol, default_format=None, prealloc_metadata=prealloc_metadata)
        self._reserve(pool, vol.name, "creating")
        try:
            if await self._exists(pool, vol.name):
                raise OperationFailed(
                    f"storage volume '{vol.name}' already exists in pool '{pool.name}'"
                )
            if pool.backend.files and spec.format == "raw" and spec.capacity:
                need = spec.capacity if spec.allocation is None else spec.allocation
                await self._check_space(pool, need, vol.name)
            facts = await pool.backend.create(pool.defn, spec, None)
            await self._store_volume(pool, vol.name, facts.format, vol.to_xml(), owner)
            pool.volumes[vol.name] = facts
        finally:
            self._release(pool, vol.name)
        await self._update_sizes(pool)
        return facts

    async def clone_volume(
        self, pool_ref: str, xml: str, source_pool: str, source: str, owner: str | None = None,
    ) -> Job:  # fmt: skip
        """vol-create-from / vol-clone as a job: ``qemu-img convert`` into a new volume
        (owned by ``owner``), also across pools. The source is leased (not deletable) while
        it is read."""
        pool = self._running(pool_ref)
        self._supported(pool)
        src_pool = self._running(source_pool)
        check_name(source)
        # libvirt clones from its cached view of the source too (refreshed by pool-refresh)
        src = src_pool.volumes.get(source) or await self.volume(source_pool, source)
        vol = parse_volume_xml(xml)
        image = src_pool.backend.image(src_pool.defn, src)
        spec = self._spec(pool, vol, default_format=src.format if pool.backend.files else None,
                          prealloc_metadata=False, clone=True)  # fmt: skip
        if spec.capacity is not None and spec.capacity < src.capacity:
            raise InvalidArgument(
                f"capacity of '{vol.name}' ({spec.capacity}) is smaller than the source's"
                f" ({src.capacity})"
            )
        if spec.capacity is None:
            spec = dataclasses.replace(spec, capacity=src.capacity)
        self._reserve(pool, vol.name, "cloning")
        pool.making[vol.name] = owner
        holder = f"job:clone-{time.monotonic_ns()}"
        leased = False
        try:
            if await self._exists(pool, vol.name):
                raise OperationFailed(
                    f"storage volume '{vol.name}' already exists in pool '{pool.name}'"
                )
            if pool.backend.files:
                need = src.allocation if spec.format == "qcow2" else src.capacity
                await self._check_space(pool, max(need, 0), vol.name)
            target = {"pool": pool.name, "volume": vol.name, "source_pool": src_pool.name,
                      "source": src.name}  # fmt: skip
            undo = {"pool": pool.defn.uuid, "volume": vol.name,
                    "delete_volume": not pool.backend.files}  # fmt: skip

            async def work(ctx: JobContext) -> dict[str, Any]:
                try:
                    facts = await pool.backend.clone(pool.defn, spec, image, ctx.progress)
                    await self._store_volume(pool, vol.name, facts.format, vol.to_xml(), owner)
                    pool.volumes[vol.name] = facts
                    return facts.to_map()
                finally:
                    self._release(pool, vol.name)
                    self.release(holder, src_pool.name, src.name)
                    await self._update_sizes(pool)

            self._lease(holder, src_pool, src.name)
            leased = True
            return await self.jobs.start("vol.clone", target, work, total=image.capacity,
                                         recovery=undo, owner=owner)  # fmt: skip
        except BaseException:
            self._release(pool, vol.name)
            if leased:
                self.release(holder, src_pool.name, src.name)
            raise

    async def _recover_clone(self, job: Job) -> None:
        """A clone the agent died in: a partition it made holds half a copy: remove it.
        (Files are written under temporary names, which pool start removes.)"""
        if not job.recovery.get("delete_volume"):
            return
        pool = self._pools.get(str(job.recovery.get("pool")))
        name = str(job.recovery.get("volume"))
        if pool is None or not pool.active or name in pool.stored:
            return
        with contextlib.suppress(NoStorageVol):
            facts = await pool.backend.volume(pool.defn, name, None)
            await pool.backend.remove(pool.defn, facts)
            pool.volumes.pop(name, None)
            log.warning("removed %s of pool %s: a clone into it was interrupted", name, pool.name)

    def _users(self, pool: Pool, name: str) -> list[str]:
        return sorted(self._leases.get((pool.defn.uuid, name), set()))

    def _not_in_use(self, pool: Pool, name: str, verb: str) -> None:
        users = self._users(pool, name)
        if users:
            who = users[0].removeprefix("domain:")
            raise OperationInvalid(
                f"cannot {verb} storage volume '{name}' of pool '{pool.name}': it is in use"
                f" by {'a job' if who.startswith('job:') else f'domain {who}'}"
            )

    async def delete_volume(self, pool_ref: str, name: str) -> None:
        """vol-delete; refused (OPERATION_INVALID) while a running domain or a job uses it."""
        pool = self._running(pool_ref)
        self._supported(pool)
        self._not_in_use(pool, name, "delete")
        self._reserve(pool, name, "deleting")
        try:
            facts = await self.volume(pool.name, name)
            await pool.backend.remove(pool.defn, facts)
            await self._drop_volume(pool, name)
        finally:
            self._release(pool, name)
        await self._update_sizes(pool)

    async def wipe_volume(
        self, pool_ref: str, name: str, algorithm: str = "zero", *, owner: str | None = None
    ) -> Job:
        """vol-wipe as a job (zero, or scrub's patterns). As libvirt, the content is gone,
        format included: the volume is raw afterwards."""
        if algorithm not in WIPE_ALGORITHMS:
            raise InvalidArgument(
                f"unknown wipe algorithm '{algorithm}' (one of {', '.join(WIPE_ALGORITHMS)})"
            )
        pool = self._running(pool_ref)
        self._supported(pool)
        self._not_in_use(pool, name, "wipe")
        facts = await self.volume(pool.name, name)
        self._reserve(pool, name, "wiping")

        async def work(ctx: JobContext) -> dict[str, Any]:
            try:
                await pool.backend.wipe(pool.defn, facts, algorithm, ctx.progress)
                record = pool.stored.get(name)
                if pool.backend.files:
                    await self._store_volume(pool, name, "raw", record["xml"] if record
                                             else volume_xml(name, None),
                                             record.get("owner") if record else None)  # fmt: skip
                return (await self.volume(pool.name, name)).to_map()
            finally:
                self._release(pool, name)

        try:
            return await self.jobs.start("vol.wipe", {"pool": pool.name, "volume": name}, work,
                                         total=facts.physical, owner=owner)  # fmt: skip
        except BaseException:
            self._release(pool, name)
            raise

    async def resize_volume(
        self, pool_ref: str, name: str, capacity: int, *, delta: bool = False,
        shrink: bool = False, allocate: bool = False,
    ) -> VolumeFacts:  # fmt: skip
        """vol-resize: grow; shrink only with ``shrink``; ``delta`` adds (or with ``shrink``
        subtracts) ``capacity``."""
        pool = self._running(pool_ref)
        self._supported(pool)
        if capacity < 0:
            raise InvalidArgument("capacity must not be negative")
        self._not_in_use(pool, name, "resize")
        self._reserve(pool, name, "resizing")
        try:
            facts = await self.volume(pool.name, name)
            new = capacity
            if delta:
                new = facts.capacity - capacity if shrink else facts.capacity + capacity
            if new < 0:
                raise InvalidArgument(f"cannot shrink '{name}' below zero")
            self._check_capacity(new, f"new capacity of volume '{name}'")
            if new < facts.capacity and not shrink:
                raise InvalidArgument(
                    f"cannot shrink volume '{name}' from {facts.capacity} to {new} bytes"
                    " without --shrink"
                )
            if shrink and new > facts.capacity:
                raise InvalidArgument(f"--shrink given but {new} is larger than the capacity")
            if allocate and new > facts.capacity:
                await self._check_space(pool, new - facts.capacity, name)
            await pool.backend.resize(pool.defn, facts, new, shrink=shrink, allocate=allocate)
            facts = await self.volume(pool.name, name)
        finally:
            self._release(pool, name)
        await self._update_sizes(pool)
        return facts

    # ================================================================== transfers
    async def upload_begin(
        self, pool_ref: str, name: str, length: int, *, owner: str | None = None
    ) -> Job:
        """vol-upload: a job that takes ``length`` bytes in chunks (upload_chunk) and makes
        them the volume's content at upload_finish, atomically. A client that stops
        sending (killed) for ``transfer_idle_timeout`` fails the job: the volume keeps its
        previous content and the temporary is removed. The job is bound to ``owner`` (the
        caller): only it may send the chunks, finish or cancel it."""
        pool = self._running(pool_ref)
        self._supported(pool)
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise InvalidArgument("upload length must be a non-negative integer")
        self._check_capacity(length, f"upload into '{name}'")
        self._not_in_use(pool, name, "upload into")
        facts = await self.volume(pool.name, name)
        if pool.backend.files:
            await self._check_space(pool, max(0, length - facts.allocation), name)
        self._reserve(pool, name, "uploading")
        try:
            sink = await pool.backend.upload(pool.defn, facts, length)
        except BaseException:
            self._release(pool, name)
            raise
        transfer = Transfer(pool, name, True, length, sink=sink)

        async def work(ctx: JobContext) -> dict[str, Any]:
            self._transfers[ctx.job.id] = transfer
            try:
                await self._follow(transfer, ctx)
                return transfer.result or {}
            finally:
                if transfer.result is None:
                    await sink.abort()
                self._transfers.pop(ctx.job.id, None)
                self._release(pool, name)

        try:
            job = await self.jobs.start("vol.upload", {"pool": pool.name, "volume": name}, work,
                                        total=length, owner=owner, bound=True)  # fmt: skip
        except BaseException:
            await sink.abort()
            self._release(pool, name)
            raise
        return job

    async def _follow(self, transfer: Transfer, ctx: JobContext) -> None:
        """The transfer's job: wait for its end, failing it when no chunk comes in time."""
        idle = self.settings.transfer_idle_timeout
        while not transfer.finished.is_set():
            transfer.activity.clear()
            waits = [asyncio.ensure_future(transfer.activity.wait()),
                     asyncio.ensure_future(transfer.finished.wait())]  # fmt: skip
            try:
                done, _ = await asyncio.wait(waits, timeout=idle,
                                             return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            finally:
                for waiter in waits:
                    waiter.cancel()
            if not done:
                transfer.error = OperationTimeout(
                    f"no chunk for {idle:g} s: the {'upload' if transfer.upload else 'download'}"
                    f" of '{transfer.volume}' was abandoned"
                )
                transfer.finished.set()
            ctx.progress(transfer.offset)
        async with transfer.moved:
            transfer.moved.notify_all()
        if transfer.error is not None:
            raise transfer.error

    def _transfer(self, job_id: str, upload: bool, user: str | None, verb: str) -> Transfer:
        """The transfer of job ``job_id``, for ``user`` (AUTH_DENIED unless it began it,
        whatever the job's state: a job id is no capability)."""
        job = self.jobs.get(job_id)
        job.check_driver(user, verb)
        transfer = self._transfers.get(job_id)
        if transfer is None or transfer.upload != upload:
            raise OperationInvalid(f"job {job_id} is {job.state.value}: no transfer to continue")
        if transfer.finished.is_set():
            raise OperationInvalid(f"the transfer of job {job_id} is over")
        return transfer

    async def upload_chunk(
        self, job_id: str, offset: int, data: bytes, *, user: str | None = None
    ) -> int:
        """Write one chunk at ``offset`` for ``user`` (the upload's owner); returns the next
        offset expected. Chunks may arrive out of order within the window; a repeated one
        is acknowledged again."""
        transfer = self._transfer(job_id, True, user, "send a chunk to")
        size = self.settings.chunk_size
        if not isinstance(data, bytes) or len(data) > size:
            raise InvalidArgument(f"a chunk must be bytes, at most {size}")
        if offset < 0 or offset + len(data) > transfer.length:
            raise InvalidArgument(
                f"chunk at {offset} is outside the upload's {transfer.length} bytes"
            )
        if offset > transfer.offset + self.settings.transfer_window * size:
            raise InvalidArgument(f"chunk at {offset} is beyond the transfer window")
        transfer.activity.set()
        async with transfer.moved:
            await transfer.moved.wait_for(
                lambda: transfer.offset >= offset or transfer.finished.is_set()
            )
            if transfer.finished.is_set():
                raise transfer.error or OperationInvalid("the transfer is over")
            if offset < transfer.offset:
                return transfer.offset  # a redelivery: written already
            assert transfer.sink is not None
            try:
                await transfer.sink.write(offset, data)
            except VirtbusError as exc:
                transfer.error = exc
                transfer.finished.set()
                transfer.moved.notify_all()
                raise
            transfer.offset = offset + len(data)
            transfer.moved.notify_all()
        transfer.activity.set()
        return transfer.offset

    async def upload_finish(self, job_id: str, *, user: str | None = None) -> VolumeFacts:
        transfer = self._transfer(job_id, True, user, "finish")
        if transfer.offset != transfer.length:
            raise InvalidArgument(
                f"upload incomplete: {transfer.offset} of {transfer.length} bytes received"
            )
        assert transfer.sink is not None
        await transfer.sink.commit()
        facts = await self.volume(transfer.pool.name, transfer.volume)
        transfer.result = facts.to_map()
        transfer.finished.set()
        await self.jobs.wait(job_id)
        return facts

    async def download_begin(
        self, pool_ref: str, name: str, *, owner: str | None = None
    ) -> tuple[Job, int]:
        """vol-download: a job serving the volume's bytes by chunks (download_chunk), to
        ``owner`` (the caller) only."""
        pool = self._running(pool_ref)
        self._supported(pool)
        facts = await self.volume(pool.name, name)
        path = pool.backend.download_path(pool.defn, facts)
        length = facts.physical if pool.backend.files else facts.capacity
        holder = f"download:{time.monotonic_ns()}"
        self._lease(holder, pool, name)
        transfer = Transfer(pool, name, False, length, path=path)

        async def work(ctx: JobContext) -> dict[str, Any]:
            self._transfers[ctx.job.id] = transfer
            try:
                await self._follow(transfer, ctx)
                return {"length": length}
            finally:
                self._transfers.pop(ctx.job.id, None)
                self.release(holder, pool.name, name)

        try:
            job = await self.jobs.start("vol.download", {"pool": pool.name, "volume": name},
                                        work, total=length, owner=owner,
                                        bound=True)  # fmt: skip
        except BaseException:
            self.release(holder, pool.name, name)
            raise
        return job, length

    async def download_chunk(self, job_id: str, offset: int, *, user: str | None = None) -> bytes:
        transfer = self._transfer(job_id, False, user, "read a chunk of")
        if offset < 0 or offset > transfer.length:
            raise InvalidArgument(
                f"offset {offset} is outside the volume's {transfer.length} bytes"
            )
        size = min(self.settings.chunk_size, transfer.length - offset)
        assert transfer.path is not None
        path = transfer.path

        def read() -> bytes:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return os.pread(fd, size, offset)
            finally:
                os.close(fd)

        transfer.activity.set()
        data = await asyncio.to_thread(read)
        transfer.offset = max(transfer.offset, offset + len(data))
        transfer.activity.set()
        return data

    async def download_finish(self, job_id: str, *, user: str | None = None) -> None:
        transfer = self._transfer(job_id, False, user, "finish")
        transfer.result = {}
        transfer.finished.set()
        await self.jobs.wait(job_id)

    async def transfer_abort(self, job_id: str) -> Job:
        return await self.jobs.cancel(job_id)

    # ================================================================== leases / resolver
    def _lease(self, holder: str, pool: Pool, name: str) -> None:
        self._leases.setdefault((pool.defn.uuid, name), set()).add(holder)

    async def resolve(self, pool: str, volume: str, domain: str) -> ResolvedVolume:
        """The VolumeResolver the hypervisor driver uses at start and attach."""
        try:
            found = self.get(pool)
        except NoStoragePool:
            raise NoStoragePool(
                f"storage pool '{pool}' of volume '{volume}' does not exist on this host"
            ) from None
        if not found.active:
            raise OperationInvalid(
                f"storage pool '{pool}' (volume '{volume}') is not active: pool-start it"
            )
        try:
            facts = await self.volume(found.name, volume)
        except NoStorageVol:
            raise NoStorageVol(f"storage volume '{volume}' not found in pool '{pool}'") from None
        if volume in found.busy:
            raise OperationInvalid(
                f"storage volume '{volume}' of pool '{pool}' is busy ({found.busy[volume]})"
            )
        image = found.backend.image(found.defn, facts)
        self._lease(f"domain:{domain}", found, volume)
        return ResolvedVolume(found.name, volume, image.kind, facts.path, image.format,
                              dict(image.network))  # fmt: skip

    def pool_targets(self) -> tuple[str, ...]:
        """The VolumeResolver's pool targets (active pools with a local target path)."""
        return tuple(p.defn.target_path for p in self.pools() if p.active and p.defn.target_path)

    def release(self, domain: str, pool: str | None = None, volume: str | None = None) -> None:
        holder = domain if ":" in domain else f"domain:{domain}"
        uuid = self._pools[self._by_name[pool]].defn.uuid if pool in self._by_name else None
        for key in list(self._leases):
            if (uuid is None or key[0] == uuid) and (volume is None or key[1] == volume):
                self._leases[key].discard(holder)
                if not self._leases[key]:
                    del self._leases[key]

    def adopt_leases(self, domain: str, volumes: Iterable[tuple[str, str]]) -> None:
        """At agent start: the volumes of a domain found running."""
        for pool, volume in volumes:
            uuid = self._by_name.get(pool)
            if uuid is not None:
                self._lease(f"domain:{domain}", self._pools[uuid], volume)

    def volumes_of(self, defn: DomainDefinition) -> list[tuple[str, str]]:
        """(pool, volume) of every disk of ``defn`` that is a volume here (by reference or
        by path): what ``undefine --remove-all-storage`` deletes."""
        out: list[tuple[str, str]] = []
        for disk in defn.disks:
            src = disk.element.find("source")
            if disk.type == "volume" and src is not None:
                if src.get("pool") and src.get("volume"):
                    out.append((str(src.get("pool")), str(src.get("volume"))))
            elif disk.source_path:
                found = self.find_by_path(disk.source_path)
                if found is not None:
                    out.append((found[0].name, found[1].name))
        return out

    async def remove_volumes(
        self,
        volumes: Iterable[tuple[str, str]],
        may_delete: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> list[tuple[str, str, VirtbusError | None]]:
        """``undefine --remove-all-storage``, after the domain is undefined: delete each
        volume that ``may_delete`` lets go (it raises AUTH_DENIED for one the caller could
        not vol-delete itself), going on past failures (as virsh does), and say what
        happened to each."""
        done: list[tuple[str, str, VirtbusError | None]] = []
        for pool, volume in volumes:
            try:
                if may_delete is not None:
                    await may_delete(pool, volume)
                await self.delete_volume(pool, volume)
            except VirtbusError as exc:
                done.append((pool, volume, exc))
            else:
                done.append((pool, volume, None))
        return done

    async def image_of(self, pool_ref: str, name: str) -> ImageSource:
        pool = self._running(pool_ref)
        return pool.backend.image(pool.defn, await self.volume(pool.name, name))
