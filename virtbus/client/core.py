"""The public async client: every op, typed, over any bus URL.

::

    async with await Client.connect("amqp://guest:guest@127.0.0.1:5672/") as c:
        dom = await c.host("a").define(xml)
        await dom.start()
        await dom.suspend()
        async for ev in c.events(host="a", since=0):
            print(ev.domain, ev.event, ev.detail)

Results are the declared result types of :mod:`virtbus.protocol` (checked as they come
in: a malformed answer is ``RPC_ERROR``); failures raise :mod:`virtbus.errors` types with
libvirt's codes. The CLI is a user of this client and has no other call path.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, AsyncIterator
from types import TracebackType
from typing import Literal, TypeVar

from virtbus.aio import backoff_delays
from virtbus.bus.base import Bus
from virtbus.bus.factory import open_bus
from virtbus.bus.topology import (
    AUDIT_EXCHANGE,
    HEARTBEAT_KEY_SUFFIX,
    HOSTS_EXCHANGE,
    SCHEDULER_ROUTE,
)
from virtbus.client.events import EventFilter, EventStream, Since, open_events
from virtbus.client.network import Network
from virtbus.client.storage import Job, Pool, host_jobs
from virtbus.errors import (
    BusUnavailable,
    InvalidArgument,
    NoConnect,
    NoDomainError,
    NoReply,
    OperationTimeout,
)
from virtbus.protocol import ops
from virtbus.protocol.backup import (
    BackupBegin,
    BackupStarted,
    CheckpointCreate,
    CheckpointDelete,
    CheckpointInfo,
    CheckpointTarget,
    DomainJobInfo,
    JobInfoRequest,
)
from virtbus.protocol.base import Empty, Message, decode, to_wire
from virtbus.protocol.blockjob import (
    BlockCommit,
    BlockCopy,
    BlockError,
    BlockJobAbort,
    BlockJobInfo,
    BlockJobSpeed,
    BlockJobState,
    BlockPull,
    BlockTarget,
)
from virtbus.protocol.domain import (
    AutostartFlag,
    DomainAutostart,
    DomainDefine,
    DomainInfo,
    DomainListRequest,
    DomainMemoryRequest,
    DomainShutdown,
    DomainStatsRequest,
    DomainStatus,
    DomainTarget,
    DomainUndefine,
    RemovedVolume,
    StatsGroup,
    StatValue,
)
from virtbus.protocol.envelope import Kind, new_id
from virtbus.protocol.host import DrainFlag, HostInventory, Pong, SetDraining
from virtbus.protocol.messages import AuditRecord, DomainEvent, audit_records
from virtbus.protocol.migration import TERMINAL_STATES, MigrationParams, MigrationRecord
from virtbus.protocol.network import (
    InterfaceAddresses,
    InterfaceAddressesRequest,
    InterfaceLinkRequest,
    InterfaceParameters,
    InterfaceParametersRequest,
    InterfaceRate,
    InterfaceTuneRequest,
    NetworkInfo,
    NetworkListRequest,
    NetworkXmlRequest,
)
from virtbus.protocol.registry import Op, Service
from virtbus.protocol.save import ManagedSaveRequest, Restored, RestoreRequest, SaveRequest
from virtbus.protocol.scheduler import (
    CancelRequest,
    ClusterDomain,
    ClusterDomainsRequest,
    ClusterNetwork,
    ClusterNetworkTarget,
    DrainRequest,
    DrainStatus,
    HostRequest,
    MigrateRequest,
    MigrationQuery,
    OfflineMigrateRequest,
    OfflineMigration,
    PlacedDomain,
    PlaceRequest,
    SchedulerPing,
    SchedulerPingRequest,
)
from virtbus.protocol.scheduler import HostView as ClusterHost
from virtbus.protocol.snapshot import (
    SnapshotCreate,
    SnapshotDelete,
    SnapshotInfo,
    SnapshotRevert,
    SnapshotTarget,
    SnapshotXmlRequest,
)
from virtbus.protocol.storage import (
    BlockInfo,
    BlockInfoRequest,
    DeviceChange,
    JobInfo,
    PoolCreate,
    PoolInfo,
    PoolListRequest,
    PoolXmlRequest,
    VolumeInfo,
    VolumeLookup,
)
from virtbus.security.trust import publisher_trusted
from virtbus.settings import DEFAULT_CALL_TIMEOUT, BusSettings

Req = TypeVar("Req", bound=Message)
Res = TypeVar("Res", bound=Message)
DISCOVERY_WAIT = 2.5  # s: a little more than one heartbeat interval at the default 2 s
FOLLOW_POLL = 5.0  # s the scheduler may hold a follow query (well under a call deadline)


class Client:
    """A connection to the bus and every op on it; see the module docstring."""

    def __init__(
        self, bus: Bus, *, timeout: float = DEFAULT_CALL_TIMEOUT, retries: int = 0
    ) -> None:
        if retries < 0:
            raise InvalidArgument(f"retries must be >= 0, not {retries}")
        self.bus = bus
        self.timeout = timeout
        self.retries = retries  # see call()
        # Whose events and heartbeats count for any host, besides the host's own user: our
        # own user (we could have sent them ourselves) and the configured trusted ones.
        self.trusted_publishers = (bus.user, *bus.settings.trusted_publishers)

    @classmethod
    async def connect(
        cls,
        url: str | None = None,
        *,
        src: str | None = None,
        timeout: float = DEFAULT_CALL_TIMEOUT,
        settings: BusSettings | None = None,
        oneshot: bool = False,
        retries: int = 0,
    ) -> Client:
        """Connect to ``url`` (else ``$VIRTBUS_BUS_URL``, else the local RabbitMQ).

        ``oneshot``: a lean transport for a short-lived process (a few calls and
        subscriptions, no reconnects), which starts about 100 ms faster. ``retries``:
        how often a call is retried after a retryable failure (see :meth:`call`)."""
        src = src or f"client-{os.getpid()}"
        bus = open_bus(url, src=src, settings=settings, oneshot=oneshot)
        await bus.connect()
        return cls(bus, timeout=timeout, retries=retries)

    async def close(self) -> None:
        await self.bus.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- calls ----------------------------------------------------------------------
    async def call(
        self,
        route: str,
        op: Op[Req, Res],
        request: Req | None = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        call_id: str | None = None,
    ) -> Res:
        """One op on ``route``; ``request`` defaults to the op's request with no fields.

        A call that fails with BUS_UNAVAILABLE (the connection went, or is coming back)
        or OPERATION_TIMEOUT (no reply within ``timeout``, each attempt's own deadline)
        is sent again up to ``retries`` times (default: the client's), after the bus's
        reconnect backoff, under the *same* call id: a server that already ran it answers
        from its reply log instead of running it twice. ``call_id``: the id to use (an
        attempt of an earlier call of yours); a new one by default. The last failure is
        raised."""
        body = to_wire(request) if request is not None else {}
        left = self.retries if retries is None else retries
        if left < 0:
            raise InvalidArgument(f"retries must be >= 0, not {left}")
        call_id = call_id or new_id()
        delays = backoff_delays(self.bus.settings.reconnect)
        while True:
            try:
                result = await self.bus.call(
                    route, op, body, timeout=timeout or self.timeout, call_id=call_id
                )
            except (BusUnavailable, OperationTimeout):
                if left <= 0:
                    raise
                left -= 1
                await asyncio.sleep(next(delays))
                continue
            return op.decode_result(result)

    async def agent(
        self,
        host: str,
        op: Op[Req, Res],
        request: Req | None = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> Res:
        """One agent op on ``host``, with errors that say which host did not answer
        (``retries``: see :meth:`call`)."""
        if op.service is not Service.AGENT:
            raise InvalidArgument(f"{op} is not an agent op")
        deadline = timeout or self.timeout
        try:
            return await self.call(
                ops.agent_route(host), op, request, timeout=deadline, retries=retries
            )
        except NoConnect:
            raise NoConnect(
                f"no agent answers for host '{host}' — is virtbus-agent running there? "
                "(`virtbus hosts` lists the hosts heard on the bus)"
            ) from None
        except NoReply:
            raise NoReply(
                f"host '{host}' did not answer {op} within {deadline:g} s — is "
                f"virtbus-agent running on '{host}'? (`virtbus hosts` lists live hosts)"
            ) from None

    async def scheduler_call(
        self,
        op: Op[Req, Res],
        request: Req | None = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> Res:
        """One op of the active scheduler (``virtbus-scheduler``; ``retries``: see
        :meth:`call`)."""
        if op.service is not Service.SCHEDULER:
            raise InvalidArgument(f"{op} is not a scheduler op")
        deadline = timeout or self.timeout
        try:
            return await self.call(SCHEDULER_ROUTE, op, request, timeout=deadline, retries=retries)
        except NoConnect:
            raise NoConnect(
                "no scheduler answers — is virtbus-scheduler running on this bus?"
            ) from None
        except NoReply:
            raise NoReply(
                f"the scheduler did not answer {op} within {deadline:g} s — is "
                "virtbus-scheduler running on this bus?"
            ) from None

    # --- handles --------------------------------------------------------------------
    def host(self, name: str) -> Host:
        return Host(self, name)

    @property
    def scheduler(self) -> Scheduler:
        return Scheduler(self)

    async def find(self, ref: str, wait: float = DISCOVERY_WAIT) -> Domain:
        """The domain ``ref`` (name or UUID) on the one host that has it."""
        heard = await self.heartbeats(wait)
        if not heard:
            raise NoConnect("no agent heard on the bus — is virtbus-agent running?")
        owners = []
        for name in sorted(heard):
            found = await self.host(name).domains(all=True)
            if any(ref in (d.name, d.uuid) for d in found):
                owners.append(name)
        if not owners:
            raise NoDomainError(f"domain '{ref}' is not defined on any host")
        if len(owners) > 1:
            raise InvalidArgument(f"domain '{ref}' exists on {', '.join(owners)}: pass --host")
        return self.host(owners[0]).domain(ref)

    # --- what is published ----------------------------------------------------------
    async def heartbeats(self, wait: float = DISCOVERY_WAIT) -> dict[str, HostInventory]:
        """Hosts heard within ``wait`` seconds: their latest inventory, by host name."""
        seen: dict[str, HostInventory] = {}
        sub = await self.bus.subscribe(HOSTS_EXCHANGE, [f"*.{HEARTBEAT_KEY_SUFFIX}"])
        try:
            async with asyncio.timeout(wait):
                async for env in sub:
                    if env.kind != Kind.HEARTBEAT:
                        continue
                    try:
                        inv = decode(env.body, HostInventory)
                    except InvalidArgument:
                        continue  # any bus client can publish
                    if publisher_trusted(env.user, inv.host, *self.trusted_publishers):
                        seen[inv.host] = inv
        except TimeoutError:
            pass
        finally:
            await sub.close()
        return seen

    async def audit(
        self,
        since: float | str = "first",
        *,
        idle: float = 2.0,
        user: str | None = None,
        daemon: str | None = None,
    ) -> AsyncGenerator[tuple[AuditRecord, str | None], None]:
        """Audit records kept in ``virtbus.audit.history`` from ``since`` (epoch seconds
        or "first"), with the bus user that published each; ends when none arrived for
        ``idle`` seconds (a stream has no end)."""
        try:
            sub = await self.bus.history(since, AUDIT_EXCHANGE)
        except BusUnavailable as exc:
            if "NOT_FOUND" in exc.message:  # no daemon has audited a call on this vhost yet
                return
            raise
        try:
            while True:
                try:
                    async with asyncio.timeout(idle):
                        env = await anext(sub)
                except (TimeoutError, StopAsyncIteration):
                    return
                if env.kind != Kind.AUDIT:
                    continue
                try:
                    records = audit_records(env.op, env.body)  # or an older audit.call
                except InvalidArgument:
                    continue  # any bus client can publish
                for rec in records:
                    if (user is None or rec.user == user) and (
                        daemon is None or rec.daemon == daemon
                    ):
                        yield rec, env.user
        finally:
            await sub.close()

    async def subscribe(
        self,
        *,
        host: str | None = None,
        domain: str | None = None,
        event: str | None = None,
        since: Since | None = None,
    ) -> EventStream:
        """Subscribe to events (an async iterator, already subscribed on return); with
        ``since`` (a sequence number per host, epoch seconds, a datetime, or "first") the
        kept history first, then live ones — no gap, no duplicate."""
        wanted = EventFilter(host, domain, event)
        sub = await open_events(self.bus, wanted, since)
        return EventStream(sub, wanted, since, self.trusted_publishers)

    async def events(
        self,
        *,
        host: str | None = None,
        domain: str | None = None,
        event: str | None = None,
        since: Since | None = None,
    ) -> AsyncGenerator[DomainEvent, None]:
        """:meth:`subscribe` as an async generator (subscribed on the first ``anext``)."""
        async with await self.subscribe(host=host, domain=domain, event=event, since=since) as s:
            async for ev in s:
                yield ev


class Host:
    """One host's agent."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name

    def __repr__(self) -> str:
        return f"Host({self.name!r})"

    async def call(self, op: Op[Req, Res], request: Req | None = None) -> Res:
        return await self.client.agent(self.name, op, request)

    def domain(self, ref: str) -> Domain:
        return Domain(self, ref)

    async def define(self, xml: str) -> Domain:
        """Define (or redefine) a domain from libvirt domain XML."""
        ref = await self.call(ops.DOMAIN_DEFINE, DomainDefine(xml=xml))
        return Domain(self, ref.name, uuid=ref.uuid)

    async def domains(self, all: bool = True) -> list[DomainInfo]:
        return (await self.call(ops.DOMAIN_LIST, DomainListRequest(all=all))).domains

    async def info(self) -> HostInventory:
        return await self.call(ops.HOST_INFO, Empty())

    async def ping(self) -> Pong:
        return await self.call(ops.HOST_PING, Empty())

    async def stats(
        self, domains: list[str] | None = None, groups: list[StatsGroup] | None = None
    ) -> dict[str, dict[str, StatValue]]:
        """libvirt's domstats of this host's domains (all, or ``domains``)."""
        request = DomainStatsRequest(domains=domains, groups=groups)
        return (await self.call(ops.DOMAIN_STATS, request)).domains

    async def set_draining(self, draining: bool = True) -> DrainFlag:
        return await self.call(ops.HOST_SET_DRAINING, SetDraining(draining=draining))

    # --- storage (virtbus/client/storage.py) ----------------------------------------
    def pool(self, ref: str) -> Pool:
        return Pool(self, ref)

    async def pools(self, all: bool = True) -> list[PoolInfo]:
        return (await self.call(ops.STORAGE_POOL_LIST, PoolListRequest(all=all))).pools

    async def define_pool(self, xml: str) -> Pool:
        ref = await self.call(ops.STORAGE_POOL_DEFINE, PoolXmlRequest(xml=xml))
        return Pool(self, ref.name)

    async def create_pool(self, xml: str, build: bool = False,
                          overwrite: bool | None = None) -> Pool:  # fmt: skip
        request = PoolCreate(xml=xml, build=build, overwrite=overwrite)
        return Pool(self, (await self.call(ops.STORAGE_POOL_CREATE, request)).name)

    async def find_volume(self, path: str) -> VolumeInfo:
        """The volume whose path or key is ``path``."""
        return await self.call(ops.STORAGE_VOL_LOOKUP, VolumeLookup(path=path))

    # --- virtual networks (virtbus/client/network.py) --------------------------------
    def network(self, ref: str) -> Network:
        return Network(self, ref)

    async def networks(self, all: bool = True) -> list[NetworkInfo]:
        return (await self.call(ops.NETWORK_LIST, NetworkListRequest(all=all))).networks

    async def define_network(self, xml: str) -> Network:
        """net-define: a persistent network from libvirt's <network> XML."""
        ref = await self.call(ops.NETWORK_DEFINE, NetworkXmlRequest(xml=xml))
        return Network(self, ref.name)

    async def create_network(self, xml: str) -> Network:
        """net-create: a transient network, started at once."""
        ref = await self.call(ops.NETWORK_CREATE, NetworkXmlRequest(xml=xml))
        return Network(self, ref.name)

    async def restore(self, file: str, *, running: bool = False, paused: bool = False) -> Restored:
        """Start the domain a save file on this host holds (virDomainRestore)."""
        request = RestoreRequest(file=file, running=running, paused=paused)
        return await self.call(ops.DOMAIN_RESTORE, request)

    def job(self, job_id: str) -> Job:
        return Job(self, JobInfo(id=job_id, kind="", target={}, state="running"))

    async def jobs(self) -> list[JobInfo]:
        return await host_jobs(self)


class Domain:
    """One domain of one host; ``ref`` is its name or UUID."""

    def __init__(self, host: Host, ref: str, *, uuid: str | None = None) -> None:
        self.host = host
        self.ref = ref
        self.uuid = uuid

    def __repr__(self) -> str:
        return f"Domain({self.ref!r} on {self.host.name!r})"

    @property
    def _target(self) -> DomainTarget:
        return DomainTarget(domain=self.ref)

    async def start(self) -> DomainStatus:
        return await self.host.call(ops.DOMAIN_START, self._target)

    async def shutdown(self, timeout: float | None = None) -> DomainStatus:
        """Ask the guest to power off; with ``timeout`` wait for it to do so."""
        request = DomainShutdown(domain=self.ref, timeout=timeout)
        if timeout is None:
            return await self.host.call(ops.DOMAIN_SHUTDOWN, request)
        deadline = max(self.host.client.timeout, timeout + 5)
        return await self.host.client.agent(
            self.host.name, ops.DOMAIN_SHUTDOWN, request, timeout=deadline
        )

    async def destroy(self) -> DomainStatus:
        return await self.host.call(ops.DOMAIN_DESTROY, self._target)

    async def reboot(self) -> DomainStatus:
        return await self.host.call(ops.DOMAIN_REBOOT, self._target)

    async def reset(self) -> DomainStatus:
        return await self.host.call(ops.DOMAIN_RESET, self._target)

    async def suspend(self) -> DomainStatus:
        return await self.host.call(ops.DOMAIN_SUSPEND, self._target)

    async def resume(self) -> DomainStatus:
        return await self.host.call(ops.DOMAIN_RESUME, self._target)

    async def undefine(self, remove_all_storage: bool = False) -> list[RemovedVolume]:
        """Remove the definition; with ``remove_all_storage`` its volumes too (each
        reported, an ``error`` when it could not be deleted)."""
        request = DomainUndefine(domain=self.ref, remove_all_storage=remove_all_storage)
        return (await self.host.call(ops.DOMAIN_UNDEFINE, request)).volumes

    async def attach_device(self, xml: str, *, live: bool = False, config: bool = False) -> None:
        """attach-device (a ``<disk>``); neither flag is libvirt's CURRENT."""
        request = DeviceChange(domain=self.ref, xml=xml, live=live, config=config)
        await self.host.call(ops.DOMAIN_ATTACH_DEVICE, request)

    async def detach_device(self, xml: str, *, live: bool = False, config: bool = False) -> None:
        request = DeviceChange(domain=self.ref, xml=xml, live=live, config=config)
        await self.host.call(ops.DOMAIN_DETACH_DEVICE, request)

    async def set_interface_link(self, interface: str, up: bool, *, live: bool = False,
                                 config: bool = False) -> None:  # fmt: skip
        """domif-setlink: ``interface`` is the NIC's target dev (its tap) or its MAC."""
        request = InterfaceLinkRequest(domain=self.ref, interface=interface, up=up, live=live,
                                       config=config)  # fmt: skip
        await self.host.call(ops.DOMAIN_SET_INTERFACE_LINK, request)

    async def interface_parameters(self, interface: str, *, live: bool = False,
                                   config: bool = False) -> InterfaceParameters:  # fmt: skip
        """domiftune without limits: the NIC's (target dev or MAC) bandwidth, 0 unset."""
        request = InterfaceParametersRequest(domain=self.ref, interface=interface, live=live,
                                             config=config)  # fmt: skip
        return await self.host.call(ops.DOMAIN_INTERFACE_PARAMETERS, request)

    async def set_interface_parameters(
        self, interface: str, *, inbound: InterfaceRate | None = None,
        outbound: InterfaceRate | None = None, live: bool = False, config: bool = False,
    ) -> None:  # fmt: skip
        """domiftune: a direction given replaces its limit (average 0: removed), one
        left out is kept; neither flag is libvirt's CURRENT."""
        request = InterfaceTuneRequest(domain=self.ref, interface=interface, inbound=inbound,
                                       outbound=outbound, live=live, config=config)  # fmt: skip
        await self.host.call(ops.DOMAIN_SET_INTERFACE_PARAMETERS, request)

    async def interface_addresses(self, source: str = "lease") -> list[InterfaceAddresses]:
        """domifaddr: the NICs' addresses from the networks' DHCP leases."""
        request = InterfaceAddressesRequest(domain=self.ref, source=source)
        return (await self.host.call(ops.DOMAIN_INTERFACE_ADDRESSES, request)).interfaces

    async def block_info(self, target: str) -> BlockInfo:
        request = BlockInfoRequest(domain=self.ref, target=target)
        return await self.host.call(ops.DOMAIN_BLOCK_INFO, request)

    async def set_memory(self, kib: int, *, maximum: bool = False, live: bool = False,
                         config: bool = False) -> None:  # fmt: skip
        """setmem (``kib`` of current memory: live, the balloon's target) or, with
        ``maximum``, setmaxmem (the definition's ``<memory>``; never live)."""
        request = DomainMemoryRequest(domain=self.ref, kib=kib, maximum=maximum, live=live,
                                      config=config)  # fmt: skip
        await self.host.call(ops.DOMAIN_SET_MEMORY, request)

    async def set_autostart(self, enabled: bool = True) -> AutostartFlag:
        request = DomainAutostart(domain=self.ref, autostart=enabled)
        return await self.host.call(ops.DOMAIN_SET_AUTOSTART, request)

    async def info(self) -> DomainInfo:
        return await self.host.call(ops.DOMAIN_INFO, self._target)

    async def state(self) -> DomainStatus:
        return await self.host.call(ops.DOMAIN_STATE, self._target)

    async def xml(self, security_info: bool = False) -> str:
        """The domain XML; ``security_info``: with its secrets (graphics passwords), as
        ``domain.read_secure``, which the policy grants apart from reading."""
        op = ops.DOMAIN_READ_SECURE if security_info else ops.DOMAIN_XML
        return (await self.host.call(op, self._target)).xml

    async def stats(self, groups: list[StatsGroup] | None = None) -> dict[str, StatValue]:
        found = await self.host.stats([self.ref], groups)
        return next(iter(found.values()), {})

    async def migrate(
        self,
        to: str | None = None,
        params: MigrationParams | None = None,
        *,
        timeout: float | None = None,
    ) -> MigrationRecord:
        """Live-migrate through the scheduler (it places the domain without ``to``)."""
        return await self.host.client.scheduler.migrate(self.ref, to, params, timeout=timeout)

    def events(self, since: Since | None = None) -> AsyncGenerator[DomainEvent, None]:
        return self.host.client.events(host=self.host.name, domain=self.ref, since=since)

    # --- saved state (virDomainSave, virDomainManagedSave) ----------------------------
    async def save(self, file: str, *, running: bool = False, paused: bool = False) -> DomainStatus:
        """Save the guest's state to ``file`` on its host and stop it."""
        request = SaveRequest(domain=self.ref, file=file, running=running, paused=paused)
        return await self.host.call(ops.DOMAIN_SAVE, request)

    async def managed_save(self, *, running: bool = False, paused: bool = False) -> DomainStatus:
        request = ManagedSaveRequest(domain=self.ref, running=running, paused=paused)
        return await self.host.call(ops.DOMAIN_MANAGED_SAVE, request)

    async def managed_save_remove(self) -> DomainStatus:
        return await self.host.call(ops.DOMAIN_MANAGED_SAVE_REMOVE, self._target)

    # --- block jobs (libvirt's virDomainBlockCommit/BlockPull/BlockJob*) ------------
    async def block_commit(
        self, disk: str, *, base: str | None = None, top: str | None = None,
        active: bool = False, shallow: bool = False, bandwidth: int = 0,
    ) -> BlockJobInfo:  # fmt: skip
        """Start merging ``top`` (default: the active layer, with ``active``) into ``base``."""
        request = BlockCommit(domain=self.ref, disk=disk, base=base, top=top, active=active,
                              shallow=shallow, bandwidth=bandwidth)  # fmt: skip
        return await self.host.call(ops.DOMAIN_BLOCK_COMMIT, request)

    async def block_pull(
        self, disk: str, *, base: str | None = None, bandwidth: int = 0
    ) -> BlockJobInfo:
        request = BlockPull(domain=self.ref, disk=disk, base=base, bandwidth=bandwidth)
        return await self.host.call(ops.DOMAIN_BLOCK_PULL, request)

    async def block_copy(
        self, disk: str, dest: str, *, format: Literal["qcow2", "raw"] = "qcow2",
        shallow: bool = False, bandwidth: int = 0,
    ) -> BlockJobInfo:  # fmt: skip
        """Start mirroring ``disk`` onto a new image ``dest``; pivot or abort once ready."""
        request = BlockCopy(domain=self.ref, disk=disk, dest=dest, format=format,
                            shallow=shallow, bandwidth=bandwidth)  # fmt: skip
        return await self.host.call(ops.DOMAIN_BLOCK_COPY, request)

    async def block_job(self, disk: str) -> BlockJobInfo | None:
        """The disk's block job with its progress; None when it has none."""
        return (await self.block_job_state(disk)).job

    async def block_job_state(self, disk: str) -> BlockJobState:
        """The disk's block job, and how its last one ended."""
        request = BlockTarget(domain=self.ref, disk=disk)
        return await self.host.call(ops.DOMAIN_BLOCK_JOB_INFO, request)

    async def block_job_abort(self, disk: str, *, pivot: bool = False) -> None:
        """Cancel the disk's job, or pivot a ready active commit; returns once it ended."""
        request = BlockJobAbort(domain=self.ref, disk=disk, pivot=pivot)
        await self.host.call(ops.DOMAIN_BLOCK_JOB_ABORT, request)

    async def block_job_speed(self, disk: str, bandwidth: int) -> BlockJobInfo | None:
        request = BlockJobSpeed(domain=self.ref, disk=disk, bandwidth=bandwidth)
        return (await self.host.call(ops.DOMAIN_BLOCK_JOB_SPEED, request)).job

    async def block_errors(self) -> list[BlockError]:
        return (await self.host.call(ops.DOMAIN_BLOCK_ERRORS, self._target)).errors

    # --- snapshots (libvirt's virDomainSnapshot*) ----------------------------------
    async def snapshot_create(
        self, xml: str | None = None, *, disk_only: bool = False, quiesce: bool = False,
        halt: bool = False, live: bool = False,
    ) -> SnapshotInfo:  # fmt: skip
        """Take a snapshot from ``<domainsnapshot>`` XML (None: defaults); ``disk_only``:
        external, onto new qcow2 overlays; ``quiesce``: through the guest agent; ``halt``:
        stop the domain afterwards; ``live``: external memory without pausing first."""
        request = SnapshotCreate(domain=self.ref, xml=xml, disk_only=disk_only, quiesce=quiesce,
                                 halt=halt, live=live)  # fmt: skip
        return await self.host.call(ops.DOMAIN_SNAPSHOT_CREATE, request)

    async def snapshots(self) -> list[SnapshotInfo]:
        return (await self.host.call(ops.DOMAIN_SNAPSHOT_LIST, self._target)).snapshots

    async def snapshot(self, name: str) -> SnapshotInfo:
        request = SnapshotTarget(domain=self.ref, snapshot=name)
        return await self.host.call(ops.DOMAIN_SNAPSHOT_INFO, request)

    async def snapshot_current(self) -> SnapshotInfo:
        return await self.host.call(ops.DOMAIN_SNAPSHOT_CURRENT, self._target)

    async def snapshot_xml(self, name: str, *, security_info: bool = False) -> str:
        """The ``<domainsnapshot>``; ``security_info``: its domain's secrets included
        (graphics passwords), which needs ``domain.read_secure`` as dumpxml's do."""
        request = SnapshotXmlRequest(domain=self.ref, snapshot=name, security_info=security_info)
        return (await self.host.call(ops.DOMAIN_SNAPSHOT_XML, request)).xml

    async def snapshot_revert(
        self, name: str, *, running: bool = False, paused: bool = False
    ) -> DomainStatus:
        request = SnapshotRevert(domain=self.ref, snapshot=name, running=running, paused=paused)
        return await self.host.call(ops.DOMAIN_SNAPSHOT_REVERT, request)

    async def snapshot_delete(
        self, name: str, *, children: bool = False, children_only: bool = False,
        metadata: bool = False,
    ) -> list[str]:  # fmt: skip
        """Delete a snapshot (and its descendants with ``children``); the names deleted."""
        request = SnapshotDelete(domain=self.ref, snapshot=name, children=children,
                                 children_only=children_only, metadata=metadata)  # fmt: skip
        return (await self.host.call(ops.DOMAIN_SNAPSHOT_DELETE, request)).deleted

    # --- checkpoints and backups (libvirt's virDomainCheckpoint*, virDomainBackup*) -----
    async def checkpoint_create(self, xml: str | None = None) -> CheckpointInfo:
        """Create a checkpoint from ``<domaincheckpoint>`` XML (None: defaults)."""
        request = CheckpointCreate(domain=self.ref, xml=xml)
        return await self.host.call(ops.DOMAIN_CHECKPOINT_CREATE, request)

    async def checkpoints(self) -> list[CheckpointInfo]:
        return (await self.host.call(ops.DOMAIN_CHECKPOINT_LIST, self._target)).checkpoints

    async def checkpoint(self, name: str) -> CheckpointInfo:
        request = CheckpointTarget(domain=self.ref, checkpoint=name)
        return await self.host.call(ops.DOMAIN_CHECKPOINT_INFO, request)

    async def checkpoint_xml(self, name: str) -> str:
        request = CheckpointTarget(domain=self.ref, checkpoint=name)
        return (await self.host.call(ops.DOMAIN_CHECKPOINT_XML, request)).xml

    async def checkpoint_delete(self, name: str, *, metadata: bool = False) -> list[str]:
        request = CheckpointDelete(domain=self.ref, checkpoint=name, metadata=metadata)
        return (await self.host.call(ops.DOMAIN_CHECKPOINT_DELETE, request)).deleted

    async def backup_begin(
        self, backup_xml: str | None = None, checkpoint_xml: str | None = None
    ) -> BackupStarted:
        """Start a push-mode backup (``<domainbackup>``; None: full, every disk), and a
        checkpoint at its instant with ``checkpoint_xml``; it ends with ``job_completed``."""
        request = BackupBegin(domain=self.ref, backup_xml=backup_xml,
                              checkpoint_xml=checkpoint_xml)  # fmt: skip
        return await self.host.call(ops.DOMAIN_BACKUP_BEGIN, request)

    async def backup_xml(self) -> str:
        return (await self.host.call(ops.DOMAIN_BACKUP_XML, self._target)).xml

    async def job_info(self, *, completed: bool = False) -> DomainJobInfo:
        request = JobInfoRequest(domain=self.ref, completed=completed)
        return await self.host.call(ops.DOMAIN_JOB_INFO, request)

    async def job_abort(self) -> DomainJobInfo:
        return await self.host.call(ops.DOMAIN_JOB_ABORT, self._target)


class Scheduler:
    """The active scheduler: the cluster view, placement, migrations, drains."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def call(
        self, op: Op[Req, Res], request: Req | None = None, *, timeout: float | None = None
    ) -> Res:
        return await self.client.scheduler_call(op, request, timeout=timeout)

    async def ping(self, timeout: float | None = None) -> SchedulerPing:
        return await self.call(ops.SCHEDULER_PING, SchedulerPingRequest(), timeout=timeout)

    async def hosts(self) -> list[ClusterHost]:
        return (await self.call(ops.SCHEDULER_HOSTS, Empty())).hosts

    async def domains(self, all: bool = False) -> tuple[list[ClusterDomain], list[str]]:
        """Domains of every host that is up, and the hosts that did not answer."""
        found = await self.call(ops.SCHEDULER_DOMAINS, ClusterDomainsRequest(all=all))
        return found.domains, found.unreachable

    async def place(self, xml: str) -> str:
        return (await self.call(ops.SCHEDULER_PLACE, PlaceRequest(xml=xml))).host

    async def define(self, xml: str) -> PlacedDomain:
        """Place, claim and define a domain."""
        return await self.call(ops.SCHEDULER_DEFINE, PlaceRequest(xml=xml))

    async def define_network(self, xml: str) -> ClusterNetwork:
        """A cluster network: defined and started on every host, joined by VXLAN."""
        return await self.call(ops.SCHEDULER_NETWORK_DEFINE, PlaceRequest(xml=xml))

    async def networks(self) -> list[ClusterNetwork]:
        return (await self.call(ops.SCHEDULER_NETWORKS, Empty())).networks

    async def undefine_network(self, name: str) -> None:
        await self.call(ops.SCHEDULER_NETWORK_UNDEFINE, ClusterNetworkTarget(network=name))

    async def migrate(
        self,
        domain: str,
        to: str | None = None,
        params: MigrationParams | None = None,
        *,
        timeout: float | None = None,
        xml: str | None = None,
    ) -> MigrationRecord:
        """Live-migrate ``domain``; ``xml``: the destination's definition (virsh migrate
        --xml: other host paths, same name and uuid)."""
        request = MigrateRequest(
            domain=domain, to=to, params=params or MigrationParams(), timeout=timeout, xml=xml
        )
        return await self.call(ops.SCHEDULER_MIGRATE, request)

    async def migration(
        self,
        ref: str,
        *,
        wait: float | None = None,
        seen: MigrationRecord | None = None,
    ) -> MigrationRecord:
        """A migration's record by id or domain; ``wait``: a long poll (see the op)."""
        request = MigrationQuery(domain=ref, wait=wait, seen=seen)
        deadline = None if wait is None else max(self.client.timeout, wait + 5)
        return await self.call(ops.SCHEDULER_MIGRATION, request, timeout=deadline)

    async def follow(self, ref: str) -> AsyncIterator[MigrationRecord]:
        """Each change of a migration's record until it ends (the last one yielded)."""
        record = await self.migration(ref)
        yield record
        while record.state not in TERMINAL_STATES:
            fresh = await self.migration(record.id, wait=FOLLOW_POLL, seen=record)
            if fresh != record:
                record = fresh
                yield record

    async def migrations(self) -> list[MigrationRecord]:
        return (await self.call(ops.SCHEDULER_MIGRATIONS, Empty())).migrations

    async def cancel_migration(self, domain: str) -> MigrationRecord:
        return await self.call(ops.SCHEDULER_MIGRATE_CANCEL, CancelRequest(domain=domain))

    async def migrate_offline(self, domain: str, to: str | None = None) -> OfflineMigration:
        """Move a shut-off domain's definition (placed by the filters without ``to``)."""
        return await self.call(
            ops.SCHEDULER_MIGRATE_OFFLINE, OfflineMigrateRequest(domain=domain, to=to)
        )

    async def drain(
        self,
        host: str,
        params: MigrationParams | None = None,
        *,
        timeout: float | None = None,
        stop_containers: bool = False,
    ) -> DrainStatus:
        """Live-migrate every running domain off ``host``; containers stay unless
        ``stop_containers`` (they are shut down, moved offline and started elsewhere)."""
        request = DrainRequest(
            host=host, params=params or MigrationParams(), timeout=timeout,
            stop_containers=stop_containers,
        )  # fmt: skip
        return await self.call(ops.SCHEDULER_DRAIN, request)

    async def drain_status(self, host: str) -> DrainStatus:
        return await self.call(ops.SCHEDULER_DRAIN_STATUS, HostRequest(host=host))

    async def undrain(self, host: str) -> DrainFlag:
        return await self.call(ops.SCHEDULER_UNDRAIN, HostRequest(host=host))
