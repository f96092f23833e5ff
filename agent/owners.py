"""Who owns an object of this host: the one owner lookup the policy's owner rules use.

An object's owner is the bus user that made it, recorded where the object's record
already lives (so it survives an agent restart with the object):

- a domain: ``<metadata><virtbus:owner>`` in its definition (the driver's info);
- a storage pool or a network: ``owner`` in its ``<uuid>.json`` state file;
- a volume: ``owner`` in its volume record (``volumes/<pool-uuid>/<digest>.json``).

A redefinition keeps the owner; the volumes a copy-storage migration makes on its
destination get the migrated domain's owner. An object made before owners were recorded
or found on the storage (a volume a pool scan found) has none, and the owner rules treat
it as nobody's.

The caller of the call being run is :data:`CALLER` (set by the agent service around
every handler), which the handlers that make objects record as their owner.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any

from virtbus.errors import VirtbusError
from virtbus.protocol.registry import Target
from virtbus.security.policy import Owner

log = logging.getLogger(__name__)

#: the bus user of the call being run (None outside a call, e.g. at agent start)
CALLER: ContextVar[str | None] = ContextVar("virtbus_caller", default=None)

#: the owner of the object of one kind named (as the policy names it), None: nobody's
OwnerOf = Callable[[str], Awaitable[str | None]]


def caller() -> str | None:
    """The user of the call being run: who owns what a handler makes."""
    return CALLER.get()


def stored_owner(record: Mapping[str, Any]) -> str | None:
    """The ``owner`` of a state file or volume record (None: nobody's, as in a record
    written before owners were, or one whose owner is not a user name)."""
    owner = record.get("owner")
    return owner if isinstance(owner, str) and owner else None


def relation(owner: str | None, user: str) -> Owner:
    """What the policy's owner rules see: the caller's own, another's, or nobody's."""
    if owner is None:
        return Owner.UNKNOWN
    return Owner.SELF if owner == user else Owner.OTHER


class Owners:
    """One owner lookup per object kind (domain, pool, volume, network)."""

    def __init__(self, lookups: Mapping[Target, OwnerOf]) -> None:
        self._lookups = dict(lookups)
        #: the target kinds whose objects may have an owner (read on every call)
        self.kinds = frozenset(self._lookups)

    async def owner(self, kind: Target, name: str | None) -> str | None:
        """The owner of the object ``name`` of ``kind``; None when it has none, does not
        exist (yet: a define's target), or cannot be read (logged: the object is then
        treated as nobody's, as before owners were recorded)."""
        lookup = self._lookups.get(kind)
        if lookup is None or name is None:
            return None
        try:
            return await lookup(name)
        except VirtbusError as exc:
            log.warning("%s %s: its owner not read: %s", kind, name, exc)
            return None
