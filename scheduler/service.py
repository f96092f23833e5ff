"""The scheduler service: serves ``scheduler.*`` ops, keeps the view, runs migrations.

Active/standby: the scheduler queue has a single active consumer, so when two schedulers
run, RabbitMQ delivers calls to one of them only. A scheduler learns that it is the
active one when it receives a call; a standby keeps probing the queue with its own
``scheduler.ping`` so that it notices a takeover even when no client is calling. Only the
active scheduler resolves the journal and drives migrations; a standby keeps its cluster
view warm from heartbeats, so a takeover answers at once.

Every body that reaches the scheduler is checked by its declared type where it enters:
calls (``INVALID_ARG`` naming the field), heartbeats (a malformed one is dropped: any bus
client can publish) and agents' answers (``RPC_ERROR``, handled like a failed call).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from scheduler.drain import CONTAINER_TYPES, DrainManager
from scheduler.inventory import Claim, ClusterView, DomainMeta
from scheduler.journal import BusJournal, Journal, MigrationRecord
from scheduler.migration import MigrationCoordinator
from scheduler.networks import ClusterNetworks
from scheduler.offline import OfflineMover
from scheduler.placement import place, request_for
from scheduler.settings import SchedulerSettings
from virtbus.aio import TaskGroup, forget
from virtbus.bus.base import Bus, Server, Subscription
from virtbus.bus.rpc import settle
from virtbus.bus.topology import (
    AUDIT_EXCHANGE,
    EVENTS_EXCHANGE,
    HEARTBEAT_KEY_SUFFIX,
    HOSTS_EXCHANGE,
    SCHEDULER_ROUTE,
)
from virtbus.domain import parse_domain_xml
from virtbus.errors import (
    ConfigUnsupported,
    InvalidArgument,
    NoDomainError,
    NoHostError,
    NoSupport,
    OperationInvalid,
    OperationTimeout,
    VirtbusError,
)
from virtbus.protocol import ops
from virtbus.protocol.base import Accepted, Empty, Message, decode, to_wire
from virtbus.protocol.domain import (
    DomainDefine,
    DomainInfo,
    DomainListRequest,
    DomainShutdown,
    DomainTarget,
    DomainXml,
    StateName,
)
from virtbus.protocol.envelope import Envelope, Kind, ok_body
from virtbus.protocol.host import DrainFlag, HostInventory, SetDraining
from virtbus.protocol.messages import DomainEvent
from virtbus.protocol.migration import MigrationParams, RecordState
from virtbus.protocol.migration import MigrationRecord as MigrationRecordMessage
from virtbus.protocol.registry import Op, Service
from virtbus.protocol.scheduler import (
    CancelRequest,
    ClusterDomain,
    ClusterDomains,
    ClusterDomainsRequest,
    ClusterHosts,
    ClusterNetwork,
    ClusterNetworkTarget,
    DrainDomain,
    DrainRequest,
    DrainStatus,
    HostRequest,
    MigrateRequest,
    MigrationBrief,
    MigrationList,
    MigrationQuery,
    OfflineMigrateRequest,
    OfflineMigration,
    PlacedDomain,
    Placement,
    PlaceRequest,
    SchedulerPing,
    SchedulerPingRequest,
)
from virtbus.protocol.scheduler import ClusterNetworks as ClusterNetworksList
from virtbus.security.audit import AuditTrail
from virtbus.security.authz import Authorizer, no_user

log = logging.getLogger(__name__)

Req = TypeVar("Req", bound=Message)
Res = TypeVar("Res", bound=Message)
OpHandler = Callable[[Any], Awaitable[Message]]
ACTIVE_STATES = frozenset({StateName.RUNNING, StateName.PAUSED, StateName.BLOCKED})
# Hosts refreshed at once (see SchedulerService._refresh_slots).
REFRESH_CONCURRENCY = 32
# Ops answered before the journal is resolved (they touch no migration).
_EARLY_OPS = frozenset({ops.SCHEDULER_PING, ops.SCHEDULER_HOSTS, ops.SCHEDULER_DOMAINS})


class SchedulerService:
    def __init__(self, settings: SchedulerSettings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.id = f"scheduler-{uuidlib.uuid4().hex[:8]}"
        self.view = ClusterView(settings.host_down_after)
        # On the bus (a cluster replicates it); the state dir keeps only a local cache.
        self.journal = BusJournal(bus, Journal(settings.state_dir, fsync=settings.journal_fsync))
        self._tasks = TaskGroup("scheduler", on_crash=self._task_crashed)
        self.coordinator = MigrationCoordinator(
            self._agent_call, self.view, self.journal, settings, self._tasks
        )
        self.drains = DrainManager(self.coordinator)
        self.offline = OfflineMover(self._agent_call, self.view, self._defined_on,
                                    settings.placement, settings.step_timeout)  # fmt: skip
        self.networks = ClusterNetworks(self.journal, self.view, self._agent_call,
                                        self._tasks, settings.step_timeout)  # fmt: skip
        self.authz = Authorizer.load(settings.policy, bus.user)  # who may call what
        self.audit = AuditTrail(
            settings.state_dir / "audit.log",
            "scheduler",
            max_bytes=settings.audit_max_bytes,
            keep=settings.audit_keep,
            publish=lambda key, env: self.bus.publish(AUDIT_EXCHANGE, key, env),
        )
        self._targets: dict[str, str | None] = {}  # call id -> its target, for the audit
        self.active = False
        self.ready = asyncio.Event()  # active and the journal resolved
        self.failed = asyncio.Event()
        self._server: Server | None = None
        self._subs: list[Subscription] = []
        self._refreshing: set[str] = set()
        # Hosts whose last refresh failed (a timeout in a cold start's stampede): asked
        # again at their next heartbeat, which alone would not say that anything changed.
        self._stale: set[str] = set()
        # Refreshes at once: a cold start asks every host for its domains (domain.list,
        # then domain.xml of each new one); unbounded, 1,000 hosts' calls queue at the
        # agents past fanout_timeout and the view never converges.
        self._refresh_slots = asyncio.Semaphore(REFRESH_CONCURRENCY)
        self._flagging: set[str] = set()  # hosts with a drain-flag call in flight
        self._ops: dict[str, OpHandler] = {
            ops.SCHEDULER_PING: self._ping,
            ops.SCHEDULER_HOSTS: self._hosts,
            ops.SCHEDULER_DOMAINS: self._domains,
            ops.SCHEDULER_PLACE: self._place,
            ops.SCHEDULER_DEFINE: self._define,
            ops.SCHEDULER_MIGRATE: self._migrate,
            ops.SCHEDULER_MIGRATION: self._migration,
            ops.SCHEDULER_MIGRATIONS: self._migrations,
            ops.SCHEDULER_MIGRATE_CANCEL: self._migrate_cancel,
            ops.SCHEDULER_MIGRATE_OFFLINE: self._migrate_offline,
            ops.SCHEDULER_DRAIN: self._drain,
            ops.SCHEDULER_DRAIN_STATUS: self._drain_status,
            ops.SCHEDULER_UNDRAIN: self._undrain,
            ops.SCHEDULER_NETWORK_DEFINE: self._network_define,
            ops.SCHEDULER_NETWORKS: self._networks,
            ops.SCHEDULER_NETWORK_UNDEFINE: self._network_undefine,
        }

    # --- lifecycle ------------------------------------------------------------------
    def _task_crashed(self, name: str, exc: BaseException) -> None:
        log.error("scheduler task %s died (%r): stopping", name, exc)
        self.failed.set()

    async def start(self) -> None:
        await self.journal.open()
        await self.bus.connect()
        heartbeats = await self.bus.subscribe(HOSTS_EXCHANGE, [f"*.{HEARTBEAT_KEY_SUFFIX}"])
        events = await self.bus.subscribe(EVENTS_EXCHANGE, ["*.*.migration"])
        self._subs = [heartbeats, events]
        self._tasks.spawn(self._heartbeat_loop(heartbeats), name="heartbeats")
        self._tasks.spawn(self._event_loop(events), name="migration-events")
        self._tasks.spawn(self.audit.run(), name="audit")
        self._server = await self.bus.serve(SCHEDULER_ROUTE, self._handle)
        self._tasks.spawn(self._leader_probe(), name="leader-probe")
        log.info("scheduler %s serving (active once the queue delivers to it)", self.id)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None
        await self.audit.flush()
        await self._tasks.cancel_all()  # in-flight migrations stay journaled
        for sub in self._subs:
            await sub.close()
        await self.bus.close()

    async def _leader_probe(self) -> None:
        while not self.active:
            with contextlib.suppress(VirtbusError):  # nobody answered yet: keep probing
                await self.bus.call(
                    SCHEDULER_ROUTE,
                    ops.SCHEDULER_PING,
                    {"probe": self.id},
                    timeout=self.settings.leader_probe,
                )
            if not self.active:
                await asyncio.sleep(self.settings.leader_probe)

    def _activate(self) -> None:
        if not self.active:
            self.active = True
            self._tasks.spawn(self._become_active(), name="activate")

    async def _become_active(self) -> None:
        log.info("scheduler %s is the active scheduler: resolving the journal", self.id)
        self.view.draining |= await self.journal.load_draining()
        await self.coordinator.recover(await self.journal.load())
        await self.networks.load()  # before any heartbeat drives them (ready)
        self.ready.set()

    # --- calls ----------------------------------------------------------------------
    def _handle(self, call: Envelope) -> Awaitable[dict[str, Any]]:
        self._activate()  # the queue delivered to us: we are the active consumer
        return self._audited(call, time.monotonic())

    async def _audited(self, call: Envelope, started: float) -> dict[str, Any]:
        body = await settle(self._answer(call), call.op)
        target = self._targets.pop(call.id, None)
        self.audit.record(call, target, body, time.monotonic() - started)
        return body

    async def _answer(self, call: Envelope) -> dict[str, Any]:
        if not call.user:
            raise no_user(call.op)
        op = ops.lookup(call.op)
        handler = self._ops.get(op)
        if op.service is not Service.SCHEDULER or handler is None:
            raise NoSupport(f"'{call.op}' is not a scheduler op")
        request = op.decode_request(call.body)
        # The scheduler's own ops name a host only when the request does (a drain).
        host = getattr(request, "host", None)
        self._targets[call.id] = op.target_of(request)
        self.authz.check(call.user, op, host if isinstance(host, str) else "scheduler",
                         op.target_of(request))  # fmt: skip
        if op not in _EARLY_OPS:
            await self.ready.wait()
        return ok_body(to_wire(await handler(request)))

    async def _agent_call(self, host: str, op: Op[Req, Res], request: Req, timeout: float) -> Res:
        """One agent op; its answer is checked as the op's result type (RPC_ERROR)."""
        result = await self.bus.call(ops.agent_route(host), op, to_wire(request), timeout=timeout)
        return op.decode_result(result)

    # --- the view -------------------------------------------------------------------
    async def _heartbeat_loop(self, sub: Subscription) -> None:
        async for env in sub:
            if env.kind != Kind.HEARTBEAT:
                continue
            try:
                inv = decode(env.body, HostInventory)
            except InvalidArgument as exc:  # any bus client can publish: never let it stop us
                host = env.body.get("host")
                log.warning("dropped a heartbeat of host %r from %r: %s", host, env.src, exc)
                continue
            host = inv.host
            if not self.authz.speaks_for(env.user, host):  # a forged heartbeat: never believed
                log.warning("dropped a heartbeat of host %r sent by user %r", host, env.user)
                continue
            if self.view.observe_heartbeat(inv) or host in self._stale:
                self._refresh_soon(host)
            self.coordinator.cleanups.host_alive(host)  # retry what it still owes at once
            if self.ready.is_set():
                self.networks.observe(inv)
            if (
                self.active
                and self.view.drain_intended(host)
                and not inv.draining
                and host not in self._flagging
            ):
                self._flagging.add(host)  # one call in flight per host, not one per heartbeat
                self._tasks.spawn(self._flag_draining(host), name=f"drain-flag:{host}")

    async def _flag_draining(self, host: str) -> None:
        try:
            await self._tell_draining(host, True)
        finally:
            self._flagging.discard(host)

    async def _event_loop(self, sub: Subscription) -> None:
        async for env in sub:
            if env.kind != Kind.EVENT or env.body.get("event") != "migration":
                continue
            try:
                event = decode(env.body, DomainEvent)
            except InvalidArgument as exc:
                log.warning("dropped a migration event from %r: %s", env.src, exc)
                continue
            if not self.authz.speaks_for(env.user, event.host):
                log.warning("dropped a migration event of %r sent by %r", event.host, env.user)
                continue
            self.coordinator.on_event(event)

    def _refresh_soon(self, host: str) -> None:
        if host not in self._refreshing:
            self._refreshing.add(host)
            self._tasks.spawn(self._refresh(host), name=f"refresh:{host}")

    async def _refresh(self, host: str) -> list[DomainInfo] | None:
        """Ask a host for its domains (and the metadata of new ones); None when it is silent."""
        t = self.settings.fanout_timeout
        try:
            async with self._refresh_slots:
                listing = await self._agent_call(host, ops.DOMAIN_LIST, DomainListRequest(), t)
                domains = listing.domains
                unknown = self.view.observe_domains(host, domains)
                for d in domains:  # the agent says their groups: no definition to fetch
                    if d.groups is not None:
                        self.view.observe_meta(DomainMeta(d.name, d.uuid, frozenset(d.groups)))
                for uuid in unknown:  # only from an agent too old to say: its definition
                    if uuid in self.view.meta:
                        continue
                    target = DomainTarget(domain=uuid)
                    reply = await self._agent_call(host, ops.DOMAIN_XML, target, t)
                    defn = parse_domain_xml(reply.xml)
                    self.view.observe_meta(DomainMeta(defn.name, uuid, defn.placement_groups))
            self._stale.discard(host)
            return domains
        except VirtbusError as exc:
            log.info("host %s did not list its domains: %s (asked again at its next"
                     " heartbeat)", host, exc)  # fmt: skip
            self._stale.add(host)
            return None
        finally:
            self._refreshing.discard(host)

    async def _tell_draining(self, host: str, draining: bool) -> None:
        try:
            await self._agent_call(
                host,
                ops.HOST_SET_DRAINING,
                SetDraining(draining=draining),
                self.settings.step_timeout,
            )
        except VirtbusError as exc:
            log.warning(
                "could not tell %s it is %sdraining: %s", host, "" if draining else "not ", exc
            )

    def _up_hosts(self) -> list[str]:
        return [h for h in sorted(self.view.hosts) if self.view.is_up(h)]

    # --- ops ------------------------------------------------------------------------
    async def _network_define(self, req: PlaceRequest) -> ClusterNetwork:
        return await self.networks.define(req.xml)

    async def _networks(self, req: Empty) -> ClusterNetworksList:
        return ClusterNetworksList(
            networks=[self.networks.describe(r) for r in self.networks.records.values()]
        )

    async def _network_undefine(self, req: ClusterNetworkTarget) -> Accepted:
        await self.networks.undefine(req.network)
        return Accepted()

    async def _ping(self, req: SchedulerPingRequest) -> SchedulerPing:
        return SchedulerPing(scheduler=self.id, active=self.active, ready=self.ready.is_set())

    async def _hosts(self, req: Empty) -> ClusterHosts:
        now = time.monotonic()
        active = list(self.coordinator.active.values())
        rows = []
        for host in sorted(self.view.hosts):
            row = self.view.host_view(host, now)
            if row is None:
                continue
            row.migrations_out = sum(r.source == host for r in active)
            row.migrations_in = sum(r.destination == host for r in active)
            rows.append(row)
        return ClusterHosts(scheduler=self.id, hosts=rows)

    async def _domains(self, req: ClusterDomainsRequest) -> ClusterDomains:
        hosts = self._up_hosts()
        results = await asyncio.gather(*(self._refresh(h) for h in hosts))
        out, silent = [], []
        for host, domains in zip(hosts, results, strict=True):
            if domains is None:
                silent.append(host)
                continue
            for info in domains:
                if not req.all and info.state == StateName.SHUTOFF:
                    continue
                row = ClusterDomain(**msgspec.structs.asdict(info), host=host)
                rec = self.coordinator.for_domain(info.uuid)
                if rec is not None and not rec.terminal:
                    row.migration = MigrationBrief(
                        id=rec.id,
                        state=rec.state,
                        phase=rec.phase,
                        source=rec.source,
                        destination=rec.destination,
                    )
                out.append(row)
        out.sort(key=lambda d: (d.host, d.name))
        return ClusterDomains(domains=out, unreachable=silent)

    async def _place(self, req: PlaceRequest) -> Placement:
        defn = parse_domain_xml(req.xml)
        chosen = self.view.place(request_for(defn), self.settings.placement)
        return Placement(host=chosen.name)

    async def _define(self, req: PlaceRequest) -> PlacedDomain:
        defn = parse_domain_xml(req.xml)
        groups = defn.placement_groups
        host = self.view.place(request_for(defn), self.settings.placement).name
        self._claim(host, defn.uuid, defn.name, defn.current_memory_kib, defn.current_vcpus, groups)
        try:
            result = await self._agent_call(
                host, ops.DOMAIN_DEFINE, DomainDefine(xml=req.xml), self.settings.step_timeout
            )
        except VirtbusError:
            self.view.release(host, defn.uuid)
            raise
        self.view.observe_meta(DomainMeta(result.name, result.uuid, groups))
        self.view.add_domain(
            host,
            DomainInfo(
                name=result.name, uuid=result.uuid, id=None, state=StateName.SHUTOFF,
                state_code=5, reason="unknown", max_memory_kib=defn.memory_kib,
                memory_kib=defn.current_memory_kib, vcpus=defn.current_vcpus,
            ),
        )  # fmt: skip
        return PlacedDomain(host=host, name=result.name, uuid=result.uuid)

    def _claim(
        self, host: str, uuid: str, name: str, memory: int, vcpus: int, groups: frozenset[str]
    ) -> None:
        expires = time.monotonic() + self.settings.claim_ttl
        self.view.claim(host, Claim(uuid, name, memory, vcpus, groups, expires))

    async def _migrate(self, req: MigrateRequest) -> MigrationRecordMessage:
        record = await self.start_migration(
            req.domain, req.to, req.params, req.timeout, destination_xml=req.xml
        )
        return record.to_wire()

    async def start_migration(
        self,
        ref: str,
        to: str | None,
        params: MigrationParams,
        timeout: float | None,
        drain: str | None = None,
        destination_xml: str | None = None,
    ) -> MigrationRecord:
        """Find the domain, place it (or check ``to``), claim, journal, start.
        ``destination_xml`` replaces the source's definition at the destination."""
        t = self.settings.step_timeout
        # With its secrets (graphics passwords): the destination starts this definition.
        secure = ops.DOMAIN_READ_SECURE
        known = [(h, i.uuid) for h, i in self.view.hosts_with(ref) if self.view.is_up(h)]
        early: asyncio.Future[DomainXml] | None = None
        if len(known) == 1:  # the usual case: its XML is read while its state is checked
            early = asyncio.ensure_future(
                self._agent_call(known[0][0], secure, DomainTarget(domain=known[0][1]), t)
            )
        try:
            source, info = await self._locate(ref)
            if self.coordinator.busy(info.uuid):
                raise OperationInvalid(f"domain '{info.name}' is already migrating")
        except BaseException:
            forget(early)
            raise
        if early is not None and known[0] != (source, info.uuid):  # it was not that one
            forget(early)
            early = None
        if early is not None:
            reply = await early
        else:
            reply = await self._agent_call(source, secure, DomainTarget(domain=info.uuid), t)
        defn = parse_domain_xml(reply.xml)
        defn.root.attrib.pop("id", None)  # the running id: not part of a definition
        xml = defn.to_xml()
        if destination_xml is not None:
            xml = _destination_definition(defn.name, defn.uuid, destination_xml)
        src = self.view.candidate(source)
        if src is None:
            raise NoHostError(f"source host '{source}' has sent no heartbeat")
        if defn.hv_type in CONTAINER_TYPES or src.driver in CONTAINER_TYPES:
            raise NoSupport(
                f"domain '{defn.name}' is a container: containers cannot migrate live (nor"
                " with libvirt's LXC driver); shut it off and use `virtbus migrate --offline`"
            )
        req = request_for(defn, source=src)
        if to is not None:
            if to == source:
                raise InvalidArgument(f"domain '{defn.name}' already runs on {to}")
            if to not in self.view.hosts:
                raise NoHostError(f"unknown host '{to}'")
            there = self.view.candidate(to)
            destination = place(req, [] if there is None else [there], self.settings.placement).name
        else:
            destination = self.view.place(req, self.settings.placement).name
        if params.listen_address is None:
            inv = self.view.hosts[destination].inventory
            address = inv.migration_address if inv is not None else ""
            if address:
                params = msgspec.structs.replace(params, listen_address=address)
        self._claim(destination, defn.uuid, defn.name, req.memory_kib, req.vcpus, req.groups)
        record = MigrationRecord(
            domain=defn.name,
            uuid=defn.uuid,
            source=source,
            destination=destination,
            params=params,
            timeout=float(timeout or self.settings.migration_timeout),
            drain=drain,
        )
        try:
            return await self.coordinator.submit(record, xml)
        except VirtbusError:
            self.view.release(destination, defn.uuid)
            raise

    async def _locate(self, ref: str) -> tuple[str, DomainInfo]:
        """The one up host where ``ref`` is active (a persistent, running or paused domain)."""
        found = [(h, i) for h, i in self.view.hosts_with(ref) if self.view.is_up(h)]
        if not found:
            await asyncio.gather(*(self._refresh(h) for h in self._up_hosts()))
            found = [(h, i) for h, i in self.view.hosts_with(ref) if self.view.is_up(h)]
        if not found:
            raise NoDomainError(f"domain '{ref}' is not defined on any host that is up")
        fresh = []
        for host, info in found:
            try:
                now = await self._agent_call(
                    host,
                    ops.DOMAIN_INFO,
                    DomainTarget(domain=info.uuid),
                    self.settings.step_timeout,
                )
            except (NoDomainError, OperationTimeout):
                continue
            if now.state in ACTIVE_STATES and now.persistent:
                fresh.append((host, now))
        if not fresh:
            raise OperationInvalid(f"domain '{ref}' is not running")
        if len(fresh) > 1:
            where = ", ".join(h for h, _ in fresh)
            raise OperationInvalid(f"domain '{ref}' is active on several hosts ({where})")
        return fresh[0]

    async def _migration(self, req: MigrationQuery) -> MigrationRecordMessage:
        """One migration's record; with ``wait`` (s), a long poll: answered when it changes
        (phase, state, progress) or after ``wait``, so a follower needs no polling loop.
        ``seen`` is the record the follower last got: if it already differs, the answer is
        immediate (a change between two polls is never missed)."""
        ref = req.id or req.domain
        if ref is None:
            raise InvalidArgument("'id' or 'domain' is required")
        record = self.coordinator.for_domain(ref)
        if record is None:
            raise NoDomainError(f"no migration known for '{ref}'")
        if req.wait is not None and req.seen in (None, record.to_wire()):
            await self.coordinator.wait_change(record, min(req.wait, self.settings.long_poll_max))
        return record.to_wire()

    async def _migrations(self, req: Empty) -> MigrationList:
        records = [*self.coordinator.active.values(), *self.coordinator.history]
        return MigrationList(migrations=[r.to_wire() for r in records])

    async def _migrate_cancel(self, req: CancelRequest) -> MigrationRecordMessage:
        return self.coordinator.cancel(req.domain).to_wire()

    async def _migrate_offline(self, req: OfflineMigrateRequest) -> OfflineMigration:
        found = await self._defined_on(req.domain)
        if found and self.coordinator.busy(found[0][1].uuid):
            raise OperationInvalid(f"domain '{req.domain}' is migrating")
        return await self.offline.move(req.domain, req.to)

    async def _defined_on(self, ref: str) -> list[tuple[str, DomainInfo]]:
        """(host, DomainInfo) of every up host that has ``ref`` defined."""
        found = [(h, i) for h, i in self.view.hosts_with(ref) if self.view.is_up(h)]
        if not found:
            await asyncio.gather(*(self._refresh(h) for h in self._up_hosts()))
            found = [(h, i) for h, i in self.view.hosts_with(ref) if self.view.is_up(h)]
        return found

    async def _move_container(self, uuid: str, host: str, row: DrainDomain) -> None:
        """A drain with stop_containers: shut it down (destroy it if it does not stop in
        time), move its definition offline, start it on its new host."""
        t, grace = self.settings.step_timeout, self.settings.container_stop_timeout
        target = DomainTarget(domain=uuid)
        try:
            row.state = "stopping"
            try:
                stop = DomainShutdown(domain=uuid, timeout=grace)
                await self._agent_call(host, ops.DOMAIN_SHUTDOWN, stop, grace + t)
            except OperationTimeout:
                await self._agent_call(host, ops.DOMAIN_DESTROY, target, t)
            row.state = "moving"
            moved = await self.offline.move(uuid, None)
            row.destination = moved.destination
            row.state = "starting"
            await self._agent_call(moved.destination, ops.DOMAIN_START, target, t)
            row.state, row.error = RecordState.COMPLETED, None
        except VirtbusError as exc:
            log.warning("drain of %s: container %s: %s", host, uuid, exc)
            row.state, row.error = RecordState.FAILED, str(exc)

    def _known_host(self, host: str) -> str:
        if host not in self.view.hosts:
            raise NoHostError(f"unknown host '{host}' (no heartbeat heard)")
        return host

    async def _drain(self, req: DrainRequest) -> DrainStatus:
        host = self._known_host(req.host)
        self.view.set_draining(host, True)
        await self.journal.save_draining(set(self.view.draining))
        await self._tell_draining(host, True)
        listing = await self._agent_call(
            host, ops.DOMAIN_LIST, DomainListRequest(all=False), self.settings.fanout_timeout
        )
        running = [d for d in listing.domains if d.state in ACTIVE_STATES]

        async def start(uuid: str, drain_host: str) -> MigrationRecord:
            return await self.start_migration(uuid, None, req.params, req.timeout, drain=drain_host)

        job = await self.drains.drain(
            host, running, start,
            move_container=self._move_container if req.stop_containers else None,
            spawn=self._tasks.spawn,
        )  # fmt: skip
        return job.status(self.coordinator)

    async def _drain_status(self, req: HostRequest) -> DrainStatus:
        job = self.drains.status(req.host)
        if job is None:
            raise NoHostError(f"no drain of host '{req.host}' is known")
        return job.status(self.coordinator)

    async def _undrain(self, req: HostRequest) -> DrainFlag:
        host = self._known_host(req.host)
        self.view.set_draining(host, False)
        await self.journal.save_draining(set(self.view.draining))
        await self._tell_draining(host, False)
        self.view.reported_not_draining(host)  # until its next heartbeat shows it
        return DrainFlag(host=host, draining=False)


def _destination_definition(name: str, uuid: str, xml: str) -> str:
    """``virsh migrate --xml``: the definition the destination starts. Like libvirt's ABI
    check it must name the same domain; other host-side values (paths) may differ."""
    defn = parse_domain_xml(xml)  # XML_ERROR for a malformed file
    if defn.name != name:
        raise ConfigUnsupported(f"target domain name '{defn.name}' does not match source '{name}'")
    if defn.uuid != uuid:
        raise ConfigUnsupported(f"target domain uuid {defn.uuid} does not match source {uuid}")
    defn.root.attrib.pop("id", None)
    return defn.to_xml()
