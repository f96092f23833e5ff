"""A bus URL names one RabbitMQ node or the several nodes of one cluster.

Both spellings are accepted, and may be mixed::

    amqp://user:pw@mq1,mq2:5673,mq3/virtbus?heartbeat=30     (one URL, a list of hosts)
    amqp://user:pw@mq1/virtbus,amqp://user:pw@mq2/virtbus     (what repeated --bus gives)

A transport connects to the first node that answers and, when that node is lost,
reconnects to the next one (:mod:`virtbus.bus.reconnect`), so a client of a RabbitMQ
cluster survives the loss of any node its queues are replicated past.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from virtbus.errors import InvalidArgument

# A comma starts another full URL only where a scheme follows it; elsewhere it separates
# the hosts of one URL (a host never contains "/", "?", "#" or "@").
_NEXT_URL: Final = re.compile(r",(?=[A-Za-z][A-Za-z0-9+.-]*://)")
_URL: Final = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?:(?P<userinfo>[^@/?#]*)@)?"
    r"(?P<hosts>[^/?#]*)(?P<rest>.*)$"
)
_PASSWORD: Final = re.compile(r"(://[^:@/?#]*:)[^@/?#]*@")


def bus_nodes(url: str) -> tuple[str, ...]:
    """Each node's own URL, in the order given (duplicates dropped); INVALID_ARG for an
    empty host in a list (``amqp://mq1,,mq2/``) or a part that is not a URL."""
    nodes: list[str] = []
    for part in _NEXT_URL.split(url.strip()):
        match = _URL.match(part)
        if match is None:
            raise InvalidArgument(
                f"bus URL {redacted(part)!r} is not SCHEME://[USER[:PASSWORD]@]HOST[,HOST...]/..."
            )
        hosts = match["hosts"].split(",")
        if len(hosts) > 1 and not all(hosts):
            raise InvalidArgument(f"bus URL {redacted(part)!r} has an empty host in its list")
        userinfo = match["userinfo"]
        prefix = f"{match['scheme']}://" + (f"{userinfo}@" if userinfo is not None else "")
        nodes.extend(f"{prefix}{host}{match['rest']}" for host in hosts)
    return tuple(dict.fromkeys(nodes))


def join_bus_urls(urls: Sequence[str]) -> str:
    """One bus URL from several (repeated ``--bus``): they are alternatives, in order."""
    return ",".join(u.strip() for u in urls if u.strip())


def redacted(url: str) -> str:
    """The URL (one node or several) with every password replaced by ``***``."""
    return _PASSWORD.sub(r"\1***@", url)
