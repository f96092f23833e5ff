"""The typed layer under every op: message structs, and one way to check a body.

Bodies travel as msgpack maps (see :mod:`virtbus.protocol.codec`). Where a body enters a
process — the agent, the scheduler, the client — it is converted into its declared
:class:`Message` type by :func:`decode`, which turns every shape error into an
``INVALID_ARG`` naming the field (``'params.parallel': expected int, got str``). Unknown
fields are ignored, so an older peer still serves a newer one that sends more. On the
way out :func:`to_wire` turns a message back into plain maps.

msgspec is used because its structs convert from the maps msgpack gives in a few
microseconds, carry their constraints (``Meta``) with them, and produce the JSON Schemas
of the AsyncAPI document (:mod:`virtbus.protocol.schema`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, TypeVar

import msgspec
from msgspec import Meta

from virtbus.errors import InvalidArgument, ProtocolError

T = TypeVar("T")

# A domain, pool, volume or network name as it travels; object-specific rules (libvirt's
# name syntax) are checked where the object is defined.
NAME_MAX: Final = 1024
Name = Annotated[str, Meta(min_length=1, max_length=NAME_MAX)]
HostName = Annotated[str, Meta(min_length=1, max_length=200)]
XmlText = Annotated[str, Meta(min_length=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
PosInt = Annotated[int, Meta(gt=0)]
Seconds = Annotated[float, Meta(gt=0, le=86_400 * 366)]
NonNegSeconds = Annotated[float, Meta(ge=0, le=86_400 * 366)]


class BadValue(InvalidArgument, ValueError):
    """A value a message's ``__post_init__`` refuses. It is a ValueError so that msgspec,
    decoding, names the field's path itself (``'seen.params': ...``) and the decode
    function maps it as any other field error (INVALID_ARG in a request, RPC_ERROR in an
    answer); built directly in code, it is an INVALID_ARG."""

    def __str__(self) -> str:  # msgspec quotes it after the field's path
        return self.message


class Message(msgspec.Struct, kw_only=True):
    """Base of every request, result, event and heartbeat body."""


class Empty(Message):
    """A body with no fields (``{}``)."""


class Accepted(Message):
    """The result of an op that has nothing to report but success (``{}``)."""


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]+)`")


def _field_error(exc: msgspec.ValidationError) -> InvalidArgument:
    """msgspec's message, reworded to name the field first."""
    match = _AT.match(str(exc))
    what = match.group("what") if match else str(exc)
    path = (match.group("path") or "") if match else ""
    path = path.lstrip(".").replace("][", "].[")
    missing = _MISSING.match(what)
    if missing is not None:
        name = f"{path}.{missing['field']}" if path else missing["field"]
        return InvalidArgument(f"'{name}' is required")
    what = what[:1].lower() + what[1:]
    return InvalidArgument(f"'{path}': {what}" if path else what)


def decode(body: Any, kind: type[T]) -> T:
    """``body`` (a plain map from the wire) as ``kind``, or INVALID_ARG naming the field."""
    try:
        return msgspec.convert(body, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise _field_error(exc) from None


def decode_reply(result: Any, kind: type[T], op: str) -> T:
    """A peer's result as ``kind``; a malformed one is the peer's fault (RPC_ERROR)."""
    try:
        return msgspec.convert(result, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"{op}: malformed answer: {_field_error(exc).message}") from None


def to_wire(value: Any) -> Any:
    """Plain maps, lists and scalars for msgpack (enums as their values); bytes stay bytes
    (msgpack's bin type: a volume chunk is not base64-inflated)."""
    return msgspec.to_builtins(value, builtin_types=(bytes, bytearray, memoryview))
