"""The README's protocol tables and docs/asyncapi.yaml are generated, fresh and complete.

They are regenerated here byte for byte; an op or a message declared anywhere in
virtbus/protocol shows up in both without anyone touching the generator. The AsyncAPI
validator itself runs in tests/unit/test_asyncapi.py.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from virtbus import errors
from virtbus.bus.topology import HOSTS_EXCHANGE
from virtbus.protocol import schema
from virtbus.protocol.base import Message
from virtbus.protocol.envelope import Kind
from virtbus.protocol.events import event_routing_key
from virtbus.protocol.messages import (
    EVENT_DOMAIN,
    HEARTBEAT,
    MESSAGES,
    METRICS_DOMAIN,
    METRICS_HOST,
)
from virtbus.protocol.messages import published as declare_message
from virtbus.protocol.registry import REGISTRY, Access, Service, Target, op


def test_readme_and_asyncapi_are_regenerated_byte_for_byte() -> None:
    text = schema.README.read_text(encoding="utf-8")
    for name in schema.readme_sections():
        begin, end = schema._markers(name)
        assert begin in text and end in text, f"README.md lacks the {name} markers"
    assert schema.render_readme(text) == text, f"README.md is stale: run `{schema.COMMAND}`"
    document = schema.ASYNCAPI.read_text(encoding="utf-8")
    assert schema.asyncapi_yaml() == document, f"asyncapi.yaml is stale: run `{schema.COMMAND}`"
    assert schema.stale() == []


def test_the_check_command_fails_on_a_stale_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--check`` exits 1 naming the stale file; ``--write`` mends it."""
    fresh = schema.README.read_text(encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(fresh.replace("| `domain.define` |", "| `domain.defined` |"))
    monkeypatch.setattr(schema, "targets", lambda: [(readme, schema.render_readme)])
    assert schema.main(["--check"]) == 1
    assert f"{readme} is stale" in capsys.readouterr().err
    assert schema.main(["--write"]) == 0
    assert readme.read_text() == fresh
    assert schema.main(["--check"]) == 0


def test_output_does_not_depend_on_import_order() -> None:
    """A process that imports the scheduler's ops before the agent's (and another hash
    seed) generates the same bytes."""
    code = (
        "import sys, hashlib\n"
        "import virtbus.protocol.scheduler, virtbus.protocol.migration\n"
        "from virtbus.protocol import schema\n"
        "text = schema.asyncapi_yaml() + repr(schema.readme_sections())\n"
        "sys.stdout.write(hashlib.sha256(text.encode()).hexdigest())\n"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
        ).stdout
        for seed in ("1", "2")
    ]
    import hashlib

    here = hashlib.sha256(
        (schema.asyncapi_yaml() + repr(schema.readme_sections())).encode()
    ).hexdigest()
    assert runs == [here, here]


def test_every_protocol_module_with_ops_is_indexed_by_ops_py() -> None:
    """The agent and the scheduler serve what ``virtbus.protocol.ops`` registers: an op
    module that ops.py does not import would be documented but never served."""
    code = (
        "import importlib, json, pkgutil, virtbus.protocol as p\n"
        "from virtbus.protocol.registry import REGISTRY\n"
        "from virtbus.protocol.messages import MESSAGES\n"
        "import virtbus.protocol.ops\n"
        "before = (set(REGISTRY), set(MESSAGES))\n"
        "for m in pkgutil.iter_modules(p.__path__, 'virtbus.protocol.'):\n"
        "    importlib.import_module(m.name)\n"
        "after = (set(REGISTRY), set(MESSAGES))\n"
        "print(json.dumps([sorted(after[0] - before[0]), sorted(after[1] - before[1]),"
        " len(before[0])]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    missing_ops, missing_messages, count = json.loads(out.stdout)
    assert (missing_ops, missing_messages) == ([], [])
    assert count == len(REGISTRY)


# --- a new op shows up by itself --------------------------------------------------------
class FrobRequest(Message):
    """Frobnicate a volume (a test op)."""

    volume: str
    level: int = 3


class FrobResult(Message):
    frobbed: bool


class FrobEvent(Message):
    host: str
    volume: str


@pytest.fixture
def new_op_and_message() -> Iterator[None]:
    """An op and a published message declared the way a new op module declares them."""
    op(
        "storage.frob", FrobRequest, FrobResult, Service.AGENT, "frobnicate a volume",
        access=Access.CONFIG, target=Target.VOLUME,
    )  # fmt: skip
    declare_message(
        "storage.frob_event", FrobEvent, Kind.EVENT, HOSTS_EXCHANGE, "{host}.frob.{volume}",
        "a volume was frobbed",
    )  # fmt: skip
    try:
        yield
    finally:
        del REGISTRY["storage.frob"], MESSAGES["storage.frob_event"]


@pytest.mark.usefixtures("new_op_and_message")
def test_a_new_op_shows_up_in_the_tables_and_the_document() -> None:
    tables = schema.readme_sections()
    assert (
        "| `storage.frob` | config | `{volume, level?: int}` | `{frobbed: bool}` |"
        in (tables["agent-ops"])
    )
    assert (
        "| `storage.frob_event` | event | `virtbus.hosts` | `{host}.frob.{volume}` |"
        in (tables["messages"])
    )
    doc = schema.asyncapi()
    assert doc["operations"]["storage.frob"]["action"] == "send"
    assert "storage.frob.call" in doc["channels"]["agent"]["messages"]
    assert "storage.frob.reply" in doc["channels"]["reply"]["messages"]
    assert doc["channels"]["storage.frob_event"]["address"] == "{host}.frob.{volume}"
    assert "volume" in doc["components"]["parameters"]
    schemas = doc["components"]["schemas"]
    assert schemas["FrobRequest"]["required"] == ["volume"]
    assert schemas["FrobRequest"]["properties"]["level"] == {"type": "integer", "default": 3}
    assert set(schema.stale()) == {schema.README, schema.ASYNCAPI}  # the freshness test fails


def test_routing_key_patterns_are_what_the_publishers_use() -> None:
    """The declared patterns against the functions the agent publishes with."""
    from agent.metrics import domain_routing_key, host_routing_key

    assert MESSAGES[EVENT_DOMAIN].key(host="h.1", domain="web#1", event="started") == (
        event_routing_key("h.1", "web#1", "started")
    )
    assert MESSAGES[METRICS_DOMAIN].key(host="h.1", domain="w*b") == domain_routing_key(
        "h.1", "w*b"
    )
    assert MESSAGES[METRICS_HOST].key(host="h 1") == host_routing_key("h 1")
    assert MESSAGES[HEARTBEAT].key(host="h.1") == "h_1.heartbeat"


def test_json_schemas_are_draft_07_and_complete() -> None:
    schemas = schema.asyncapi()["components"]["schemas"]
    text = msgspec.json.encode(schemas).decode()
    assert "prefixItems" not in text and '"required":[]' not in text
    history = schemas["MigrationRecord"]["properties"]["history"]["items"]
    assert history == {
        "type": "array",
        "minItems": 2,
        "maxItems": 2,
        "items": [{"type": "string"}, {"type": "number"}],
        "additionalItems": False,
    }
    for o in REGISTRY.values():
        assert o.request.__name__ in schemas and o.result.__name__ in schemas, o
    assert schemas["MigrationParams"]["properties"]["parallel"] == {
        "type": "integer", "minimum": 0, "maximum": 255, "default": 0,
    }  # fmt: skip


def test_the_readme_lists_every_error_type_with_its_code() -> None:
    """The client section's error table, against virtbus.errors (hand-written, so checked)."""
    text = schema.README.read_text(encoding="utf-8")
    table = text[text.index("| class | code | raised when |") :].split("\n\n", 1)[0]
    listed = dict(re.findall(r"^\| `(\w+)` \| `([A-Z_]+)` \|", table, re.MULTILINE))
    raised = {
        name: cls.code
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.VirtbusError)
        and cls not in (errors.VirtbusError, errors.RetryableError)
    }
    assert listed == raised
