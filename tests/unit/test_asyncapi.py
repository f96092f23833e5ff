"""docs/asyncapi.yaml passes AsyncAPI's own validator, and the validator has teeth.

``asyncapi validate`` (npm @asyncapi/cli, installed by deploy/setup-dev into
~/.cache/virtbus/npm; its ValidationService, driven by asyncapi_validate_many.js) parses
the document with AsyncAPI's parser: the 3.0 JSON Schema of the document, every $ref
resolved, operations' messages within their channels, every payload a valid schema, and
Spectral's AsyncAPI rules (warnings fail too). Its usage analytics stay off. The YAML is
also read back with js-yaml and compared with the data it was written from.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from virtbus.protocol import schema

PREFIX = Path(os.environ.get("VIRTBUS_NPM_PREFIX", Path.home() / ".cache" / "virtbus" / "npm"))
CLI = PREFIX / "node_modules" / ".bin" / "asyncapi"
ANALYTICS_OFF = PREFIX / "asyncapi-analytics.json"
TIMEOUT = 600  # s: one node process validates five documents; slow on a loaded machine


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if not CLI.exists() or not ANALYTICS_OFF.exists():
        pytest.fail(f"AsyncAPI's CLI is not installed in {PREFIX}: run deploy/setup-dev")
    home = tmp_path_factory.mktemp("asyncapi-home")  # its context store, not ours
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CI": "true",
        "ASYNCAPI_METRICS_CONFIG_PATH": str(ANALYTICS_OFF),
        "NODE_PATH": str(PREFIX / "node_modules"),
    }


VALIDATE_MANY = Path(__file__).with_name("asyncapi_validate_many.js")


def _drop_action(doc: dict[str, Any]) -> None:
    del doc["operations"]["domain.define"]["action"]


def _dangling_ref(doc: dict[str, Any]) -> None:
    payload = doc["components"]["messages"]["domain.start.call"]["payload"]
    payload["allOf"][1]["properties"]["body"] = {"$ref": "#/components/schemas/NoSuchBody"}


def _bad_schema(doc: dict[str, Any]) -> None:
    doc["components"]["schemas"]["DomainTarget"]["properties"]["domain"]["type"] = "text"


def _message_outside_its_channel(doc: dict[str, Any]) -> None:
    doc["operations"]["domain.info"]["messages"] = [
        {"$ref": "#/channels/reply/messages/domain.info.reply"}
    ]


def _refs(node: Any) -> set[str]:
    """Every ``$ref`` under ``node``."""
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node))
    return set()


def _pointer(ref: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in ref.removeprefix("#/").split("/")]


def pruned(doc: dict[str, Any], keep: set[str]) -> dict[str, Any]:
    """``doc`` with only the operations ``keep``, their channels' messages and the
    components they reach: a document the validator reads in a fraction of the time of the
    whole one, so each breakage is validated small (the whole document is validated once,
    whole). Its unbroken form is validated too, so a breakage is what fails it."""
    out = copy.deepcopy({k: v for k, v in doc.items() if k not in ("operations", "channels")})
    out["operations"] = {k: copy.deepcopy(v) for k, v in doc["operations"].items() if k in keep}
    messages: dict[str, set[str]] = {}
    for ref in _refs(out["operations"]):
        parts = _pointer(ref)
        if parts[0] == "channels":
            messages.setdefault(parts[1], set()).update(parts[3:4])
    out["channels"] = {}
    for name, wanted in messages.items():
        channel = copy.deepcopy(doc["channels"][name])
        channel["messages"] = {m: v for m, v in channel["messages"].items() if m in wanted}
        out["channels"][name] = channel
    reached: set[tuple[str, str]] = set()
    todo = _refs(out["operations"]) | _refs(out["channels"])
    while todo:
        parts = _pointer(todo.pop())
        if parts[0] == "components" and (parts[1], parts[2]) not in reached:
            reached.add((parts[1], parts[2]))
            todo |= _refs(doc["components"][parts[1]][parts[2]])
    out["components"] = {
        kind: {n: copy.deepcopy(v) for n, v in items.items() if (kind, n) in reached}
        for kind, items in doc["components"].items()
    }
    out["components"] = {k: v for k, v in out["components"].items() if v}
    return out


PRUNED_TO = {"domain.define", "domain.start", "domain.info"}  # what the breakages touch

BREAKAGES: dict[str, tuple[Any, str]] = {
    "operation-without-action": (_drop_action, "action"),
    "dangling-ref": (_dangling_ref, "NoSuchBody"),
    "invalid-json-schema": (_bad_schema, "type"),
    "message-elsewhere": (_message_outside_its_channel, "does not belong"),
}


@pytest.fixture(scope="module")
def verdicts(
    cli_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """The CLI's own ValidationService (what ``asyncapi validate --fail-severity warn``
    runs) over the real document, its pruned form and each broken pruned one, in one node
    process: the CLI starts slowly, so it starts once rather than six times."""
    docs = tmp_path_factory.mktemp("asyncapi-docs")
    small = pruned(schema.asyncapi(), PRUNED_TO)
    files = {"generated": schema.ASYNCAPI, "pruned": docs / "pruned.yaml"}
    files["pruned"].write_text(schema.to_yaml(small), encoding="utf-8")
    for name, (breakage, _words) in BREAKAGES.items():
        doc = copy.deepcopy(small)
        breakage(doc)
        files[name] = docs / f"{name}.yaml"
        files[name].write_text(schema.to_yaml(doc), encoding="utf-8")
    done = subprocess.run(
        ["node", str(VALIDATE_MANY), *map(str, files.values())],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    by_file = {v["file"]: v for v in json.loads(done.stdout)}
    return {name: by_file[str(path)] for name, path in files.items()}


def test_the_document_passes_asyncapi_validate(verdicts: dict[str, dict[str, Any]]) -> None:
    got = verdicts["generated"]
    assert got["valid"] is True, got["text"]
    assert "0 errors, 0 warnings" in got["text"], got["text"]


def test_the_pruned_document_is_small_and_valid(verdicts: dict[str, dict[str, Any]]) -> None:
    """The premise of the breakages: unbroken, the pruned document passes, and it is the
    small document it is meant to be (a pruner that kept everything would pass too)."""
    got = verdicts["pruned"]
    assert got["valid"] is True, got["text"]
    assert "0 errors, 0 warnings" in got["text"], got["text"]
    small = pruned(schema.asyncapi(), PRUNED_TO)
    assert set(small["operations"]) == PRUNED_TO
    assert len(small["components"]["messages"]) < 20, sorted(small["components"]["messages"])


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_the_validator_refuses_a_broken_document(
    breakage: str, verdicts: dict[str, dict[str, Any]]
) -> None:
    """Each breakage, alone, of the generated document makes the validator fail."""
    got = verdicts[breakage]
    words = BREAKAGES[breakage][1]
    assert got["valid"] is False, got["text"]
    assert "error" in got["text"] and words in got["text"], got["text"]


def test_the_yaml_reads_back_as_the_document(cli_env: dict[str, str], tmp_path: Path) -> None:
    """js-yaml (the CLI's own YAML parser) loads exactly the data the YAML was written from."""
    expected = tmp_path / "expected.json"
    expected.write_text(json.dumps(schema.asyncapi()), encoding="utf-8")
    script = (
        "const yaml = require('js-yaml'), fs = require('fs'), util = require('util');"
        "const got = yaml.load(fs.readFileSync(process.argv[1], 'utf8'));"
        "const want = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));"
        "process.exit(util.isDeepStrictEqual(got, want) ? 0 : 3);"
    )
    done = subprocess.run(
        ["node", "-e", script, str(schema.ASYNCAPI), str(expected)],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_tricky_strings_survive_the_yaml_writer(cli_env: dict[str, str], tmp_path: Path) -> None:
    values = ["", "true", "No", "null", "0.1.0", "3", "#/a", "a: b", "- x", "é → ü 😀",
              "line\nnext", '"q"', "tab\t", " lead", "$ref", "~", "@x", "*x", "&x", "!x",
              "%x", "`x", "x #y", "{a}", "[a]", "\u2028", "\x00"]  # fmt: skip
    data = {"values": values, "keys": {v: i for i, v in enumerate(values)}, "nest": [[1, [2]]]}
    written = tmp_path / "t.yaml"
    written.write_text(schema.to_yaml(data), encoding="utf-8")
    script = (
        "const yaml = require('js-yaml'), fs = require('fs');"
        "process.stdout.write(JSON.stringify(yaml.load(fs.readFileSync(process.argv[1], 'utf8'))));"
    )
    done = subprocess.run(
        ["node", "-e", script, str(written)], capture_output=True, text=True, env=cli_env
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == data
