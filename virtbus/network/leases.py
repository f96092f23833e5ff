"""dnsmasq's lease file (``--dhcp-leasefile``): one lease a line,
``EXPIRY MAC IP HOSTNAME CLIENT-ID`` with ``*`` for an unknown hostname or client id."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Lease:
    expiry: int  # epoch seconds, 0: never
    mac: str
    ip: str
    prefix: int
    hostname: str | None
    client_id: str | None

    @property
    def family(self) -> str:
        return "ipv6" if ":" in self.ip else "ipv4"


def parse_leases(text: str, prefix: int) -> list[Lease]:
    """The IPv4 leases in ``text`` (lines that do not parse are skipped: dnsmasq rewrites
    the file while we may read it)."""
    out: list[Lease] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 4 or words[0] == "duid":
            continue
        try:
            expiry = int(words[0])
            ip = str(ipaddress.ip_address(words[2]))
        except ValueError:
            continue
        hostname = None if words[3] == "*" else words[3]
        client = words[4] if len(words) > 4 and words[4] != "*" else None
        out.append(Lease(expiry, words[1].lower(), ip, prefix, hostname, client))
    return out
