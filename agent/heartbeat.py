"""The host's heartbeat: who it is, what it has, what it runs — every few seconds."""

from __future__ import annotations

import time

from drivers.base import Driver
from virtbus import __version__
from virtbus.protocol.events import DomainState
from virtbus.protocol.host import HostInventory
from virtbus.protocol.network import NetworkSummary
from virtbus.protocol.storage import PoolSummary


async def inventory(
    driver: Driver,
    host: str,
    *,
    started_at: float,
    last_seq: int,
    labels: dict[str, str] | None = None,
    draining: bool = False,
    migration_address: str = "127.0.0.1",
    pools: list[PoolSummary] | None = None,
    networks: list[NetworkSummary] | None = None,
    underlay_address: str | None = None,
) -> HostInventory:
    """The inventory carried by heartbeats and answered by ``host.info``.

    ``labels`` come from the agent's settings (``--label KEY=VALUE``); ``draining`` is set by
    the scheduler (``host.set_draining``) so every reader of heartbeats sees a drain.
    ``pools`` are the storage pools with their sizes: the scheduler places domains whose
    volumes' pools are there; ``networks`` the virtual networks and whether they run;
    ``underlay_address`` where this host's cluster networks' VXLAN is reached.
    """
    resources = await driver.host_resources()
    domains = await driver.list_domains(include_inactive=True)
    active = [d for d in domains if d.state != DomainState.SHUTOFF]
    return HostInventory(
        host=host,
        driver=driver.name,
        cpus=resources.cpus,
        memory_total_kib=resources.memory_total_kib,
        memory_free_kib=resources.memory_free_kib,
        arch=resources.arch,
        cpu_model=resources.cpu_model,
        hypervisor=resources.hypervisor,
        domains=len(domains),
        active_domains=len(active),
        allocated_memory_kib=sum(d.memory_kib for d in active),
        allocated_vcpus=sum(d.vcpus for d in active),
        running=[d.name for d in active],
        labels=dict(labels or {}),
        draining=draining,
        migration_address=migration_address,
        pools=list(pools or []),
        networks=list(networks or []),
        underlay_address=underlay_address,
        last_event_seq=last_seq,
        agent_version=__version__,
        started_at=started_at,
        now=time.time(),
    )
