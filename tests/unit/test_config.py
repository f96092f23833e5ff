"""Daemon TOML configuration: file < flags, every bad value refused with the key named."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.__main__ import settings_from as agent_settings
from scheduler.__main__ import settings_from
from scheduler.settings import scheduler_keys
from virtbus.config import ConfigError, load_config
from virtbus.settings import agent_keys

ROOT = Path(__file__).resolve().parents[2]
AGENT_KEYS = agent_keys(("test", "qemu"))
SCHED_KEYS = scheduler_keys(("spread", "pack"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("hots = 'x'", "hots", "unknown key"),
        ("[bux]\nurl = 'amqp://x'", "bux", "unknown key"),
        ("[bus]\nurll = 'amqp://x'", "bus.urll", "unknown key"),
        ("heartbeat_interval = -1", "heartbeat_interval", "must be > 0"),
        ("heartbeat_interval = 0", "heartbeat_interval", "must be > 0"),
        ("heartbeat_interval = 'fast'", "heartbeat_interval", "must be a number"),
        ("heartbeat_interval = true", "heartbeat_interval", "must be a number"),
        ("metrics_interval = inf", "metrics_interval", "must be finite"),
        ("metrics_interval = nan", "metrics_interval", "must be finite"),
        ("shutdown_grace = -0.5", "shutdown_grace", "must be >= 0"),
        ("call_memory = 1.5", "call_memory", "must be an integer"),
        ("call_memory = 0", "call_memory", "must be >= 1"),
        ("event_buffer = '10'", "event_buffer", "must be an integer"),
        ("driver = 'vmware'", "driver", "must be one of test, qemu"),
        ("driver = 3", "driver", "must be a non-empty string"),
        ("host = ''", "host", "must be a non-empty string"),
        ("state_dir = 5", "state_dir", "must be a non-empty string"),
        ("log_level = 'loud'", "log_level", "must be one of"),
        ("metrics_listen = 'localhost'", "metrics_listen", "must be ADDR:PORT"),
        ("metrics_listen = ':70000'", "metrics_listen", "must be ADDR:PORT"),
        ("labels = 'rack=r1'", "labels", "must be a table"),
        ("[labels]\nrack = ['a']", "labels.rack", "must be a string or number"),
        ("[bus]\nurl = 'http://x'", "bus.url", "must start with amqp://"),
        ("[bus]\nprefetch = 0", "bus.prefetch", "must be >= 1"),
        ("[bus]\ncall_timeout = -3", "bus.call_timeout", "must be > 0"),
        ("[bus]\ncall_queue_type = 'lazy'", "bus.call_queue_type", "must be one of quorum, clas"),
    ],
)
def test_bad_agent_values_name_the_key(tmp_path: Path, text: str, key: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), AGENT_KEYS)
    assert caught.value.key == key
    assert why in str(caught.value)


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("max_outbound = 0", "max_outbound", "must be >= 1"),
        ("max_migrations = -1", "max_migrations", "must be >= 1"),
        ("weigher = 'random'", "weigher", "must be one of spread, pack"),
        ("journal_fsync = 'yes'", "journal_fsync", "must be true or false"),
        ("host_down_after = 0", "host_down_after", "must be > 0"),
        ("cpu_overcommit = -1.0", "cpu_overcommit", "must be > 0"),
        ("history = -1", "history", "must be >= 0"),
        ("heartbeat_interval = 2", "heartbeat_interval", "unknown key"),  # an agent key
    ],
)
def test_bad_scheduler_values_name_the_key(tmp_path: Path, text: str, key: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), SCHED_KEYS)
    assert caught.value.key == key
    assert why in str(caught.value)


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml", AGENT_KEYS)
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "host = "), AGENT_KEYS)


def test_file_sets_defaults_and_flags_override(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        "host = 'from-file'\ndriver = 'test'\nheartbeat_interval = 0.5\ncommand_timeout = 42\n"
        "[labels]\nrack = 'r1'\nzone = 'a'\n[driver_options]\ndelay = 0.2\n"
        "[bus]\nurl = 'amqp://u:p@h:5672/v'\nprefetch = 7\n",
    )
    argv = ["--config", str(cfg), "--heartbeat-interval", "1.5", "--label", "zone=b"]
    settings = agent_settings(argv)
    assert (settings.host, settings.heartbeat_interval, settings.bus.url) == (
        "from-file",
        1.5,
        "amqp://u:p@h:5672/v",
    )
    assert settings.command_timeout == 42.0 and settings.bus.prefetch == 7
    assert settings.labels == {"rack": "r1", "zone": "b"}  # the flag wins, per label
    assert settings.driver_options == {"delay": "0.2"}
    flagged = agent_settings(["--config", str(cfg), "--host", "from-flag"])
    assert flagged.host == "from-flag"
    assert agent_settings([]).heartbeat_interval == 2.0  # the default


def test_scheduler_file_reaches_its_settings(tmp_path: Path) -> None:
    cfg = write(
        tmp_path, "max_outbound = 3\nweigher = 'pack'\njournal_fsync = true\nclaim_ttl = 9\n"
    )
    settings = settings_from(["--config", str(cfg), "--max-migrations", "5"])
    assert (settings.max_outbound_per_host, settings.max_migrations) == (3, 5)
    assert settings.placement.weigher == "pack" and settings.journal_fsync
    assert settings.claim_ttl == 9.0
    no_fsync = settings_from(["--config", str(cfg), "--no-journal-fsync"])
    assert not no_fsync.journal_fsync


@pytest.mark.parametrize(
    ("daemon", "argv", "expect"),
    [
        ("agent", ["--heartbeat-interval", "-1"], "--heartbeat-interval: must be > 0"),
        ("agent", ["--metrics-listen", "nope"], "--metrics-listen: must be ADDR:PORT"),
        ("agent", ["--bus", "http://x"], "--bus: must start with amqp://"),
        ("agent", ["--call-queue-type", "lazy"], "--call-queue-type: invalid choice"),
        ("scheduler", ["--call-queue-type", "stream"], "--call-queue-type: invalid choice"),
        ("scheduler", ["--max-outbound", "0"], "--max-outbound: must be >= 1"),
        ("scheduler", ["--step-timeout", "0"], "--step-timeout: must be > 0"),
    ],
)
def test_bad_flags_exit_2_with_one_line(daemon: str, argv: list[str], expect: str) -> None:
    parse = agent_settings if daemon == "agent" else settings_from
    with pytest.raises(SystemExit) as caught:
        parse(argv)
    assert caught.value.code == 2


def test_daemon_refuses_a_bad_file_with_exit_2(tmp_path: Path) -> None:
    cfg = write(tmp_path, "heartbeat_interval = -1\n")
    run = subprocess.run(
        [sys.executable, "-m", "agent", "--config", str(cfg)], capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"virtbus-agent: {cfg}: heartbeat_interval: must be > 0, got -1"
    ]


@pytest.mark.parametrize(
    ("example", "keys"), [("agent.toml", AGENT_KEYS), ("scheduler.toml", SCHED_KEYS)]
)
def test_examples_load_and_document_every_key(example: str, keys: tuple) -> None:  # type: ignore[type-arg]
    path = ROOT / "deploy" / "examples" / example
    load_config(path, keys)
    text = path.read_text()
    readme = (ROOT / "README.md").read_text()
    for key in keys:
        leaf = key.name.split(".")[-1]
        assert re.search(rf"^(#? ?{re.escape(leaf)}\b|\[{re.escape(leaf)}\])", text, re.M), (
            f"{example} lacks {key.name}"
        )
        assert f"`{key.name}`" in readme, f"README lacks {key.name}"


@pytest.mark.parametrize("driver", ["test", "qemu", "xen"])
def test_every_driver_refuses_an_unknown_or_bad_option(tmp_path: Path, driver: str) -> None:
    from agent.drivers import make_driver
    from virtbus.errors import InvalidArgument
    from virtbus.settings import AgentSettings

    def settings(**options: str) -> AgentSettings:
        return AgentSettings(host="h", driver=driver, state_dir=tmp_path, driver_options=options)

    with pytest.raises(InvalidArgument, match=f"unknown {driver} driver option 'bogus'"):
        make_driver(settings(bogus="1"))
    number = {"test": "delay", "qemu": "qmp_timeout", "xen": "xl_timeout"}[driver]
    with pytest.raises(InvalidArgument, match=f"option {number} must be float"):
        make_driver(settings(**{number: "soon"}))


def test_qemu_settings_come_from_driver_options(tmp_path: Path) -> None:
    from agent.drivers import make_driver
    from virtbus.settings import AgentSettings

    options = {"qmp_timeout": "3.5", "emulator": "/opt/qemu/bin/qemu-system-x86_64"}
    driver = make_driver(
        AgentSettings(host="h", driver="qemu", state_dir=tmp_path, driver_options=options)
    )
    assert driver._settings.qmp_timeout == 3.5  # type: ignore[attr-defined]
    assert driver._settings.emulator.startswith("/opt/qemu")  # type: ignore[attr-defined]


def test_qemu_command_line_settings_come_from_driver_options(tmp_path: Path) -> None:
    """VNC/SPICE/chardev TLS and the rest of ArgvSettings are driver options too (as in
    libvirt's qemu.conf); what is not given keeps its default under the state dir."""
    from agent.drivers import qemu_settings
    from virtbus.errors import InvalidArgument

    options = {"vnc_tls": "on", "vnc_tls_dir": "/etc/pki/vnc", "qmp_timeout": "2"}
    settings = qemu_settings(options, tmp_path)
    assert settings.argv is not None and settings.qmp_timeout == 2.0
    assert (settings.argv.vnc_tls, settings.argv.vnc_tls_dir) == (True, "/etc/pki/vnc")
    assert settings.argv.vnc_tls_verify is False  # not given: the default
    assert settings.argv.nvram_dir == tmp_path / "nvram"  # kept under the state dir
    moved = qemu_settings({"nvram_dir": "/srv/nvram"}, tmp_path).argv
    assert moved is not None and moved.nvram_dir == Path("/srv/nvram")
    with pytest.raises(InvalidArgument, match=r"option vnc_tls must be bool, got 'maybe'"):
        qemu_settings({"vnc_tls": "maybe"}, tmp_path)
    with pytest.raises(InvalidArgument, match=r"unknown qemu driver option 'vnc_tlss'.*vnc_tls"):
        qemu_settings({"vnc_tlss": "on"}, tmp_path)


def test_path_flags_reach_the_settings(tmp_path: Path) -> None:
    argv = ["--state-dir", str(tmp_path / "s"), "--run-dir", str(tmp_path / "r")]
    settings = agent_settings(argv)
    assert (settings.state_dir, settings.runtime_dir) == (tmp_path / "s", tmp_path / "r")
