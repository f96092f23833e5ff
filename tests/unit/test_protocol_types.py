"""Every declared body against its type: requests, results and published messages.

Property tests over values generated from the types themselves (tests/typegen.py), so an
op added to the registry is covered without a line here:

- every value round-trips: to_wire → msgpack envelope → decode gives back an equal value;
- unknown fields, in every map of a struct, are ignored;
- every field refuses each wrong type, a missing required field is refused, and every
  constraint (bounds, lengths, patterns) refuses a value just outside it — each with the
  field named (``'params.parallel': ...``): INVALID_ARG for what a server takes in,
  RPC_ERROR for a malformed answer the client gets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.typegen import (
    JSONISH,
    UNKNOWN_FIELD,
    Gen,
    Spot,
    out_of_range,
    place,
    spots,
    with_unknown_fields,
    wrong_values,
)
from virtbus.errors import InvalidArgument, ProtocolError, VirtbusError
from virtbus.protocol import codec, schema
from virtbus.protocol.base import to_wire
from virtbus.protocol.envelope import Envelope, Kind, ok_body, reply_to
from virtbus.protocol.messages import decode_message
from virtbus.protocol.registry import REGISTRY

OPS, MESSAGES = schema.declared()
GEN = Gen()
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.large_base_example,
        HealthCheck.data_too_large,
    ],
)
BAD_SETTINGS = settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.large_base_example,
        HealthCheck.data_too_large,
    ],
)


@dataclass(frozen=True)
class Body:
    """One declared body: its type, how it is decoded where it enters, what error that gives."""

    label: str
    kind: type[msgspec.Struct]
    decode: Callable[[Any], Any]
    error: type[VirtbusError]


def _bodies() -> list[Body]:
    found = []
    for op in OPS:
        found.append(Body(f"{op.name}:request", op.request, op.decode_request, InvalidArgument))
        found.append(Body(f"{op.name}:result", op.result, op.decode_result, ProtocolError))
    for m in MESSAGES:
        found.append(Body(f"{m.op}:body", m.body, _message_decoder(m.op), InvalidArgument))
    return found


def _message_decoder(op: str) -> Callable[[Any], Any]:
    return lambda body: decode_message(op, body)


BODIES = _bodies()


def test_the_registry_is_what_is_tested() -> None:
    """Premise: the bodies under test are every op's and every message's."""
    assert {o.name for o in OPS} == set(REGISTRY) and len(REGISTRY) >= 36
    assert {"domain.define", "migration.prepare", "scheduler.migrate"} <= set(REGISTRY)
    assert {m.op for m in MESSAGES} >= {"domain.event", "host.heartbeat", "metrics.host"}
    assert len(BODIES) == 2 * len(OPS) + len(MESSAGES)


# --- round trips ----------------------------------------------------------------------
@pytest.mark.parametrize("op", OPS, ids=str)
@SETTINGS
@given(data=st.data())
def test_request_and_result_round_trip_through_the_wire(op: Any, data: st.DataObject) -> None:
    request = data.draw(GEN.of(op.request), label="request")
    call = Envelope(kind=Kind.CALL, op=op.name, body=to_wire(request), src="client")
    received = codec.decode(codec.encode(call))
    assert op.decode_request(received.body) == request
    result = data.draw(GEN.of(op.result), label="result")
    reply = reply_to(received, ok_body(to_wire(result)), src="agent")
    answered = codec.decode(codec.encode(reply))
    assert answered.id == call.id
    assert op.decode_result(answered.body["result"]) == result


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.op)
@SETTINGS
@given(data=st.data())
def test_published_bodies_round_trip_through_the_wire(message: Any, data: st.DataObject) -> None:
    body = data.draw(GEN.of(message.body))
    env = Envelope(kind=message.kind, op=message.op, body=to_wire(body), src="agent")
    assert decode_message(message.op, codec.decode(codec.encode(env)).body) == body


@pytest.mark.parametrize("body", BODIES, ids=lambda b: b.label)
@SETTINGS
@given(data=st.data())
def test_unknown_fields_are_ignored(body: Body, data: st.DataObject) -> None:
    value = data.draw(GEN.of(body.kind))
    wire = with_unknown_fields(mi.type_info(body.kind), to_wire(value), data.draw(JSONISH))
    assert UNKNOWN_FIELD in wire  # premise: there is an unknown field to ignore
    assert body.decode(wire) == value


# --- bad bodies -----------------------------------------------------------------------
def _copy(wire: Any) -> Any:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(wire))


def _fresh(data: st.DataObject) -> Callable[[mi.Type], Any]:
    """A valid wire value of a container type (a list with one item, at least), drawn
    once per type and example and copied after."""
    drawn: dict[int, Any] = {}

    def fresh(t: mi.Type) -> Any:
        if id(t) not in drawn:
            if isinstance(t, mi.ListType):
                items = st.lists(GEN.valid(t.item_type), min_size=1, max_size=1)
                drawn[id(t)] = to_wire(data.draw(items))
            else:
                drawn[id(t)] = to_wire(data.draw(GEN.valid(t)))
        return _copy(drawn[id(t)])

    return fresh


def _refused(body: Body, wire: dict[str, Any], spot: Spot, what: str) -> str:
    with pytest.raises(body.error) as caught:
        body.decode(wire)
    message = caught.value.message
    assert f"'{spot.name}'" in message, (what, spot.name, message)
    return message


@pytest.mark.parametrize("body", BODIES, ids=lambda b: b.label)
@BAD_SETTINGS
@given(data=st.data())
def test_every_field_refuses_a_wrong_type_naming_it(body: Body, data: st.DataObject) -> None:
    base = to_wire(data.draw(GEN.of(body.kind)))
    fresh = _fresh(data)
    typed = 0
    for spot in spots(mi.type_info(body.kind)):  # type: ignore[arg-type]
        bad_values = wrong_values(spot.leaf)
        assert bad_values or isinstance(spot.leaf, mi.AnyType), spot
        for bad in bad_values:
            wire = _copy(base)
            place(wire, spot, fresh)[spot.path[-1]] = bad
            message = _refused(body, wire, spot, f"wrong type {bad!r}")
            assert "expected" in message.lower() or "invalid" in message.lower(), message
        typed += bool(bad_values)
    fields = mi.type_info(body.kind).fields  # type: ignore[attr-defined]
    assert typed >= sum(not isinstance(f.type, mi.AnyType) for f in fields)


@pytest.mark.parametrize("body", BODIES, ids=lambda b: b.label)
@BAD_SETTINGS
@given(data=st.data())
def test_missing_fields_and_values_out_of_range_are_refused(
    body: Body, data: st.DataObject
) -> None:
    base = to_wire(data.draw(GEN.of(body.kind)))
    fresh = _fresh(data)
    for spot in spots(mi.type_info(body.kind)):  # type: ignore[arg-type]
        if spot.required and isinstance(spot.path[-1], str):
            wire = _copy(base)
            del place(wire, spot, fresh)[spot.path[-1]]
            assert _refused(body, wire, spot, "missing").endswith("is required")
        for bad in out_of_range(spot.leaf, lambda t: to_wire(data.draw(GEN.valid(t)))):
            wire = _copy(base)
            place(wire, spot, fresh)[spot.path[-1]] = bad
            _refused(body, wire, spot, f"out of range {bad!r}")


def test_bad_bodies_name_nested_fields_and_list_items() -> None:
    """The error's wording, pinned on a few spots the generated tests reach."""
    prepare = REGISTRY["migration.prepare"]
    with pytest.raises(InvalidArgument, match=r"'params\.parallel': expected `int`, got `str`"):
        prepare.decode_request({"xml": "<domain/>", "params": {"parallel": "4"}})
    with pytest.raises(InvalidArgument, match=r"'params\.parallel': expected `int` <= 255"):
        prepare.decode_request({"xml": "<domain/>", "params": {"parallel": 256}})
    with pytest.raises(InvalidArgument, match=r"'params\.listen_address'"):
        prepare.decode_request({"xml": "<d/>", "params": {"listen_address": "127.0.0.1\n"}})
    with pytest.raises(InvalidArgument, match=r"'domains\[1\]': expected `str`, got `int`"):
        REGISTRY["domain.stats"].decode_request({"domains": ["a", 2]})
    with pytest.raises(InvalidArgument, match=r"^INVALID_ARG: 'xml' is required$"):
        REGISTRY["domain.define"].decode_request({})
    with pytest.raises(
        ProtocolError, match=r"domain\.list: malformed answer: 'domains\[0\]\.uuid'"
    ):
        REGISTRY["domain.list"].decode_result({"domains": [{"name": "a", "state": "running"}]})
