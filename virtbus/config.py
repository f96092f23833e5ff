"""Daemon configuration files: one TOML file per daemon, flags override it.

``virtbus-agent --config /etc/virtbus/agent.toml`` and ``virtbus-scheduler --config
/etc/virtbus/scheduler.toml`` read every setting from the file; a flag given on the
command line wins over the file, the file wins over the built-in default. Every key is
declared here once (type, bounds, help), so a typo, a wrong type or a negative interval
stops the daemon at start with the key named — a daemon that silently ignores a setting
is worse than one that refuses to start. The key tables are plain data (no import of the
agent or scheduler), which also lets the README and the example files be checked
against them.
"""

from __future__ import annotations

import argparse
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_ERROR_EXIT = 2  # as argparse: a usage error, not a runtime failure
BUS_SCHEMES = ("amqp://", "amqps://", "memory://")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
KINDS = ("str", "float", "int", "bool", "path", "table", "choice", "listen", "bus_url")


class ConfigError(ValueError):
    """A bad configuration value; ``str()`` names the key (``key: what is wrong``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.reason = message


@dataclass(frozen=True, slots=True)
class Key:
    """One setting: its dotted TOML name, type and bounds, and the flag that overrides it."""

    name: str  # dotted TOML key, e.g. "bus.url"
    kind: str  # one of KINDS
    help: str
    dest: str | None = None  # argparse dest of the overriding flag (None: file only)
    minimum: float | None = None  # inclusive lower bound of numbers
    positive: bool = False  # numbers must be > 0
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + (self.dest or self.name).replace("_", "-")


def _bus_keys() -> tuple[Key, ...]:
    return (
        Key("bus.url", "bus_url", "bus URL: amqp://, amqps:// (TLS) or memory://", dest="bus"),
        Key("bus.call_timeout", "float", "default deadline of a call (s)", positive=True),
        Key("bus.connect_timeout", "float", "deadline of connecting to the broker (s)",
            positive=True),
        Key("bus.confirm_timeout", "float", "wait for a publisher confirm (s)", positive=True),
        Key("bus.prefetch", "int", "unacknowledged calls held at once", minimum=1),
        Key("bus.stop_grace", "float", "calls in hand may finish this long at stop (s)",
            minimum=0),
    )  # fmt: skip


def agent_keys(drivers: Sequence[str]) -> tuple[Key, ...]:
    """The keys of ``agent.toml`` (``drivers``: the driver names this agent knows)."""
    return (
        Key("host", "str", "this host's name on the bus", dest="host"),
        Key("driver", "choice", "hypervisor driver", dest="driver", choices=tuple(drivers)),
        Key("state_dir", "path", "durable state (definitions, outbox)", dest="state_dir"),
        Key("run_dir", "path", "sockets and pid files (default STATE_DIR/run)", dest="run_dir"),
        Key("log_level", "choice", "logging level", dest="log_level", choices=LOG_LEVELS),
        Key("heartbeat_interval", "float", "seconds between heartbeats",
            dest="heartbeat_interval", positive=True),
        Key("metrics_interval", "float", "seconds between metrics passes",
            dest="metrics_interval", positive=True),
        Key("metrics_listen", "listen", "ADDR:PORT of the Prometheus page (default off)",
            dest="metrics_listen"),
        Key("command_timeout", "float", "a command running longer is failed (s)",
            positive=True),
        Key("shutdown_grace", "float", "time for the commands in hand at SIGTERM (s)",
            minimum=0),
        Key("call_memory", "int", "recent call ids remembered for redelivery", minimum=1),
        Key("event_buffer", "int", "events held while the broker is away", minimum=1),
        Key("rejected_events_max_bytes", "int", "size of outbox/rejected.log before it rotates",
            minimum=1),
        Key("cpu_overcommit", "float", "vCPUs of active guests per host CPU (start limit)",
            dest="cpu_overcommit", positive=True),
        Key("memory_overcommit", "float", "guest memory per host memory (start limit)",
            dest="memory_overcommit", positive=True),
        Key("labels", "table", "labels of this host for placement (KEY = \"VALUE\")"),
        Key("migration_address", "str", "address other hosts stream live migrations to",
            dest="migration_address"),
        Key("driver_options", "table", "driver tuning (KEY = VALUE)"),
        *_bus_keys(),
    )  # fmt: skip


def scheduler_keys(weighers: Sequence[str]) -> tuple[Key, ...]:
    """The keys of ``scheduler.toml``."""
    return (
        Key("state_dir", "path", "journal directory (shared by standbys)", dest="state_dir"),
        Key("log_level", "choice", "logging level", dest="log_level", choices=LOG_LEVELS),
        Key("host_down_after", "float", "a host silent this long is down (s)",
            dest="host_down_after", positive=True),
        Key("cpu_overcommit", "float", "vCPUs per host CPU", dest="cpu_overcommit",
            positive=True),
        Key("memory_overcommit", "float", "guest memory per host memory",
            dest="memory_overcommit", positive=True),
        Key("weigher", "choice", "spread or pack", dest="weigher", choices=tuple(weighers)),
        Key("max_outbound", "int", "migrations leaving one host at once", dest="max_outbound",
            minimum=1),
        Key("max_migrations", "int", "migrations in flight in the cluster",
            dest="max_migrations", minimum=1),
        Key("migration_timeout", "float", "default timeout of a migration (s)",
            dest="migration_timeout", positive=True),
        Key("step_timeout", "float", "deadline of each agent call of a migration (s)",
            dest="step_timeout", positive=True),
        Key("cleanup_timeout", "float", "retry rollback steps this long (s)",
            dest="cleanup_timeout", positive=True),
        Key("journal_fsync", "bool", "fsync every journal write", dest="journal_fsync"),
        Key("progress_poll", "float", "poll migration.status this often (s)", positive=True),
        Key("claim_ttl", "float", "a placement claims its host this long (s)", positive=True),
        Key("fanout_timeout", "float", "deadline of calls to every host (s)", positive=True),
        Key("leader_probe", "float", "a standby checks for leadership this often (s)",
            positive=True),
        Key("history", "int", "finished migrations remembered", minimum=0),
        *_bus_keys(),
    )  # fmt: skip


def check_value(key: Key, value: Any) -> Any:
    """``value`` converted for ``key`` (TOML or flag), or :class:`ConfigError`."""
    kind = key.kind
    if kind in ("float", "int"):
        wanted = "a number" if kind == "float" else "an integer"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key.name, f"must be {wanted}, got {_show(value)}")
        if kind == "int" and not isinstance(value, int):
            raise ConfigError(key.name, f"must be an integer, got {_show(value)}")
        if not math.isfinite(value):
            raise ConfigError(key.name, f"must be finite, got {value}")
        if key.positive and value <= 0:
            raise ConfigError(key.name, f"must be > 0, got {value}")
        if key.minimum is not None and value < key.minimum:
            raise ConfigError(key.name, f"must be >= {key.minimum:g}, got {value}")
        return float(value) if kind == "float" else value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(key.name, f"must be true or false, got {_show(value)}")
        return value
    if kind == "table":
        return _table(key, value)
    if not isinstance(value, str) or not value:
        raise ConfigError(key.name, f"must be a non-empty string, got {_show(value)}")
    if kind == "path":
        return Path(value)
    if key.choices == LOG_LEVELS:
        value = value.upper()
    if kind == "choice" and value not in key.choices:
        raise ConfigError(key.name, f"must be one of {', '.join(key.choices)}, got {value!r}")
    if kind == "bus_url" and not value.startswith(BUS_SCHEMES):
        raise ConfigError(key.name, f"must start with {', '.join(BUS_SCHEMES)}, got {value!r}")
    if kind == "listen":
        _addr, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(key.name, f"must be ADDR:PORT, got {value!r}")
    return value


def _table(key: Key, value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError(key.name, f"must be a table of KEY = VALUE, got {_show(value)}")
    out: dict[str, str] = {}
    for k, v in value.items():
        if isinstance(v, Mapping | list):
            raise ConfigError(f"{key.name}.{k}", f"must be a string or number, got {_show(v)}")
        out[str(k)] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def _show(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}  # fmt: skip
    return f"{kinds.get(type(value), type(value).__name__)} ({value!r})"


def load_config(path: Path, keys: Sequence[Key]) -> dict[str, Any]:
    """The file's settings by dotted key, checked; :class:`ConfigError` names a bad key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    by_name = {k.name: k for k in keys}
    values: dict[str, Any] = {}

    def walk(table: Mapping[str, Any], prefix: str) -> None:
        for name, value in table.items():
            dotted = prefix + name
            key = by_name.get(dotted)
            if key is not None:
                values[dotted] = check_value(key, value)
            elif isinstance(value, Mapping) and any(n.startswith(dotted + ".") for n in by_name):
                walk(value, dotted + ".")
            else:
                raise ConfigError(dotted, "unknown key")

    walk(data, "")
    return values


def parse_with_config(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, keys: Sequence[Key]
) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Parse ``argv`` with the file named by ``--config`` as defaults.

    Returns the arguments (flag > file > default) and the file's values of keys without a
    flag (by dotted name). A bad file or flag value exits with status 2 and one line naming
    the key (file) or the flag.
    """
    args = parser.parse_args(argv)
    file_values: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        try:
            file_values = load_config(Path(args.config), keys)
        except ConfigError as exc:
            parser.exit(CONFIG_ERROR_EXIT, f"{parser.prog}: {args.config}: {exc}\n")
        parser.set_defaults(**{k.dest: file_values[k.name] for k in keys
                               if k.dest and k.name in file_values})  # fmt: skip
        args = parser.parse_args(argv)
    for key in keys:
        if key.dest is None or key.kind == "table":
            continue
        value = getattr(args, key.dest, None)
        if value is None or (key.kind == "path" and isinstance(value, Path)):
            continue
        try:
            setattr(args, key.dest, check_value(key, value))
        except ConfigError as exc:
            parser.exit(CONFIG_ERROR_EXIT, f"{parser.prog}: {key.flag}: {exc.reason}\n")
    return args, {k: v for k, v in file_values.items() if not _has_dest(keys, k)}


def _has_dest(keys: Sequence[Key], name: str) -> bool:
    return any(k.name == name and k.dest for k in keys)


def extras_for(file_values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The file-only values under ``prefix`` (e.g. ``"bus."``) by their bare field names."""
    return {
        name.removeprefix(prefix): value
        for name, value in file_values.items()
        if name.startswith(prefix) and "." not in name.removeprefix(prefix)
    }
