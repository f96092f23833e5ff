"""What every CLI command gets: the client, the output mode, the call deadline."""

from __future__ import annotations

import os
from dataclasses import dataclass

from virtbus.client import Client, Domain
from virtbus.client.core import DISCOVERY_WAIT
from virtbus.errors import BusUnavailable, NoConnect, OperationTimeout
from virtbus.protocol.host import HostInventory

HOST_ENV = "VIRTBUS_HOST"
SCHEDULER_PROBE = 2.0  # s: how long to wait for a scheduler before falling back

__all__ = ["DISCOVERY_WAIT", "HOST_ENV", "Context"]


@dataclass(slots=True)
class Context:
    client: Client
    json: bool
    timeout: float

    def explicit_host(self, explicit: str | None) -> str | None:
        """``--host``, else ``$VIRTBUS_HOST``."""
        return explicit or os.environ.get(HOST_ENV)

    async def scheduler_answers(self) -> bool:
        """True when an active scheduler answers (commands then use its cluster view)."""
        try:
            await self.client.scheduler.ping(timeout=min(self.timeout, SCHEDULER_PROBE))
        except (NoConnect, OperationTimeout, BusUnavailable):
            return False
        return True

    async def domain(self, explicit: str | None, ref: str) -> Domain:
        """The domain ``ref`` on ``--host``/``$VIRTBUS_HOST``, else on the host that has it."""
        host = self.explicit_host(explicit)
        if host:
            return self.client.host(host).domain(ref)
        return await self.client.find(ref)

    async def hosts_heard(self, wait: float = DISCOVERY_WAIT) -> dict[str, HostInventory]:
        return await self.client.heartbeats(wait)
