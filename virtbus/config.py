"""Daemon settings: declared once, as typed dataclasses; TOML keys and flags follow.

Every setting of a daemon is a field of its settings dataclass (``AgentSettings``,
``BusSettings``, the scheduler's ``SchedulerSettings``) with its default, and, in the
field's metadata (:func:`setting`), its help, bounds and whether a command-line flag
overrides it. From that one declaration come the TOML keys of ``agent.toml`` /
``scheduler.toml`` (:func:`keys_of`), the argparse flags (:func:`add_flags`) and the
settings object itself (:func:`build`): file < flag, file over default. A typo, a wrong
type or a negative interval stops the daemon at start with the key named — a daemon
that silently ignores a setting is worse than one that refuses to start.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from virtbus.bus.nodes import bus_nodes, join_bus_urls, redacted
from virtbus.errors import InvalidArgument

CONFIG_ERROR_EXIT = 2  # as argparse: a usage error, not a runtime failure
BUS_SCHEMES = ("amqp://", "amqps://", "memory://")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
KINDS = (
    "str", "float", "int", "bool", "path", "table", "choice", "listen", "bus_url", "paths", "strs",
)  # fmt: skip
_META = "virtbus.setting"
_NESTED = "virtbus.nested"
T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration value; ``str()`` names the key (``key: what is wrong``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.reason = message


def setting(
    help: str,
    *,
    flag: bool | str = False,
    minimum: float | None = None,
    positive: bool = False,
    choices: tuple[str, ...] = (),
    kind: str | None = None,
    name: str | None = None,
    metavar: str | None = None,
) -> dict[str, Any]:
    """Field metadata: a setting with a TOML key (``name``, default: the field's name) and,
    with ``flag`` (True, or the flag's own name), a command-line flag."""
    return {
        _META: {
            "help": help, "flag": flag, "minimum": minimum, "positive": positive,
            "choices": choices, "kind": kind, "name": name, "metavar": metavar,
        }
    }  # fmt: skip


def nested(prefix: str = "") -> dict[str, Any]:
    """Field metadata: a dataclass whose settings are keys too (under ``prefix``)."""
    return {_NESTED: prefix}


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
    path: tuple[str, ...] = ()  # attribute path in the settings object
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + (self.dest or self.name).replace("_", "-")


def _kind_of(annotation: Any, declared: str | None, choices: tuple[str, ...]) -> str:
    if declared is not None:
        return declared
    if choices:
        return "choice"
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if isinstance(annotation, types.UnionType) and len(args) == 1 else annotation
    origin = typing.get_origin(base) or base
    kinds: dict[Any, str] = {float: "float", int: "int", bool: "bool", str: "str", Path: "path"}
    if origin is dict:
        return "table"
    if origin is tuple:  # tuple[Path, ...] / tuple[str, ...]: a TOML array
        return "paths" if typing.get_args(base)[0] is Path else "strs"
    if origin not in kinds:
        raise TypeError(f"no setting kind for {annotation!r}")
    return kinds[origin]


def keys_of(
    cls: type[Any],
    *,
    prefix: str = "",
    choices: Mapping[str, Sequence[str]] | None = None,
    path: tuple[str, ...] = (),
) -> tuple[Key, ...]:
    """The keys a settings dataclass declares (``choices``: values known only at run time,
    by field name, e.g. the agent's driver names)."""
    hints = typing.get_type_hints(cls)
    keys: list[Key] = []
    for f in dataclasses.fields(cls):
        if _NESTED in f.metadata:
            inner = hints[f.name]
            keys += keys_of(inner, prefix=prefix + f.metadata[_NESTED], choices=choices,
                            path=(*path, f.name))  # fmt: skip
            continue
        meta = f.metadata.get(_META)
        if meta is None:
            continue
        allowed = tuple((choices or {}).get(f.name, ())) or meta["choices"]
        name = prefix + (meta["name"] or f.name)
        flag = meta["flag"]
        dest = (flag if isinstance(flag, str) else name.replace(".", "_")) if flag else None
        keys.append(
            Key(
                name, _kind_of(hints[f.name], meta["kind"], allowed), meta["help"], dest,
                meta["minimum"], meta["positive"], allowed, (*path, f.name), meta["metavar"],
            )
        )  # fmt: skip
    return tuple(keys)


def add_flags(parser: argparse.ArgumentParser, keys: Sequence[Key]) -> None:
    """The flags of the keys that have one; every default is None (= not given)."""
    for key in keys:
        if key.dest is None:
            continue
        flag = "--" + key.dest.replace("_", "-")
        if key.kind == "bool":
            parser.add_argument(flag, dest=key.dest, action=argparse.BooleanOptionalAction,
                                default=None, help=key.help)  # fmt: skip
        elif key.kind == "bus_url":  # a cluster's nodes: repeat the flag, or list them
            parser.add_argument(flag, dest=key.dest, action="append", default=None,
                                metavar=key.metavar, help=f"{key.help} (repeatable: "
                                "the nodes of a RabbitMQ cluster)")  # fmt: skip
        elif key.kind == "table":
            parser.add_argument(flag, dest=key.dest, action="append", default=None,
                                metavar="KEY=VALUE", help=f"{key.help} (repeatable)")  # fmt: skip
        else:
            convert: Any = {"float": float, "int": int}.get(key.kind, str)  # paths: check_value
            parser.add_argument(
                flag, dest=key.dest, type=convert, default=None,
                choices=key.choices or None, metavar=key.metavar, help=key.help,
            )  # fmt: skip


def _pairs(flag: str, items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ConfigError(flag, f"wants KEY=VALUE, got {item!r}")
        out[k] = v
    return out


def parse_settings(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, keys: Sequence[Key]
) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The arguments and every setting given (``{key name: value}``): the ``--config``
    file's, overridden by flags (tables merge, flags winning per entry). A bad file or
    flag value exits with status 2 and one line naming the key (file) or the flag."""
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    config = getattr(args, "config", None)
    try:
        if config is not None:
            values = load_config(Path(config), keys)
    except ConfigError as exc:
        parser.exit(CONFIG_ERROR_EXIT, f"{parser.prog}: {config}: {exc}\n")
    for key in keys:
        given = getattr(args, key.dest, None) if key.dest else None
        if given is None:
            continue
        try:
            if key.kind == "table":
                values[key.name] = {**values.get(key.name, {}), **_pairs(key.flag, given)}
            elif key.kind == "bus_url":
                values[key.name] = check_value(key, join_bus_urls(given))
            else:
                values[key.name] = check_value(key, given)
        except ConfigError as exc:
            parser.exit(CONFIG_ERROR_EXIT, f"{parser.prog}: {key.flag}: {exc.reason}\n")
    return args, values


def parse_daemon_args(
    prog: str, description: str, keys: Sequence[Key], argv: Sequence[str] | None
) -> dict[str, Any]:
    """A daemon's command line: ``--config FILE`` and a flag per flagged key; the settings
    given (file < flags), by key name, with the bus URL falling back to the environment."""
    from virtbus.settings import bus_url_from_env

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config", type=Path, default=None, metavar="FILE",
        help=f"TOML settings (e.g. /etc/virtbus/{prog.removeprefix('virtbus-')}.toml); "
        "flags override it",
    )  # fmt: skip
    add_flags(parser, keys)
    _args, values = parse_settings(parser, argv, keys)
    return {**values, "bus.url": bus_url_from_env(values.get("bus.url"))}


def build(cls: type[T], values: Mapping[str, Any], keys: Sequence[Key], **fixed: Any) -> T:
    """``cls`` from its defaults, then the settings ``values`` (by key name), then ``fixed``."""
    tree: dict[str, Any] = {}
    for key in keys:
        if key.name in values:
            node = tree
            for part in key.path[:-1]:
                node = node.setdefault(part, {})
            node[key.path[-1]] = values[key.name]
    return _construct(cls, {**tree, **fixed})


def _construct(cls: type[T], tree: Mapping[str, Any]) -> T:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in tree.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(hints.get(name)):
            value = _construct(hints[name], value)
        kwargs[name] = value
    return cls(**kwargs)


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
    if kind in ("paths", "strs"):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(key.name, f"must be an array of strings, got {_show(value)}")
        if kind == "strs":
            return tuple(value)
        if not all(v.startswith("/") for v in value):
            raise ConfigError(key.name, f"must be absolute paths, got {value!r}")
        return tuple(Path(v) for v in value)
    if not isinstance(value, str) or not value:
        raise ConfigError(key.name, f"must be a non-empty string, got {_show(value)}")
    if kind == "path":
        return Path(value)
    if key.choices == LOG_LEVELS:
        value = value.upper()
    if kind == "choice" and value not in key.choices:
        raise ConfigError(key.name, f"must be one of {', '.join(key.choices)}, got {value!r}")
    if kind == "bus_url":
        try:
            nodes = bus_nodes(value) if value.startswith(BUS_SCHEMES) else (value,)
        except InvalidArgument as exc:
            raise ConfigError(key.name, exc.message) from None
        if not all(node.startswith(BUS_SCHEMES) for node in nodes):
            raise ConfigError(
                key.name, f"must start with {', '.join(BUS_SCHEMES)}, got {redacted(value)!r}"
            )
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
    import tomllib  # only where a file is read: the settings' users (the CLI) do without

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


def _path_list(text: str) -> tuple[Path, ...]:
    """``/a:/b`` (as $PATH): absolute paths only; empty gives none."""
    paths = tuple(Path(p) for p in text.split(":") if p)
    if any(not p.is_absolute() for p in paths):
        raise ValueError(text)
    return paths


def _str_list(text: str) -> tuple[str, ...]:
    """``a,b`` (commas: an IPv6 address holds colons)."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


_CONVERT: dict[Any, Any] = {
    float: float, int: int, str: str, Path: Path,
    tuple[Path, ...]: _path_list, tuple[str, ...]: _str_list,
}  # fmt: skip
_KIND_NAMES = {tuple[Path, ...]: "a ':'-separated list of absolute paths",
               tuple[str, ...]: "a ','-separated list"}  # fmt: skip


def option_fields(cls: type[Any]) -> dict[str, Any]:
    """The fields of a settings dataclass that a ``KEY=VALUE`` option can set, with their
    types: numbers, strings, paths, booleans and lists of those."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: hints[f.name] for f in dataclasses.fields(cls) if hints[f.name] in (*_CONVERT, bool)
    }


def options_into(cls: type[T], options: Mapping[str, str], what: str, **fixed: Any) -> T:
    """A driver's settings dataclass from ``--driver-option KEY=VALUE`` strings: each key
    must be a field of plain type (number, string, path, boolean), converted and checked;
    an unknown key or a bad value is refused naming it (INVALID_ARG), never ignored."""
    from virtbus.errors import InvalidArgument

    plain = {name: kind for name, kind in option_fields(cls).items() if name not in fixed}
    kwargs = dict(fixed)
    for key, text in options.items():
        kind = plain.get(key)
        if kind is None:
            known = ", ".join(sorted(plain)) or "none"
            raise InvalidArgument(f"unknown {what} option {key!r} (known: {known})")
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(text)
                kwargs[key] = text.lower() in ("true", "1", "yes", "on")
            else:
                kwargs[key] = _CONVERT[kind](text)
        except ValueError:
            name = _KIND_NAMES.get(kind) or kind.__name__
            raise InvalidArgument(f"{what} option {key} must be {name}, got {text!r}") from None
        if isinstance(kwargs[key], float) and not math.isfinite(kwargs[key]):
            raise InvalidArgument(f"{what} option {key} must be finite, got {text!r}")
    return cls(**kwargs)
