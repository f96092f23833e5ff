"""Issue 12, CLI start-up: a command builds only its own verb's parser and imports no
other verb's module; the one-shot path (``virtbus list``) imports no AMQP library, no XML,
TOML, policy or JSON code. ``tests/bench/cli_startup.py`` measures the time; this file
keeps the gain from regressing silently.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from virtbus.cli.main import build_parser
from virtbus.cli.verbs import MAIN, MODULE_VERBS, VERB_MODULE, verb_of

# A port where nothing listens: the command gets as far as connecting (the transport is
# imported) and fails at once with BUS_UNAVAILABLE.
DEAD_BUS = "amqp://guest:guest@127.0.0.1:9/"
# What `virtbus list` needed before the verb table and still must not import.
HEAVY = (
    "aio_pika",
    "aiormq",
    "yarl",
    "lxml",
    "virtbus.bus.amqp",
    "virtbus.domain",
    "virtbus.storage",
    "virtbus.security.policy",
    "virtbus.security.authz",
    "virtbus.cli.storage",
    "virtbus.cli.snapshot",
    "virtbus.cli.disk",
    "virtbus.cli.pki",
    "virtbus.cli.acl",
    "xml.sax",
    "urllib.request",
    "tomllib",
    "json",
    "shutil",
    "hashlib",
)
PROBE = """
import sys
from virtbus.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
sys.stdout.write(" ".join([str(code), *sorted(sys.modules)]))
"""  # no import of its own after the command's (not even json): sys.modules is the command's


def _modules_after(*argv: str) -> tuple[int, set[str], str]:
    """The exit status, the modules imported and stderr of a CLI command in a fresh process."""
    run = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60
    )
    code, *modules = run.stdout.split()
    return int(code), set(modules), run.stderr


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_list_one_shot_imports_nothing_heavy() -> None:
    code, modules, stderr = _modules_after("--bus", DEAD_BUS, "list", "--all", "--host", "h1")
    # The premise: the command ran as far as its transport and failed connecting.
    assert code == 1 and "BUS_UNAVAILABLE" in stderr, stderr[-500:]
    assert "virtbus.bus.oneshot" in modules and "virtbus.client.core" in modules
    assert _heavy(modules) == []


def test_the_probe_sees_a_heavy_import() -> None:
    """The negative case: ``event`` follows for long and takes aio-pika, and the probe says so."""
    code, modules, stderr = _modules_after("--bus", DEAD_BUS, "event", "--host", "h1")
    assert code == 1, stderr[-500:]
    assert {"aio_pika", "aiormq"} <= set(_heavy(modules))


def test_a_verb_imports_its_own_module_only() -> None:
    _, modules, _ = _modules_after("--bus", DEAD_BUS, "list", "--host", "h1")
    cli_modules = {m for m in modules if m.startswith("virtbus.cli.")}
    verb_modules = {f"virtbus.cli.{m}" for m in MODULE_VERBS if m != MAIN}
    assert cli_modules & verb_modules == {"virtbus.cli.host"}


@pytest.mark.parametrize("module", [m for m in MODULE_VERBS if m != MAIN])
def test_each_module_registers_exactly_its_verbs(module: str) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    importlib.import_module(f"virtbus.cli.{module}").add_parsers(sub)
    assert tuple(sub.choices) == MODULE_VERBS[module]


def _choices(parser: argparse.ArgumentParser) -> list[str]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


def test_the_whole_parser_has_every_verb_in_table_order() -> None:
    assert _choices(build_parser()) == list(VERB_MODULE)


def test_a_verb_parser_has_its_module_verbs_only() -> None:
    assert _choices(build_parser("list")) == ["hosts", "list"]
    assert _choices(build_parser("demo")) == ["demo"]


@pytest.mark.parametrize(
    ("words", "verb"),
    [
        (["list", "--all"], "list"),
        (["--json", "list"], "list"),
        (["--bus", "amqp://x/", "--timeout", "3", "dominfo", "d"], "dominfo"),
        (["--bus=amqp://x/", "start", "d"], "start"),
        (["--time", "3", "start"], "start"),  # argparse's unambiguous prefix
        (["--help"], None),
        (["-h", "list"], None),
        (["lsit"], None),  # a typo: the whole parser names the choices
        ([], None),
        (["--bus", "list"], None),  # "list" is --bus's value: no verb
    ],
)
def test_verb_of(words: list[str], verb: str | None) -> None:
    assert verb_of(words) == verb
