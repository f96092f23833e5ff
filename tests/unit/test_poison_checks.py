"""Issue 11: the shared checks behind the poison fixes, one by one (the end-to-end proofs
through real agents are in tests/integration/test_poison.py and tests/e2e)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import pytest

from agent.admission import Admission, Demand
from agent.outbox import EventOutbox
from drivers.base import MigrationParams as ReExported
from drivers.test import TestDriver, TestHostSpec
from virtbus.bus.amqp_consumers import deadline_from_header
from virtbus.bus.topology import check_routing_key
from virtbus.domain import MAX_NAME_BYTES, check_domain_name, parse_domain_xml, parse_int
from virtbus.errors import InvalidArgument, OperationFailed, ProtocolError, XMLError
from virtbus.netaddr import is_host
from virtbus.protocol.base import decode, to_wire
from virtbus.protocol.codec import decode_payload
from virtbus.protocol.envelope import Envelope, Kind
from virtbus.protocol.events import MAX_WORD_BYTES, event_routing_key, routing_word
from virtbus.protocol.migration import MigrationParams
from virtbus.settings import Backoff

# ------------------------------------------------------------------ routing keys, names


@pytest.mark.parametrize("name", ["a" * 250, "é" * 300, "x.y" * 90, "a" * MAX_WORD_BYTES])
def test_routing_words_are_bounded_distinct_and_stable(name: str) -> None:
    word = routing_word(name)
    assert len(word.encode()) <= MAX_WORD_BYTES
    assert word == routing_word(name)  # publishers and subscribers agree
    assert routing_word(name + "z") != word
    key = event_routing_key("h" * 300, name, "defined")
    assert len(key.encode()) <= 255
    check_routing_key(key)


def test_short_words_are_unchanged() -> None:
    assert routing_word("web-1") == "web-1" and routing_word("a.b c#") == "a_b_c_"


def test_routing_key_over_255_bytes_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="255"):
        check_routing_key("k" * 256)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("n" * (MAX_NAME_BYTES + 1), "bytes"),
        ("é" * (MAX_NAME_BYTES // 2 + 1), "bytes"),
        ("a/b", "'/'"),
        ("a\x7fb", "control"),
        ("a\u0085b", "control"),
        ("   ", "empty"),
    ],
)
def test_bad_domain_names_are_refused(name: str, why: str) -> None:
    with pytest.raises(XMLError, match=why):
        check_domain_name(name)


def test_the_longest_name_is_accepted() -> None:
    check_domain_name("é" * (MAX_NAME_BYTES // 2))


# ------------------------------------------------------------------ numbers


@pytest.mark.parametrize("raw", ["9" * 5000, "1_000", "١٢", "0x10", " ", "1e3", "--1"])
def test_bounded_integers_refuse_what_int_would_take_or_choke_on(raw: str) -> None:
    with pytest.raises(XMLError) as info:
        parse_int(raw, "<x>")
    assert len(info.value.message) < 200  # a 5,000-digit value is not echoed back


def test_bounded_integers() -> None:
    assert parse_int(" 42 ", "<x>") == 42
    assert parse_int("0x1f", "<x>", hex_ok=True) == 31
    with pytest.raises(XMLError, match="at most 7"):
        parse_int("8", "<x>", maximum=7)


@pytest.mark.parametrize(
    "fragment",
    [
        "<memory>" + "9" * 5000 + "</memory>",
        "<memory>1</memory><vcpu>" + "9" * 30 + "</vcpu>",
        "<memory>1</memory><vcpu>100000</vcpu>",
        "<memory>1</memory><cpu><topology sockets='99999999999999999999999' cores='1' "
        "threads='1'/></cpu>",
        "<memory>1</memory><devices><graphics type='vnc' port='1" + "0" * 40 + "'/></devices>",
    ],
)
def test_definitions_with_huge_numbers_are_xml_errors(fragment: str) -> None:
    xml = f"<domain type='test'><name>n</name>{fragment}<os><type>hvm</type></os></domain>"
    with pytest.raises(XMLError):
        parse_domain_xml(xml)


# ------------------------------------------------------------------ the wire


def test_timestamp_ext_is_refused_anywhere_in_a_message() -> None:
    for value in ({"t": msgpack.Timestamp(1)}, [1, [msgpack.Timestamp(0, 5)]]):
        with pytest.raises(ProtocolError, match="timestamp"):
            decode_payload(msgpack.packb({"body": value}))


@pytest.mark.parametrize("value", ["1700000000000", True, b"1", [1], -1, float("nan")])
def test_a_deadline_header_of_the_wrong_type_or_sign_is_a_protocol_error(value: object) -> None:
    with pytest.raises(ProtocolError, match="x-deadline"):
        deadline_from_header(value)


def test_deadline_headers_that_are_fine() -> None:
    assert deadline_from_header(None) is None
    assert deadline_from_header(1_700_000_000_000) == 1_700_000_000.0
    assert deadline_from_header(1_700_000_000.5) == 1_700_000_000.5


# ------------------------------------------------------------------ migration params


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"bandwidth_mib_s": -1}, "bandwidth_mib_s"),
        ({"bandwidth_mib_s": True}, "bandwidth_mib_s"),
        ({"max_downtime_ms": 0}, "max_downtime_ms"),
        ({"parallel": -1}, "parallel"),
        ({"parallel": 256}, "parallel"),
        ({"postcopy": "yes"}, "postcopy"),
        ({"postcopy": True, "parallel": 2}, "postcopy"),
        ({"listen_address": "1.2.3.4:5,to=6"}, "listen_address"),
        ({"listen_address": "fe80::1%eth0"}, "listen_address"),
        ({"max_downtime_ms": 2_000_001}, "max_downtime_ms"),
        ({"bandwidth_mib_s": 1 << 40}, "bandwidth_mib_s"),
    ],
)
def test_migration_params_name_the_bad_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        decode(raw, MigrationParams)


def test_migration_params_defaults_and_the_one_class() -> None:
    assert ReExported is MigrationParams  # drivers.base uses the protocol's class
    params = decode({"bandwidth_mib_s": None, "parallel": 4}, MigrationParams)
    assert params == MigrationParams(parallel=4)
    assert decode(to_wire(params), MigrationParams) == params


@pytest.mark.parametrize(
    ("text", "ok"),
    [("127.0.0.1", True), ("::1", True), ("host-1.example.net", True), ("a" * 64, False),
     ("a,b", False), ("a=b", False), ("1.2.3.4:5", False), ("-a", False), ("", False)],
)  # fmt: skip
def test_host_syntax(text: str, ok: bool) -> None:
    assert is_host(text) is ok


# ------------------------------------------------------------------ admission


def _demand(vcpus: int, mem_mib: int, name: str = "g") -> Demand:
    return Demand(uuid=f"u-{name}", name=name, memory_kib=mem_mib * 1024, vcpus=vcpus)


async def test_admission_counts_active_guests_and_starts_in_progress() -> None:
    driver = TestDriver(TestHostSpec(cpus=2, memory_kib=4 << 20))
    admission = Admission(driver, "h", cpu_overcommit=2.0, memory_overcommit=1.0)
    with pytest.raises(OperationFailed, match="needs 5 vCPUs"):
        async with admission.starting(_demand(5, 64)):
            pass
    with pytest.raises(OperationFailed, match="memory"):
        async with admission.starting(_demand(1, 5 << 10)):
            pass
    async with admission.starting(_demand(3, 64, "a")):  # an admitted start holds its share
        with pytest.raises(OperationFailed, match="3 of the host's 4"):
            async with admission.starting(_demand(2, 64, "b")):
                pass
    async with admission.starting(_demand(4, 64, "c")):  # released when it ended
        pass


# ------------------------------------------------------------------ outbox


async def test_a_non_retryable_publish_error_sets_the_event_aside(tmp_path: Path) -> None:
    sent: list[int] = []

    async def publish(env: Envelope) -> None:
        if env.body["seq"] == 2:
            raise ProtocolError("too big")
        if env.body["seq"] == 3:
            raise KeyError("a bug")
        sent.append(env.body["seq"])

    box = EventOutbox(publish, path=tmp_path / "events.log", capacity=10, retry=Backoff())
    await box.load()
    runner = asyncio.create_task(box.run())
    for seq in range(1, 5):
        box.put(Envelope(Kind.EVENT, "domain.event", {"seq": seq, "domain": "d", "event": "e"}))
    assert await box.flush(5)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    assert sent == [1, 4] and box.rejected == 2
    lines = (tmp_path / "rejected.log").read_text().splitlines()
    assert len(lines) == 2 and "too big" in lines[0] and "a bug" in lines[1]
    again = EventOutbox(publish, path=tmp_path / "events.log", capacity=10, retry=Backoff())
    await again.load()
    assert len(again) == 0 and again.last_seq == 4  # nothing replayed, numbering goes on
