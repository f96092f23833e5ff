"""The agent's ops: validate a call's body, run it on the driver, shape the result.

Every op named in ``virtbus.protocol.ops.AGENT_OPS`` has a handler here; the body and
result shapes are the README's protocol reference.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from agent.migration import MIGRATION_HANDLERS
from drivers.base import STATS_GROUPS, Driver
from virtbus.domain import parse_domain_xml
from virtbus.errors import InvalidArgument, NoSupport
from virtbus.protocol import ops
from virtbus.protocol.envelope import Envelope

Handler = Callable[[Driver, dict[str, Any]], Awaitable[Any]]


def _domain_ref(body: dict[str, Any]) -> str:
    ref = body.get("domain")
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument("'domain' (a name or uuid) is required")
    return ref


def _xml(body: dict[str, Any]) -> str:
    xml = body.get("xml")
    if not isinstance(xml, str) or not xml.strip():
        raise InvalidArgument("'xml' (a domain definition) is required")
    return xml


def _optional_number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(f"'{key}' must be a non-negative number")
    return float(value)


async def _define(driver: Driver, body: dict[str, Any]) -> Any:
    ref = await driver.define(_xml(body))
    return {"name": ref.name, "uuid": ref.uuid}


async def _undefine(driver: Driver, body: dict[str, Any]) -> Any:
    await driver.undefine(_domain_ref(body))
    return {}


def _lifecycle(verb: str) -> Handler:
    async def handle(driver: Driver, body: dict[str, Any]) -> Any:
        ref = _domain_ref(body)
        await getattr(driver, verb)(ref)
        info = await driver.info(ref)
        return {"state": info.state.label, "reason": info.reason}

    handle.__name__ = f"_{verb}"
    return handle


async def _shutdown(driver: Driver, body: dict[str, Any]) -> Any:
    ref = _domain_ref(body)
    await driver.shutdown(ref, timeout=_optional_number(body, "timeout"))
    info = await driver.info(ref)
    return {"state": info.state.label, "reason": info.reason}


async def _info(driver: Driver, body: dict[str, Any]) -> Any:
    return (await driver.info(_domain_ref(body))).to_map()


async def _state(driver: Driver, body: dict[str, Any]) -> Any:
    info = await driver.info(_domain_ref(body))
    return {"state": info.state.label, "reason": info.reason}


async def _xml_of(driver: Driver, body: dict[str, Any]) -> Any:
    return {"xml": await driver.xml(_domain_ref(body))}


async def _stats(driver: Driver, body: dict[str, Any]) -> Any:
    """libvirt's domstats, collected now; unknown domains or groups are INVALID_ARG/NO_DOMAIN."""
    refs, groups = body.get("domains"), body.get("groups")
    for key, value in (("domains", refs), ("groups", groups)):
        if value is not None and (
            not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)
        ):
            raise InvalidArgument(f"'{key}' must be a list of names")
    unknown = sorted(set(groups or ()) - set(STATS_GROUPS))
    if unknown:
        raise InvalidArgument(
            f"unknown stats group {', '.join(unknown)} (choose from {', '.join(STATS_GROUPS)})"
        )
    found = await driver.stats(refs or None, frozenset(groups) if groups else None)
    return {"domains": found}


async def _list(driver: Driver, body: dict[str, Any]) -> Any:
    include_inactive = bool(body.get("all", True))
    domains = await driver.list_domains(include_inactive=include_inactive)
    return {"domains": [d.to_map() for d in domains]}


async def _suspend_fast(driver: Driver, body: dict[str, Any]) -> Any:
    # The hot path of the benchmark: no extra round trip for the state afterwards.
    await driver.suspend(_domain_ref(body))
    return {"state": "paused", "reason": "user"}


async def _resume_fast(driver: Driver, body: dict[str, Any]) -> Any:
    await driver.resume(_domain_ref(body))
    return {"state": "running", "reason": "unpaused"}


HANDLERS: dict[str, Handler] = {
    ops.DOMAIN_DEFINE: _define,
    ops.DOMAIN_UNDEFINE: _undefine,
    ops.DOMAIN_START: _lifecycle("start"),
    ops.DOMAIN_SHUTDOWN: _shutdown,
    ops.DOMAIN_DESTROY: _lifecycle("destroy"),
    ops.DOMAIN_REBOOT: _lifecycle("reboot"),
    ops.DOMAIN_RESET: _lifecycle("reset"),
    ops.DOMAIN_SUSPEND: _suspend_fast,
    ops.DOMAIN_RESUME: _resume_fast,
    ops.DOMAIN_INFO: _info,
    ops.DOMAIN_STATE: _state,
    ops.DOMAIN_XML: _xml_of,
    ops.DOMAIN_LIST: _list,
    ops.DOMAIN_STATS: _stats,
    **MIGRATION_HANDLERS,  # agent/migration.py: libvirt's v3 migration steps
}


# Ops that change nothing: a redelivery may simply run them again, so no reply is journaled.
READ_ONLY_OPS = frozenset(
    {
        ops.DOMAIN_INFO,
        ops.DOMAIN_STATE,
        ops.DOMAIN_XML,
        ops.DOMAIN_LIST,
        ops.DOMAIN_STATS,
        ops.HOST_INFO,
        ops.HOST_PING,
        ops.MIGRATION_STATUS,
    }
)


def domain_key(driver: Driver, call: Envelope) -> str | None:
    """The serialisation key of a call: the domain's name, or None for host-wide ops."""
    if call.op not in ops.DOMAIN_OPS and call.op not in ops.MIGRATION_DOMAIN_OPS:
        return None
    if call.op in (ops.DOMAIN_DEFINE, ops.MIGRATION_PREPARE):
        return parse_domain_xml(_xml(call.body)).name
    ref = _domain_ref(call.body)
    known = driver.lookup(ref)
    return known.name if known else ref


def handler_for(op: str) -> Handler:
    handler = HANDLERS.get(op)
    if handler is None:
        raise NoSupport(f"unknown op '{op}'")
    return handler
