"""The agent's ``domain.block.*`` ops: typed handlers over the driver's BlockJobs methods
(see :mod:`agent.table`); a driver without them answers NO_SUPPORT."""

from __future__ import annotations

from agent.table import HANDLERS, AgentContext
from drivers.base import BlockJobs
from virtbus.errors import NoSupport
from virtbus.protocol import ops
from virtbus.protocol.blockjob import (
    BlockCommit,
    BlockCopy,
    BlockErrors,
    BlockJobAbort,
    BlockJobInfo,
    BlockJobSpeed,
    BlockJobState,
    BlockPull,
    BlockTarget,
)
from virtbus.protocol.domain import DomainTarget


def _jobs(ctx: AgentContext) -> BlockJobs:
    if not isinstance(ctx.driver, BlockJobs):
        raise NoSupport(f"the {ctx.driver.name} driver has no block jobs")
    return ctx.driver


@HANDLERS.on(ops.DOMAIN_BLOCK_COMMIT)
async def _commit(ctx: AgentContext, req: BlockCommit) -> BlockJobInfo:
    return await _jobs(ctx).block_commit(req.domain, req)


@HANDLERS.on(ops.DOMAIN_BLOCK_PULL)
async def _pull(ctx: AgentContext, req: BlockPull) -> BlockJobInfo:
    return await _jobs(ctx).block_pull(req.domain, req)


@HANDLERS.on(ops.DOMAIN_BLOCK_COPY)
async def _copy(ctx: AgentContext, req: BlockCopy) -> BlockJobInfo:
    return await _jobs(ctx).block_copy(req.domain, req)


@HANDLERS.on(ops.DOMAIN_BLOCK_JOB_INFO)
async def _info(ctx: AgentContext, req: BlockTarget) -> BlockJobState:
    return _state(ctx, req.domain, req.disk, await _jobs(ctx).block_job_info(req.domain, req.disk))


def _state(ctx: AgentContext, domain: str, disk: str, job: BlockJobInfo | None) -> BlockJobState:
    return BlockJobState(job=job, last=_jobs(ctx).block_job_end(domain, disk))


@HANDLERS.on(ops.DOMAIN_BLOCK_JOB_ABORT)
async def _abort(ctx: AgentContext, req: BlockJobAbort) -> BlockJobState:
    await _jobs(ctx).block_job_abort(req.domain, req.disk, req.pivot)
    return _state(ctx, req.domain, req.disk, await _jobs(ctx).block_job_info(req.domain, req.disk))


@HANDLERS.on(ops.DOMAIN_BLOCK_JOB_SPEED)
async def _speed(ctx: AgentContext, req: BlockJobSpeed) -> BlockJobState:
    job = await _jobs(ctx).block_job_speed(req.domain, req.disk, req.bandwidth)
    return _state(ctx, req.domain, req.disk, job)


@HANDLERS.on(ops.DOMAIN_BLOCK_ERRORS)
async def _errors(ctx: AgentContext, req: DomainTarget) -> BlockErrors:
    return BlockErrors(errors=await _jobs(ctx).block_errors(req.domain))
