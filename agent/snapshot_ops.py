"""The agent's ``domain.snapshot.*`` ops: typed handlers over the driver's Snapshots
methods (see :mod:`agent.table`); a driver without them answers NO_SUPPORT."""

from __future__ import annotations

from agent.handlers import status_of
from agent.table import HANDLERS, AgentContext
from drivers.base import Snapshots
from virtbus.domain.snapshot import snapshot_without_secrets
from virtbus.errors import InvalidArgument, NoSupport
from virtbus.protocol import ops
from virtbus.protocol.domain import DomainStatus, DomainTarget
from virtbus.protocol.snapshot import (
    SnapshotCreate,
    SnapshotDelete,
    SnapshotInfo,
    SnapshotList,
    SnapshotRevert,
    SnapshotsDeleted,
    SnapshotTarget,
    SnapshotXml,
    SnapshotXmlRequest,
)


def _snapshots(ctx: AgentContext) -> Snapshots:
    if not isinstance(ctx.driver, Snapshots):
        raise NoSupport(f"the {ctx.driver.name} driver has no snapshots")
    return ctx.driver


@HANDLERS.on(ops.DOMAIN_SNAPSHOT_CREATE)
async def _create(ctx: AgentContext, req: SnapshotCreate) -> SnapshotInfo:
    return await _snapshots(ctx).snapshot_create(
        req.domain, req.xml, req.disk_only, req.quiesce, req.halt, req.live
    )


@HANDLERS.on(ops.DOMAIN_SNAPSHOT_LIST)
async def _list(ctx: AgentContext, req: DomainTarget) -> SnapshotList:
    return SnapshotList(snapshots=await _snapshots(ctx).snapshot_list(req.domain))


@HANDLERS.on(ops.DOMAIN_SNAPSHOT_INFO)
async def _info(ctx: AgentContext, req: SnapshotTarget) -> SnapshotInfo:
    return await _snapshots(ctx).snapshot_info(req.domain, req.snapshot)


@HANDLERS.on(ops.DOMAIN_SNAPSHOT_CURRENT)
async def _current(ctx: AgentContext, req: DomainTarget) -> SnapshotInfo:
    return await _snapshots(ctx).snapshot_info(req.domain, None)


@HANDLERS.on(ops.DOMAIN_SNAPSHOT_XML)
async def _xml(ctx: AgentContext, req: SnapshotXmlRequest) -> SnapshotXml:
    """Hidden here, for every driver: the secrets of the snapshot's ``<domain>`` unless
    ``security_info`` (which the agent authorised as domain.read_secure too)."""
    xml = await _snapshots(ctx).snapshot_xml(req.domain, req.snapshot)
    return SnapshotXml(xml=xml if req.security_info else snapshot_without_secrets(xml))


@HANDLERS.on(ops.DOMAIN_SNAPSHOT_REVERT)
async def _revert(ctx: AgentContext, req: SnapshotRevert) -> DomainStatus:
    if req.running and req.paused:
        raise InvalidArgument("--running and --paused are mutually exclusive")
    await _snapshots(ctx).snapshot_revert(req.domain, req.snapshot, req.running, req.paused)
    return status_of(ctx.driver, req.domain)


@HANDLERS.on(ops.DOMAIN_SNAPSHOT_DELETE)
async def _delete(ctx: AgentContext, req: SnapshotDelete) -> SnapshotsDeleted:
    if req.children and req.children_only:
        raise InvalidArgument("--children and --children-only are mutually exclusive")
    deleted = await _snapshots(ctx).snapshot_delete(
        req.domain, req.snapshot, req.children, req.children_only, req.metadata
    )
    return SnapshotsDeleted(deleted=deleted)
