"""How an agent op is served: a typed handler per op, and what handlers may touch.

A handler receives the request already converted to its declared type (the dispatcher
decodes every body once, where it enters) and returns the declared result type, which
the dispatcher turns into the reply. Handlers register in :data:`HANDLERS` with
:meth:`HandlerTable.on`; the op modules of the agent (``agent.handlers``,
``agent.migration``, ...) register theirs on import.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent.admission import Admission
from agent.jobs import JobManager
from agent.network import Networks
from agent.storage import StoragePools
from drivers.base import Driver
from virtbus.errors import NoSupport
from virtbus.protocol.base import Message
from virtbus.protocol.host import HostInventory
from virtbus.protocol.registry import Op, Service

Req = TypeVar("Req", bound=Message)
Res = TypeVar("Res", bound=Message)


@dataclass(slots=True)
class AgentContext:
    """What a handler may use: the host's name, its driver, its inventory, its flags, and
    the admission check every start passes (``agent.admission``).

    The agent service builds one and hands it to every handler; handlers never see the
    service itself (nor its bus, outbox or dispatcher).
    """

    host: str
    driver: Driver
    inventory: Callable[[], Awaitable[HostInventory]]
    admission: Admission
    storage: StoragePools  # the host's pools and volumes (agent/storage.py)
    jobs: JobManager  # long operations (agent/jobs.py)
    networks: Networks  # the host's virtual networks (agent/network.py)
    #: AUTH_DENIED unless the call's caller may call this op on this target (its owner
    #: rules included): for a handler that does another op's work on another object
    #: (undefine --remove-all-storage deletes volumes, as vol-delete would)
    authorize: Callable[[Op[Any, Any], str | None], Awaitable[None]]
    draining: bool = False
    extras: dict[str, Any] = field(default_factory=dict)  # managers of later rooms


HandlerFn = Callable[[AgentContext, Req], Awaitable[Res]]
Handler = Callable[[AgentContext, Any], Awaitable[Message]]


class HandlerTable:
    """op name -> handler; exactly one registration per op."""

    def __init__(self) -> None:
        self._table: dict[str, Handler] = {}

    def on(self, op: Op[Req, Res]) -> Callable[[HandlerFn[Req, Res]], HandlerFn[Req, Res]]:
        if op.service is not Service.AGENT:
            raise ValueError(f"{op.name} is not an agent op")

        def register(fn: HandlerFn[Req, Res]) -> HandlerFn[Req, Res]:
            if op.name in self._table:
                raise ValueError(f"{op.name} has two handlers")
            self._table[op.name] = fn
            return fn

        return register

    def __getitem__(self, name: str) -> Handler:
        try:
            return self._table[name]
        except KeyError:
            raise NoSupport(f"this agent does not serve '{name}'") from None

    def __contains__(self, name: object) -> bool:
        return name in self._table

    def names(self) -> frozenset[str]:
        return frozenset(self._table)


HANDLERS = HandlerTable()
