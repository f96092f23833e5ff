"""Sizes of storage in bytes: libvirt's scaled integers and virsh's size arguments.

Storage sizes in libvirt's XML default to *bytes* (``<capacity>5</capacity>`` is 5 bytes,
``<capacity unit='G'>5</capacity>`` 5 GiB), unlike domain memory (KiB). Units follow
``virScaleInteger``: ``b``/``bytes``, ``K``/``KiB`` = 1024, ``KB`` = 1000, ... up to ``E``.
virsh's size arguments (``vol-create-as pool vol 10G``) take the same suffixes; a space
between number and unit is accepted. Every failure is an error naming the value.
"""

from __future__ import annotations

import re

from virtbus.domain.units import UNIT_FACTORS
from virtbus.errors import InvalidArgument, XMLError

#: libvirt stores sizes as unsigned long long
MAX_BYTES = 2**64 - 1

_SIZE_ARG = re.compile(r"^\s*([0-9]+)\s*([A-Za-z]*)\s*$")


def unit_bytes(unit: str | None) -> int:
    """Bytes per ``unit`` (None or empty: bytes); ValueError for an unknown unit."""
    if not unit:
        return 1
    try:
        return UNIT_FACTORS[unit.lower()]
    except KeyError:
        raise ValueError(f"unknown unit {unit!r}") from None


def parse_scaled(text: str | None, unit: str | None, what: str) -> int:
    """``<what unit=...>text</what>`` in bytes; XMLError naming the element."""
    raw = (text or "").strip()
    if not raw.isascii() or not raw.isdigit():
        raise XMLError(f"<{what}> must be a non-negative integer, not {raw!r}")
    try:
        factor = unit_bytes(unit)
    except ValueError:
        raise XMLError(f"invalid <{what} unit='{unit}'>") from None
    total = int(raw) * factor
    if total > MAX_BYTES:
        raise XMLError(f"<{what}> of {raw} {unit or 'bytes'} is too large")
    return total


def parse_size_arg(value: str, what: str = "capacity") -> int:
    """A virsh size argument (``10G``, ``512M``, ``1 EiB``, ``4096``) in bytes.

    No unit means bytes, as in ``virsh vol-create-as``. InvalidArgument for negative,
    fractional or unit-less nonsense (``-1``, ``1.5G``, ``12 parsecs``).
    """
    match = _SIZE_ARG.match(value) if isinstance(value, str) else None
    if match is None:
        raise InvalidArgument(
            f"invalid {what} {value!r}: expected a non-negative integer with an optional"
            " unit (B, K/KiB, KB, M/MiB, MB, G/GiB, GB, T, P, E)"
        )
    number, unit = match.groups()
    try:
        factor = unit_bytes(unit)
    except ValueError:
        raise InvalidArgument(f"invalid {what} {value!r}: unknown unit {unit!r}") from None
    total = int(number) * factor
    if total > MAX_BYTES:
        raise InvalidArgument(f"invalid {what} {value!r}: larger than 2^64 bytes")
    return total


def format_bytes(size: int) -> str:
    """``5.00 GiB`` as virsh vol-info prints sizes."""
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} EiB"  # pragma: no cover - unreachable
