"""Host address syntax: the one check for an IP address or a DNS host name.

Addresses from definitions and calls end up in QEMU's command line and in migration URIs
(``tcp:HOST:PORT``), where a comma or a colon starts another option. Only what is an
IPv4/IPv6 address (no zone index) or an RFC 1123 host name passes.
"""

from __future__ import annotations

import ipaddress
import re

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_HOSTNAME = 253


def is_ip(text: str) -> bool:
    """An IPv4 or IPv6 address (brackets and zone indexes are not)."""
    if "%" in text:
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_host(text: str) -> bool:
    """An IP address or a DNS host name (labels of letters, digits and inner hyphens)."""
    if is_ip(text):
        return True
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > MAX_HOSTNAME:
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))
