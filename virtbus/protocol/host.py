"""The ``host.*`` ops an agent serves, and the inventory its heartbeats carry."""

from __future__ import annotations

from msgspec import field as default

from virtbus.protocol.base import Empty, HostName, Message, NonNegInt
from virtbus.protocol.network import NetworkSummary
from virtbus.protocol.registry import Access, Service, Target, op
from virtbus.protocol.storage import PoolSummary


class HostInventory(Message):
    """A host's inventory: its heartbeat body and the answer of ``host.info``.

    Every field but ``host`` has a default, so a heartbeat from an older agent that
    lacks one still counts; a field of the wrong type drops the heartbeat.
    """

    host: HostName
    driver: str = ""
    cpus: NonNegInt = 0
    memory_total_kib: NonNegInt = 0
    memory_free_kib: NonNegInt = 0
    arch: str = ""
    cpu_model: str = ""
    cpu_models: list[str] = default(default_factory=list)
    hypervisor: str = ""
    domains: NonNegInt = 0
    active_domains: NonNegInt = 0
    allocated_memory_kib: NonNegInt = 0
    allocated_vcpus: NonNegInt = 0
    running: list[str] = default(default_factory=list)
    labels: dict[str, str] = default(default_factory=dict)
    draining: bool = False
    migration_address: str = ""
    pools: list[PoolSummary] = default(default_factory=list)  # storage pools (bytes)
    networks: list[NetworkSummary] = default(default_factory=list)  # virtual networks
    underlay_address: str | None = None  # its cluster networks' VXLAN address
    last_event_seq: NonNegInt = 0
    agent_version: str = ""
    started_at: float | None = None
    now: float | None = None


class Pong(Message):
    host: str


class SetDraining(Message):
    draining: bool = True


class DrainFlag(Message):
    host: str
    draining: bool


_A, _H = Service.AGENT, Target.HOST

HOST_INFO = op(
    "host.info", Empty, HostInventory, _A, "the host's inventory (as in heartbeats)",
    access=Access.READ, target=_H,
)  # fmt: skip
HOST_PING = op("host.ping", Empty, Pong, _A, "is the agent serving?", access=Access.READ, target=_H)
HOST_SET_DRAINING = op(
    "host.set_draining", SetDraining, DrainFlag, _A,
    "mark the host draining (set by the scheduler; shown in heartbeats)",
    access=Access.ADMIN, target=_H,
)  # fmt: skip
