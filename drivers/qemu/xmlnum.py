"""Integers read from a definition's elements, through virtbus' one bounded parser.

Every number the command-line builder and the definition completion take from the XML
goes through here: a value that is not an integer, has too many digits or is out of range
is an XML_ERROR naming the element and attribute (never a Python ValueError).
"""

from __future__ import annotations

from virtbus.domain import parse_int
from virtbus.domain.model import Element


def num(el: Element, attr: str, default: str | None = None, *, minimum: int | None = 0,
        maximum: int | None = None, hex_ok: bool = False) -> int:  # fmt: skip
    """``el``'s attribute ``attr`` (``default`` when absent) as an integer."""
    raw = el.get(attr, default)
    if raw is not None and raw.isascii() and raw.isdigit() and len(raw) < 10:  # the usual case
        value = int(raw)
        if (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
            return value
    return parse_int(el.get(attr, default), f"<{el.tag} {attr}", minimum=minimum,
                     maximum=maximum, hex_ok=hex_ok)  # fmt: skip


def num_text(el: Element, default: str | None = None, *, minimum: int | None = 0,
             maximum: int | None = None, hex_ok: bool = False) -> int:  # fmt: skip
    """``el``'s text (``default`` when empty) as an integer."""
    text = (el.text or "").strip() or default
    return parse_int(text, f"<{el.tag}>", minimum=minimum, maximum=maximum, hex_ok=hex_ok)


def attr_int(el: Element | None, name: str, default: int = 0) -> int:
    """An optional attribute (decimal or ``0x`` hex, as libvirt writes addresses);
    ``default`` when the element or the attribute is absent."""
    raw = el.get(name) if el is not None else None
    if raw is None or el is None:
        return default
    if raw.isascii() and len(raw) < 10:  # the usual cases: decimal, and 0x hex (addresses)
        if raw.isdigit():
            return int(raw)
        if raw[:2] in ("0x", "0X") and raw[2:].isalnum():
            try:
                return int(raw, 16)
            except ValueError:
                pass  # parse_int names the attribute
    return parse_int(raw.strip().lstrip("+"), f"<{el.tag} {name}", minimum=None, hex_ok=True)
