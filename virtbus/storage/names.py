"""Names of pools and volumes: what may become a file name, a path component or an argv word.

A volume's name is a file name inside its pool's directory, so it must never climb out
of it or be read as an option by the tools that get it: no ``/``, not ``.`` or ``..``, no
NUL or other control characters, no leading ``-``. Pool names follow libvirt's rule (no
``/``) plus the same hardening. One home for the check, used by the XML parser and by
every op that takes a name.
"""

from __future__ import annotations

import uuid as _uuid

from lxml import etree

from virtbus.domain.model import Element
from virtbus.errors import InvalidArgument, XMLError

MAX_NAME_BYTES = 255  # NAME_MAX of Linux file systems


def check_name(name: object, what: str = "volume") -> str:
    """``name`` if it is a safe pool or volume name, else InvalidArgument saying why."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{what} name must be a non-empty string")
    if "/" in name:
        raise InvalidArgument(f"{what} name {name!r} must not contain '/'")
    if name in (".", ".."):
        raise InvalidArgument(f"{what} name {name!r} is not allowed")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidArgument(f"{what} name {name!r} must not contain NUL or control characters")
    if name.startswith("-"):
        raise InvalidArgument(f"{what} name {name!r} must not start with '-'")
    if name != name.strip():
        raise InvalidArgument(f"{what} name {name!r} must not start or end with white space")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidArgument(f"{what} name is longer than {MAX_NAME_BYTES} bytes")
    return name


def definition_uuid(root: Element, what: str) -> str:
    """The ``<uuid>`` of a pool or network definition, checked; one is generated and written
    into the tree (after ``<name>``) when it has none, as libvirt does at define."""
    uuid_el = root.find("uuid")
    if uuid_el is None:
        value = str(_uuid.uuid4())
        uuid_el = etree.Element("uuid")
        uuid_el.text = value
        name_el = root.find("name")
        assert name_el is not None
        name_el.addnext(uuid_el)
        return value
    raw = (uuid_el.text or "").strip()
    try:
        value = str(_uuid.UUID(raw))
    except ValueError:
        raise XMLError(f"invalid <uuid> '{raw}' in {what}") from None
    if len(raw.replace("-", "")) != 32:
        raise XMLError(f"invalid <uuid> '{raw}' in {what}")
    return value
