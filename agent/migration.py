"""The agent's migration ops: libvirt's v3 steps, one bus call each.

The steps and their order are in :mod:`virtbus.protocol.migration`. ``finish`` and
``confirm`` are idempotent, because a coordinator that restarted may repeat them:
finishing a domain that already runs here as a persistent domain, confirming a success
whose source domain is already gone, or rolling back a destination that has no incoming
domain (left) all answer OK instead of an error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from agent import copy_storage
from agent.admission import Demand
from agent.table import HANDLERS, AgentContext
from drivers.base import CopyStorage, Driver, MigrationTls, MigrationWait
from virtbus.domain import parse_domain_xml
from virtbus.errors import AuthDenied, NoSupport, OperationInvalid, VirtbusError
from virtbus.protocol import ops
from virtbus.protocol.base import Accepted
from virtbus.protocol.events import DomainState
from virtbus.protocol.migration import (
    MigrationBegin,
    MigrationDomain,
    MigrationEnd,
    MigrationOutcome,
    MigrationParams,
    MigrationPerform,
    MigrationPrepare,
    MigrationRef,
    MigrationSource,
    MigrationStatus,
    MigrationStatusQuery,
    MigrationTarget,
    PreparedUri,
)
from virtbus.store import SnapshotFile

log = logging.getLogger(__name__)
ABSENT = MigrationOutcome(state="absent")
GUARD = "migration_guard"  # its key in AgentContext.extras
MAX_PREPARED = 256  # prepared migrations remembered (the oldest are forgotten first)


@dataclass(slots=True)
class MigrationGuard:
    """A migration's stream goes only where its destination's ``prepare`` said.

    The destination records the URI it answered under the migration id (``prepared``, on
    disk too: a restarted destination still vouches for it); the source, at ``perform``,
    asks the named destination host for it (``ask``: a ``migration.prepared`` call, which
    only that host's agent serves) and refuses any other URI with AUTH_DENIED. A user with
    the scheduler role could otherwise stream a guest's memory to a listener of its own.
    ``strict`` (a policy is enforced): a ``perform`` without a migration id and a
    destination is refused too; in development mode it is let through unchecked.
    """

    path: Path
    ask: Callable[[str, str], Awaitable[str]]  # (destination host, migration id) -> URI
    strict: bool
    prepared: dict[str, str] = field(default_factory=dict)
    _file: SnapshotFile = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._file = SnapshotFile(self.path)

    def load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("prepared migrations not read from %s: %s", self.path, exc)
            return
        if isinstance(data, dict):
            self.prepared = {str(k): str(v) for k, v in data.items()}

    async def record(self, migration: str, uri: str) -> None:
        self.prepared.pop(migration, None)
        self.prepared[migration] = uri
        while len(self.prepared) > MAX_PREPARED:
            del self.prepared[next(iter(self.prepared))]
        # concurrent prepares: an older snapshot must not replace a newer one on disk
        await self._file.write(lambda: json.dumps(self.prepared).encode())

    def uri_of(self, migration: str, host: str) -> str:
        uri = self.prepared.get(migration)
        if uri is None:
            raise OperationInvalid(f"host {host!r} prepared no migration {migration!r}")
        return uri

    async def check(self, req: MigrationPerform) -> None:
        if req.migration is None or req.destination is None:
            if self.strict:
                raise AuthDenied(
                    f"migration.perform of {req.domain!r} names no migration id and destination:"
                    " the URI is accepted only as that migration's prepare answered it"
                )
            return
        try:
            uri = await self.ask(req.destination, req.migration)
        except VirtbusError as exc:
            raise AuthDenied(
                f"migration.perform of {req.domain!r} towards {req.uri!r} refused: host "
                f"{req.destination!r} does not vouch for migration {req.migration!r}: {exc}"
            ) from None
        if uri != req.uri:
            raise AuthDenied(
                f"migration.perform of {req.domain!r} towards {req.uri!r} refused: migration "
                f"{req.migration!r}'s prepare on {req.destination!r} answered {uri!r}"
            )


def _copier(ctx: AgentContext) -> CopyStorage:
    if not isinstance(ctx.driver, CopyStorage):
        raise NoSupport(f"the {ctx.driver.name} driver cannot migrate with copy-storage")
    return ctx.driver


def _copied(ctx: AgentContext) -> copy_storage.CopiedVolumes:
    copied: copy_storage.CopiedVolumes | None = ctx.extras.get(copy_storage.KEY)
    if copied is None:
        raise NoSupport(f"host {ctx.host!r} keeps no record of copied volumes")
    return copied


def _check_tls(ctx: AgentContext, params: MigrationParams) -> None:
    """This host's TLS rules for a migration (migrate_tls_force), before anything moves."""
    if isinstance(ctx.driver, MigrationTls):
        ctx.driver.migrate_check_tls(params)
    elif params.tls:
        raise NoSupport(f"the {ctx.driver.name} driver cannot migrate over TLS")


@HANDLERS.on(ops.MIGRATION_BEGIN)
async def _begin(ctx: AgentContext, req: MigrationBegin) -> MigrationSource:
    _check_tls(ctx, req.params)
    xml = await ctx.driver.migrate_begin(req.domain)
    params = req.params
    disks = (
        await _copier(ctx).migrate_disks(req.domain, params.copy_storage_inc)
        if params.copy_storage
        else []
    )
    info = await ctx.driver.info(req.domain)
    return MigrationSource(
        xml=xml, name=info.name, uuid=info.uuid, state=info.state.label, disks=disks
    )


@HANDLERS.on(ops.MIGRATION_PREPARE)
async def _prepare(ctx: AgentContext, req: MigrationPrepare) -> MigrationTarget:
    defn = parse_domain_xml(req.xml)
    demand = Demand(defn.uuid, defn.name, defn.current_memory_kib, defn.current_vcpus)
    _check_tls(ctx, req.params)
    copy = req.params.copy_storage
    if not copy and req.disks:
        raise OperationInvalid("disks to copy are given without copy-storage")
    nbd = None
    async with ctx.admission.starting(demand):  # the incoming guest takes the host too
        if copy:
            copier, copied = _copier(ctx), _copied(ctx)
            await copied.precreate(defn, req.disks)  # before the launch resolves them
        try:
            uri = await ctx.driver.migrate_prepare(req.xml, req.params)
        except BaseException:
            if copy:
                await copied.remove(defn.uuid)
            raise
        if copy:
            try:
                targets = [d.target for d in req.disks]
                nbd = await copier.migrate_nbd_start(defn.uuid, targets, req.params.listen)
            except BaseException:
                await ctx.driver.migrate_finish(defn.uuid, False)
                await copied.remove(defn.uuid)
                raise
    guard: MigrationGuard | None = ctx.extras.get(GUARD)
    if guard is not None and req.migration is not None:
        await guard.record(req.migration, uri)
    return MigrationTarget(uri=uri, name=defn.name, uuid=defn.uuid, nbd=nbd)


@HANDLERS.on(ops.MIGRATION_PREPARED)
async def _prepared(ctx: AgentContext, req: MigrationRef) -> PreparedUri:
    guard: MigrationGuard | None = ctx.extras.get(GUARD)
    if guard is None:
        raise OperationInvalid(f"host {ctx.host!r} records no prepared migrations")
    return PreparedUri(uri=guard.uri_of(req.migration, ctx.host))


@HANDLERS.on(ops.MIGRATION_PERFORM)
async def _perform(ctx: AgentContext, req: MigrationPerform) -> Accepted:
    guard: MigrationGuard | None = ctx.extras.get(GUARD)
    if guard is not None:
        await guard.check(req)
    _check_tls(ctx, req.params)
    params = req.params
    if params.tls and params.tls_destination is None and req.destination is not None:
        # the destination's certificate names its host (virtbus pki: CN = host name)
        params = msgspec.structs.replace(params, tls_destination=req.destination)
    if params.copy_storage:
        if req.nbd is None:
            raise OperationInvalid(
                f"migration.perform of {req.domain!r} with copy-storage names no NBD"
                " target (the destination's prepare answers it)"
            )
        await _copier(ctx).migrate_perform_copy(req.domain, req.uri, params, req.nbd)
    else:
        await ctx.driver.migrate_perform(req.domain, req.uri, params)
    return Accepted()


@HANDLERS.on(ops.MIGRATION_STATUS)
async def _status(ctx: AgentContext, req: MigrationStatusQuery) -> MigrationStatus:
    """With ``wait``: answered once the migration ended (or after ``wait``)."""
    if req.wait and isinstance(ctx.driver, MigrationWait):
        await ctx.driver.migrate_wait(req.domain, req.wait)
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
    """Also the end of the volumes a copy-storage prepare made: removed once a rollback
    left no incoming instance using them, kept (forgotten) once the domain is ours."""
    copied: copy_storage.CopiedVolumes | None = ctx.extras.get(copy_storage.KEY)
    found = ctx.driver.lookup(req.domain)
    uuid = found.uuid if found is not None else req.domain  # the scheduler names the uuid
    try:
        outcome = await _finish_domain(ctx, req)
    finally:
        if copied is not None and not req.success and _inactive(ctx.driver, uuid):
            await copied.remove(uuid)
    if copied is not None and req.success:
        await copied.forget(uuid)
    return outcome


def _inactive(driver: Driver, ref: str) -> bool:
    if driver.lookup(ref) is None:
        return True
    return driver.state(ref)[0] == DomainState.SHUTOFF


async def _finish_domain(ctx: AgentContext, req: MigrationEnd) -> MigrationOutcome:
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
