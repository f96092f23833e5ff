"""The agent's saved-state ops: save, restore, managedsave, managedsave-remove, over the
driver's SavedState methods (see :mod:`agent.table`); NO_SUPPORT without them."""

from __future__ import annotations

from agent.handlers import status_of
from agent.table import HANDLERS, AgentContext
from drivers.base import SavedState
from virtbus.errors import InvalidArgument, NoSupport
from virtbus.protocol import ops
from virtbus.protocol.domain import DomainStatus, DomainTarget
from virtbus.protocol.save import ManagedSaveRequest, Restored, RestoreRequest, SaveRequest


def _saves(ctx: AgentContext) -> SavedState:
    if not isinstance(ctx.driver, SavedState):
        raise NoSupport(f"the {ctx.driver.name} driver cannot save a guest's state")
    return ctx.driver


def _flags(running: bool, paused: bool) -> None:
    if running and paused:
        raise InvalidArgument("--running and --paused are mutually exclusive")


@HANDLERS.on(ops.DOMAIN_SAVE)
async def _save(ctx: AgentContext, req: SaveRequest) -> DomainStatus:
    _flags(req.running, req.paused)
    await _saves(ctx).save(req.domain, req.file, req.running, req.paused)
    return status_of(ctx.driver, req.domain)


@HANDLERS.on(ops.DOMAIN_RESTORE)
async def _restore(ctx: AgentContext, req: RestoreRequest) -> Restored:
    _flags(req.running, req.paused)
    ref = await _saves(ctx).restore(req.file, req.running, req.paused)
    return Restored(name=ref.name, uuid=ref.uuid, state=status_of(ctx.driver, ref.uuid))


@HANDLERS.on(ops.DOMAIN_MANAGED_SAVE)
async def _managed_save(ctx: AgentContext, req: ManagedSaveRequest) -> DomainStatus:
    _flags(req.running, req.paused)
    await _saves(ctx).managed_save(req.domain, req.running, req.paused)
    return status_of(ctx.driver, req.domain)


@HANDLERS.on(ops.DOMAIN_MANAGED_SAVE_REMOVE)
async def _managed_save_remove(ctx: AgentContext, req: DomainTarget) -> DomainStatus:
    await _saves(ctx).managed_save_remove(req.domain)
    return status_of(ctx.driver, req.domain)
