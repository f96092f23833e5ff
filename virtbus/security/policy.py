"""Who may call which op on which host and object: libvirt's ACLs, for a bus.

A policy file (``/etc/virtbus/policy.toml``, the same on every host) names roles, gives
users roles, and lists rules::

    [users]
    alice = ["operator"]          # a user (the AMQP user_id, a certificate's CN) and roles
    sched-1 = ["scheduler"]

    [[rules]]                     # rules are matched in order of the file
    role = "operator"             # or user = "alice"
    ops = ["@lifecycle", "@read"] # op names, globs ("domain.*"), or @access classes
    except = ["domain.reset"]     # op patterns taken out again (optional)
    hosts = ["*"]                 # host name globs (default: every host)
    targets = ["web-*"]           # object name globs (domain, pool, network ...; default *)
    effect = "allow"              # or "deny"

The shipped roles (:data:`BUILTIN_RULES`) come first and can be extended: ``admin``
(everything), ``operator`` (read, lifecycle and creating objects; configuring only the
domains, pools, volumes and networks it owns, or that nobody owns except to undefine or
delete them, unless a rule grants it), ``viewer`` (read-only ops),
``scheduler`` (migration steps, drain flags, define on placement, reads, the
definitions it moves with their secrets: ``domain.read_secure``, and the cluster
networks it keeps on every host: ``network.define/start/set_peers/destroy/undefine``) and ``agent``
(only ``migration.prepared``: a migration's source asks its destination which URI its
prepare answered). A ``deny`` that matches wins over any
``allow``; nothing matching is a deny.

Checks are hot (one per call), so rules are compiled once: op patterns are expanded
against the declared ops into an index ``(identity, op) -> rules``, and a check only
walks the few rules of the caller's own identities, matching precompiled globs.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from virtbus.errors import AuthDenied, InvalidArgument
from virtbus.protocol import ops as _ops  # noqa: F401  (declares every op in the registry)
from virtbus.protocol.registry import REGISTRY, Access, Op, Target

ANY = "*"


class Effect(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class Owner(StrEnum):
    """Who owns the target of a call: a domain, pool, volume or network (known to the
    agent that holds the object, agent/owners.py)."""

    SELF = "self"  # the caller defined it
    OTHER = "other"  # someone else did
    UNKNOWN = "unknown"  # not yet defined, or not owned (no owner recorded)


@dataclass(frozen=True, slots=True)
class Rule:
    """One line of the policy, as written (for explanations) and compiled (for checks)."""

    who: str  # "user:NAME" or "role:NAME"
    ops: tuple[str, ...]
    hosts: tuple[str, ...] = (ANY,)
    targets: tuple[str, ...] = (ANY,)
    effect: Effect = Effect.ALLOW
    owner: Owner | None = None  # only when the target's owner is this (e.g. self)
    exclude: tuple[str, ...] = ()  # op patterns taken out of ``ops``
    origin: str = "policy"  # where it was written (file:line, or "builtin")

    def describe(self) -> str:
        parts = [f"{self.effect} {self.who}", f"ops={','.join(self.ops)}"]
        if self.exclude:
            parts.append(f"except={','.join(self.exclude)}")
        if self.hosts != (ANY,):
            parts.append(f"hosts={','.join(self.hosts)}")
        if self.targets != (ANY,):
            parts.append(f"targets={','.join(self.targets)}")
        if self.owner is not None:
            parts.append(f"owner={self.owner}")
        return f"{' '.join(parts)} ({self.origin})"


@dataclass(frozen=True, slots=True)
class Request:
    """What is asked: who, which op, on which host, of which object (and its owner)."""

    user: str
    op: str
    host: str
    target: str | None = None
    owner: Owner = Owner.UNKNOWN


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: Rule | None  # the rule that decided (None: nothing matched)
    reason: str

    def raise_if_denied(self) -> None:
        if not self.allowed:
            raise AuthDenied(self.reason)


def _glob(patterns: Sequence[str]) -> re.Pattern[str] | None:
    """One regex for a list of globs; None means "matches everything"."""
    if not patterns or ANY in patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


@dataclass(slots=True)
class _Compiled:
    rule: Rule
    hosts: re.Pattern[str] | None
    targets: re.Pattern[str] | None

    def matches(self, req: Request) -> bool:
        if self.hosts is not None and not self.hosts.match(req.host):
            return False
        if self.targets is not None and (req.target is None or not self.targets.match(req.target)):
            return False
        return self.rule.owner is None or self.rule.owner == req.owner


def _expand(patterns: Iterable[str], ops: Mapping[str, Op[Any, Any]]) -> set[str]:
    """Op names a rule's op patterns stand for: names, globs and ``@access`` classes."""
    names: set[str] = set()
    for pattern in patterns:
        if pattern.startswith("@"):
            try:
                access = Access(pattern[1:])
            except ValueError:
                choices = ", ".join(f"@{a}" for a in Access)
                raise InvalidArgument(f"unknown access class {pattern!r} ({choices})") from None
            names |= {n for n, o in ops.items() if o.access is access}
        elif any(c in pattern for c in "*?["):
            names |= {n for n in ops if fnmatch.fnmatchcase(n, pattern)}
        else:
            names.add(pattern)  # an op of a newer peer still counts
    return names


# What an operator may not do to objects nobody owns (unless a rule grants it).
_DESTRUCTIVE = ("*.undefine", "*.delete", "*.wipe", "*.undefine_*")

BUILTIN_RULES: tuple[Rule, ...] = (
    Rule("role:admin", (ANY,), origin="builtin"),
    Rule("role:viewer", ("@read",), origin="builtin"),
    Rule("role:operator", ("@read", "@lifecycle"), origin="builtin"),
    Rule("role:operator", ("@config",), owner=Owner.SELF, origin="builtin"),
    Rule(
        "role:operator",
        ("@config",),
        owner=Owner.UNKNOWN,
        exclude=_DESTRUCTIVE,
        origin="builtin",
    ),
    # A migration's source asks its destination what its prepare answered (and nothing else).
    Rule("role:agent", ("migration.prepared",), origin="builtin"),
    Rule(
        "role:scheduler",
        (
            "@read",
            "@migrate",
            "host.set_draining",
            "domain.define",
            "domain.read_secure",
            "network.define",
            "network.start",
            "network.set_peers",
            "network.destroy",
            "network.undefine",
        ),
        origin="builtin",
    ),
)


@dataclass(slots=True)
class Policy:
    """A compiled policy (see the module docstring); :meth:`check` is the hot path."""

    rules: list[Rule]
    users: dict[str, tuple[str, ...]] = field(default_factory=dict)  # user -> roles
    _index: dict[tuple[str, str], list[_Compiled]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index = {}
        for rule in self.rules:
            compiled = _Compiled(rule, _glob(rule.hosts), _glob(rule.targets))
            names = set(REGISTRY) if ANY in rule.ops else _expand(rule.ops, REGISTRY)
            names -= _expand(rule.exclude, REGISTRY)
            for name in names:
                self._index.setdefault((rule.who, name), []).append(compiled)

    def identities(self, user: str) -> tuple[str, ...]:
        return (f"user:{user}", *(f"role:{r}" for r in self.users.get(user, ())))

    def check(self, req: Request) -> Decision:
        allow: _Compiled | None = None
        for who in self.identities(req.user):
            for compiled in self._index.get((who, req.op), ()):
                if not compiled.matches(req):
                    continue
                if compiled.rule.effect is Effect.DENY:
                    return Decision(False, compiled.rule, self._why(req, compiled.rule))
                if allow is None:
                    allow = compiled
        if allow is not None:
            return Decision(True, allow.rule, f"allowed by {allow.rule.describe()}")
        return Decision(False, None, self._why(req, None))

    def _why(self, req: Request, rule: Rule | None) -> str:
        what = f"{req.user!r} may not call {req.op} on host {req.host!r}"
        if req.target is not None:
            declared = REGISTRY.get(req.op)
            kind = f"{declared.target} " if declared is not None else ""
            what += f" for {kind}{req.target!r}"  # "for pool 'p1'"
            if req.owner is not Owner.UNKNOWN:  # an owner rule may decide: say whose it is
                what += " (owned by another user)" if req.owner is Owner.OTHER else " (its own)"
        if rule is not None:
            return f"{what}: denied by {rule.describe()}"
        roles = ", ".join(self.users.get(req.user, ())) or "none"
        return f"{what}: no rule allows it (roles: {roles})"


def _strings(value: Any, where: str, default: tuple[str, ...] = (ANY,)) -> tuple[str, ...]:
    if value is None:
        return default
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidArgument(f"{where}: must be a list of non-empty strings")
    return tuple(value)


def parse_policy(text: str, origin: str = "policy.toml") -> Policy:
    """A policy from TOML (the built-in rules first); INVALID_ARG names a bad entry."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{origin}: not valid TOML: {exc}") from None
    unknown = set(data) - {"users", "rules"}
    if unknown:
        raise InvalidArgument(f"{origin}: unknown section(s) {', '.join(sorted(unknown))}")
    users: dict[str, tuple[str, ...]] = {}
    raw_users = data.get("users", {})
    if not isinstance(raw_users, dict):
        raise InvalidArgument(f"{origin}: [users] must be a table of user = [roles]")
    for name, roles in raw_users.items():
        users[name] = _strings(roles, f"{origin}: users.{name}", default=())
    rules = list(BUILTIN_RULES)
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        raise InvalidArgument(f"{origin}: rules must be an array of tables ([[rules]])")
    for i, raw in enumerate(raw_rules, start=1):
        where = f"{origin}: rules[{i}]"
        if not isinstance(raw, dict):
            raise InvalidArgument(f"{where}: must be a table")
        keys = {"user", "role", "ops", "except", "hosts", "targets", "effect", "owner"}
        extra = set(raw) - keys
        if extra:
            raise InvalidArgument(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
        if ("user" in raw) == ("role" in raw):
            raise InvalidArgument(f"{where}: give exactly one of user or role")
        who = f"user:{raw['user']}" if "user" in raw else f"role:{raw['role']}"
        try:
            effect = Effect(raw.get("effect", "allow"))
            owner = Owner(raw["owner"]) if "owner" in raw else None
        except ValueError as exc:
            raise InvalidArgument(f"{where}: {exc}") from None
        ops = _strings(raw.get("ops"), f"{where}.ops", default=())
        if not ops:
            raise InvalidArgument(f"{where}: ops is required")
        _expand([o for o in ops if o != ANY], REGISTRY)  # refuses an unknown @class now
        rules.append(
            Rule(
                who,
                ops,
                _strings(raw.get("hosts"), f"{where}.hosts"),
                _strings(raw.get("targets"), f"{where}.targets"),
                effect,
                owner,
                exclude=_strings(raw.get("except"), f"{where}.except", default=()),
                origin=f"{origin} rule {i}",
            )
        )
    return Policy(rules, users)


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot read the policy {path}: {exc.strerror}") from None
    return parse_policy(text, origin=str(path))


def target_of(op: Op[Any, Any], request: Any) -> str | None:
    """The name of the object a request acts on (None for host-wide ops)."""
    if op.target is Target.HOST:
        return None
    return op.target_of(request)
