"""The agent's domain and host ops: one typed handler per op (see :mod:`agent.table`)."""

from __future__ import annotations

from typing import Any

from agent.admission import Demand
from agent.table import HANDLERS, AgentContext
from drivers.base import Affect, Driver, MemoryTuning
from virtbus.domain import domain_name_of, parse_domain_xml, without_secrets
from virtbus.errors import InternalError, NoSupport
from virtbus.protocol import ops
from virtbus.protocol.base import Accepted, Empty
from virtbus.protocol.domain import (
    AutostartFlag,
    DefinedDomain,
    DomainAutostart,
    DomainDefine,
    DomainList,
    DomainListRequest,
    DomainMemoryRequest,
    DomainShutdown,
    DomainStats,
    DomainStatsRequest,
    DomainStatus,
    DomainTarget,
    DomainUndefine,
    DomainXml,
    RemovedVolume,
    StateName,
    Undefined,
)
from virtbus.protocol.domain import DomainInfo as DomainInfoMsg
from virtbus.protocol.host import DrainFlag, HostInventory, Pong, SetDraining
from virtbus.protocol.registry import Op, Target


def status_of(driver: Driver, ref: str) -> DomainStatus:
    """A lifecycle op's answer: the driver's own record of the state, no I/O."""
    state, reason = driver.state(ref)
    return DomainStatus(state=StateName.of(state), reason=reason)


@HANDLERS.on(ops.DOMAIN_DEFINE)
async def _define(ctx: AgentContext, req: DomainDefine) -> DefinedDomain:
    ref = await ctx.driver.define(req.xml)
    return DefinedDomain(name=ref.name, uuid=ref.uuid)


@HANDLERS.on(ops.DOMAIN_UNDEFINE)
async def _undefine(ctx: AgentContext, req: DomainUndefine) -> Undefined:
    """virsh undefine [--remove-all-storage]: the volumes go after the definition, each
    reported (one that cannot be deleted does not stop the others)."""
    volumes: list[tuple[str, str]] = []
    if req.remove_all_storage:
        volumes = ctx.storage.volumes_of(parse_domain_xml(await ctx.driver.xml(req.domain)))
    await ctx.driver.undefine(req.domain)

    async def may_delete(pool: str, volume: str) -> None:  # as a vol-delete of it would be
        await ctx.authorize(ops.STORAGE_VOL_DELETE, f"{pool}/{volume}")

    removed = await ctx.storage.remove_volumes(volumes, may_delete)
    return Undefined(volumes=[
        RemovedVolume(pool=p, volume=v, error=e.to_wire() if e is not None else None)
        for p, v, e in removed
    ])  # fmt: skip


def _lifecycle(op: Op[DomainTarget, DomainStatus], verb: str) -> None:
    async def handle(ctx: AgentContext, req: DomainTarget) -> DomainStatus:
        await getattr(ctx.driver, verb)(req.domain)
        return status_of(ctx.driver, req.domain)

    handle.__name__ = f"_{verb}"
    HANDLERS.on(op)(handle)


@HANDLERS.on(ops.DOMAIN_START)
async def _start(ctx: AgentContext, req: DomainTarget) -> DomainStatus:
    info = await ctx.driver.info(req.domain)
    demand = Demand(info.uuid, info.name, info.memory_kib, info.vcpus)
    async with ctx.admission.starting(demand):  # refuses what the host cannot hold
        await ctx.driver.start(req.domain)
    return status_of(ctx.driver, req.domain)


for _op, _verb in (
    (ops.DOMAIN_DESTROY, "destroy"),
    (ops.DOMAIN_REBOOT, "reboot"),
    (ops.DOMAIN_RESET, "reset"),
    (ops.DOMAIN_SUSPEND, "suspend"),
    (ops.DOMAIN_RESUME, "resume"),
):
    _lifecycle(_op, _verb)


@HANDLERS.on(ops.DOMAIN_SHUTDOWN)
async def _shutdown(ctx: AgentContext, req: DomainShutdown) -> DomainStatus:
    await ctx.driver.shutdown(req.domain, timeout=req.timeout)
    return status_of(ctx.driver, req.domain)


@HANDLERS.on(ops.DOMAIN_INFO)
async def _info(ctx: AgentContext, req: DomainTarget) -> DomainInfoMsg:
    # the owner comes with the driver's info, from its definition's tree: no XML is
    # serialised and parsed again per call
    return (await ctx.driver.info(req.domain)).to_wire(with_owner=True)


@HANDLERS.on(ops.DOMAIN_STATE)
async def _state(ctx: AgentContext, req: DomainTarget) -> DomainStatus:
    return status_of(ctx.driver, req.domain)


@HANDLERS.on(ops.DOMAIN_XML)
async def _xml(ctx: AgentContext, req: DomainTarget) -> DomainXml:
    return DomainXml(xml=without_secrets(await ctx.driver.xml(req.domain)))


@HANDLERS.on(ops.DOMAIN_READ_SECURE)
async def _xml_secure(ctx: AgentContext, req: DomainTarget) -> DomainXml:
    return DomainXml(xml=await ctx.driver.xml(req.domain))


@HANDLERS.on(ops.DOMAIN_SET_AUTOSTART)
async def _set_autostart(ctx: AgentContext, req: DomainAutostart) -> AutostartFlag:
    """Only drivers that start domains with the agent have ``set_autostart``."""
    setter = getattr(ctx.driver, "set_autostart", None)
    if setter is None:
        raise NoSupport(f"the {ctx.driver.name} driver does not autostart domains")
    await setter(req.domain, req.autostart)
    return AutostartFlag(autostart=req.autostart)


@HANDLERS.on(ops.DOMAIN_SET_MEMORY)
async def _set_memory(ctx: AgentContext, req: DomainMemoryRequest) -> Accepted:
    if not isinstance(ctx.driver, MemoryTuning):
        raise NoSupport(f"the {ctx.driver.name} driver cannot change a domain's memory")
    await ctx.driver.set_memory(req.domain, req.kib, req.maximum, Affect(req.live, req.config))
    return Accepted()


@HANDLERS.on(ops.DOMAIN_LIST)
async def _list(ctx: AgentContext, req: DomainListRequest) -> DomainList:
    domains = await ctx.driver.list_domains(include_inactive=req.all)
    return DomainList(domains=[d.to_wire() for d in domains])


@HANDLERS.on(ops.DOMAIN_STATS)
async def _stats(ctx: AgentContext, req: DomainStatsRequest) -> DomainStats:
    """libvirt's domstats, collected now; an unknown domain is NO_DOMAIN."""
    groups = frozenset(req.groups) if req.groups else None
    return DomainStats(domains=await ctx.driver.stats(req.domains or None, groups))


@HANDLERS.on(ops.HOST_INFO)
async def _host_info(ctx: AgentContext, req: Empty) -> HostInventory:
    return await ctx.inventory()


@HANDLERS.on(ops.HOST_PING)
async def _ping(ctx: AgentContext, req: Empty) -> Pong:
    return Pong(host=ctx.host)


@HANDLERS.on(ops.HOST_SET_DRAINING)
async def _set_draining(ctx: AgentContext, req: SetDraining) -> DrainFlag:
    ctx.draining = req.draining
    return DrainFlag(host=ctx.host, draining=ctx.draining)


def serial_key(driver: Driver, op: Op[Any, Any], req: Any) -> str | None:
    """The key calls are serialised on: the target object's resolved name, or None.

    Ops on one domain run strictly one after another whether the caller named it by name
    or by UUID; ops whose target is the name inside an XML definition parse it.
    """
    if not op.serial:
        return None
    ref = op.target_of(req)
    if ref is None:
        xml = getattr(req, "xml", None)
        if not isinstance(xml, str):
            raise InternalError(f"{op.name} is serial but names no target")
        ref = domain_name_of(xml)  # the driver parses it fully; only the name is needed here
    elif op.target is Target.DOMAIN:
        known = driver.lookup(ref)
        ref = known.name if known else ref
    return f"{op.target}:{ref}"


def target_name(driver: Driver, op: Op[Any, Any], req: Any, key: str | None) -> str | None:
    """The name the policy matches a call's target by (a domain's name even when the call
    named it by UUID; None for host-wide ops and for ops that name no object)."""
    if op.target is Target.HOST:
        return None
    if key is not None:
        return key.partition(":")[2]
    ref = op.target_of(req)
    if ref is None:
        xml = getattr(req, "xml", None)
        return domain_name_of(xml) if isinstance(xml, str) else None
    if op.target is Target.DOMAIN:
        known = driver.lookup(ref)
        return known.name if known else ref
    return str(ref)
