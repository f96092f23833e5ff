"""The one Driver protocol every hypervisor implements, and what it reports.

The agent never knows which hypervisor it talks to: it calls these methods and receives
:class:`DriverEvent` values through the ``sink`` callable it hands the driver. The sink is
synchronous and never blocks (the agent stamps the per-host sequence number and queues
the event for publishing), so event order is exactly the order the driver saw things
happen, with no queue of the driver's own in between.

A domain reference (``ref``) is a name or a UUID string. Errors are ``virtbus.errors``
types: ``NoDomainError`` for an unknown ref, ``OperationInvalid`` for a wrong state,
``OperationFailed`` for a duplicate name/uuid or a failed operation, ``XMLError`` /
``ConfigUnsupported`` for definitions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from virtbus.protocol.events import DomainState


@dataclass(frozen=True, slots=True)
class DriverEvent:
    """One event in libvirt's vocabulary (``event`` and ``detail`` as in protocol/events.py)."""

    domain: str
    uuid: str
    event: str
    detail: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    reconciled: bool = False


EventSink = Callable[[DriverEvent], None]


@dataclass(frozen=True, slots=True)
class DomainRef:
    name: str
    uuid: str


@dataclass(slots=True)
class DomainInfo:
    """What ``virsh dominfo`` shows."""

    name: str
    uuid: str
    state: DomainState
    reason: str
    max_memory_kib: int
    memory_kib: int
    vcpus: int
    cpu_time_ns: int = 0
    persistent: bool = True
    autostart: bool = False
    id: int | None = None  # hypervisor id while active, None when shut off
    hv_type: str = ""

    def to_map(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uuid": self.uuid,
            "id": self.id,
            "state": self.state.label,
            "state_code": int(self.state),
            "reason": self.reason,
            "max_memory_kib": self.max_memory_kib,
            "memory_kib": self.memory_kib,
            "vcpus": self.vcpus,
            "cpu_time_ns": self.cpu_time_ns,
            "persistent": self.persistent,
            "autostart": self.autostart,
            "type": self.hv_type,
        }


@dataclass(frozen=True, slots=True)
class HostResources:
    """What a host offers, for heartbeats and placement."""

    cpus: int
    memory_total_kib: int
    memory_free_kib: int
    arch: str
    cpu_model: str
    hypervisor: str

    def to_map(self) -> dict[str, Any]:
        return {
            "cpus": self.cpus,
            "memory_total_kib": self.memory_total_kib,
            "memory_free_kib": self.memory_free_kib,
            "arch": self.arch,
            "cpu_model": self.cpu_model,
            "hypervisor": self.hypervisor,
        }


@runtime_checkable
class Driver(Protocol):
    """A hypervisor. All methods are coroutines except ``lookup`` (a cheap local lookup)."""

    name: str

    async def open(self, sink: EventSink) -> None:
        """Connect (and reattach to guests left running); events go to ``sink`` from now on."""

    async def close(self) -> None:
        """Release connections; running guests are left running."""

    def lookup(self, ref: str) -> DomainRef | None:
        """Resolve a name or UUID without I/O; None when unknown."""

    async def define(self, xml: str) -> DomainRef: ...
    async def undefine(self, ref: str) -> None: ...
    async def start(self, ref: str) -> None: ...
    async def shutdown(self, ref: str, timeout: float | None = None) -> None:
        """Ask the guest to power off (ACPI); with ``timeout`` wait for it, else return at once."""

    async def destroy(self, ref: str) -> None: ...
    async def reboot(self, ref: str) -> None: ...
    async def reset(self, ref: str) -> None: ...
    async def suspend(self, ref: str) -> None: ...
    async def resume(self, ref: str) -> None: ...
    async def info(self, ref: str) -> DomainInfo: ...
    async def list_domains(self, include_inactive: bool = True) -> list[DomainInfo]: ...
    async def xml(self, ref: str) -> str: ...
    async def host_resources(self) -> HostResources: ...
