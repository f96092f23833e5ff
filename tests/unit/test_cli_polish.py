"""CLI polish: colour and bars only on a terminal, completion scripts, helpful errors."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from virtbus.bus.factory import open_bus
from virtbus.cli.completion import script
from virtbus.cli.context import Context
from virtbus.cli.main import build_parser
from virtbus.cli.migrate import _line
from virtbus.cli.term import ProgressLine, Style, bar, colour_enabled
from virtbus.client import Client
from virtbus.errors import NoConnect, OperationTimeout


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_only_on_a_terminal_and_never_with_no_color(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert colour_enabled(FakeTty()) and not colour_enabled(io.StringIO())
    assert Style(FakeTty())("ok", "green") == "\033[32mok\033[0m"
    assert Style(io.StringIO())("ok", "green") == "ok"
    monkeypatch.setenv("NO_COLOR", "")
    assert not colour_enabled(FakeTty())
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("TERM", "dumb")
    assert not colour_enabled(FakeTty())


def test_progress_bar_redrawn_on_a_terminal_and_plain_lines_in_a_pipe() -> None:
    assert bar(0.5, width=10) == "[#####.....]  50%"
    assert bar(2.0, width=4) == "[####] 100%"
    pipe = io.StringIO()
    line = ProgressLine(pipe)
    for text in ("a", "a", "b"):
        line.update(text)
    line.clear()
    assert pipe.getvalue() == "a\nb\n"
    tty = FakeTty()
    line = ProgressLine(tty)
    line.update("a")
    line.update("b")
    line.clear()
    assert "\r" in tty.getvalue() and tty.getvalue().endswith("\n")


def test_migration_line_shows_a_bar_only_when_asked() -> None:
    rec = {"id": "m1", "domain": "d", "source": "a", "destination": "b", "state": "running",
           "phase": "progress", "progress": {"status": "active", "transferred": 64 << 20,
                                             "total": 256 << 20, "passes": 1}}  # fmt: skip
    assert "active 25% (64/256 MiB, pass 1)" in _line(rec)
    assert "[######" in _line(rec, with_bar=True)
    rec["state"] = "completed"
    assert "100%" in _line(rec)  # resent dirty pages make transferred/total meaningless at the end


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script_is_valid_bash_and_knows_the_commands(shell: str) -> None:
    text = script(build_parser(), shell)
    for word in ("migrate", "domstats", "demo", "--to", "--group", "cpu-total", "--driver"):
        assert word in text
    check = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr


def test_completion_completes_commands_and_choices() -> None:
    text = script(build_parser(), "bash")
    probe = (
        text + "\nCOMP_WORDS=(virtbus --json mig); COMP_CWORD=2; _virtbus_complete;"
        ' echo "${COMPREPLY[*]}"'
        + '\nCOMP_WORDS=(virtbus domstats --group ""); COMP_CWORD=3; _virtbus_complete;'
        ' echo "${COMPREPLY[*]}"'
    )
    out = subprocess.run(["bash", "-c", probe], text=True, capture_output=True).stdout.splitlines()
    assert out == [
        "migrate migrate-cancel migrations",
        "state cpu-total balloon vcpu interface block",
    ]


def test_version_and_completion_through_the_entry_point() -> None:
    run = subprocess.run([sys.executable, "-m", "virtbus.cli.main", "--version"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert run.returncode == 0 and run.stdout.startswith("virtbus ")
    run = subprocess.run([sys.executable, "-m", "virtbus.cli.main", "completion", "bash"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert run.returncode == 0 and "complete -o default -F _virtbus_complete virtbus" in run.stdout


async def test_errors_name_the_host_and_the_daemon_to_start() -> None:
    bus = open_bus("memory://cli-polish", src="cli")
    await bus.connect()
    try:
        ctx = Context(client=Client(bus, timeout=0.3), json=False, timeout=0.3)
        with pytest.raises(NoConnect, match="no agent answers for host 'ghost' — is virtbus-agent"):
            await ctx.client.host("ghost").domain("x").info()
        with pytest.raises((NoConnect, OperationTimeout), match="is virtbus-scheduler running"):
            await ctx.client.scheduler.ping()
        assert not await ctx.scheduler_answers()  # the CLI still falls back
    finally:
        await bus.close()


def test_migrate_tls_flags_become_params() -> None:
    """``virtbus migrate --tls [--tls-destination NAME]``: the typed params the scheduler
    carries to both agents; a name without --tls is refused as the agents refuse it."""
    from virtbus.cli.migrate import _params
    from virtbus.errors import InvalidArgument
    from virtbus.protocol.migration import MigrationParams

    parser = build_parser()
    args = parser.parse_args(["migrate", "web", "--to", "b", "--tls"])
    assert _params(args) == MigrationParams(tls=True)
    args = parser.parse_args(["migrate", "web", "--tls", "--tls-destination", "mig.example.net"])
    assert _params(args) == MigrationParams(tls=True, tls_destination="mig.example.net")
    assert _params(parser.parse_args(["migrate", "web"])) == MigrationParams()
    with pytest.raises(InvalidArgument, match="without tls"):
        _params(parser.parse_args(["migrate", "web", "--tls-destination", "x"]))
