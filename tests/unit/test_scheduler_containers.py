"""Scheduler and containers: lxc domains only on lxc hosts, drains that leave containers
running (or move them), offline migration undone when the source will not let go."""

from __future__ import annotations

from typing import Any

import pytest

from scheduler.drain import DrainJob, DrainManager
from scheduler.inventory import ClusterView
from scheduler.offline import OfflineMover
from scheduler.placement import HostCandidate, PlacementPolicy, place, request_for
from virtbus.domain import parse_domain_xml
from virtbus.errors import MigrateFailed, NoHostError, OperationInvalid
from virtbus.protocol import ops
from virtbus.protocol.domain import DefinedDomain, DomainInfo, DomainXml, StateName
from virtbus.protocol.host import HostInventory
from virtbus.protocol.scheduler import DrainDomain

GIB = 1 << 20
LXC = ("<domain type='lxc'><name>c1</name><uuid>0a6f4e52-4d3c-4c8e-9a51-2b0d2f6a7c10</uuid>"
       "<memory unit='MiB'>64</memory><os><type>exe</type></os><devices><filesystem>"
       "<source dir='/r'/><target dir='/'/></filesystem></devices></domain>")  # fmt: skip


def host(name: str, driver: str, free: int) -> HostCandidate:
    return HostCandidate(name=name, driver=driver, arch="x86_64", cpus=4,
                         memory_total_kib=free, memory_free_kib=free)  # fmt: skip


def test_containers_go_to_lxc_hosts_only() -> None:
    defn = parse_domain_xml(LXC)
    hosts = [host("vm", "test", 64 * GIB), host("kvm", "qemu", 32 * GIB), host("ct", "lxc", GIB)]
    assert place(request_for(defn), hosts, PlacementPolicy()).name == "ct"
    with pytest.raises(NoHostError, match="driver removed 2"):
        place(request_for(defn), hosts[:2], PlacementPolicy())
    vm = parse_domain_xml(LXC.replace("type='lxc'", "type='kvm'").replace("exe", "hvm"))
    assert place(request_for(vm), hosts[1:], PlacementPolicy()).name == "kvm"  # never on ct


class Coordinator:
    def for_domain(self, _ref: str) -> None:
        return None


def container(name: str = "c1", uuid: str = "u1") -> DomainInfo:
    return DomainInfo(name=name, uuid=uuid, state=StateName.RUNNING, type="lxc")


async def test_drain_lists_containers_and_leaves_them() -> None:
    running = [container()]
    started: list[str] = []

    async def start(uuid: str, _host: str) -> Any:
        started.append(uuid)
        raise AssertionError("containers are never migrated live")

    job = await DrainManager(Coordinator()).drain("h", running, start)  # type: ignore[arg-type]
    out = job.status(Coordinator())  # type: ignore[arg-type]
    assert out.domains["c1"] == DrainDomain(state="stays", error="cannot move live")
    assert (out.done, out.ok, out.left) == (True, True, ["c1"])
    assert started == []


async def test_drain_with_stop_containers_moves_them() -> None:
    running = [container()]
    moved: list[tuple[str, str]] = []
    spawned: list[Any] = []

    async def move(uuid: str, host: str, row: DrainDomain) -> None:
        moved.append((uuid, host))
        row.state, row.destination = "completed", "h2"

    async def start(uuid: str, _host: str) -> Any:
        raise AssertionError("never live")

    job = await DrainManager(Coordinator()).drain(  # type: ignore[arg-type]
        "h", running, start, move_container=move, spawn=lambda coro, _name: spawned.append(coro)
    )
    assert isinstance(job, DrainJob)
    assert job.status(Coordinator()).done is False  # type: ignore[arg-type]  # queued
    await spawned[0]
    out = job.status(Coordinator())  # type: ignore[arg-type]
    assert moved == [("u1", "h")] and out.ok and out.domains["c1"].destination == "h2"


def view_with(*hosts: tuple[str, str]) -> ClusterView:
    view = ClusterView(host_down_after=60)
    for name, driver in hosts:
        inv = HostInventory(host=name, driver=driver, arch="x86_64", cpus=4,
                            memory_total_kib=GIB, memory_free_kib=GIB)  # fmt: skip
        view.observe_heartbeat(inv)
    return view


class Agents:
    """Answers the mover's agent calls as two agents would; ``refuse`` fails one op."""

    def __init__(self, refuse: tuple[str, str] | None = None, state: str = "shutoff") -> None:
        self.calls: list[tuple[str, str]] = []
        self.refuse, self.state = refuse, state

    async def __call__(self, host: str, op: str, request: Any, _t: float) -> Any:
        self.calls.append((host, op))
        if (host, op) == self.refuse:
            raise OperationInvalid("cannot undefine domain 'c1': it is running")
        if op == ops.DOMAIN_INFO:
            return DomainInfo(name="c1", uuid=request.domain, state=StateName(self.state))
        if op == ops.DOMAIN_READ_SECURE:
            return DomainXml(xml=LXC)
        return DefinedDomain(name="c1", uuid=UUID)


UUID = "0a6f4e52-4d3c-4c8e-9a51-2b0d2f6a7c10"


def mover(agents: Agents, view: ClusterView) -> OfflineMover:
    async def locate(_ref: str) -> list[tuple[str, DomainInfo]]:
        return [("a", DomainInfo(name="c1", uuid=UUID, state=StateName.SHUTOFF))]

    return OfflineMover(agents, view, locate, PlacementPolicy(), 5.0)


async def test_offline_migration_defines_there_then_undefines_here() -> None:
    agents = Agents()
    view = view_with(("a", "lxc"), ("b", "lxc"), ("v", "test"))
    out = await mover(agents, view).move("c1", None)
    assert (out.source, out.destination, out.offline) == ("a", "b", True)
    assert agents.calls == [("a", ops.DOMAIN_INFO), ("a", ops.DOMAIN_READ_SECURE),
                            ("b", ops.DOMAIN_DEFINE), ("a", ops.DOMAIN_UNDEFINE)]  # fmt: skip


async def test_offline_migration_is_undone_when_the_source_keeps_it() -> None:
    agents = Agents(refuse=("a", ops.DOMAIN_UNDEFINE))
    with pytest.raises(MigrateFailed, match="undone: the source did not let go"):
        await mover(agents, view_with(("a", "lxc"), ("b", "lxc"))).move("c1", None)
    assert agents.calls[-2:] == [("a", ops.DOMAIN_UNDEFINE), ("b", ops.DOMAIN_UNDEFINE)]


async def test_offline_migration_of_a_running_domain_is_refused() -> None:
    agents = Agents(state="running")
    with pytest.raises(OperationInvalid, match="shut-off domains only"):
        await mover(agents, view_with(("a", "lxc"), ("b", "lxc"))).move("c1", "b")
    assert agents.calls == [("a", ops.DOMAIN_INFO)]  # nothing else was touched


async def test_offline_migration_needs_a_host_of_the_same_driver() -> None:
    with pytest.raises(NoHostError, match="driver removed 1"):
        await mover(Agents(), view_with(("a", "lxc"), ("v", "test"))).move("c1", None)
