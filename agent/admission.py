"""Admission: the agent refuses a start the host cannot hold, whatever the driver.

The scheduler places guests under overcommit ratios, but anyone with bus access can call
``domain.start`` (or ``migration.prepare``) directly, and a driver may not notice: the test
driver "ran" a 1 EiB guest and a 100,000-vCPU one. Before a start the agent adds the
guest's current memory and vCPUs to those of the host's active guests (the scheduler's
arithmetic: ``memory_total x memory_overcommit`` and ``cpus x cpu_overcommit``) and
refuses with OPERATION_FAILED naming the numbers when it does not fit.

Starts of different domains run concurrently, so each admitted start holds a reservation
until it ends (then the guest is active and counted as such); the check and the
reservation are made under one lock, which is held only for that arithmetic.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from drivers.base import Driver
from virtbus.errors import OperationFailed
from virtbus.protocol.events import DomainState


@dataclass(frozen=True, slots=True)
class Demand:
    """What one guest takes from its host while it is active."""

    uuid: str
    name: str
    memory_kib: int
    vcpus: int


def _mib(kib: float) -> str:
    return f"{kib / 1024:,.0f} MiB"


class Admission:
    def __init__(
        self, driver: Driver, host: str, *, cpu_overcommit: float, memory_overcommit: float
    ) -> None:
        self._driver = driver
        self._host = host
        self._cpu_ratio = cpu_overcommit
        self._memory_ratio = memory_overcommit
        self._lock = asyncio.Lock()
        self._reserved: dict[str, Demand] = {}  # uuid -> admitted start still in progress

    @asynccontextmanager
    async def starting(self, demand: Demand) -> AsyncIterator[None]:
        """Admit ``demand`` (OperationFailed if it does not fit) for the ``with`` body."""
        async with self._lock:
            await self._check(demand)
            self._reserved[demand.uuid] = demand
        try:
            yield
        finally:
            async with self._lock:  # released under the lock: a concurrent check sees it
                self._reserved.pop(demand.uuid, None)

    async def _check(self, demand: Demand) -> None:
        host = await self._driver.host_resources()
        others = [
            (d.memory_kib, d.vcpus)
            for d in await self._driver.list_domains(include_inactive=True)
            if d.state != DomainState.SHUTOFF and d.uuid != demand.uuid
        ]
        others += [(r.memory_kib, r.vcpus) for u, r in self._reserved.items() if u != demand.uuid]
        memory_limit = host.memory_total_kib * self._memory_ratio
        memory_used = sum(m for m, _ in others)
        if memory_used + demand.memory_kib > memory_limit:
            raise OperationFailed(
                f"cannot start domain '{demand.name}' on host '{self._host}': it needs "
                f"{_mib(demand.memory_kib)} of memory, and {_mib(memory_used)} of the host's "
                f"{_mib(memory_limit)} (memory {_mib(host.memory_total_kib)} x "
                f"memory_overcommit {self._memory_ratio:g}) are taken by active guests"
            )
        cpu_limit = host.cpus * self._cpu_ratio
        cpu_used = sum(v for _, v in others)
        if cpu_used + demand.vcpus > cpu_limit:
            raise OperationFailed(
                f"cannot start domain '{demand.name}' on host '{self._host}': it needs "
                f"{demand.vcpus} vCPUs, and {cpu_used} of the host's {cpu_limit:g} "
                f"({host.cpus} CPUs x cpu_overcommit {self._cpu_ratio:g}) are taken by "
                "active guests"
            )
