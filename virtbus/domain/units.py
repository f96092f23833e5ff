"""libvirt's scaled-integer units for memory sizes (``<memory unit='MiB'>``).

The rules follow libvirt's ``virScaleInteger``: units are case-insensitive; ``b``/``byte``/
``bytes`` are bytes; a bare letter or ``<letter>iB`` is a power of 1024; ``<letter>B`` a
power of 1000; no unit means KiB. Memory is rounded *up* to whole KiB, as libvirt does.
"""

from __future__ import annotations

from virtbus.domain.numbers import MAX_DIGITS, parse_int, shown
from virtbus.errors import XMLError

_PREFIXES = "kmgtpe"

#: bytes per unit, keyed by the lower-cased unit name
UNIT_FACTORS: dict[str, int] = {"b": 1, "byte": 1, "bytes": 1}
for _power, _letter in enumerate(_PREFIXES, start=1):
    UNIT_FACTORS[_letter] = 1024**_power
    UNIT_FACTORS[f"{_letter}ib"] = 1024**_power
    UNIT_FACTORS[f"{_letter}b"] = 1000**_power

#: libvirt caps memory sizes at LLONG_MAX bytes
MAX_MEMORY_BYTES = 2**63 - 1


def unit_factor(unit: str | None) -> int:
    """Bytes per ``unit`` (``None``/empty means KiB); ValueError for an unknown unit."""
    if unit is None or unit == "":
        return 1024
    try:
        return UNIT_FACTORS[unit.lower()]
    except KeyError:
        raise ValueError(f"unknown unit {unit!r}") from None


def to_kib(value: int, unit: str | None = "KiB") -> int:
    """``value`` in ``unit`` as KiB, rounded up (libvirt's ``VIR_DIV_UP(bytes, 1024)``)."""
    if value < 0:
        raise ValueError("a size cannot be negative")
    total = value * unit_factor(unit)
    return -(-total // 1024)


def parse_memory_element(text: str | None, unit: str | None, what: str) -> int:
    """Parse ``<what unit=...>text</what>`` to KiB, raising XMLError naming the element."""
    raw = (text or "").strip()
    try:
        value = parse_int(raw, f"<{what}>", minimum=0)
    except XMLError:
        raise XMLError(
            f"<{what}> must be a non-negative integer of at most {MAX_DIGITS} digits, "
            f"not '{shown(raw)}'"
        ) from None
    try:
        factor = unit_factor(unit)
    except ValueError:
        raise XMLError(f"invalid <{what} unit='{shown(unit or '')}'>") from None
    total = value * factor
    if total > MAX_MEMORY_BYTES:
        raise XMLError(f"<{what}> of {raw} {unit or 'KiB'} is too large")
    return -(-total // 1024)
