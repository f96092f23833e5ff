"""The scheduler service: serves ``scheduler.*`` ops, keeps the view, runs migrations.

Active/standby: the scheduler queue has a single active consumer, so when two schedulers
run, RabbitMQ delivers calls to one of them only. A scheduler learns that it is the
active one when it receives a call; a standby keeps probing the queue with its own
``scheduler.ping`` so that it notices a takeover even when no client is calling. Only the
active scheduler resolves the journal and drives migrations; a standby keeps its cluster
view warm from heartbeats, so a takeover answers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from typing import Any

from scheduler.drain import DrainManager
from scheduler.inventory import Claim, ClusterView, DomainMeta
from scheduler.journal import Journal, MigrationRecord
from scheduler.migration import MigrationCoordinator
from scheduler.placement import anti_affinity_groups, place, request_for
from scheduler.settings import SchedulerSettings
from scheduler.wire import domain_info, domain_list, parse_heartbeat, reply_str
from virtbus.aio import TaskGroup
from virtbus.bus.base import Bus, Server, Subscription
from virtbus.bus.topology import (
    EVENTS_EXCHANGE,
    HEARTBEAT_KEY_SUFFIX,
    HOSTS_EXCHANGE,
    SCHEDULER_ROUTE,
)
from virtbus.domain import parse_domain_xml
from virtbus.errors import (
    InternalError,
    InvalidArgument,
    NoDomainError,
    NoHostError,
    NoSupport,
    OperationInvalid,
    OperationTimeout,
    VirtbusError,
)
from virtbus.protocol import ops
from virtbus.protocol.envelope import Envelope, Kind, error_body, ok_body

log = logging.getLogger(__name__)

Op = Callable[[dict[str, Any]], Awaitable[Any]]
ACTIVE_STATES = frozenset({"running", "paused", "blocked"})
PARAM_TYPES: dict[str, type | tuple[type, ...]] = {
    "bandwidth_mib_s": int,
    "max_downtime_ms": int,
    "auto_converge": bool,
    "postcopy": bool,
    "parallel": int,
    "listen_address": str,
}
# Ops answered before the journal is resolved (they touch no migration).
_EARLY_OPS = frozenset({ops.SCHEDULER_PING, ops.SCHEDULER_HOSTS, ops.SCHEDULER_DOMAINS})


def _str_arg(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"'{key}' is required")
    return value


def _timeout_arg(body: dict[str, Any]) -> float | None:
    timeout = body.get("timeout")
    if timeout is None:
        return None
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        raise InvalidArgument("'timeout' must be a positive number of seconds")
    return float(timeout)


def migration_params(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidArgument("'params' must be a map")
    out = {}
    for key, value in raw.items():
        kind = PARAM_TYPES.get(key)
        if kind is None:
            raise InvalidArgument(f"unknown migration parameter '{key}'")
        if value is None:
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InvalidArgument(f"migration parameter '{key}' has the wrong type")
        out[key] = value
    return out


class SchedulerService:
    def __init__(self, settings: SchedulerSettings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.id = f"scheduler-{uuidlib.uuid4().hex[:8]}"
        self.view = ClusterView(settings.host_down_after)
        self.journal = Journal(settings.state_dir, fsync=settings.journal_fsync)
        self._tasks = TaskGroup("scheduler", on_crash=self._task_crashed)
        self.coordinator = MigrationCoordinator(
            self._agent_call, self.view, self.journal, settings, self._tasks
        )
        self.drains = DrainManager(self.coordinator)
        self.active = False
        self.ready = asyncio.Event()  # active and the journal resolved
        self.failed = asyncio.Event()
        self._server: Server | None = None
        self._subs: list[Subscription] = []
        self._refreshing: set[str] = set()
        self._flagging: set[str] = set()  # hosts with a drain-flag call in flight
        self._ops: dict[str, Op] = {
            ops.SCHEDULER_PING: self._ping,
            ops.SCHEDULER_HOSTS: self._hosts,
            ops.SCHEDULER_DOMAINS: self._domains,
            ops.SCHEDULER_PLACE: self._place,
            ops.SCHEDULER_DEFINE: self._define,
            ops.SCHEDULER_MIGRATE: self._migrate,
            ops.SCHEDULER_MIGRATION: self._migration,
            ops.SCHEDULER_MIGRATIONS: self._migrations,
            ops.SCHEDULER_MIGRATE_CANCEL: self._migrate_cancel,
            ops.SCHEDULER_DRAIN: self._drain,
            ops.SCHEDULER_DRAIN_STATUS: self._drain_status,
            ops.SCHEDULER_UNDRAIN: self._undrain,
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
        self._server = await self.bus.serve(SCHEDULER_ROUTE, self._handle)
        self._tasks.spawn(self._leader_probe(), name="leader-probe")
        log.info("scheduler %s serving (active once the queue delivers to it)", self.id)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None
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
        self.ready.set()

    # --- calls ----------------------------------------------------------------------
    def _handle(self, call: Envelope) -> Awaitable[dict[str, Any]]:
        self._activate()  # the queue delivered to us: we are the active consumer
        return self._answer(call)

    async def _answer(self, call: Envelope) -> dict[str, Any]:
        try:
            op = self._ops.get(call.op)
            if op is None:
                raise NoSupport(f"unknown scheduler op '{call.op}'")
            if call.op not in _EARLY_OPS:
                await self.ready.wait()
            return ok_body(await op(call.body))
        except VirtbusError as exc:
            return error_body(exc.code, exc.message)
        except Exception as exc:  # a bug must become a reply, not a dead consumer
            log.exception("scheduler op %s failed", call.op)
            return error_body(InternalError.code, f"{type(exc).__name__}: {exc}")

    async def _agent_call(self, host: str, op: str, body: dict[str, Any], timeout: float) -> Any:
        return await self.bus.call(ops.agent_route(host), op, body, timeout=timeout)

    # --- the view -------------------------------------------------------------------
    async def _heartbeat_loop(self, sub: Subscription) -> None:
        async for env in sub:
            if env.kind != Kind.HEARTBEAT:
                continue
            inv = parse_heartbeat(env.body)
            if isinstance(inv, str):  # any bus client can publish: never let it stop us
                host = env.body.get("host") if isinstance(env.body, dict) else None
                log.warning("dropped a heartbeat of host %r from %r: %s", host, env.src, inv)
                continue
            host = inv.host
            if self.view.observe_heartbeat(inv):
                self._refresh_soon(host)
            self.coordinator.cleanups.host_alive(host)  # retry what it still owes at once
            if (
                self.active
                and host in self.view.draining
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
            if env.kind == Kind.EVENT and env.body.get("event") == "migration":
                self.coordinator.on_event(env.body)  # checks the body's shape itself

    def _refresh_soon(self, host: str) -> None:
        if host not in self._refreshing:
            self._refreshing.add(host)
            self._tasks.spawn(self._refresh(host), name=f"refresh:{host}")

    async def _refresh(self, host: str) -> list[dict[str, Any]] | None:
        """Ask a host for its domains (and the metadata of new ones); None when it is silent."""
        t = self.settings.fanout_timeout
        try:
            listing = await self._agent_call(host, ops.DOMAIN_LIST, {"all": True}, t)
            domains = domain_list(listing, ops.DOMAIN_LIST)
            for uuid in self.view.observe_domains(host, domains):
                reply = await self._agent_call(host, ops.DOMAIN_XML, {"domain": uuid}, t)
                xml = reply_str(reply, ops.DOMAIN_XML, "xml")
                defn = parse_domain_xml(xml)
                self.view.observe_meta(DomainMeta(defn.name, uuid, anti_affinity_groups(defn)))
            return domains
        except VirtbusError as exc:
            log.info("host %s did not list its domains: %s", host, exc)
            return None
        finally:
            self._refreshing.discard(host)

    async def _tell_draining(self, host: str, draining: bool) -> None:
        try:
            await self._agent_call(
                host, ops.HOST_SET_DRAINING, {"draining": draining}, self.settings.step_timeout
            )
        except VirtbusError as exc:
            log.warning(
                "could not tell %s it is %sdraining: %s", host, "" if draining else "not ", exc
            )

    def _up_hosts(self) -> list[str]:
        return [h for h in sorted(self.view.hosts) if self.view.is_up(h)]

    # --- ops ------------------------------------------------------------------------
    async def _ping(self, body: dict[str, Any]) -> Any:
        return {"scheduler": self.id, "active": self.active, "ready": self.ready.is_set()}

    async def _hosts(self, body: dict[str, Any]) -> Any:
        now = time.monotonic()
        rows = [
            self.view.host_map(h, now)
            for h in sorted(self.view.hosts)
            if self.view.hosts[h].inventory is not None
        ]
        for row in rows:
            row["migrations_out"] = sum(
                r.source == row["host"] for r in self.coordinator.active.values()
            )
            row["migrations_in"] = sum(
                r.destination == row["host"] for r in self.coordinator.active.values()
            )
        return {"scheduler": self.id, "hosts": rows}

    async def _domains(self, body: dict[str, Any]) -> Any:
        include_inactive = bool(body.get("all", False))
        hosts = self._up_hosts()
        results = await asyncio.gather(*(self._refresh(h) for h in hosts))
        out, silent = [], []
        for host, domains in zip(hosts, results, strict=True):
            if domains is None:
                silent.append(host)
                continue
            for info in domains:
                if not include_inactive and info.get("state") == "shutoff":
                    continue
                row = {"host": host, **info}
                rec = self.coordinator.for_domain(info["uuid"])
                if rec is not None and not rec.terminal:
                    row["migration"] = {
                        "id": rec.id,
                        "state": rec.state,
                        "phase": rec.phase,
                        "source": rec.source,
                        "destination": rec.destination,
                    }
                out.append(row)
        out.sort(key=lambda d: (d["host"], d["name"]))
        return {"domains": out, "unreachable": silent}

    async def _place(self, body: dict[str, Any]) -> Any:
        defn = parse_domain_xml(_str_arg(body, "xml"))
        chosen = place(request_for(defn), self.view.candidates(), self.settings.placement)
        return {"host": chosen.name}

    async def _define(self, body: dict[str, Any]) -> Any:
        xml = _str_arg(body, "xml")
        defn = parse_domain_xml(xml)
        groups = anti_affinity_groups(defn)
        host = place(request_for(defn), self.view.candidates(), self.settings.placement).name
        self._claim(host, defn.uuid, defn.name, defn.current_memory_kib, defn.current_vcpus, groups)
        try:
            reply = await self._agent_call(
                host, ops.DOMAIN_DEFINE, {"xml": xml}, self.settings.step_timeout
            )
            result = domain_info(reply, ops.DOMAIN_DEFINE)
        except VirtbusError:
            self.view.release(host, defn.uuid)
            raise
        self.view.observe_meta(DomainMeta(result["name"], result["uuid"], groups))
        self.view.hosts[host].domains.setdefault(
            result["uuid"], {"name": result["name"], "uuid": result["uuid"], "state": "shutoff"}
        )
        return {"host": host, **result}

    def _claim(
        self, host: str, uuid: str, name: str, memory: int, vcpus: int, groups: frozenset[str]
    ) -> None:
        expires = time.monotonic() + self.settings.claim_ttl
        self.view.claim(host, Claim(uuid, name, memory, vcpus, groups, expires))

    async def _migrate(self, body: dict[str, Any]) -> Any:
        to = body.get("to")
        if to is not None and not isinstance(to, str):
            raise InvalidArgument("'to' must be a host name")
        record = await self.start_migration(
            _str_arg(body, "domain"), to, migration_params(body.get("params")), _timeout_arg(body)
        )
        return record.to_map()

    async def start_migration(
        self,
        ref: str,
        to: str | None,
        params: dict[str, Any],
        timeout: float | None,
        drain: str | None = None,
    ) -> MigrationRecord:
        """Find the domain, place it (or check ``to``), claim, journal, start."""
        source, info = await self._locate(ref)
        if self.coordinator.busy(info["uuid"]):
            raise OperationInvalid(f"domain '{info['name']}' is already migrating")
        t = self.settings.step_timeout
        reply = await self._agent_call(source, ops.DOMAIN_XML, {"domain": info["uuid"]}, t)
        xml = reply_str(reply, ops.DOMAIN_XML, "xml")
        defn = parse_domain_xml(xml)
        defn.root.attrib.pop("id", None)  # the running id: not part of a definition
        xml = defn.to_xml()
        candidates = self.view.candidates()
        src = next((c for c in candidates if c.name == source), None)
        if src is None:
            raise NoHostError(f"source host '{source}' has sent no heartbeat")
        req = request_for(defn, source=src)
        if to is not None:
            if to == source:
                raise InvalidArgument(f"domain '{defn.name}' already runs on {to}")
            if to not in self.view.hosts:
                raise NoHostError(f"unknown host '{to}'")
            candidates = [c for c in candidates if c.name == to]
        destination = place(req, candidates, self.settings.placement).name
        if "listen_address" not in params:
            inv = self.view.hosts[destination].inventory
            address = inv.migration_address if inv is not None else ""
            if address:
                params = {**params, "listen_address": address}
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

    async def _locate(self, ref: str) -> tuple[str, dict[str, Any]]:
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
                reply = await self._agent_call(
                    host, ops.DOMAIN_INFO, {"domain": info["uuid"]}, self.settings.step_timeout
                )
                now = domain_info(reply, ops.DOMAIN_INFO)
            except (NoDomainError, OperationTimeout):
                continue
            if now.get("state") in ACTIVE_STATES and now.get("persistent", True):
                fresh.append((host, now))
        if not fresh:
            raise OperationInvalid(f"domain '{ref}' is not running")
        if len(fresh) > 1:
            where = ", ".join(h for h, _ in fresh)
            raise OperationInvalid(f"domain '{ref}' is active on several hosts ({where})")
        return fresh[0]

    async def _migration(self, body: dict[str, Any]) -> Any:
        """One migration's record; with ``wait`` (s), a long poll: answered when it changes
        (phase, state, progress) or after ``wait``, so a follower needs no polling loop.
        ``seen`` is the record the follower last got: if it already differs, the answer is
        immediate (a change between two polls is never missed)."""
        ref = body.get("id") or _str_arg(body, "domain")
        record = self.coordinator.for_domain(str(ref))
        if record is None:
            raise NoDomainError(f"no migration known for '{ref}'")
        wait = body.get("wait")
        if wait is not None:
            if not isinstance(wait, int | float) or isinstance(wait, bool) or wait < 0:
                raise InvalidArgument("'wait' must be a non-negative number of seconds")
            if body.get("seen") in (None, record.to_map()):
                await self.coordinator.wait_change(record, min(wait, self.settings.long_poll_max))
        return record.to_map()

    async def _migrations(self, body: dict[str, Any]) -> Any:
        records = [*self.coordinator.active.values(), *self.coordinator.history]
        return {"migrations": [r.to_map() for r in records]}

    async def _migrate_cancel(self, body: dict[str, Any]) -> Any:
        return self.coordinator.cancel(_str_arg(body, "domain")).to_map()

    def _known_host(self, body: dict[str, Any]) -> str:
        host = _str_arg(body, "host")
        if host not in self.view.hosts:
            raise NoHostError(f"unknown host '{host}' (no heartbeat heard)")
        return host

    async def _drain(self, body: dict[str, Any]) -> Any:
        host = self._known_host(body)
        params = migration_params(body.get("params"))
        timeout = _timeout_arg(body)
        self.view.draining.add(host)
        await self.journal.save_draining(self.view.draining)
        await self._tell_draining(host, True)
        listing = await self._agent_call(
            host, ops.DOMAIN_LIST, {"all": False}, self.settings.fanout_timeout
        )
        domains = domain_list(listing, ops.DOMAIN_LIST)
        running = [d for d in domains if d.get("state") in ACTIVE_STATES]

        async def start(uuid: str, drain_host: str) -> MigrationRecord:
            return await self.start_migration(uuid, None, params, timeout, drain=drain_host)

        job = await self.drains.drain(host, running, start)
        return job.to_map(self.coordinator)

    async def _drain_status(self, body: dict[str, Any]) -> Any:
        host = _str_arg(body, "host")
        job = self.drains.status(host)
        if job is None:
            raise NoHostError(f"no drain of host '{host}' is known")
        return job.to_map(self.coordinator)

    async def _undrain(self, body: dict[str, Any]) -> Any:
        host = self._known_host(body)
        self.view.draining.discard(host)
        await self.journal.save_draining(self.view.draining)
        await self._tell_draining(host, False)
        inv = self.view.hosts[host].inventory
        if inv is not None:  # until its next heartbeat shows it
            self.view.hosts[host].inventory = dataclasses.replace(inv, draining=False)
        return {"host": host, "draining": False}
