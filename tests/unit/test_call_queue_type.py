"""``bus.call_queue_type``: one setting (TOML key and flag of both daemons) that decides the
type of the call queues the daemons declare and the definitions hold. The broker side
(replacing a queue of the other type) is tests/integration/test_bus_quorum.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.__main__ import settings_from as agent_settings
from scheduler.__main__ import settings_from as scheduler_settings
from virtbus.bus.definitions import definitions
from virtbus.bus.definitions import main as definitions_main
from virtbus.bus.topology import DEAD_LETTER_EXCHANGE, SCHEDULER_QUEUE, call_queue_for
from virtbus.errors import InvalidArgument


def test_quorum_is_the_default_of_both_daemons() -> None:
    assert agent_settings([]).bus.call_queue_type == "quorum"
    assert scheduler_settings([]).bus.call_queue_type == "quorum"


def test_file_and_flag_reach_both_daemons(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[bus]\ncall_queue_type = 'classic'\n")
    assert agent_settings(["--config", str(cfg)]).bus.call_queue_type == "classic"
    assert scheduler_settings(["--config", str(cfg)]).bus.call_queue_type == "classic"
    flagged = ["--config", str(cfg), "--call-queue-type", "quorum"]  # the flag wins
    assert agent_settings(flagged).bus.call_queue_type == "quorum"
    assert scheduler_settings(["--call-queue-type", "classic"]).bus.call_queue_type == "classic"


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_call_queues_have_the_type_asked_for(queue_type: str) -> None:
    agent = call_queue_for("agent.h1", queue_type)
    assert agent.name == "virtbus.agent.h1" and agent.durable
    assert agent.arguments == {
        "x-queue-type": queue_type, "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    }  # fmt: skip
    scheduler = call_queue_for("scheduler", queue_type)
    assert scheduler.name == SCHEDULER_QUEUE
    assert scheduler.arguments["x-queue-type"] == queue_type
    assert scheduler.arguments["x-single-active-consumer"] is True


def test_an_unknown_queue_type_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="quorum, classic") as err:
        call_queue_for("agent.h1", "stream")
    assert err.value.code == "INVALID_ARG"


def scheduler_queue_type(defs: dict[str, object]) -> object:
    queues = defs["queues"]
    assert isinstance(queues, list)
    (queue,) = [q for q in queues if q["name"] == SCHEDULER_QUEUE]
    return queue["arguments"]["x-queue-type"]


def test_definitions_declare_the_schedulers_queue_of_the_type(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert scheduler_queue_type(definitions("/v", "pw")) == "quorum"
    assert scheduler_queue_type(definitions("/v", "pw", call_queue_type="classic")) == "classic"
    import json

    definitions_main(["--password", "pw", "--call-queue-type", "classic"])
    assert scheduler_queue_type(json.loads(capsys.readouterr().out)) == "classic"
    with pytest.raises(SystemExit):
        definitions_main(["--password", "pw", "--call-queue-type", "lazy"])
