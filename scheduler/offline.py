"""Offline migration: move a shut-off domain's definition to another host, as
``virsh migrate --offline --persistent`` does. Containers cannot move live; this is how
they move (their root filesystem must be reachable at the same path on the destination,
until storage pools move volumes too).

Three agent calls, each undone if a later one fails, so the definition ends on exactly
one host: ``domain.xml`` (source; the domain must be shut off) → ``domain.define``
(destination, placed through the filters with the source's driver) →
``domain.undefine`` (source; if the domain was started meanwhile this fails and the
destination's copy is undefined again).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from scheduler.inventory import ClusterView
from scheduler.placement import PlacementPolicy, place, request_for
from virtbus.domain import DomainDefinition, parse_domain_xml
from virtbus.errors import (
    InvalidArgument,
    MigrateFailed,
    NoDomainError,
    NoHostError,
    OperationInvalid,
    VirtbusError,
)
from virtbus.protocol import ops
from virtbus.protocol.base import Message
from virtbus.protocol.domain import DomainDefine, DomainInfo, DomainTarget, StateName
from virtbus.protocol.registry import Op
from virtbus.protocol.scheduler import OfflineMigration

log = logging.getLogger(__name__)

Req = TypeVar("Req", bound=Message)
Res = TypeVar("Res", bound=Message)
AgentCall = Callable[[str, Op[Any, Any], Any, float], Awaitable[Any]]
Locate = Callable[[str], Awaitable[list[tuple[str, DomainInfo]]]]


class OfflineMover:
    def __init__(self, call: AgentCall, view: ClusterView, locate: Locate,
                 policy: PlacementPolicy, step_timeout: float) -> None:  # fmt: skip
        self._call = call  # (host, op, request, timeout) -> the op's typed result
        self._view = view
        self._locate = locate  # (host, DomainInfo) of every up host that has it
        self._policy = policy
        self._t = step_timeout

    async def move(self, ref: str, to: str | None) -> OfflineMigration:
        """Move ``ref``'s definition (to ``to``, else where placement says)."""
        found = await self._locate(ref)
        if not found:
            raise NoDomainError(f"domain '{ref}' is not defined on any host that is up")
        if len(found) > 1:
            where = ", ".join(h for h, _ in found)
            raise OperationInvalid(f"domain '{ref}' is defined on several hosts ({where})")
        source, info = found[0]
        target = DomainTarget(domain=info.uuid)
        now: DomainInfo = await self._call(source, ops.DOMAIN_INFO, target, self._t)
        if now.state != StateName.SHUTOFF:
            raise OperationInvalid(
                f"domain '{now.name}' is {now.state}: offline migration moves shut-off domains"
                " only (shut it off first)"
            )
        # with its secrets (graphics passwords): the destination is defined with it
        xml = (await self._call(source, ops.DOMAIN_READ_SECURE, target, self._t)).xml
        defn = parse_domain_xml(xml)
        destination = self._place(defn, source, to)
        await self._call(destination, ops.DOMAIN_DEFINE, DomainDefine(xml=xml), self._t)
        try:
            await self._call(source, ops.DOMAIN_UNDEFINE, target, self._t)
        except VirtbusError as exc:
            try:
                await self._call(destination, ops.DOMAIN_UNDEFINE, target, self._t)
            except VirtbusError as undo:
                log.error("offline migration of %s: %s keeps a copy: %s", defn.name,
                          destination, undo)  # fmt: skip
            raise MigrateFailed(
                f"offline migration of '{defn.name}' undone: the source did not let go of it"
                f" ({exc})"
            ) from exc
        self._view.domain_moved(info.uuid, source, destination, live=False)
        return OfflineMigration(domain=defn.name, uuid=info.uuid, source=source,
                                destination=destination)  # fmt: skip

    def _place(self, defn: DomainDefinition, source: str, to: str | None) -> str:
        src = self._view.candidate(source)
        if src is None:
            raise NoHostError(f"source host '{source}' has sent no heartbeat")
        req = request_for(defn, source=src)
        if to is not None:
            if to == source:
                raise InvalidArgument(f"domain '{defn.name}' is already defined on {to}")
            if to not in self._view.hosts:
                raise NoHostError(f"unknown host '{to}'")
            there = self._view.candidate(to)
            return place(req, [] if there is None else [there], self._policy).name
        return self._view.place(req, self._policy).name
