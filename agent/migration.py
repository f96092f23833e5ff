"""The agent's migration ops: libvirt's v3 steps, one bus call each.

The scheduler (or any other tool) drives a live migration by calling these on the source
and destination agents in turn: ``migration.begin`` (source) → ``migration.prepare``
(destination, returns the URI) → ``migration.perform`` (source) → ``migration.status``
until done → ``migration.finish`` (destination) → ``migration.confirm`` (source).

``finish`` and ``confirm`` are idempotent, because a coordinator that restarted may repeat
them: finishing a domain that already runs here as a persistent domain, confirming a
success whose source domain is already gone, or rolling back a destination that has no
incoming domain (left) all answer OK instead of an error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from drivers.base import Driver, MigrationParams
from virtbus.domain import parse_domain_xml
from virtbus.errors import InvalidArgument
from virtbus.protocol import ops
from virtbus.protocol.events import DomainState

MigrationHandler = Callable[[Driver, dict[str, Any]], Awaitable[Any]]


def _ref(body: dict[str, Any]) -> str:
    ref = body.get("domain")
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument("'domain' (a name or uuid) is required")
    return ref


def _params(body: dict[str, Any]) -> MigrationParams:
    raw = body.get("params") or {}
    if not isinstance(raw, dict):
        raise InvalidArgument("'params' must be a map")
    try:
        params = MigrationParams.from_map(raw)
    except TypeError as exc:
        raise InvalidArgument(f"bad migration params: {exc}") from None
    for key in ("bandwidth_mib_s", "max_downtime_ms"):
        value = getattr(params, key)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise InvalidArgument(f"'{key}' must be a positive integer")
    if not isinstance(params.parallel, int) or params.parallel < 0:
        raise InvalidArgument("'parallel' must be a non-negative integer")
    return params


def _success(body: dict[str, Any]) -> bool:
    value = body.get("success")
    if not isinstance(value, bool):
        raise InvalidArgument("'success' (a boolean) is required")
    return value


async def _begin(driver: Driver, body: dict[str, Any]) -> Any:
    ref = _ref(body)
    xml = await driver.migrate_begin(ref)
    info = await driver.info(ref)
    return {"xml": xml, "name": info.name, "uuid": info.uuid, "state": info.state.label}


async def _prepare(driver: Driver, body: dict[str, Any]) -> Any:
    xml = body.get("xml")
    if not isinstance(xml, str) or not xml.strip():
        raise InvalidArgument("'xml' (the domain definition from migration.begin) is required")
    uri = await driver.migrate_prepare(xml, _params(body))
    defn = parse_domain_xml(xml)
    return {"uri": uri, "name": defn.name, "uuid": defn.uuid}


async def _perform(driver: Driver, body: dict[str, Any]) -> Any:
    uri = body.get("uri")
    if not isinstance(uri, str) or not uri:
        raise InvalidArgument("'uri' (from migration.prepare) is required")
    await driver.migrate_perform(_ref(body), uri, _params(body))
    return {}


async def _status(driver: Driver, body: dict[str, Any]) -> Any:
    return (await driver.migrate_status(_ref(body))).to_map()


async def _cancel(driver: Driver, body: dict[str, Any]) -> Any:
    await driver.migrate_cancel(_ref(body))
    return {}


async def _state_of(driver: Driver, ref: str) -> dict[str, Any]:
    info = await driver.info(ref)
    return {"state": info.state.label, "reason": info.reason, "persistent": info.persistent}


async def _finish(driver: Driver, body: dict[str, Any]) -> Any:
    ref, success = _ref(body), _success(body)
    known = driver.lookup(ref)
    if known is None:
        if success:
            return await _state_of(driver, ref)  # raises NO_DOMAIN: nothing to finish
        return {"state": "absent"}
    info = await driver.info(ref)
    if success and info.persistent and info.state == DomainState.RUNNING:
        return await _state_of(driver, ref)  # finished before (a repeated call)
    if not success and info.persistent and info.reason != "migration":
        return await _state_of(driver, ref)  # not an incoming domain: nothing to undo
    await driver.migrate_finish(ref, success)
    if driver.lookup(ref) is None:
        return {"state": "absent"}
    return await _state_of(driver, ref)


async def _confirm(driver: Driver, body: dict[str, Any]) -> Any:
    ref, success = _ref(body), _success(body)
    if driver.lookup(ref) is None:
        if success:
            return {"state": "absent"}  # the source copy is already gone
        return await _state_of(driver, ref)  # raises NO_DOMAIN: the guest is not here
    await driver.migrate_confirm(ref, success)
    if driver.lookup(ref) is None:
        return {"state": "absent"}
    return await _state_of(driver, ref)


MIGRATION_HANDLERS: dict[str, MigrationHandler] = {
    ops.MIGRATION_BEGIN: _begin,
    ops.MIGRATION_PREPARE: _prepare,
    ops.MIGRATION_PERFORM: _perform,
    ops.MIGRATION_STATUS: _status,
    ops.MIGRATION_CANCEL: _cancel,
    ops.MIGRATION_FINISH: _finish,
    ops.MIGRATION_CONFIRM: _confirm,
}
