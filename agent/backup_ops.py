"""The agent's ``domain.checkpoint.*``, ``domain.backup.*`` and ``domain.job.*`` ops:
typed handlers over the driver's Backups methods (see :mod:`agent.table`); a driver
without them answers NO_SUPPORT."""

from __future__ import annotations

from agent.table import HANDLERS, AgentContext
from drivers.base import Backups
from virtbus.errors import NoSupport
from virtbus.protocol import ops
from virtbus.protocol.backup import (
    BackupBegin,
    BackupStarted,
    BackupXml,
    CheckpointCreate,
    CheckpointDelete,
    CheckpointInfo,
    CheckpointList,
    CheckpointsDeleted,
    CheckpointTarget,
    CheckpointXml,
    DomainJobInfo,
    JobInfoRequest,
)
from virtbus.protocol.domain import DomainTarget


def _backups(ctx: AgentContext) -> Backups:
    if not isinstance(ctx.driver, Backups):
        raise NoSupport(f"the {ctx.driver.name} driver has no checkpoints or backups")
    return ctx.driver


@HANDLERS.on(ops.DOMAIN_CHECKPOINT_CREATE)
async def _create(ctx: AgentContext, req: CheckpointCreate) -> CheckpointInfo:
    return await _backups(ctx).checkpoint_create(req.domain, req.xml)


@HANDLERS.on(ops.DOMAIN_CHECKPOINT_LIST)
async def _list(ctx: AgentContext, req: DomainTarget) -> CheckpointList:
    return CheckpointList(checkpoints=await _backups(ctx).checkpoint_list(req.domain))


@HANDLERS.on(ops.DOMAIN_CHECKPOINT_INFO)
async def _info(ctx: AgentContext, req: CheckpointTarget) -> CheckpointInfo:
    return await _backups(ctx).checkpoint_info(req.domain, req.checkpoint)


@HANDLERS.on(ops.DOMAIN_CHECKPOINT_XML)
async def _xml(ctx: AgentContext, req: CheckpointTarget) -> CheckpointXml:
    return CheckpointXml(xml=await _backups(ctx).checkpoint_xml(req.domain, req.checkpoint))


@HANDLERS.on(ops.DOMAIN_CHECKPOINT_DELETE)
async def _delete(ctx: AgentContext, req: CheckpointDelete) -> CheckpointsDeleted:
    deleted = await _backups(ctx).checkpoint_delete(req.domain, req.checkpoint, req.metadata)
    return CheckpointsDeleted(deleted=deleted)


@HANDLERS.on(ops.DOMAIN_BACKUP_BEGIN)
async def _begin(ctx: AgentContext, req: BackupBegin) -> BackupStarted:
    return await _backups(ctx).backup_begin(req.domain, req.backup_xml, req.checkpoint_xml)


@HANDLERS.on(ops.DOMAIN_BACKUP_XML)
async def _backup_xml(ctx: AgentContext, req: DomainTarget) -> BackupXml:
    return BackupXml(xml=await _backups(ctx).backup_xml(req.domain))


@HANDLERS.on(ops.DOMAIN_JOB_INFO)
async def _job_info(ctx: AgentContext, req: JobInfoRequest) -> DomainJobInfo:
    return await _backups(ctx).job_info(req.domain, req.completed)


@HANDLERS.on(ops.DOMAIN_JOB_ABORT)
async def _job_abort(ctx: AgentContext, req: DomainTarget) -> DomainJobInfo:
    return await _backups(ctx).job_abort(req.domain)
