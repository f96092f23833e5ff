"""Issue 11, item 14: every subcommand's bad flag is one line ``error: INVALID_ARG: ...``
and exit status 1, as the README promises (argparse printed its usage and exited 2).

The cases are generated from the CLI's own parser, so a new subcommand or flag is covered
without touching this file. Nothing here reaches a bus: argument errors come first.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from tests.procs import VIRTBUS
from virtbus.cli.main import build_parser, main


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the CLI has no subcommands")


def _required_positionals(sub: argparse.ArgumentParser) -> list[str]:
    values = []
    for action in sub._actions:
        if action.option_strings or action.nargs in ("?", "*"):
            continue
        values.append(str(next(iter(action.choices))) if action.choices else "x")
    return values


def _bad_values(sub: argparse.ArgumentParser) -> list[list[str]]:
    """For every typed or constrained option: that option with a value it must refuse."""
    cases = []
    for action in sub._actions:
        if not action.option_strings or action.nargs == 0:
            continue
        flag = action.option_strings[-1]
        if action.choices:
            cases.append([flag, "no-such-choice"])
        elif action.type in (int, float):
            cases.append([flag, "abc"])
    return cases


def _cases() -> list[tuple[str, list[str]]]:
    cases: list[tuple[str, list[str]]] = [
        ("virtbus", ["--timeout", "abc", "list"]),
        ("virtbus", ["no-such-command"]),
        ("virtbus", []),
    ]
    for name, sub in _subcommands().items():
        positionals = _required_positionals(sub)
        cases.append((name, [name, *positionals, "--no-such-flag"]))
        if positionals:
            cases.append((name, [name]))  # a missing argument
        cases += [(name, [name, *positionals, *bad]) for bad in _bad_values(sub)]
    return cases


CASES = _cases()


def test_the_cases_cover_every_subcommand_and_typed_flag() -> None:
    subs = _subcommands()
    assert {"migrate", "drain", "event", "define", "completion"} <= set(subs)
    assert {name for name, _ in CASES} >= set(subs)
    assert ("migrate", ["migrate", "x", "--bandwidth", "abc"]) in CASES


@pytest.mark.parametrize(("command", "argv"), CASES, ids=[" ".join(a) or "-" for _, a in CASES])
def test_a_bad_flag_is_one_line_invalid_arg_and_exit_1(
    command: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    out, err = capsys.readouterr()
    assert exited.value.code == 1, (argv, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: INVALID_ARG: "), err
    assert "usage:" not in err


def test_the_issue_example_as_a_user_runs_it() -> None:
    run = subprocess.run(
        [*VIRTBUS, "migrate", "d", "--bandwidth", "abc"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 1, run
    assert run.stderr == (
        "error: INVALID_ARG: virtbus migrate: argument --bandwidth: invalid int value: 'abc' "
        "(see `virtbus migrate --help`)\n"
    )


def test_help_still_works() -> None:
    run = subprocess.run([sys.executable, "-m", "virtbus.cli.main", "migrate", "--help"],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert run.returncode == 0 and "usage: virtbus migrate" in run.stdout
