"""What the snapshot and checkpoint list verbs share: virsh's filters over a tree of named
records (``--from``, ``--descendants``, ``--roots``, ``--leaves``, ``--no-leaves``), its
``--tree`` drawing and its time format."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar


class Node(Protocol):
    """What a tree is drawn from: a snapshot, or a checkpoint."""

    @property
    def name(self) -> str: ...
    @property
    def parent(self) -> str | None: ...


class Listed(Node, Protocol):
    """A listed record: a node that knows how many children it has."""

    @property
    def children(self) -> int: ...


L = TypeVar("L", bound=Listed)


def when(epoch: int) -> str:
    """virsh's creation-time column."""
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(epoch))


def select(
    items: list[L], args: argparse.Namespace, missing: Callable[[str], Exception]
) -> list[L]:
    """virsh's list filters, parents before children; ``missing(name)`` is the error for
    a ``--from`` that names nothing."""
    if args.from_:
        if args.from_ not in {i.name for i in items}:
            raise missing(args.from_)
        below = _below(items, args.from_, every=args.descendants or args.tree)
        items = [i for i in items if i.name in below]
    if args.roots:
        items = [i for i in items if i.parent is None]
    if args.leaves:
        items = [i for i in items if i.children == 0]
    if args.no_leaves:
        items = [i for i in items if i.children > 0]
    return items


def _below(items: Sequence[Node], name: str, every: bool) -> set[str]:
    found: set[str] = set()
    todo = [name]
    while todo:
        parent = todo.pop()
        for i in items:
            if i.parent == parent and i.name not in found:
                found.add(i.name)
                if every:
                    todo.append(i.name)
    return found


def tree_lines(items: Sequence[Node], root: str | None = None) -> list[str]:
    """virsh's ``--tree`` drawing."""
    names = {i.name for i in items}
    kids: dict[str | None, list[str]] = {}
    for i in items:
        parent = i.parent if i.parent in names else None
        kids.setdefault(parent, []).append(i.name)
    lines: list[str] = []

    def walk(name: str, indent: str, last: bool, top: bool) -> None:
        if top:
            lines.append(name)
            child_indent = ""
        else:
            lines.append(f"{indent}|")
            lines.append(f"{indent}+- {name}")
            child_indent = indent + ("    " if last else "|   ")
        children = kids.get(name, [])
        for n, child in enumerate(children):
            walk(child, child_indent + ("  " if top else ""), n == len(children) - 1, False)

    tops = kids.get(None, []) if root is None else [root]
    for n, top in enumerate(tops):
        if n:
            lines.append("")
        walk(top, "", True, True)
    return lines
