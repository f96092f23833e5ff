"""RPC semantics shared by both transports: how a handler's outcome becomes a reply body
and how a reply body becomes a result or a typed error on the caller's side."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable
from typing import Any

from virtbus.bus.topology import check_routing_key
from virtbus.errors import (
    InternalError,
    InvalidArgument,
    NoConnect,
    ProtocolError,
    VirtbusError,
    error_from_wire,
)
from virtbus.protocol.codec import encode
from virtbus.protocol.envelope import Envelope, Kind, error_body
from virtbus.settings import BusSettings

log = logging.getLogger(__name__)


def outgoing_call(
    settings: BusSettings,
    src: str,
    route: str,
    op: str,
    body: dict[str, Any],
    timeout: float | None,
    call_id: str | None,
) -> tuple[Envelope, bytes, float]:
    """A call's envelope, its encoding and its timeout, checked alike on every transport
    before any I/O: a positive timeout (default ``settings.call_timeout``), a valid route,
    the message limit. ``call_id``: the id of a failed attempt, so that a server that ran
    it answers from its reply log."""
    timeout = settings.call_timeout if timeout is None else timeout
    if timeout <= 0:
        raise InvalidArgument(f"call timeout must be positive, not {timeout!r}")
    check_routing_key(route, InvalidArgument)
    envelope = Envelope(kind=Kind.CALL, op=op, body=body, src=src)
    if call_id is not None:
        envelope = dataclasses.replace(envelope, id=call_id)
    data = encode(envelope)
    if len(data) > settings.limits.max_bytes:
        raise ProtocolError(f"call {op!r} of {len(data)} bytes exceeds the message limit")
    return envelope, data, timeout


def no_route(route: str) -> NoConnect:
    return NoConnect(f"nothing serves route {route!r} (no queue bound to it)")


def body_from_exception(exc: Exception, op: str) -> dict[str, Any]:
    """A handler failure never kills a consumer: it becomes an error reply."""
    if isinstance(exc, VirtbusError):
        return error_body(exc)
    log.error("handler for %r failed", op, exc_info=exc)
    return error_body(InternalError(f"{type(exc).__name__}: {exc}"))


def checked_body(body: Any, op: str) -> dict[str, Any]:
    """A handler must return ``{"ok": ...}``; anything else is our bug, reported as such."""
    if isinstance(body, dict) and isinstance(body.get("ok"), bool):
        return body
    log.error("handler for %r returned a malformed reply body: %r", op, type(body))
    return error_body(InternalError(f"handler for {op!r} returned a malformed reply"))


async def settle(awaitable: Awaitable[dict[str, Any]], op: str) -> dict[str, Any]:
    """Await a handler's result; every outcome but cancellation is a reply body."""
    try:
        body = await awaitable
    except Exception as exc:  # noqa: BLE001 - the handler's failure is the caller's answer
        return body_from_exception(exc, op)
    return checked_body(body, op)


def result_from_reply(body: dict[str, Any]) -> Any:
    """``{"ok": true, "result": r}`` -> r; ``{"ok": false, "error": e}`` -> raise typed e."""
    ok = body.get("ok")
    if ok is True:
        return body.get("result")
    if ok is False:
        raise error_from_wire(body.get("error"))
    raise ProtocolError("reply body has no boolean 'ok'")
