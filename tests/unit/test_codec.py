"""The envelope codec: round trip and every bad input refused with RPC_ERROR."""

from __future__ import annotations

import msgpack
import pytest

from virtbus.errors import NoDomainError, OperationTimeout, ProtocolError, error_from_wire
from virtbus.protocol.codec import DecodeLimits, decode, encode
from virtbus.protocol.envelope import Envelope, Kind, error_body


def _raw(**over: object) -> bytes:
    base: dict[str, object] = {
        "v": 1,
        "id": "abc",
        "kind": "call",
        "op": "domain.start",
        "ts": 1.5,
        "src": "t",
        "body": {"domain": "d1"},
    }
    base.update(over)
    return msgpack.packb(base, use_bin_type=True)


def test_round_trip() -> None:
    env = Envelope(
        kind=Kind.CALL,
        op="domain.define",
        body={"xml": "<domain/>", "n": [1, 2.5, None, True, b"\x00"]},
        src="cli",
    )
    back = decode(encode(env))
    assert back == env


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\xc1", "malformed"),
        (b"", "malformed"),
        (msgpack.packb([1, 2]), "must be a map"),
        (_raw(v=2), "version"),
        (_raw(v=None), "version"),
        (_raw(kind="bogus"), "unknown message kind"),
        (_raw(op=""), "'op'"),
        (_raw(op=5), "'op'"),
        (_raw(id=None), "'id'"),
        (_raw(src=3), "'src'"),
        (_raw(ts="now"), "'ts'"),
        (_raw(ts=True), "'ts'"),
        (_raw(body=[1]), "'body'"),
        (_raw(body={1: "x"}), "keys must be strings"),
        (msgpack.packb({"v": 1, b"id": "x"}, use_bin_type=True), "keys must be strings"),
        (_raw(body={"x": msgpack.ExtType(5, b"boom")}), "ext type"),
    ],
)
def test_bad_input_is_protocol_error(data: bytes, fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment) as info:
        decode(data)
    assert info.value.code == "RPC_ERROR"


def test_oversize_refused_before_decoding() -> None:
    data = _raw(body={"blob": "x" * 2000})
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(data, DecodeLimits(max_bytes=1000))


def test_depth_limit() -> None:
    nested: object = {}
    for _ in range(40):
        nested = {"a": nested}
    with pytest.raises(ProtocolError, match="deeper"):
        decode(_raw(body=nested), DecodeLimits(max_depth=32))
    deep_list: object = []
    for _ in range(40):
        deep_list = [deep_list]
    with pytest.raises(ProtocolError, match="deeper"):
        decode(_raw(body={"l": deep_list}), DecodeLimits(max_depth=32))


def test_error_reply_maps_back_to_typed_error() -> None:
    body = error_body(NoDomainError("no such domain"))
    err = error_from_wire(body["error"])
    assert isinstance(err, NoDomainError) and err.message == "no such domain"
    assert isinstance(
        error_from_wire({"code": "OPERATION_TIMEOUT", "message": ""}), OperationTimeout
    )
    unknown = error_from_wire({"code": "FUTURE_CODE", "message": "m"})
    assert unknown.code == "FUTURE_CODE"
    assert error_from_wire("garbage").code == "RPC_ERROR"


def _nested(levels: int) -> object:
    inner: object = {}
    for i in range(levels):
        inner = {"a": inner} if i % 2 else {"l": [inner]}
    return inner


def test_depth_limit_is_exact() -> None:
    """The envelope is level 1, its body level 2: a body whose deepest container is at
    level 32 passes max_depth=32, one more level does not (maps and lists both count)."""
    limits = DecodeLimits(max_depth=32)
    # _nested(19): 10 maps each holding a list, 9 maps, the innermost map: 30 containers,
    # at levels 3 to 32
    decode(_raw(body={"x": _nested(19)}), limits)
    with pytest.raises(ProtocolError, match="deeper"):
        decode(_raw(body={"x": {"y": _nested(19)}}), limits)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"l": [1, "x", [msgpack.Timestamp(1, 0)]]}, "timestamp"),
        ({"l": [{"ok": 1}, {2: "x"}]}, "keys must be strings"),
        ({"m": {"n": {"o": [msgpack.Timestamp(0, 5)]}}}, "timestamp"),
    ],
)
def test_bad_values_deep_inside_are_refused(body: dict[str, object], fragment: str) -> None:
    data = msgpack.packb(
        {"v": 1, "kind": "call", "op": "x", "id": "i", "src": "", "ts": 0.0, "body": body},
        use_bin_type=True,
        datetime=False,
    )
    with pytest.raises(ProtocolError, match=fragment):
        decode(data)
