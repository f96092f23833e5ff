"""Values and wrong values of msgspec types, read from their type info, for property tests.

hypothesis's ``from_type`` does not know msgspec Structs nor their ``Meta`` constraints,
so this builds strategies from :func:`msgspec.inspect.type_info`:

- :meth:`Gen.valid` — values of a type, within its constraints (lengths, bounds, patterns);
- :func:`wrong_values` — values of the wrong type for a type (none for ``Any``);
- :func:`out_of_range` — values of the right type that break a constraint;
- :func:`spots` — every place in a body where a field sits (``params.parallel``,
  ``domains[0]``), to put one bad value at and to name in the expected error;
- :func:`with_unknown_fields` — a wire value with an unknown field in every map of a struct;
- :func:`minimal` — a small valid wire value, deterministically.

A type it does not know raises ``NotImplementedError``: extend it when an op uses one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec.inspect as mi
from hypothesis import strategies as st

INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # what msgpack carries
MAX_TEXT = 24  # short strings keep examples fast; lengths beyond are tested by bounds
MAX_ITEMS = 3
UNKNOWN_FIELD = "zz_field_from_a_newer_peer"

JSONISH: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(INT_MIN, INT_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=MAX_TEXT),
    lambda inner: (
        st.lists(inner, max_size=MAX_ITEMS)
        | st.dictionaries(st.text(max_size=8), inner, max_size=MAX_ITEMS)
    ),
    max_leaves=8,
)


def _len_bounds(low: int | None, high: int | None, cap: int) -> tuple[int, int]:
    lo = low or 0
    return lo, max(lo, min(high, cap) if high is not None else cap)


class Gen:
    """Strategies of valid values, one per type (structs cached, recursion deferred)."""

    def __init__(self) -> None:
        self._structs: dict[type[Any], st.SearchStrategy[Any]] = {}

    def of(self, kind: type[Any]) -> st.SearchStrategy[Any]:
        return self.valid(mi.type_info(kind))

    def valid(self, t: mi.Type) -> st.SearchStrategy[Any]:
        if isinstance(t, mi.StrType):
            lo, hi = _len_bounds(t.min_length, t.max_length, MAX_TEXT)
            if t.pattern is None:
                return st.text(min_size=lo, max_size=hi)
            pattern = t.pattern
            return st.from_regex(pattern, fullmatch=True).filter(
                lambda s: lo <= len(s) <= (t.max_length or len(s)) and re.search(pattern, s)
            )
        if isinstance(t, mi.IntType):
            lo = t.ge if t.ge is not None else t.gt + 1 if t.gt is not None else INT_MIN
            hi = t.le if t.le is not None else t.lt - 1 if t.lt is not None else INT_MAX
            ints = st.integers(lo, hi)
            if t.multiple_of:
                step = t.multiple_of
                return st.integers(-(-lo // step), hi // step).map(lambda n: n * step)
            return ints
        if isinstance(t, mi.FloatType):
            if t.multiple_of:
                raise NotImplementedError(f"typegen: multiple_of on floats ({t!r})")
            return st.floats(
                min_value=t.ge if t.ge is not None else t.gt,
                max_value=t.le if t.le is not None else t.lt,
                exclude_min=t.gt is not None,
                exclude_max=t.lt is not None,
                allow_nan=False,
                allow_infinity=False,
            )
        if isinstance(t, mi.BoolType):
            return st.booleans()
        if isinstance(t, mi.BytesType):  # msgpack bin (volume chunks): small ones will do
            lo, hi = _len_bounds(t.min_length, t.max_length, MAX_TEXT)
            return st.binary(min_size=lo, max_size=hi)
        if isinstance(t, mi.NoneType):
            return st.none()
        if isinstance(t, mi.AnyType):
            return JSONISH
        if isinstance(t, mi.ListType):
            lo, hi = _len_bounds(t.min_length, t.max_length, MAX_ITEMS)
            return st.lists(self.valid(t.item_type), min_size=lo, max_size=hi)
        if isinstance(t, mi.VarTupleType):
            lo, hi = _len_bounds(t.min_length, t.max_length, MAX_ITEMS)
            return st.lists(self.valid(t.item_type), min_size=lo, max_size=hi).map(tuple)
        if isinstance(t, mi.TupleType):
            return st.tuples(*(self.valid(i) for i in t.item_types))
        if isinstance(t, mi.DictType):
            lo, hi = _len_bounds(t.min_length, t.max_length, MAX_ITEMS)
            return st.dictionaries(
                self.valid(t.key_type), self.valid(t.value_type), min_size=lo, max_size=hi
            )
        if isinstance(t, mi.EnumType):
            return st.sampled_from(list(t.cls))
        if isinstance(t, mi.LiteralType):
            return st.sampled_from(t.values)
        if isinstance(t, mi.UnionType):
            return st.one_of(*(self.valid(m) for m in t.types))
        if isinstance(t, mi.StructType):
            if t.cls not in self._structs:
                self._structs[t.cls] = st.deferred(lambda: self._struct(t))
            return self._structs[t.cls]
        raise NotImplementedError(f"typegen: no strategy for {t!r}; extend tests/typegen.py")

    def _struct(self, t: mi.StructType) -> st.SearchStrategy[Any]:
        if t.array_like or t.tag_field is not None:
            raise NotImplementedError(f"typegen: array-like or tagged struct {t.cls!r}")
        required = {f.name: self.valid(f.type) for f in t.fields if f.required}
        optional = {f.name: self.valid(f.type) for f in t.fields if not f.required}
        cls = t.cls

        def build(kw: dict[str, Any]) -> Any:
            """The struct, or None when its ``__post_init__`` refuses the combination (a
            rule across fields, or beyond a pattern, that the type info cannot show)."""
            try:
                return cls(**kw)
            except Exception:  # noqa: BLE001 - whatever a __post_init__ raises is a refusal
                return None

        fields = st.fixed_dictionaries(required, optional=optional)
        return fields.map(build).filter(lambda value: value is not None)


# --- which kinds of wire value a type takes ------------------------------------------
# Wrong values, one per kind of wire value, tried in this order.
CANDIDATES: tuple[tuple[str, Any], ...] = (
    ("int", 7),
    ("str", "\x00not-a-member"),
    ("list", []),
    ("map", {}),
    ("bool", True),
    ("float", 1.5),
    ("null", None),
)


def accepts(t: mi.Type, kind: str) -> bool:
    """Whether ``t`` takes some wire value of ``kind`` (as msgspec's strict convert does)."""
    if isinstance(t, mi.AnyType):
        return True
    if isinstance(t, mi.UnionType):
        return any(accepts(m, kind) for m in t.types)
    if isinstance(t, mi.EnumType | mi.LiteralType):
        values = [m.value for m in t.cls] if isinstance(t, mi.EnumType) else list(t.values)
        return any(_kind_of(v) == kind for v in values) and kind != "str"
    simple: dict[type[mi.Type], tuple[str, ...]] = {
        mi.StrType: ("str",),
        mi.BytesType: ("str",),  # msgspec's convert takes base64 text for bytes too
        mi.IntType: ("int",),
        mi.FloatType: ("int", "float"),
        mi.BoolType: ("bool",),
        mi.NoneType: ("null",),
        mi.ListType: ("list",),
        mi.VarTupleType: ("list",),
        mi.TupleType: ("list",),
        mi.DictType: ("map",),
        mi.StructType: ("map",),
    }
    for cls, kinds in simple.items():
        if isinstance(t, cls):
            return kind in kinds
    raise NotImplementedError(f"typegen: which values does {t!r} take?")


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if value is None:
        return "null"
    return "list" if isinstance(value, list) else "map"


def wrong_values(t: mi.Type) -> list[Any]:
    """Wire values of a kind ``t`` never takes (a string for an enum is not a member).

    For an empty-able struct ``{}`` is a valid value, so ``map`` counts as taken."""
    return [value for kind, value in CANDIDATES if not accepts(t, kind)]


def out_of_range(t: mi.Type, sample: Callable[[mi.Type], Any]) -> list[Any]:
    """Values of the right kind that break one of ``t``'s constraints (``sample`` gives a
    valid value of a member type, to break a pattern with)."""
    found: list[Any] = []
    if isinstance(t, mi.UnionType):
        for member in t.types:
            others = [m for m in t.types if m is not member]
            found += [v for v in out_of_range(member, sample) if not _taken(others, v)]
        return found
    if isinstance(t, mi.IntType | mi.FloatType):
        one = 1 if isinstance(t, mi.IntType) else 1.0
        if t.ge is not None:
            found.append(t.ge - one)
        if t.gt is not None:
            found.append(t.gt)
        if t.le is not None:
            found.append(t.le + one)
        if t.lt is not None:
            found.append(t.lt)
    elif isinstance(t, mi.StrType):
        if t.min_length:
            found.append("a" * (t.min_length - 1))
        if t.max_length is not None:
            found.append("a" * (t.max_length + 1))
        if t.pattern is not None:
            # Python's `$` also matches before a final newline: a pattern must not let one in
            found += [sample(t) + "\n", "\x00"]
    elif isinstance(t, mi.BytesType):
        if t.min_length:
            found.append(b"a" * (t.min_length - 1))
        if t.max_length is not None:
            found.append(b"a" * (t.max_length + 1))
    elif isinstance(t, mi.ListType | mi.VarTupleType | mi.DictType) and (
        t.min_length or t.max_length is not None
    ):
        raise NotImplementedError(f"typegen: length bounds on containers ({t!r})")
    return found


def _taken(types: list[mi.Type], value: Any) -> bool:
    """Whether another member of a union may take the value (then it is not tried)."""
    return any(accepts(m, _kind_of(value)) for m in types)


# --- where fields sit in a body -------------------------------------------------------
Step = str | int  # a field's wire name, or a list index


@dataclass(frozen=True)
class Spot:
    """One place in a body: the path to it and the type of each container on the way."""

    path: tuple[Step, ...]
    containers: tuple[mi.StructType | mi.ListType, ...]  # containers[i] holds path[i]
    leaf: mi.Type
    required: bool

    @property
    def name(self) -> str:
        """As the error names it: ``seen.params.parallel``, ``domains[0]``."""
        out = ""
        for step in self.path:
            out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
        return out


def _members(t: mi.Type) -> tuple[mi.Type, ...]:
    return t.types if isinstance(t, mi.UnionType) else (t,)


def spots(t: mi.StructType, depth: int = 3) -> Iterator[Spot]:
    """Every field of a struct, of the structs in its fields and of list items, to
    ``depth`` levels (each struct class once per path, so recursion ends)."""
    yield from _spots(t, (), (), depth, frozenset())


def _spots(
    t: mi.StructType,
    path: tuple[Step, ...],
    containers: tuple[mi.StructType | mi.ListType, ...],
    depth: int,
    seen: frozenset[type[Any]],
) -> Iterator[Spot]:
    here = (*containers, t)
    for f in t.fields:
        at = (*path, f.encode_name)
        yield Spot(at, here, f.type, f.required)
        if depth <= 1:
            continue
        for member in _members(f.type):
            if isinstance(member, mi.StructType) and member.cls not in seen | {t.cls}:
                yield from _spots(member, at, here, depth - 1, seen | {t.cls})
            elif isinstance(member, mi.ListType):
                item = (*at, 0)
                yield Spot(item, (*here, member), member.item_type, True)
                for inner in _members(member.item_type):
                    if isinstance(inner, mi.StructType) and inner.cls not in seen | {t.cls}:
                        yield from _spots(inner, item, (*here, member), depth - 1, seen | {t.cls})


def place(body: dict[str, Any], spot: Spot, fresh: Callable[[mi.Type], Any]) -> Any:
    """The container in ``body`` that holds the spot's last step, made to exist: a missing,
    null or empty container on the way is replaced by ``fresh(type)`` (a valid wire value,
    a non-empty list for a list)."""
    node: Any = body
    for i, step in enumerate(spot.path[:-1]):
        inner = spot.containers[i + 1]
        want = dict if isinstance(inner, mi.StructType) else list
        child = node[step] if isinstance(step, int) else node.get(step)
        if not isinstance(child, want) or not child:
            child = fresh(inner)
            node[step] = child
        node = child
    return node


def with_unknown_fields(t: mi.Type, wire: Any, extra: Any) -> Any:
    """``wire`` (a valid wire value of ``t``) with an unknown field in each struct map."""
    if isinstance(t, mi.UnionType):
        for member in t.types:
            if isinstance(member, mi.StructType) and isinstance(wire, dict):
                return with_unknown_fields(member, wire, extra)
            if isinstance(member, mi.ListType | mi.VarTupleType) and isinstance(wire, list):
                return with_unknown_fields(member, wire, extra)
            if isinstance(member, mi.DictType) and isinstance(wire, dict):
                return with_unknown_fields(member, wire, extra)
        return wire
    if isinstance(t, mi.StructType) and isinstance(wire, dict):
        types = {f.encode_name: f.type for f in t.fields}
        out = {
            k: with_unknown_fields(types[k], v, extra) if k in types else v for k, v in wire.items()
        }
        out[UNKNOWN_FIELD] = extra
        return out
    if isinstance(t, mi.ListType | mi.VarTupleType) and isinstance(wire, list):
        return [with_unknown_fields(t.item_type, v, extra) for v in wire]
    if isinstance(t, mi.TupleType) and isinstance(wire, list):
        return [with_unknown_fields(i, v, extra) for i, v in zip(t.item_types, wire, strict=True)]
    if isinstance(t, mi.DictType) and isinstance(wire, dict):
        return {k: with_unknown_fields(t.value_type, v, extra) for k, v in wire.items()}
    return wire


def minimal(t: mi.Type) -> Any:
    """A small valid wire value of ``t``, deterministically (for calls to a real agent)."""
    if isinstance(t, mi.StructType):
        return {f.encode_name: minimal(f.type) for f in t.fields if f.required}
    if isinstance(t, mi.UnionType):
        members = [m for m in t.types if not isinstance(m, mi.NoneType)] or list(t.types)
        return minimal(members[0])
    if isinstance(t, mi.StrType):
        text = "a" * max(1, t.min_length or 0)
        if t.pattern is not None and not re.search(t.pattern, text):
            # a choice of words (``^(raw|qcow2)$``): its first word
            choice = re.match(r"\^\(([\w|-]+)\)\$", t.pattern)
            words = choice.group(1).split("|") if choice else []
            if not words or not re.search(t.pattern, words[0]):
                raise NotImplementedError(f"typegen: no minimal string for {t.pattern!r}")
            text = words[0]
        return text
    if isinstance(t, mi.IntType | mi.FloatType):
        low = t.ge if t.ge is not None else t.gt + 1 if t.gt is not None else 0
        return low if isinstance(t, mi.IntType) else float(low)
    if isinstance(t, mi.EnumType):
        return next(iter(t.cls)).value
    if isinstance(t, mi.LiteralType):
        return t.values[0]
    simple: dict[type[mi.Type], Any] = {
        mi.BoolType: False,
        mi.BytesType: b"",
        mi.NoneType: None,
        mi.AnyType: None,
        mi.ListType: [],
        mi.VarTupleType: [],
        mi.DictType: {},
    }
    for cls, value in simple.items():
        if isinstance(t, cls):
            if getattr(t, "min_length", None):
                raise NotImplementedError(f"typegen: minimal non-empty container ({t!r})")
            return value
    if isinstance(t, mi.TupleType):
        return [minimal(i) for i in t.item_types]
    raise NotImplementedError(f"typegen: no minimal value for {t!r}")
