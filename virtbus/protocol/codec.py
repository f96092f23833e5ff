"""msgpack encode/decode of envelopes: pure functions, bounded, never pickle.

Decoding refuses, with :class:`ProtocolError`: messages over ``max_bytes``, nesting
deeper than ``max_depth``, msgpack ext types, non-string map keys, a wrong protocol
version, an unknown kind, and any envelope field of the wrong type. msgpack's timestamp
extension (type -1) counts as an ext type, although msgpack decodes it without the hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

import msgpack

from virtbus.errors import ProtocolError
from virtbus.protocol.envelope import PROTOCOL_VERSION, Envelope, Kind


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    max_bytes: int = 4 * 1024 * 1024
    max_depth: int = 32


DEFAULT_LIMITS = DecodeLimits()
_KINDS = {k.value: k for k in Kind}


def encode(envelope: Envelope) -> bytes:
    try:
        data: bytes = msgpack.packb(envelope.to_map(), use_bin_type=True, datetime=False)
        return data
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode message {envelope.op!r}: {exc}") from exc


def _no_ext(code: int, data: bytes) -> NoReturn:
    raise ProtocolError(f"msgpack ext type {code} is not allowed")


def _check_depth(obj: Any, max_depth: int) -> None:
    """Iterative walk: a deep message must not be able to exhaust our own stack.

    It also refuses msgpack's timestamp extension (type -1): msgpack decodes that one
    natively (``timestamp=0`` leaves it a :class:`msgpack.Timestamp`) instead of calling
    the ext hook, and "no ext types" means none.

    Level by level, and only containers (and timestamps) are kept for the next level:
    every call and reply goes through this, and a walk that pushed each scalar cost more
    than the msgpack decode itself. msgpack builds exact dicts and lists (no hooks here).
    """
    level: list[Any] = [obj]
    depth = 1
    while level:
        nested: list[Any] = []
        for item in level:
            kind = type(item)
            if kind is dict:
                if depth > max_depth:
                    raise ProtocolError(f"message nests deeper than {max_depth} levels")
                for key in item:
                    if type(key) is not str:
                        raise ProtocolError("map keys must be strings")
                values = item.values()
            elif kind is list:
                if depth > max_depth:
                    raise ProtocolError(f"message nests deeper than {max_depth} levels")
                values = item
            elif kind is msgpack.Timestamp:
                raise ProtocolError("msgpack ext type -1 (timestamp) is not allowed")
            else:
                continue
            for value in values:
                if type(value) in _WALKED:
                    nested.append(value)
        level = nested
        depth += 1


_WALKED = frozenset({dict, list, msgpack.Timestamp})


def decode_payload(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Any:
    """Decode bounded msgpack into plain Python values (maps, lists, str, bytes, numbers)."""
    if len(data) > limits.max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {limits.max_bytes}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,  # checked below with a clear error
            ext_hook=_no_ext,
            timestamp=0,  # a Timestamp object, refused by the walk below
            use_list=True,
        )
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise ProtocolError(f"malformed msgpack: {exc}") from exc
    _check_depth(obj, limits.max_depth)
    return obj


def decode(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS, user: str | None = None) -> Envelope:
    """An envelope from the wire; ``user`` is the transport's verified sender (user_id)."""
    obj = decode_payload(data, limits)
    if not isinstance(obj, dict):
        raise ProtocolError("envelope must be a map")
    v = obj.get("v")
    if v != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {v!r} (expected {PROTOCOL_VERSION})")
    kind = _KINDS.get(obj.get("kind"))  # type: ignore[arg-type]
    if kind is None:
        raise ProtocolError(f"unknown message kind {obj.get('kind')!r}")
    op, msg_id, src, ts, body = (obj.get(k) for k in ("op", "id", "src", "ts", "body"))
    if not isinstance(op, str) or not op:
        raise ProtocolError("envelope 'op' must be a non-empty string")
    if not isinstance(msg_id, str) or not msg_id:
        raise ProtocolError("envelope 'id' must be a non-empty string")
    if not isinstance(src, str):
        raise ProtocolError("envelope 'src' must be a string")
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        raise ProtocolError("envelope 'ts' must be a number")
    if not isinstance(body, dict):
        raise ProtocolError("envelope 'body' must be a map")
    return Envelope(kind=kind, op=op, body=body, src=src, id=msg_id, ts=float(ts), v=v, user=user)
