"""Bounded integer parsing of untrusted text: the one place numbers in domain XML are read.

Python's ``int()`` accepts 4,300 digits, underscores, Unicode digits and surrounding
whitespace, and beyond that raises a ValueError that is no libvirt error at all. Every
integer a definition carries (element text and attributes, in ``virtbus.domain`` and in
the drivers) goes through :func:`parse_int` instead: ASCII digits only, at most
``MAX_DIGITS`` of them, an optional sign or ``0x`` prefix where allowed, and a range;
anything else is an :class:`~virtbus.errors.XMLError` naming the element.
"""

from __future__ import annotations

import re

from virtbus.errors import XMLError

#: 2**64 has 20 decimal digits; no value in a domain definition needs more
MAX_DIGITS = 20
_DECIMAL = re.compile(rf"[+-]?[0-9]{{1,{MAX_DIGITS}}}")
_HEX = re.compile(r"0[xX][0-9a-fA-F]{1,16}")
_SHOWN = 40  # characters of an offending value quoted back in an error


def shown(value: str) -> str:
    """``value`` cut to a length fit for an error message."""
    return value if len(value) <= _SHOWN else f"{value[:_SHOWN]}... ({len(value)} characters)"


def parse_int(
    text: str | None,
    what: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    hex_ok: bool = False,
) -> int:
    """``text`` as an integer in ``[minimum, maximum]``; XMLError naming ``what`` otherwise.

    ``what`` reads like the XML, e.g. ``"<vcpu current"`` or ``"<memory>"``. With
    ``hex_ok`` a ``0x`` prefix is accepted too (libvirt's PCI addresses).
    """
    raw = (text or "").strip()
    if _DECIMAL.fullmatch(raw):
        number = int(raw, 10)
    elif hex_ok and _HEX.fullmatch(raw):
        number = int(raw, 16)
    else:
        limit = f"at most {MAX_DIGITS} digits"
        raise XMLError(f"invalid {what}='{shown(raw)}': expected an integer ({limit})")
    if minimum is not None and number < minimum:
        raise XMLError(f"invalid {what}='{shown(raw)}': must be at least {minimum}")
    if maximum is not None and number > maximum:
        raise XMLError(f"invalid {what}='{shown(raw)}': must be at most {maximum}")
    return number


def optional_int(
    text: str | None,
    what: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    hex_ok: bool = False,
) -> int | None:
    """:func:`parse_int`, or None when the attribute is absent."""
    if text is None:
        return None
    return parse_int(text, what, minimum=minimum, maximum=maximum, hex_ok=hex_ok)
