"""The names a domain may have: one check, used wherever a name enters virtbus.

libvirt sets no length limit on a domain name, but a name travels in routing keys
(AMQP short strings: 255 bytes), file names and log lines, so virtbus accepts at most
``MAX_NAME_BYTES`` bytes of UTF-8. Like libvirt it refuses an empty name, a ``/`` (names
become file names) and control characters (they break logs and terminals).
"""

from __future__ import annotations

import unicodedata

from virtbus.domain.numbers import shown
from virtbus.errors import XMLError

MAX_NAME_BYTES = 200


def check_domain_name(name: str) -> None:
    """XMLError (libvirt's XML_ERROR) when ``name`` is not a valid domain name."""
    if not name.strip():
        raise XMLError("<name> must not be empty")
    size = len(name.encode("utf-8", errors="surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise XMLError(
            f"<name> '{shown(name)}' is {size} bytes long: at most {MAX_NAME_BYTES} bytes "
            "(UTF-8) are allowed"
        )
    if "/" in name:
        raise XMLError(f"<name> '{shown(name)}' must not contain '/'")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise XMLError(f"<name> {shown(name)!r} must not contain control characters")
