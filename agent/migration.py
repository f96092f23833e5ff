"""The agent's migration ops: libvirt's v3 steps, one bus call each.

The steps and their order are in :mod:`virtbus.protocol.migration`. ``finish`` and
``confirm`` are idempotent, because a coordinator that restarted may repeat them:
finishing a domain that already runs here as a persistent domain, confirming a success
whose source domain is already gone, or rolling back a destination that has no incoming
domain (left) all answer OK instead of an error.
"""

from __future__ import annotations

from agent.admission import Demand
from agent.table import HANDLERS, AgentContext
from drivers.base import Driver
from virtbus.domain import parse_domain_xml
from virtbus.protocol import ops
from virtbus.protocol.base import Accepted
from virtbus.protocol.events import DomainState
from virtbus.protocol.migration import (
    MigrationDomain,
    MigrationEnd,
    MigrationOutcome,
    MigrationPerform,
    MigrationPrepare,
    MigrationSource,
    MigrationStatus,
    MigrationTarget,
)

ABSENT = MigrationOutcome(state="absent")


@HANDLERS.on(ops.MIGRATION_BEGIN)
async def _begin(ctx: AgentContext, req: MigrationDomain) -> MigrationSource:
    xml = await ctx.driver.migrate_begin(req.domain)
    info = await ctx.driver.info(req.domain)
    return MigrationSource(xml=xml, name=info.name, uuid=info.uuid, state=info.state.label)


@HANDLERS.on(ops.MIGRATION_PREPARE)
async def _prepare(ctx: AgentContext, req: MigrationPrepare) -> MigrationTarget:
    defn = parse_domain_xml(req.xml)
    demand = Demand(defn.uuid, defn.name, defn.current_memory_kib, defn.current_vcpus)
    async with ctx.admission.starting(demand):  # the incoming guest takes the host too
        uri = await ctx.driver.migrate_prepare(req.xml, req.params)
    return MigrationTarget(uri=uri, name=defn.name, uuid=defn.uuid)


@HANDLERS.on(ops.MIGRATION_PERFORM)
async def _perform(ctx: AgentContext, req: MigrationPerform) -> Accepted:
    await ctx.driver.migrate_perform(req.domain, req.uri, req.params)
    return Accepted()


@HANDLERS.on(ops.MIGRATION_STATUS)
async def _status(ctx: AgentContext, req: MigrationDomain) -> MigrationStatus:
    return await ctx.driver.migrate_status(req.domain)


@HANDLERS.on(ops.MIGRATION_CANCEL)
async def _cancel(ctx: AgentContext, req: MigrationDomain) -> Accepted:
    await ctx.driver.migrate_cancel(req.domain)
    return Accepted()


async def _outcome(driver: Driver, ref: str) -> MigrationOutcome:
    info = await driver.info(ref)  # NO_DOMAIN when it is not here
    return MigrationOutcome(state=info.state.label, reason=info.reason, persistent=info.persistent)


@HANDLERS.on(ops.MIGRATION_FINISH)
async def _finish(ctx: AgentContext, req: MigrationEnd) -> MigrationOutcome:
    driver, ref, success = ctx.driver, req.domain, req.success
    if driver.lookup(ref) is None:
        if success:
            return await _outcome(driver, ref)  # raises NO_DOMAIN: nothing to finish
        return ABSENT
    info = await driver.info(ref)
    if success and info.persistent and info.state == DomainState.RUNNING:
        return await _outcome(driver, ref)  # finished before (a repeated call)
    if not success and info.persistent and info.reason != "migration":
        return await _outcome(driver, ref)  # not an incoming domain: nothing to undo
    await driver.migrate_finish(ref, success)
    if driver.lookup(ref) is None:
        return ABSENT
    return await _outcome(driver, ref)


@HANDLERS.on(ops.MIGRATION_CONFIRM)
async def _confirm(ctx: AgentContext, req: MigrationEnd) -> MigrationOutcome:
    driver, ref, success = ctx.driver, req.domain, req.success
    if driver.lookup(ref) is None:
        if success:
            return ABSENT  # the source copy is already gone
        return await _outcome(driver, ref)  # raises NO_DOMAIN: the guest is not here
    await driver.migrate_confirm(ref, success)
    if driver.lookup(ref) is None:
        return ABSENT
    return await _outcome(driver, ref)
