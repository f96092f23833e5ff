"""libvirt's CPU/node set syntax (``virBitmapParse``): ``0-3,^2,8``."""

from __future__ import annotations

from collections.abc import Iterable

from virtbus.errors import XMLError

MAX_BIT = 1 << 16  # libvirt's VIR_DOMAIN_CPUMASK_LEN is 4096; node sets are smaller still


def parse_bitmap(text: str, what: str) -> frozenset[int]:
    """The set ``text`` names; XMLError ("Failed to parse bitmap ...") when malformed."""
    bad = XMLError(f"Failed to parse bitmap '{text}' ({what})")
    cpus: set[int] = set()
    neg: set[int] = set()
    if not text.strip():
        raise bad
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise bad
        target = cpus
        if part.startswith("^"):
            target, part = neg, part[1:]
        lo_s, sep, hi_s = part.partition("-")
        if not lo_s.isdigit() or (sep and not hi_s.isdigit()):
            raise bad
        lo = int(lo_s)
        hi = int(hi_s) if sep else lo
        if hi < lo or hi >= MAX_BIT or (target is neg and sep):
            raise bad
        target.update(range(lo, hi + 1))
    result = frozenset(cpus - neg)
    if not result:
        raise bad
    return result


def format_bitmap(bits: Iterable[int]) -> str:
    """``{0, 1, 2, 5}`` -> ``0-2,5``."""
    out: list[str] = []
    run: list[int] = []
    for bit in sorted(set(bits)):
        if run and bit == run[-1] + 1:
            run.append(bit)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [bit]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)
