"""The per-host agent: serves its call queue, publishes events and heartbeats.

Start order: the host's own state (outbox, pools, networks, the driver's reattach) while
the bus connects, then the outbox publisher, heartbeat, and last the call queue. Stop is
staged the other way round: stop taking calls and finish the ones in hand (bounded), stop
heartbeats, flush events (bounded), close the driver (guests keep running), close the bus.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from enum import Enum
from typing import Any

import agent.backup_ops
import agent.blockjob_ops
import agent.copy_storage
import agent.handlers
import agent.migration
import agent.network_ops
import agent.save_ops
import agent.snapshot_ops
import agent.storage_ops
from agent.admission import Admission
from agent.calllog import CallLog
from agent.dispatch import Dispatcher, Prepared
from agent.guest_taps import GuestTaps
from agent.heartbeat import inventory
from agent.jobs import Job, JobManager
from agent.metrics import AgentMetrics
from agent.network import NetworkEvent, Networks
from agent.outbox import EventOutbox
from agent.owners import CALLER, Owners, relation
from agent.statedisk import StateDisk
from agent.storage import PoolEvent, StoragePools
from agent.table import HANDLERS, AgentContext
from drivers.base import Driver, DriverEvent, UsesNetworks, UsesVolumes
from virtbus.aio import TaskGroup
from virtbus.bus.base import Bus, Server, WindowPublisher
from virtbus.bus.topology import (
    AUDIT_EXCHANGE,
    EVENTS_EXCHANGE,
    HEARTBEAT_KEY_SUFFIX,
    HOSTS_EXCHANGE,
)
from virtbus.domain import parse_domain_xml, with_owner
from virtbus.errors import NoSupport, OperationInvalid, VirtbusError
from virtbus.protocol import ops
from virtbus.protocol.base import Message, to_wire
from virtbus.protocol.domain import DomainDefine
from virtbus.protocol.envelope import Envelope, Kind
from virtbus.protocol.events import (
    event_routing_key,
    job_routing_key,
    network_routing_key,
    pool_routing_key,
    routing_key,
    routing_word,
)
from virtbus.protocol.host import HostInventory
from virtbus.protocol.messages import DomainEvent
from virtbus.protocol.migration import MigrationRef
from virtbus.protocol.network import NetworkEvent as NetworkEventMessage
from virtbus.protocol.network import NetworkSummary
from virtbus.protocol.registry import Access, Op, Service, Target
from virtbus.protocol.storage import JobEvent, PoolSummary
from virtbus.protocol.storage import PoolEvent as PoolEventMessage
from virtbus.security.audit import AuditTrail
from virtbus.security.authz import Authorizer, no_user
from virtbus.security.policy import Owner
from virtbus.settings import AgentSettings, BusSettings

log = logging.getLogger(__name__)


class AgentState(Enum):
    """The service's lifecycle: start once, stop any number of times."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class AgentService:
    def __init__(
        self,
        settings: AgentSettings,
        bus: Bus,
        driver: Driver,
        bus_settings: BusSettings | None = None,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.driver = driver
        self.host = settings.host
        self._bus_settings = bus_settings or BusSettings()
        self._started_at = time.time()
        self._server: Server | None = None
        self._tasks = TaskGroup(f"agent:{self.host}", on_crash=self._task_crashed)
        self.state_disk = StateDisk(settings.state_dir)
        self.outbox = EventOutbox(
            self._publish_event,
            disk=self.state_disk,
            path=settings.state_dir / "outbox" / "events.log",
            capacity=settings.event_buffer,
            retry=self._bus_settings.reconnect,
            rejected_max_bytes=settings.rejected_events_max_bytes,
            window=settings.event_publish_window,
            publish_window=(
                self._publish_event_window if isinstance(bus, WindowPublisher) else None
            ),
        )
        admission = Admission(
            driver,
            settings.host,
            cpu_overcommit=settings.cpu_overcommit,
            memory_overcommit=settings.memory_overcommit,
        )
        self.call_log = CallLog(
            settings.state_dir / "calls.log", keep=settings.call_memory, disk=self.state_disk
        )
        # Storage: pools and volumes (agent/storage.py) and long operations as jobs; the
        # hypervisor driver resolves <disk type='volume'> through the pools.
        self.jobs = JobManager(settings.state_dir / "jobs", self._on_job_event)
        self.storage = StoragePools(
            settings.state_dir, settings.storage, self.jobs, self._on_pool_event
        )
        # Virtual networks (agent/network.py), in the namespace network.namespace names.
        self.networks = Networks(
            settings.state_dir, settings.runtime_dir, settings.network, self._on_network_event
        )
        if isinstance(driver, UsesVolumes):
            driver.set_volume_resolver(self.storage)
        if isinstance(driver, UsesNetworks):  # guests' taps on these networks
            driver.set_tap_provider(GuestTaps(self.networks))
        self.context = AgentContext(
            host=self.host, driver=driver, inventory=self.inventory, storage=self.storage,
            jobs=self.jobs, networks=self.networks, admission=admission,
            authorize=self._authorize,
        )  # fmt: skip
        # Who owns each kind of object, for the policy's owner rules (agent/owners.py).
        self.owners = Owners({
            Target.DOMAIN: self._domain_owner,
            Target.POOL: self.storage.pool_owner,
            Target.VOLUME: self.storage.volume_owner,
            Target.NETWORK: self.networks.owner,
        })  # fmt: skip
        # Every call served or refused: on disk (JSON lines, rotated) and on virtbus.audit.
        self.audit = AuditTrail(
            settings.state_dir / "audit" / "audit.log",
            self.host,
            max_bytes=settings.audit_max_bytes,
            keep=settings.audit_keep,
            publish=self._publish_audit,
        )
        self._targets: dict[str, str | None] = {}  # call id -> its target, for the audit
        self.dispatcher = Dispatcher(
            self._prepare,
            command_timeout=settings.command_timeout,
            call_memory=settings.call_memory,
            call_log=self.call_log,
            auditor=self._audit,
            events_durable=self.outbox.durable,
        )
        # Who may call what (virtbus.security.authz); read once, at construction, so a
        # bad policy file stops the agent before it serves anything.
        self.authz = Authorizer.load(settings.policy, bus.user)
        # A migration streams only to the URI its destination's prepare answered.
        guard = agent.migration.MigrationGuard(
            settings.state_dir / "migrations-prepared.json", self._ask_prepared,
            strict=self.authz.enforcing,
        )  # fmt: skip
        guard.load()
        self.context.extras[agent.migration.GUARD] = guard
        # The volumes copy-storage migrations made here, removed again by a rollback.
        copied = agent.copy_storage.CopiedVolumes(
            settings.state_dir / "migrations-copied-volumes.json", self.context.storage
        )
        copied.load()
        self.context.extras[agent.copy_storage.KEY] = copied
        self.state = AgentState.NEW
        self.failed = asyncio.Event()  # set when a supervised task died: the agent must stop
        # Metrics observe the dispatcher, so they exist before the queue is served.
        self.metrics = AgentMetrics(self)

    @property
    def draining(self) -> bool:
        """The scheduler drains this host (``host.set_draining``)."""
        return self.context.draining

    # --- events ---------------------------------------------------------------------
    def _on_driver_event(self, event: DriverEvent) -> None:
        """The driver's sink: stamp the sequence number now, publish later; never blocks."""
        body = DomainEvent(
            host=self.host,
            seq=self.outbox.next_seq(),
            domain=event.domain,
            uuid=event.uuid,
            event=event.event,
            detail=event.detail,
            data=event.data,
            reconciled=event.reconciled,
            ts=time.time(),
        )
        self.outbox.put(
            Envelope(kind=Kind.EVENT, op=ops.EVENT_DOMAIN, body=to_wire(body), src=self.host)
        )

    def _on_pool_event(self, event: PoolEvent) -> None:
        """Storage pool lifecycle events: numbered and published like domain events."""
        body = PoolEventMessage(
            host=self.host, seq=self.outbox.next_seq(), pool=event.pool, uuid=event.uuid,
            event=event.event, detail=event.detail, reconciled=event.reconciled, ts=time.time(),
        )  # fmt: skip
        self.outbox.put(
            Envelope(kind=Kind.EVENT, op=ops.EVENT_POOL, body=to_wire(body), src=self.host)
        )

    def _on_network_event(self, event: NetworkEvent) -> None:
        """Network lifecycle events: numbered and published like domain events."""
        body = NetworkEventMessage(
            host=self.host, seq=self.outbox.next_seq(), network=event.network, uuid=event.uuid,
            event=event.event, detail=event.detail, data=event.data,
            reconciled=event.reconciled, ts=time.time(),
        )  # fmt: skip
        self.outbox.put(
            Envelope(kind=Kind.EVENT, op=ops.EVENT_NETWORK, body=to_wire(body), src=self.host)
        )

    def _on_job_event(self, job: Job, event: str) -> None:
        body = JobEvent(host=self.host, seq=self.outbox.next_seq(), job=job.id, event=event,
                        data=agent.storage_ops.job_info(job), ts=time.time())  # fmt: skip
        self.outbox.put(
            Envelope(kind=Kind.EVENT, op=ops.EVENT_JOB, body=to_wire(body), src=self.host)
        )

    def _event_key(self, envelope: Envelope) -> str:
        body = envelope.body
        if envelope.op == ops.EVENT_POOL:
            return pool_routing_key(self.host, body["pool"], body["event"])
        if envelope.op == ops.EVENT_NETWORK:
            return network_routing_key(self.host, body["network"], body["event"])
        if envelope.op == ops.EVENT_JOB:
            return job_routing_key(self.host, body["job"], body["event"])
        return event_routing_key(self.host, body["domain"], body["event"])

    async def _publish_event(self, envelope: Envelope) -> None:
        await self.bus.publish(EVENTS_EXCHANGE, self._event_key(envelope), envelope, confirm=True)

    async def _publish_event_window(self, batch: list[Envelope]) -> list[asyncio.Future[None]]:
        """The outbox's window as one write (a bus that is a WindowPublisher); an event
        whose routing key cannot be made fails alone, as its own publish would."""
        assert isinstance(self.bus, WindowPublisher)
        loop = asyncio.get_running_loop()
        faults: list[asyncio.Future[None] | None] = []
        messages: list[tuple[str, Envelope]] = []
        for envelope in batch:
            try:
                messages.append((self._event_key(envelope), envelope))
                faults.append(None)
            except Exception as exc:  # noqa: BLE001 - this event's own fault (poison)
                fault: asyncio.Future[None] = loop.create_future()
                fault.set_exception(exc)
                faults.append(fault)
        published = iter(await self.bus.publish_window(EVENTS_EXCHANGE, messages))
        return [fault if fault is not None else next(published) for fault in faults]

    @property
    def last_seq(self) -> int:
        return self.outbox.last_seq

    # --- calls ----------------------------------------------------------------------
    def _prepare(self, call: Envelope) -> Prepared:
        """Decode a call into its declared request and bind its handler (synchronous:
        the transport calls the dispatcher in delivery order)."""
        if not call.user:
            raise no_user(call.op)
        op = ops.lookup(call.op)
        if op.service is not Service.AGENT:
            raise NoSupport(f"'{call.op}' is not an agent op (send it to the {op.service})")
        request = op.decode_request(call.body)
        handler = HANDLERS[op]
        key = agent.handlers.serial_key(self.driver, op, request)
        target = agent.handlers.target_name(self.driver, op, request, key)
        self._targets[call.id] = target
        user = call.user
        # The op's own permission, and those its request's flags need as well (snapshot
        # XML with security_info: domain.read_secure), all on the same target.
        needed = (op, *op.required(request)) if op.flag_requires else (op,)
        # An object's owner (who made it) is looked up (agent/owners.py) only when the
        # policy's decision depends on it (an owner rule): the check is then put off until
        # the call runs (in its object's turn, so no define overtakes it).
        deferred = (
            self.authz.enforcing
            and op.target in self.owners.kinds
            and any(
                len({self.authz.decide(user, n, self.host, target, o).allowed for o in Owner}) > 1
                for n in needed
            )
        )
        if not deferred:
            for n in needed:
                self.authz.check(user, n, self.host, target)
        if op.access is not Access.READ:
            self.state_disk.check()  # nothing new that it could not record
        if not deferred and op is not ops.DOMAIN_DEFINE:
            context = self.context
            return Prepared(op, key, lambda: self._as_caller(user, handler(context, request)))
        return Prepared(
            op, key, lambda: self._as_owner(op, request, user, target, needed if deferred else ())
        )

    async def _as_caller(self, user: str, run: Awaitable[Message]) -> Message:
        """Run a handler with its caller known (agent.owners.CALLER): the handlers that make
        a pool, volume or network record it as the owner."""
        token = CALLER.set(user)
        try:
            return await run
        finally:
            CALLER.reset(token)

    async def _as_owner(
        self,
        op: Op[Any, Any],
        request: Any,
        user: str,
        target: str | None,
        checks: tuple[Op[Any, Any], ...],
    ) -> Message:
        """Run a call whose target's owner matters: the policy's owner rules are checked
        (for each op of ``checks``) against the owner of the target of the op's kind, and
        a domain define records its owner in the definition's virtbus metadata (the
        caller for a new domain; a redefined one keeps its owner)."""
        owner = await self.owners.owner(op.target, target)
        if checks:
            whose = relation(owner, user)
            for needed in checks:
                self.authz.check(user, needed, self.host, target, whose)
        if op is ops.DOMAIN_DEFINE:
            request = DomainDefine(xml=with_owner(request.xml, owner or user))
        return await self._as_caller(user, HANDLERS[op](self.context, request))

    async def _authorize(self, op: Op[Any, Any], target: str | None) -> None:
        """AgentContext.authorize: the policy's check of ``op`` on ``target`` for the
        caller of the call being run, with the target's owner when it matters."""
        user = CALLER.get()
        owner = await self.owners.owner(op.target, target) if self.authz.enforcing else None
        self.authz.check(user, op, self.host, target, relation(owner, user or ""))

    async def _domain_owner(self, name: str) -> str | None:
        """The owner lookup of domains: from the definition's virtbus metadata."""
        ref = self.driver.lookup(name)
        return (await self.driver.info(ref.uuid)).owner if ref is not None else None

    async def _ask_prepared(self, host: str, migration: str) -> str:
        """The URI ``host``'s prepare answered for ``migration`` (its agent answers)."""
        op, request = ops.MIGRATION_PREPARED, MigrationRef(migration=migration)
        timeout = self.settings.prepared_timeout
        result = await self.bus.call(ops.agent_route(host), op, to_wire(request), timeout=timeout)
        return op.decode_result(result).uri

    def _audit(self, call: Envelope, seconds: float, reply: dict[str, Any]) -> None:
        self.audit.record(call, self._targets.pop(call.id, None), reply, seconds)

    async def _publish_audit(self, key: str, envelope: Envelope) -> None:
        await self.bus.publish(AUDIT_EXCHANGE, key, envelope)

    async def inventory(self) -> HostInventory:
        return await inventory(
            self.driver,
            self.host,
            started_at=self._started_at,
            last_seq=self.last_seq,
            labels=self.settings.labels,
            draining=self.draining,
            migration_address=self.settings.migration_address,
            pools=[PoolSummary(**p) for p in await self.storage.inventory()],
            networks=[NetworkSummary(**n) for n in self.networks.summaries()],
            underlay_address=self.settings.network.underlay_address,
        )

    # --- heartbeat ------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        key = routing_key(routing_word(self.host), HEARTBEAT_KEY_SUFFIX)
        while True:
            try:
                body = to_wire(await self.inventory())
                envelope = Envelope(kind=Kind.HEARTBEAT, op=ops.HEARTBEAT, body=body, src=self.host)
                await self.bus.publish(HOSTS_EXCHANGE, key, envelope)
            except (VirtbusError, OSError) as exc:  # a missed beat; the next one may do
                log.warning("heartbeat not sent: %s", exc)
            await asyncio.sleep(self.settings.heartbeat_interval)

    # --- lifecycle ------------------------------------------------------------------
    def _task_crashed(self, name: str, exc: BaseException) -> None:
        log.error("agent task %s died (%r): stopping the agent", name, exc)
        self.failed.set()

    def _on_connection(self, connected: bool) -> None:
        if connected:
            self.outbox.wake(retry=True)  # publish the backlog now, not after the backoff

    async def start(self) -> None:
        if self.state is not AgentState.NEW:
            raise OperationInvalid(f"agent {self.host} is {self.state.value}: start it once")
        self.state = AgentState.STARTING
        # The bus connects while the host's own state is opened (QMP reattach and the AMQP
        # handshake overlap): nothing in _open_host uses the bus (its events wait in the
        # outbox, published in order once the outbox task runs), and the call queue is
        # consumed only after both, so no call is served before the reattach is over.
        # Both run to their end before a failure is raised, so stop() never races an open.
        results = await asyncio.gather(self._open_host(), self._connect_bus(),
                                       return_exceptions=True)  # fmt: skip
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self._tasks.spawn(self.outbox.run(), name="outbox")
        self._tasks.spawn(self._heartbeat_loop(), name="heartbeat")
        self._tasks.spawn(self.audit.run(), name="audit")
        self._server = await self.bus.serve(
            ops.agent_route(self.host),
            self.dispatcher.submit,
            before_ack=self.dispatcher.before_ack,
        )
        await self.metrics.start()
        self.state = AgentState.RUNNING
        log.info("agent %s serving with driver %s", self.host, self.driver.name)

    async def _open_host(self) -> None:
        """This host's own state, in this order: events, calls, pools, networks, the
        driver (reattach), leases, jobs."""
        await self.outbox.load()  # sequence numbers continue where they stopped
        self.dispatcher.restore(await self.call_log.load())
        await self.storage.open()  # pools re-adopted, autostart ones started
        await self.networks.open()  # running networks adopted untouched, autostart started
        await self.driver.open(self._on_driver_event)
        await self._adopt_leases()
        await self.jobs.load()  # jobs the last agent left running: failed, cleaned up

    async def _connect_bus(self) -> None:
        await self.bus.connect()
        self.bus.add_connection_listener(self._on_connection)

    async def _adopt_leases(self) -> None:
        """Volumes of domains found running are in use again (not deletable). A lease is
        only ever on a volume of a pool defined here: with no pool, there is none to
        adopt, and the running domains' XML is not read (50 guests: ~0.1 s of start)."""
        if not self.storage.pools():
            return
        for info in await self.driver.list_domains(include_inactive=False):
            try:
                defn = parse_domain_xml(await self.driver.xml(info.uuid))
            except VirtbusError as exc:
                log.warning("domain %s: cannot read its volumes: %s", info.name, exc)
                continue
            self.storage.adopt_leases(defn.uuid, self.storage.volumes_of(defn))

    async def stop(self) -> None:
        if self.state in (AgentState.STOPPING, AgentState.STOPPED):
            return
        self.state = AgentState.STOPPING
        grace = self.settings.shutdown_grace
        await self.metrics.stop()
        if self._server is not None:
            await self._server.stop()
            self._server = None
        await self.audit.flush()  # the calls just finished are on disk (and on the bus)
        await self.storage.close()
        await self.networks.close()  # networks and their dnsmasq keep running
        await self.jobs.close()  # running jobs clean up and are recorded failed
        published = await self.outbox.flush(grace)
        await self._tasks.cancel_all()
        if not await self.outbox.save_unsent():
            log.error("%d events not yet published at stop could not be written to %s (%s):"
                      " they are lost", len(self.outbox), self.settings.state_dir,
                      self.state_disk.error)  # fmt: skip
        elif not published:
            log.warning("%d events not yet published at stop: kept on disk", len(self.outbox))
        await self.call_log.close()
        await self.state_disk.close()
        await self.driver.close()
        await self.bus.close()
        self.state = AgentState.STOPPED
        log.info("agent %s stopped", self.host)
