"""The README's protocol tables and ``docs/asyncapi.yaml``, generated from the declarations.

Every op (:data:`~virtbus.protocol.registry.REGISTRY`) and every published message
(:data:`~virtbus.protocol.messages.MESSAGES`) is described from its types, so a new op
shows up in both documents as soon as its module declares it::

    python -m virtbus.protocol.schema --write   # regenerate README.md and docs/asyncapi.yaml
    python -m virtbus.protocol.schema --check   # exit 1 when either is stale

The output is deterministic (sorted by name, whatever the import order), so a test can
regenerate both byte for byte. The JSON Schemas are msgspec's
(:func:`msgspec.json.schema_components`), rewritten where JSON Schema 2020-12 and the
draft-07 dialect of AsyncAPI 3.0 differ.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

import msgspec
import msgspec.inspect as mi

import virtbus
import virtbus.protocol
from virtbus.bus.topology import (
    DEADLINE_HEADER,
    EXCHANGES,
    RPC_EXCHANGE,
    SCHEDULER_ROUTE,
    ExchangeSpec,
)
from virtbus.errors import ERROR_CODES
from virtbus.protocol.envelope import PROTOCOL_VERSION, Kind
from virtbus.protocol.messages import MESSAGES, Published
from virtbus.protocol.registry import REGISTRY, Op, Service

ROOT: Final = Path(__file__).resolve().parents[2]
README: Final = ROOT / "README.md"
ASYNCAPI: Final = ROOT / "docs" / "asyncapi.yaml"
COMMAND: Final = "python -m virtbus.protocol.schema --write"
CONTENT_TYPE: Final = "application/msgpack"
REPLY_TO: Final = "amq.rabbitmq.reply-to"
AMQP_BINDING: Final = "0.3.0"
INLINE_FIELDS: Final = 5  # bodies with more fields are named and listed under "Types"

AnyOp = Op[Any, Any]


# --- what is declared -----------------------------------------------------------------
def declared() -> tuple[list[AnyOp], list[Published]]:
    """Every op and every published message, sorted by name.

    Every module of :mod:`virtbus.protocol` is imported first, so an op is documented
    even before an index (``ops.py``) imports its module.
    """
    for mod in pkgutil.iter_modules(virtbus.protocol.__path__, "virtbus.protocol."):
        importlib.import_module(mod.name)
    ops = sorted(REGISTRY.values(), key=lambda o: o.name)
    messages = sorted(MESSAGES.values(), key=lambda m: m.op)
    return ops, messages


def _fields(kind: type[Any]) -> tuple[mi.Field, ...]:
    info = mi.type_info(kind)
    assert isinstance(info, mi.StructType), kind
    return info.fields


def _children(t: mi.Type) -> Iterable[mi.Type]:
    if isinstance(t, mi.StructType):
        return (f.type for f in t.fields)
    if isinstance(t, mi.UnionType):
        return t.types
    if isinstance(t, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        return (t.item_type,)
    if isinstance(t, mi.TupleType):
        return t.item_types
    if isinstance(t, mi.DictType):
        return (t.key_type, t.value_type)
    return ()


def _walk(t: mi.Type, seen: set[type[Any]]) -> Iterable[mi.Type]:
    """``t`` and every type inside it (a struct's fields once per struct class)."""
    if isinstance(t, mi.StructType):
        if t.cls in seen:
            return
        seen.add(t.cls)
    yield t
    for child in _children(t):
        yield from _walk(child, seen)


# --- the README tables ----------------------------------------------------------------
def _bounds(t: mi.IntType | mi.FloatType) -> str:
    """``≥0``, ``>0``, ``0..255`` (both inclusive), ``>0, ≤60``."""
    if t.ge is not None and t.le is not None:
        return f"{t.ge}..{t.le}"
    low = f"≥{t.ge}" if t.ge is not None else f">{t.gt}" if t.gt is not None else ""
    high = f"≤{t.le}" if t.le is not None else f"<{t.lt}" if t.lt is not None else ""
    return ", ".join(b for b in (low, high) if b)


class Renderer:
    """Short, exact renderings of types: ``{domain, timeout?: number(≥0)|null}``.

    A struct is written out inline when it has few fields and is used once; otherwise by
    its name, and :meth:`types_table` lists it. Enums always go by name.
    """

    def __init__(self, ops: list[AnyOp], messages: list[Published]) -> None:
        bodies = [o.request for o in ops] + [o.result for o in ops] + [m.body for m in messages]
        uses: dict[type[Any], int] = {}
        for body in bodies:
            uses[body] = uses.get(body, 0) + 1
        nested: set[type[Any]] = set()
        self.enums: set[type[Any]] = set()
        for body in set(bodies):
            for t in _walk(mi.type_info(body), set()):
                if isinstance(t, mi.StructType) and t.cls is not body:
                    nested.add(t.cls)
                elif isinstance(t, mi.EnumType):
                    self.enums.add(t.cls)
        self.named: set[type[Any]] = nested | {
            b
            for b in bodies
            if len(_fields(b)) > INLINE_FIELDS or (uses[b] > 1 and len(_fields(b)) == INLINE_FIELDS)
        }
        # a named struct's own fields may name more structs and enums
        for cls in list(self.named):
            for t in _walk(mi.type_info(cls), set()):
                if isinstance(t, mi.StructType):
                    self.named.add(t.cls)
                elif isinstance(t, mi.EnumType):
                    self.enums.add(t.cls)

    def body(self, kind: type[Any]) -> str:
        return kind.__name__ if kind in self.named else self.struct(kind)

    def struct(self, kind: type[Any]) -> str:
        """``{a, b?: int}``; ``Base + {c}`` for a named base the struct extends."""
        fields = _fields(kind)
        base = kind.__bases__[0]
        prefix = ""
        if base in self.named and fields[: len(_fields(base))] == _fields(base):
            prefix = f"{base.__name__} + "
            fields = fields[len(_fields(base)) :]
        return prefix + "{" + ", ".join(self.field(f) for f in fields) + "}"

    def field(self, f: mi.Field) -> str:
        name = f.encode_name if f.required else f"{f.encode_name}?"
        if isinstance(f.type, mi.StrType) and not f.type.pattern:
            return name
        return f"{name}: {self.type(f.type)}"

    def type(self, t: mi.Type) -> str:
        if isinstance(t, mi.StrType):
            return "str"
        if isinstance(t, mi.BoolType):
            return "bool"
        if isinstance(t, mi.BytesType):
            return "bin"  # msgpack's bin type (a volume transfer chunk)
        if isinstance(t, mi.NoneType):
            return "null"
        if isinstance(t, mi.AnyType):
            return "any"
        if isinstance(t, mi.IntType | mi.FloatType):
            word = "int" if isinstance(t, mi.IntType) else "number"
            bounds = _bounds(t)
            return f"{word}({bounds})" if bounds else word
        if isinstance(t, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
            return f"[{self.type(t.item_type)}]"
        if isinstance(t, mi.TupleType):
            return "(" + ", ".join(self.type(i) for i in t.item_types) + ")"
        if isinstance(t, mi.DictType):
            if isinstance(t.value_type, mi.AnyType):
                return "map"
            return f"{{{self.type(t.key_type)}: {self.type(t.value_type)}}}"
        if isinstance(t, mi.UnionType):
            return "|".join(self.type(m) for m in t.types)
        if isinstance(t, mi.LiteralType):
            return "|".join(json.dumps(v) for v in t.values)
        if isinstance(t, mi.EnumType):
            return t.cls.__name__
        if isinstance(t, mi.StructType):
            return self.body(t.cls)
        raise TypeError(f"no rendering for {t!r}: extend virtbus.protocol.schema")

    def ops_table(self, ops: list[AnyOp]) -> str:
        rows = [
            f"| `{o.name}` | {o.access} | {_code(self.body(o.request))} | "
            f"{_code(self.body(o.result))} | {_cell(o.summary)} |"
            for o in ops
        ]
        return "\n".join(["| op | access | request | result | summary |", _rule(5), *rows])

    def messages_table(self, messages: list[Published]) -> str:
        rows = [
            f"| `{m.op}` | {m.kind} | `{m.exchange}` | `{m.routing_key}` | "
            f"{_code(self.body(m.body))} | {_cell(m.summary)} |"
            for m in messages
        ]
        header = "| op | kind | exchange | routing key | body | summary |"
        return "\n".join([header, _rule(6), *rows])

    def types_table(self) -> str:
        rows = [
            f"| `{cls.__name__}` | {_code(self.struct(cls))} |"
            for cls in sorted(self.named, key=lambda c: c.__name__)
        ]
        rows += [
            f"| `{cls.__name__}` | {_code(' | '.join(m.value for m in cls))} |"
            for cls in sorted(self.enums, key=lambda c: c.__name__)
        ]
        return "\n".join(["| type | fields or values |", _rule(2), *rows])


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rule(columns: int) -> str:
    return "|" + "---|" * columns


def readme_sections() -> dict[str, str]:
    """The generated README sections, by marker name."""
    ops, messages = declared()
    render = Renderer(ops, messages)
    return {
        "agent-ops": render.ops_table([o for o in ops if o.service is Service.AGENT]),
        "scheduler-ops": render.ops_table([o for o in ops if o.service is Service.SCHEDULER]),
        "messages": render.messages_table(messages),
        "types": render.types_table(),
    }


def _markers(name: str) -> tuple[str, str]:
    return (
        f"<!-- BEGIN GENERATED {name}: {COMMAND} -->",
        f"<!-- END GENERATED {name} -->",
    )


def render_readme(text: str) -> str:
    """``text`` with every generated section replaced (each marker pair must be there)."""
    for name, body in readme_sections().items():
        begin, end = _markers(name)
        start, stop = text.find(begin), text.find(end)
        if text.count(begin) != 1 or text.count(end) != 1 or stop < start:
            raise ValueError(f"README.md must hold one {begin!r} ... {end!r} pair")
        text = f"{text[:start]}{begin}\n{body}\n{text[stop:]}"
    return text


# --- JSON Schema ----------------------------------------------------------------------
SCHEMA_REF: Final = "#/components/schemas/{name}"


def draft07(schema: Any) -> Any:
    """msgspec's JSON Schema 2020-12 in the draft-07 dialect AsyncAPI 3.0 schemas use:
    tuples as ``items: [..]`` + ``additionalItems: false``, no empty ``required``."""
    if isinstance(schema, list):
        return [draft07(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: draft07(v) for k, v in schema.items()}
    if "prefixItems" in out:
        out["items"] = out.pop("prefixItems")
        out["additionalItems"] = False
    if out.get("required") == []:
        del out["required"]
    return out


def _ref(name: str) -> dict[str, str]:
    return {"$ref": SCHEMA_REF.format(name=name)}


def _wire_schemas() -> dict[str, Any]:
    """The envelope, the call headers and error replies: the shapes around every body."""
    return {
        "Envelope": {
            "title": "Envelope",
            "description": (
                "Every message is one msgpack map (never pickle). Decoding is bounded: at "
                "most 4 MiB, nesting at most 32 deep, string map keys only, no ext types. "
                "A reply carries the id of its call."
            ),
            "type": "object",
            "properties": {
                "v": {"const": PROTOCOL_VERSION, "description": "protocol version"},
                "id": {"type": "string", "minLength": 1, "description": "message id"},
                "kind": {"enum": sorted(k.value for k in Kind)},
                "op": {"type": "string", "minLength": 1},
                "ts": {"type": "number", "description": "sent at (epoch seconds)"},
                "src": {"type": "string", "description": "the sender"},
                "body": {"type": "object"},
            },
            "required": ["v", "id", "kind", "op", "ts", "src", "body"],
        },
        "CallHeaders": {
            "title": "CallHeaders",
            "description": "AMQP headers of a call.",
            "type": "object",
            "properties": {
                DEADLINE_HEADER: {
                    "type": "number",
                    "description": (
                        "the absolute deadline as an integer: epoch milliseconds (what "
                        "virtbus sends) or epoch seconds (no float: header tables may carry "
                        "it as 32 bits). A call that reaches its server later is dropped, "
                        "never executed late."
                    ),
                }
            },
        },
        "Error": {
            "title": "Error",
            "description": (
                "A failure with libvirt's error code. Codes: "
                + ", ".join(sorted(ERROR_CODES))
                + "; a client keeps an unknown code verbatim (a newer peer may send one)."
            ),
            "type": "object",
            "properties": {
                "code": {"type": "string", "examples": sorted(ERROR_CODES)},
                "message": {"type": "string"},
            },
            "required": ["code", "message"],
        },
        "ErrorReply": {
            "title": "ErrorReply",
            "type": "object",
            "properties": {"ok": {"const": False}, "error": _ref("Error")},
            "required": ["ok", "error"],
        },
    }


def schemas(ops: list[AnyOp], messages: list[Published]) -> dict[str, Any]:
    """``components.schemas``: every body type and the wire shapes, sorted by name."""
    kinds = {o.request for o in ops} | {o.result for o in ops} | {m.body for m in messages}
    _, found = msgspec.json.schema_components(
        sorted(kinds, key=lambda k: (k.__name__, k.__module__)), ref_template=SCHEMA_REF
    )
    wire = _wire_schemas()
    clash = set(found) & set(wire)
    if clash:
        raise ValueError(f"body types named like the wire schemas: {sorted(clash)}")
    merged = {**found, **wire}
    return {name: draft07(merged[name]) for name in sorted(merged)}


# --- AsyncAPI -------------------------------------------------------------------------
PARAMETERS: Final = {
    "host": "the host's name, as a routing word ('.', '*', '#' and spaces become '_')",
    "domain": "the domain's name, as a routing word; the body has the exact name",
    "event": "the event name (defined, started, migration, ...)",
}


def _exchange(name: str) -> ExchangeSpec:
    return next(e for e in EXCHANGES if e.name == name)


def _route_binding(exchange: str) -> dict[str, Any]:
    spec = _exchange(exchange)
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {
                "name": spec.name,
                "type": spec.type,
                "durable": spec.durable,
                "autoDelete": False,
                "vhost": "/",
            },
            "bindingVersion": AMQP_BINDING,
        }
    }


def _address(pattern: str) -> tuple[str, dict[str, Any]]:
    words = re.findall(r"\{(\w+)\}", pattern)
    params = {w: {"$ref": f"#/components/parameters/{w}"} for w in words}
    return pattern, params


def _envelope_payload(kind: Kind, op: str, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "allOf": [
            _ref("Envelope"),
            {
                "type": "object",
                "properties": {"kind": {"const": kind.value}, "op": {"const": op}, "body": body},
            },
        ]
    }


def _message(
    name: str, title: str, summary: str, payload: dict[str, Any], *, call: bool = False
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": name,
        "title": title,
        "summary": summary,
        "contentType": CONTENT_TYPE,
    }
    if call:
        message["headers"] = _ref("CallHeaders")
    message["payload"] = payload
    message["correlationId"] = {
        "description": "the envelope id (also the AMQP correlation_id of calls and replies)",
        "location": "$message.payload#/id",
    }
    message["bindings"] = {"amqp": {"messageType": name, "bindingVersion": AMQP_BINDING}}
    return message


def _rpc_channels() -> dict[str, tuple[str, str]]:
    """Channel id → (address, description) of each service's calls."""
    return {
        Service.AGENT.value: (
            "agent.{host}",
            "Calls to one host's agent (queue virtbus.agent.<host>, durable, dead-lettered "
            "to virtbus.dlx).",
        ),
        Service.SCHEDULER.value: (
            SCHEDULER_ROUTE,
            "Calls to the active scheduler (queue virtbus.scheduler, single active "
            "consumer: standbys take over).",
        ),
    }


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document, from a client's point of view."""
    ops, messages = declared()
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    components_messages: dict[str, Any] = {}

    for service, (address, description) in _rpc_channels().items():
        pattern, params = _address(address)
        mine = [o for o in ops if o.service.value == service]
        channel: dict[str, Any] = {
            "address": pattern,
            "title": f"{service} calls",
            "description": description,
            "messages": {
                f"{o.name}.call": {"$ref": f"#/components/messages/{o.name}.call"} for o in mine
            },
            "bindings": _route_binding(RPC_EXCHANGE),
        }
        if params:
            channel["parameters"] = params
        channels[service] = channel
    channels["reply"] = {
        "address": None,
        "title": "replies",
        "description": (
            f"Direct reply-to: the caller consumes the pseudo-queue {REPLY_TO} (no-ack, on "
            "the channel it publishes calls on) and sets it as each call's reply_to."
        ),
        "messages": {
            f"{o.name}.reply": {"$ref": f"#/components/messages/{o.name}.reply"} for o in ops
        },
        "bindings": {
            "amqp": {
                "is": "queue",
                "queue": {
                    "name": REPLY_TO,
                    "durable": False,
                    "exclusive": True,
                    "autoDelete": True,
                    "vhost": "/",
                },
                "bindingVersion": AMQP_BINDING,
            }
        },
    }

    for o in ops:
        service = o.service.value
        request = o.request.__name__
        result = o.result.__name__
        components_messages[f"{o.name}.call"] = _message(
            f"{o.name}.call",
            f"{o.name} call",
            o.summary,
            _envelope_payload(Kind.CALL, o.name, _ref(request)),
            call=True,
        )
        ok = {
            "type": "object",
            "properties": {"ok": {"const": True}, "result": _ref(result)},
            "required": ["ok", "result"],
        }
        components_messages[f"{o.name}.reply"] = _message(
            f"{o.name}.reply",
            f"{o.name} reply",
            f"the answer to {o.name}",
            _envelope_payload(Kind.REPLY, o.name, {"oneOf": [ok, _ref("ErrorReply")]}),
        )
        operations[o.name] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{service}"},
            "summary": o.summary,
            "description": (
                f"Publish to {RPC_EXCHANGE} with mandatory set (a returned message: nothing "
                "serves the route, NO_CONNECT), reply_to, correlation_id = the envelope id, "
                f"expiration = the deadline in ms, and the {DEADLINE_HEADER} header. "
                f"Access class: {o.access}; acts on a {o.target}."
            ),
            "messages": [{"$ref": f"#/channels/{service}/messages/{o.name}.call"}],
            "reply": {
                "address": {
                    "description": f"the call's AMQP reply_to ({REPLY_TO})",
                    "location": "$message.header#/reply_to",
                },
                "channel": {"$ref": "#/channels/reply"},
                "messages": [{"$ref": f"#/channels/reply/messages/{o.name}.reply"}],
            },
            "bindings": {
                "amqp": {"deliveryMode": 1, "mandatory": True, "bindingVersion": AMQP_BINDING}
            },
            "tags": [{"name": service}, {"name": o.access.value}],
            "x-access": o.access.value,
            "x-target": o.target.value,
            "x-serial": o.serial,
        }
        if o.flag_requires:  # a set flag needs another op's permission too
            operations[o.name]["x-flag-requires"] = {f: n.name for f, n in o.flag_requires.items()}

    for m in messages:
        pattern, params = _address(m.routing_key)
        channel = {
            "address": pattern,
            "title": m.op,
            "description": f"{m.summary}; on the {m.exchange} exchange.",
            "messages": {m.op: {"$ref": f"#/components/messages/{m.op}"}},
            "bindings": _route_binding(m.exchange),
        }
        if params:
            channel["parameters"] = params
        channels[m.op] = channel
        components_messages[m.op] = _message(
            m.op, m.op, m.summary, _envelope_payload(m.kind, m.op, _ref(m.body.__name__))
        )
        operations[m.op] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{m.op}"},
            "summary": m.summary,
            "description": (
                f"Bind a queue of your own to {m.exchange} with the routing key pattern "
                "(topic wildcards * and # work on the words)."
            ),
            "messages": [{"$ref": f"#/channels/{m.op}/messages/{m.op}"}],
            "bindings": {
                "amqp": {"deliveryMode": 2 if m.persistent else 1, "bindingVersion": AMQP_BINDING}
            },
            "tags": [{"name": m.kind.value}],
        }

    words = sorted({w for c in channels.values() for w in c.get("parameters", {})}, key=str)
    parameters = {
        w: {"description": PARAMETERS.get(w, f"a {w} name, as a routing word")} for w in words
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "virtbus",
            "version": virtbus.__version__,
            "description": (
                "libvirt for a whole cluster, spoken over a message bus. Anything that speaks "
                "AMQP 0-9-1 and msgpack can be a client: bodies are msgpack maps shaped as "
                f"these schemas describe (envelope version {PROTOCOL_VERSION}). Unknown fields "
                "are ignored, so an older server still serves a newer client; a wrong type, "
                "a missing field or a value out of range is refused with INVALID_ARG naming "
                f"the field. Generated from virtbus.protocol by `{COMMAND}`."
            ),
            "license": {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "rabbitmq": {
                "host": "127.0.0.1:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "RabbitMQ (amqps on 5671 with TLS); every exchange is durable.",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": schemas(ops, messages),
            "messages": dict(sorted(components_messages.items())),
            "parameters": parameters,
        },
    }


# --- YAML -----------------------------------------------------------------------------
_PLAIN: Final = re.compile(r"^[A-Za-z_$][A-Za-z0-9_.$/-]*$")
_RESERVED: Final = frozenset({"true", "false", "null", "yes", "no", "on", "off", "y", "n"})


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, str):
        if _PLAIN.match(value) and value.lower() not in _RESERVED:
            return value
        return json.dumps(value)  # JSON's escapes are YAML's double-quoted escapes
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def _block(value: Any, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    items: Iterable[tuple[str | None, Any]] = (
        ((_scalar(k), v) for k, v in value.items())
        if isinstance(value, dict)
        else ((None, v) for v in value)
    )
    for key, item in items:
        lead = f"{pad}{key}:" if key is not None else f"{pad}-"
        if isinstance(item, dict | list) and item:
            if key is None:  # "- " then the item's first line on the same line
                start = len(lines)
                _block(item, indent + 2, lines)
                lines[start] = f"{pad}- " + lines[start][indent + 2 :]
            else:
                lines.append(lead)
                _block(item, indent + 2, lines)
        else:
            empty = "{}" if isinstance(item, dict) else "[]" if isinstance(item, list) else None
            lines.append(f"{lead} {empty if empty else _scalar(item)}")


def to_yaml(document: dict[str, Any]) -> str:
    """Block-style YAML of plain data (strings quoted unless plainly safe)."""
    lines: list[str] = []
    _block(document, 0, lines)
    return "\n".join(lines) + "\n"


def asyncapi_yaml() -> str:
    return f"# Generated by `{COMMAND}` from virtbus.protocol: do not edit.\n" + to_yaml(asyncapi())


# --- command line ---------------------------------------------------------------------
Target = tuple[Path, Callable[[str], str]]


def targets() -> list[Target]:
    """Each generated file and how to render it from its current text."""
    return [(README, render_readme), (ASYNCAPI, lambda _old: asyncapi_yaml())]


def stale() -> list[Path]:
    """The generated files whose content differs from a fresh generation."""
    found = []
    for path, render in targets():
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        if render(old) != old:
            found.append(path)
    return found


def _shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m virtbus.protocol.schema",
        description="Generate the README protocol tables and docs/asyncapi.yaml.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate both files")
    mode.add_argument("--check", action="store_true", help="exit 1 when either is stale")
    args = parser.parse_args(argv)
    if args.check:
        out_of_date = stale()
        for path in out_of_date:
            print(f"{_shown(path)} is stale: run `{COMMAND}`", file=sys.stderr)
        return 1 if out_of_date else 0
    for path, render in targets():
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        new = render(old)
        if new != old:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(new, encoding="utf-8")
            print(f"wrote {_shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
