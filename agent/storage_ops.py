"""The agent's storage, job and disk-device ops: typed handlers over StoragePools, the
JobManager and the driver's Hotplug methods (see :mod:`agent.table`)."""

from __future__ import annotations

from typing import Any

from agent.jobs import Job
from agent.owners import caller
from agent.storage import Pool
from agent.table import HANDLERS, AgentContext
from drivers.base import Affect, Hotplug
from virtbus.errors import NoStorageVol, NoSupport, OperationTimeout
from virtbus.protocol import ops
from virtbus.protocol.base import Accepted, Empty
from virtbus.protocol.registry import Op
from virtbus.protocol.storage import (
    Backing,
    BlockInfo,
    BlockInfoRequest,
    DeviceChange,
    DownloadChunk,
    DownloadChunkRequest,
    JobInfo,
    JobList,
    JobWait,
    PoolAutostart,
    PoolBuild,
    PoolCreate,
    PoolInfo,
    PoolList,
    PoolListRequest,
    PoolRef,
    PoolStart,
    PoolTarget,
    PoolXml,
    PoolXmlRequest,
    TransferAck,
    TransferStart,
    TransferTarget,
    UploadChunk,
    UploadRequest,
    VolumeCreate,
    VolumeCreateFrom,
    VolumeInfo,
    VolumeList,
    VolumeLookup,
    VolumePoolRequest,
    VolumeResize,
    VolumeTarget,
    VolumeWipe,
    VolumeXml,
)
from virtbus.storage import VolumeFacts


def job_info(job: Job) -> JobInfo:
    return JobInfo(
        id=job.id, kind=job.kind, target=dict(job.target), state=job.state.value,
        processed=job.processed, total=job.total, started=job.started, ended=job.ended,
        error=job.error, result=job.result, owner=job.owner,
    )  # fmt: skip


def pool_info(pool: Pool) -> PoolInfo:
    return PoolInfo(**pool.info())


def volume_info(pool: Pool, facts: VolumeFacts) -> VolumeInfo:
    back = facts.backing
    return VolumeInfo(
        pool=pool.name, name=facts.name, type=facts.type, path=facts.path, key=facts.key,
        format=facts.format, capacity=facts.capacity, allocation=facts.allocation,
        physical=facts.physical,
        backing=Backing(path=back.path, format=back.format) if back is not None else None,
        owner=pool.volume_owner(facts.name),
    )  # fmt: skip


# --- pools ----------------------------------------------------------------------------
@HANDLERS.on(ops.STORAGE_POOL_DEFINE)
async def _pool_define(ctx: AgentContext, req: PoolXmlRequest) -> PoolRef:
    pool = await ctx.storage.define(req.xml, owner=caller())
    return PoolRef(name=pool.name, uuid=pool.defn.uuid)


@HANDLERS.on(ops.STORAGE_POOL_CREATE)
async def _pool_create(ctx: AgentContext, req: PoolCreate) -> PoolRef:
    pool = await ctx.storage.create(req.xml, build=req.build, overwrite=req.overwrite,
                                    owner=caller())  # fmt: skip
    return PoolRef(name=pool.name, uuid=pool.defn.uuid)


@HANDLERS.on(ops.STORAGE_POOL_UNDEFINE)
async def _pool_undefine(ctx: AgentContext, req: PoolTarget) -> Accepted:
    await ctx.storage.undefine(req.pool)
    return Accepted()


@HANDLERS.on(ops.STORAGE_POOL_BUILD)
async def _pool_build(ctx: AgentContext, req: PoolBuild) -> Accepted:
    await ctx.storage.build(req.pool, overwrite=req.overwrite)
    return Accepted()


@HANDLERS.on(ops.STORAGE_POOL_START)
async def _pool_start(ctx: AgentContext, req: PoolStart) -> PoolInfo:
    return pool_info(await ctx.storage.start(req.pool, build=req.build, overwrite=req.overwrite))


@HANDLERS.on(ops.STORAGE_POOL_DESTROY)
async def _pool_destroy(ctx: AgentContext, req: PoolTarget) -> Accepted:
    await ctx.storage.destroy(req.pool)
    return Accepted()


@HANDLERS.on(ops.STORAGE_POOL_DELETE)
async def _pool_delete(ctx: AgentContext, req: PoolTarget) -> Accepted:
    await ctx.storage.delete(req.pool)
    return Accepted()


@HANDLERS.on(ops.STORAGE_POOL_REFRESH)
async def _pool_refresh(ctx: AgentContext, req: PoolTarget) -> PoolInfo:
    return pool_info(await ctx.storage.refresh(req.pool))


@HANDLERS.on(ops.STORAGE_POOL_AUTOSTART)
async def _pool_autostart(ctx: AgentContext, req: PoolAutostart) -> PoolInfo:
    return pool_info(await ctx.storage.set_autostart(req.pool, req.autostart))


@HANDLERS.on(ops.STORAGE_POOL_LIST)
async def _pool_list(ctx: AgentContext, req: PoolListRequest) -> PoolList:
    pools = [p for p in ctx.storage.pools() if req.all or p.active]
    return PoolList(pools=[pool_info(p) for p in pools])


@HANDLERS.on(ops.STORAGE_POOL_INFO)
async def _pool_info(ctx: AgentContext, req: PoolTarget) -> PoolInfo:
    return pool_info(ctx.storage.get(req.pool))


@HANDLERS.on(ops.STORAGE_POOL_XML)
async def _pool_xml(ctx: AgentContext, req: PoolTarget) -> PoolXml:
    return PoolXml(xml=ctx.storage.xml(req.pool))


# --- volumes --------------------------------------------------------------------------
@HANDLERS.on(ops.STORAGE_VOL_CREATE)
async def _vol_create(ctx: AgentContext, req: VolumeCreate) -> VolumeInfo:
    facts = await ctx.storage.create_volume(req.pool, req.xml, owner=caller(),
                                            prealloc_metadata=req.prealloc_metadata)  # fmt: skip
    return volume_info(ctx.storage.get(req.pool), facts)


@HANDLERS.on(ops.STORAGE_VOL_CREATE_FROM)
async def _vol_create_from(ctx: AgentContext, req: VolumeCreateFrom) -> JobInfo:
    job = await ctx.storage.clone_volume(req.pool, req.xml, req.source_pool, req.source,
                                         owner=caller())  # fmt: skip
    return job_info(job)


@HANDLERS.on(ops.STORAGE_VOL_DELETE)
async def _vol_delete(ctx: AgentContext, req: VolumeTarget) -> Accepted:
    await ctx.storage.delete_volume(req.pool, req.volume)
    return Accepted()


@HANDLERS.on(ops.STORAGE_VOL_WIPE)
async def _vol_wipe(ctx: AgentContext, req: VolumeWipe) -> JobInfo:
    job = await ctx.storage.wipe_volume(req.pool, req.volume, req.algorithm, owner=caller())
    return job_info(job)


@HANDLERS.on(ops.STORAGE_VOL_RESIZE)
async def _vol_resize(ctx: AgentContext, req: VolumeResize) -> VolumeInfo:
    facts = await ctx.storage.resize_volume(
        req.pool, req.volume, req.capacity, delta=req.delta, shrink=req.shrink,
        allocate=req.allocate,
    )  # fmt: skip
    return volume_info(ctx.storage.get(req.pool), facts)


@HANDLERS.on(ops.STORAGE_VOL_INFO)
async def _vol_info(ctx: AgentContext, req: VolumeTarget) -> VolumeInfo:
    facts = await ctx.storage.volume(req.pool, req.volume)
    return volume_info(ctx.storage.get(req.pool), facts)


@HANDLERS.on(ops.STORAGE_VOL_LIST)
async def _vol_list(ctx: AgentContext, req: VolumePoolRequest) -> VolumeList:
    pool = ctx.storage.get(req.pool)
    return VolumeList(volumes=[volume_info(pool, f) for f in ctx.storage.volumes(req.pool)])


@HANDLERS.on(ops.STORAGE_VOL_XML)
async def _vol_xml(ctx: AgentContext, req: VolumeTarget) -> VolumeXml:
    return VolumeXml(xml=await ctx.storage.volume_xml(req.pool, req.volume))


@HANDLERS.on(ops.STORAGE_VOL_LOOKUP)
async def _vol_lookup(ctx: AgentContext, req: VolumeLookup) -> VolumeInfo:
    found = ctx.storage.find_by_path(req.path)
    if found is None:
        raise NoStorageVol(f"no storage vol with matching path or key '{req.path}'")
    pool, facts = found
    return volume_info(pool, facts)


@HANDLERS.on(ops.STORAGE_VOL_UPLOAD)
async def _vol_upload(ctx: AgentContext, req: UploadRequest) -> TransferStart:
    job = await ctx.storage.upload_begin(req.pool, req.volume, req.length, owner=caller())
    cfg = ctx.storage.settings
    return TransferStart(job=job_info(job), length=req.length, chunk_size=cfg.chunk_size,
                         window=cfg.transfer_window)  # fmt: skip


@HANDLERS.on(ops.STORAGE_VOL_UPLOAD_CHUNK)
async def _vol_upload_chunk(ctx: AgentContext, req: UploadChunk) -> TransferAck:
    offset = await ctx.storage.upload_chunk(req.job, req.offset, req.data, user=caller())
    return TransferAck(offset=offset)


@HANDLERS.on(ops.STORAGE_VOL_UPLOAD_FINISH)
async def _vol_upload_finish(ctx: AgentContext, req: TransferTarget) -> VolumeInfo:
    job = ctx.jobs.get(req.job)
    facts = await ctx.storage.upload_finish(req.job, user=caller())
    return volume_info(ctx.storage.get(job.target.get("pool", "")), facts)


@HANDLERS.on(ops.STORAGE_VOL_DOWNLOAD)
async def _vol_download(ctx: AgentContext, req: VolumeTarget) -> TransferStart:
    job, length = await ctx.storage.download_begin(req.pool, req.volume, owner=caller())
    cfg = ctx.storage.settings
    return TransferStart(job=job_info(job), length=length, chunk_size=cfg.chunk_size,
                         window=cfg.transfer_window)  # fmt: skip


@HANDLERS.on(ops.STORAGE_VOL_DOWNLOAD_CHUNK)
async def _vol_download_chunk(ctx: AgentContext, req: DownloadChunkRequest) -> DownloadChunk:
    data = await ctx.storage.download_chunk(req.job, req.offset, user=caller())
    return DownloadChunk(data=data)


@HANDLERS.on(ops.STORAGE_VOL_DOWNLOAD_FINISH)
async def _vol_download_finish(ctx: AgentContext, req: TransferTarget) -> Accepted:
    await ctx.storage.download_finish(req.job, user=caller())
    return Accepted()


# --- jobs -----------------------------------------------------------------------------
@HANDLERS.on(ops.JOB_INFO)
async def _job_info(ctx: AgentContext, req: TransferTarget) -> JobInfo:
    return job_info(ctx.jobs.get(req.job))


@HANDLERS.on(ops.JOB_LIST)
async def _job_list(ctx: AgentContext, req: Empty) -> JobList:
    return JobList(jobs=[job_info(j) for j in ctx.jobs.jobs()])


@HANDLERS.on(ops.JOB_WAIT)
async def _job_wait(ctx: AgentContext, req: JobWait) -> JobInfo:
    try:
        return job_info(await ctx.jobs.wait(req.job, req.timeout))
    except OperationTimeout:
        return job_info(ctx.jobs.get(req.job))  # still running: the caller asks again


# What cancelling a job of this kind does to its volume, as the op that would do it: a
# clone's cancel removes the volume it was making (vol-delete), a wipe's leaves the
# volume part-wiped (vol-wipe). A user other than the job's starter needs that right on
# the volume: job.cancel is a host op, and an operator must not undo another's work.
_CANCEL_IS: dict[str, Op[Any, Any]] = {
    "vol.clone": ops.STORAGE_VOL_DELETE,
    "vol.wipe": ops.STORAGE_VOL_WIPE,
}


@HANDLERS.on(ops.JOB_CANCEL)
async def _job_cancel(ctx: AgentContext, req: TransferTarget) -> JobInfo:
    job = ctx.jobs.get(req.job)
    user = caller()
    job.check_driver(user, "cancel")  # a transfer: its owner only
    acts_as = _CANCEL_IS.get(job.kind)
    if acts_as is not None and user != job.owner:
        await ctx.authorize(acts_as, f"{job.target.get('pool')}/{job.target.get('volume')}")
    return job_info(await ctx.jobs.cancel(req.job))


# --- disk devices ---------------------------------------------------------------------
def _hotplug(ctx: AgentContext) -> Hotplug:
    if not isinstance(ctx.driver, Hotplug):
        raise NoSupport(f"the {ctx.driver.name} driver cannot change a domain's devices")
    return ctx.driver


@HANDLERS.on(ops.DOMAIN_ATTACH_DEVICE)
async def _attach(ctx: AgentContext, req: DeviceChange) -> Accepted:
    await _hotplug(ctx).attach_device(req.domain, req.xml, Affect(req.live, req.config))
    return Accepted()


@HANDLERS.on(ops.DOMAIN_DETACH_DEVICE)
async def _detach(ctx: AgentContext, req: DeviceChange) -> Accepted:
    await _hotplug(ctx).detach_device(req.domain, req.xml, Affect(req.live, req.config))
    return Accepted()


@HANDLERS.on(ops.DOMAIN_BLOCK_INFO)
async def _block_info(ctx: AgentContext, req: BlockInfoRequest) -> BlockInfo:
    info = await _hotplug(ctx).block_info(req.domain, req.target)
    return BlockInfo(target=info.target, capacity=info.capacity, allocation=info.allocation,
                     physical=info.physical)  # fmt: skip
