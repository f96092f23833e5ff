"""How the CLI shows things: virsh-like text by default, JSON with ``--json``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

# virsh's words for states in `list` and `domstate`
STATE_LABELS = {
    "nostate": "no state",
    "running": "running",
    "blocked": "idle",
    "paused": "paused",
    "shutdown": "in shutdown",
    "shutoff": "shut off",
    "crashed": "crashed",
    "pmsuspended": "pmsuspended",
}


def state_label(state: str) -> str:
    return STATE_LABELS.get(state, state)


def emit_json(value: Any) -> None:
    import json  # only with --json: a one-shot command's text output does without it

    sys.stdout.write(json.dumps(value, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """virsh's table style: a leading space, columns padded, a dashed rule."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(values: Sequence[str]) -> str:
        return " " + "   ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    rule = "-" * (sum(widths) + 3 * (len(widths) - 1) + 2)
    return "\n".join([line(list(headers)), rule, *(line(row) for row in cells)])


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    """``dominfo`` style: ``Key:   value`` lines."""
    width = max(len(k) for k, _ in pairs) + 2
    return "\n".join(f"{(k + ':').ljust(width)}{v}" for k, v in pairs)


def kib(value: int) -> str:
    return f"{value} KiB"


def fail(code: str, message: str) -> int:
    sys.stderr.write(f"error: {code}: {message}\n")
    sys.stderr.flush()
    return 1
