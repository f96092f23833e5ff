"""The Xen driver: ``xl`` for commands, one persistent XenStore connection for events.

XenStore's ``@introduceDomain`` / ``@releaseDomain`` watches are only triggers: each
(debounced) trigger, every reconnect and a periodic tick run one reconcile pass — one
``xl list -v`` fed to :func:`drivers.xen.reconcile.observe` per defined domain. Pause and
unpause leave no trace in XenStore, so the driver reports its own and the periodic tick
catches anyone else's. Definitions (the domain XML) persist as ``<state_dir>/<uuid>.xml``;
the xl config generated from them goes to ``xl create`` as ``<uuid>.cfg``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from drivers.base import (
    DomainInfo,
    DomainRef,
    DriverEvent,
    EventSink,
    HostResources,
)
from drivers.xen.migration import MigrationJob, make_uri, parse_uri
from drivers.xen.reconcile import Tracked, observe
from drivers.xen.settings import XenSettings
from drivers.xen.xenstore import WatchEvent, XenStoreSession
from drivers.xen.xl import Xl
from drivers.xen.xlconfig import check_supported, to_xl_config
from virtbus.aio import TaskGroup, backoff_delays
from virtbus.domain import DomainDefinition, parse_domain_xml
from virtbus.errors import (
    NoDomainError,
    OperationFailed,
    OperationInvalid,
    OperationTimeout,
    VirtbusError,
)
from virtbus.protocol.base import to_wire
from virtbus.protocol.domain import STATS_GROUPS
from virtbus.protocol.events import DomainState, reason_code
from virtbus.protocol.migration import MigrationParams, MigrationState, MigrationStatus
from virtbus.store import quarantine

log = logging.getLogger(__name__)
WATCHES = ("@introduceDomain", "@releaseDomain")
_LIVE = (DomainState.RUNNING, DomainState.BLOCKED)
_LoopFactory = Callable[[], Coroutine[Any, Any, None]]


class XenDriver:
    """The ``xen`` driver (see module docstring)."""

    name = "xen"

    def __init__(self, settings: XenSettings | None = None) -> None:
        self.settings = s = settings or XenSettings()
        self.xl = Xl(s.xl_path, s.xl_timeout)
        self._defs: dict[str, DomainDefinition] = {}  # by uuid
        self._tracked: dict[str, Tracked] = {}
        self._by_name: dict[str, str] = {}
        self._jobs: dict[str, MigrationJob] = {}
        self._sink: EventSink = lambda _e: None
        self._lock = asyncio.Lock()
        self._changed = asyncio.Condition()
        self._dirty = asyncio.Event()
        self._tasks = TaskGroup("xen-driver", on_crash=self._on_loop_crash)
        self._loops: dict[str, tuple[_LoopFactory, Iterator[float]]] = {}  # by task name
        self._loop_started: dict[str, float] = {}
        self._closing = False
        self._initial = True
        self._create_slots = asyncio.Semaphore(s.parallel_creates)
        self.session: XenStoreSession | None = None
        self.passes = 0
        self.pass_seconds = 0.0  # how long the last `xl list -v` took

    # --- plumbing ---------------------------------------------------------------------
    async def open(self, sink: EventSink) -> None:
        self._sink = sink
        self._closing = False
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(
            await asyncio.to_thread(lambda: list(self.settings.state_dir.glob("*.xml")))
        ):
            try:
                defn = parse_domain_xml(await asyncio.to_thread(path.read_text))
                if path.stem != defn.uuid:
                    raise ValueError(f"holds uuid {defn.uuid}, not the one its name says")
            except (OSError, UnicodeDecodeError, ValueError, VirtbusError) as exc:
                # one bad file must not keep the agent (and every other domain) down
                await quarantine(path, f"not a usable domain definition: {exc}")
                continue
            self._remember(defn)
        await self.reconcile()
        session = self.session = XenStoreSession(
            WATCHES, self._on_watch, self._on_connected, self.settings.xenstore
        )
        self._spawn_loop("xenstore", session.run)
        self._spawn_loop("reconcile", self._reconcile_loop)

    async def close(self) -> None:
        self._closing = True
        for job in self._jobs.values():
            if job.task is not None:
                job.task.cancel()
        await self._tasks.cancel_all()
        self._loops.clear()
        self._sink = lambda _e: None

    def _spawn_loop(self, name: str, factory: _LoopFactory, delay: float = 0.0) -> None:
        """Run a background loop that :meth:`_on_loop_crash` restarts if it dies."""
        task = self._tasks.spawn(self._run_loop(name, factory, delay), name)
        if task.get_name() not in self._loops:
            self._loops[task.get_name()] = (factory, backoff_delays(self.settings.loop_restart))

    async def _run_loop(self, name: str, factory: _LoopFactory, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        self._loop_started[name] = time.monotonic()
        await factory()

    def _on_loop_crash(self, task_name: str, exc: BaseException) -> None:
        """A loop died of a bug (TaskGroup logged it): restart it with backoff, so the
        driver does not keep running blind to XenStore events or without reconciling."""
        entry = self._loops.get(task_name)
        if self._closing or entry is None:
            return
        factory, delays = entry
        name = task_name.partition(":")[2]
        policy = self.settings.loop_restart
        if time.monotonic() - self._loop_started.get(name, 0.0) > policy.maximum:
            delays = backoff_delays(policy)  # it had been healthy for a while: start over
            self._loops[task_name] = (factory, delays)
        delay = next(delays)
        log.error("xen: %s loop died (%r); restarting in %.2f s", name, exc, delay)
        self._dirty.set()  # resync whatever was missed meanwhile
        self._spawn_loop(name, factory, delay)

    def _on_watch(self, _event: WatchEvent) -> None:
        self._dirty.set()

    async def _on_connected(self) -> None:
        self._dirty.set()  # anything may have happened while we were away: full resync

    async def _reconcile_loop(self) -> None:
        s = self.settings
        while True:
            # the periodic pass idles a multiple of what the last pass took: `xl list -v`
            # in a starved dom0 takes seconds, and back-to-back passes would hold a dom0 CPU
            # that the guests' creates and boots need (triggered passes are not delayed)
            idle = max(s.reconcile_interval, s.reconcile_idle_factor * self.pass_seconds)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(idle):
                    await self._dirty.wait()
            await asyncio.sleep(self.settings.debounce)
            self._dirty.clear()
            try:
                await self.reconcile()
            except VirtbusError as exc:
                log.warning("xen reconcile failed: %s", exc)

    async def reconcile(self) -> None:
        """One pass: ``xl list -v`` against every defined domain; emit the differences."""
        async with self._lock:
            started = time.monotonic()
            try:
                rows = await self.xl.list_verbose(timeout=self.settings.list_timeout)
            finally:
                self.pass_seconds = time.monotonic() - started
            initial, self._initial = self._initial, False
            reap: list[tuple[Tracked, int]] = []
            for t in list(self._tracked.values()):
                for event, detail in observe(t, rows, initial=initial):
                    self._emit(t, event, detail, reconciled=True)
                if t.reap and t.domid is not None and t.intent != "reap":
                    t.intent = "reap"
                    reap.append((t, t.domid))
            self.passes += 1
        async with self._changed:
            self._changed.notify_all()
        for t, domid in reap:  # on_poweroff/on_crash "destroy", applied here (see xlconfig)
            try:
                await self.xl.destroy(domid)
            except VirtbusError as exc:
                log.warning("xen: cannot destroy shut-down domain %s: %s", t.name, exc)
            self._dirty.set()

    async def _wait_for(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        """Until ``pred`` holds after some pass. One fresh pass is asked for; after it the
        XenStore triggers and the periodic tick bring the news (asking for a pass after
        every pass kept `xl list -v` running back to back for as long as anyone waited)."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                self._dirty.set()
                await self._changed.wait_for(pred)
        except TimeoutError:
            raise OperationTimeout(f"timed out after {timeout} s waiting for {what}") from None

    def _emit(
        self, t: Tracked, event: str, detail: str | None, reconciled: bool = False, **data: Any
    ) -> None:
        self._sink(DriverEvent(t.name, t.uuid, event, detail, data, reconciled))

    # --- lookup -------------------------------------------------------------------------
    def lookup(self, ref: str) -> DomainRef | None:
        uuid = self._resolve(ref)
        return DomainRef(self._defs[uuid].name, uuid) if uuid else None

    def state(self, ref: str) -> tuple[DomainState, str]:
        t = self._get(ref)
        return t.state, t.reason

    def _resolve(self, ref: str) -> str | None:
        if ref in self._defs:
            return ref
        if ref in self._by_name:
            return self._by_name[ref]
        if len(ref) == 32:
            dashed = f"{ref[:8]}-{ref[8:12]}-{ref[12:16]}-{ref[16:20]}-{ref[20:]}".lower()
            return dashed if dashed in self._defs else None
        return None

    def _get(self, ref: str) -> Tracked:
        uuid = self._resolve(ref)
        if uuid is None:
            raise NoDomainError(f"domain not found: no domain with matching name or uuid '{ref}'")
        return self._tracked[uuid]

    @staticmethod
    def _require(t: Tracked, *states: DomainState, verb: str) -> None:
        if t.state not in states:
            if t.state == DomainState.SHUTOFF:
                raise OperationInvalid(f"domain '{t.name}' is not running")
            raise OperationInvalid(f"cannot {verb} domain '{t.name}': it is {t.state.label}")

    # --- definitions --------------------------------------------------------------------
    def _remember(self, defn: DomainDefinition) -> Tracked:
        t = self._tracked.get(defn.uuid) or Tracked(defn.name, defn.uuid)
        t.on_poweroff, t.on_reboot, t.on_crash = defn.on_poweroff, defn.on_reboot, defn.on_crash
        self._defs[defn.uuid] = defn
        self._tracked[defn.uuid] = t
        self._by_name[defn.name] = defn.uuid
        return t

    def _forget(self, uuid: str) -> None:
        defn = self._defs.pop(uuid)
        self._tracked.pop(uuid, None)
        self._by_name.pop(defn.name, None)
        for ext in ("xml", "cfg"):
            (self.settings.state_dir / f"{uuid}.{ext}").unlink(missing_ok=True)

    async def _save(self, defn: DomainDefinition) -> None:
        path = self.settings.state_dir / f"{defn.uuid}.xml"
        await asyncio.to_thread(path.write_text, defn.to_xml())

    async def define(self, xml: str) -> DomainRef:
        defn = parse_domain_xml(xml)
        check_supported(defn)
        by_name = self._by_name.get(defn.name)
        if by_name is not None and by_name != defn.uuid:
            raise OperationFailed(f"domain '{defn.name}' already exists with uuid {by_name}")
        old = self._defs.get(defn.uuid)
        if old is not None and old.name != defn.name:
            raise OperationFailed(f"domain '{old.name}' is already defined with uuid {defn.uuid}")
        await self._save(defn)
        t = self._remember(defn)
        self._emit(t, "defined", "updated" if old is not None else "added")
        return DomainRef(defn.name, defn.uuid)

    async def undefine(self, ref: str) -> None:
        t = self._get(ref)
        self._require(t, DomainState.SHUTOFF, verb="undefine")
        await asyncio.to_thread(self._forget, t.uuid)
        self._emit(t, "undefined", "removed")

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self, ref: str) -> None:
        t = self._get(ref)
        if t.active or t.state != DomainState.SHUTOFF:
            raise OperationInvalid(f"domain '{t.name}' is already active")
        await self._create(t, "start")
        await self._wait_for(lambda: t.domid is not None, self.settings.start_timeout, "start")

    async def _create(self, t: Tracked, intent: str) -> None:
        cfg = self.settings.state_dir / f"{t.uuid}.cfg"
        await asyncio.to_thread(cfg.write_text, to_xl_config(self._defs[t.uuid], reap=True))
        t.intent, t.migrated_away, t.creating = intent, False, True
        try:
            async with self._create_slots:
                await self.xl.create(str(cfg))
        except VirtbusError:
            t.intent = None
            await self._remove_leftovers(t.uuid)
            raise
        finally:
            t.creating = False
        await self._settle()

    async def _settle(self) -> None:
        """A pass after a command that succeeded: if it fails (``xl list -v`` timing out in a
        starved dom0), the loop's next pass catches up and the caller's wait still holds;
        the command's success is not turned into an error."""
        try:
            await self.reconcile()
        except VirtbusError as exc:
            log.warning("xen reconcile failed: %s", exc)
            self._dirty.set()

    async def _remove_leftovers(self, uuid: str) -> None:
        """A failed or timed-out `xl create` may leave a half-built domain behind."""
        with contextlib.suppress(VirtbusError):
            for row in await self.xl.list_verbose(timeout=self.settings.list_timeout):
                if row.uuid == uuid:
                    await self.xl.destroy(row.domid)

    async def shutdown(self, ref: str, timeout: float | None = None) -> None:
        t = self._get(ref)
        self._require(t, *_LIVE, verb="shut down")
        assert t.domid is not None
        t.intent = "shutdown"
        await self.xl.shutdown(t.domid)
        if timeout is not None:
            await self._wait_for(
                lambda: (
                    t.state in (DomainState.SHUTOFF, DomainState.SHUTDOWN) or t.awaiting_restart
                ),
                timeout,
                f"domain '{t.name}' to shut down",
            )

    async def destroy(self, ref: str) -> None:
        t = self._get(ref)
        if t.domid is None and not t.awaiting_restart:
            raise OperationInvalid(f"domain '{t.name}' is not running")
        t.intent = "destroy"
        if t.domid is not None:
            await self.xl.destroy(t.domid)
        t.awaiting_restart = False
        await self._settle()
        await self._wait_for(
            lambda: t.state == DomainState.SHUTOFF, self.settings.xl_timeout, "destroy"
        )

    async def reboot(self, ref: str) -> None:
        t = self._get(ref)
        self._require(t, *_LIVE, verb="reboot")
        assert t.domid is not None
        t.intent = "reboot"
        await self.xl.reboot(t.domid)

    async def reset(self, ref: str) -> None:
        """Xen has no reset for PV/PVH: destroy and re-create at once (a ``reboot`` event)."""
        t = self._get(ref)
        if t.domid is None:
            raise OperationInvalid(f"domain '{t.name}' is not running")
        t.intent = "reset"
        await self.xl.destroy(t.domid)
        await self._settle()  # vanished with intent reset: awaiting the re-create
        await self._create(t, "reset")
        await self._wait_for(lambda: t.domid is not None, self.settings.start_timeout, "reset")
        self._emit(t, "reboot", None)

    async def suspend(self, ref: str) -> None:
        t = self._get(ref)
        self._require(t, *_LIVE, verb="suspend")
        assert t.domid is not None
        await self.xl.pause(t.domid)
        async with self._lock:  # a periodic pass may have reported it already
            if t.state != DomainState.PAUSED:
                t.state, t.reason = DomainState.PAUSED, "user"
                self._emit(t, "suspended", "paused")

    async def resume(self, ref: str) -> None:
        t = self._get(ref)
        self._require(t, DomainState.PAUSED, verb="resume")
        assert t.domid is not None
        await self.xl.unpause(t.domid)
        async with self._lock:
            if t.state == DomainState.PAUSED:
                t.state, t.reason = DomainState.RUNNING, "unpaused"
                self._emit(t, "resumed", "unpaused")

    # --- inspection ---------------------------------------------------------------------
    def _info(self, t: Tracked) -> DomainInfo:
        defn, row = self._defs[t.uuid], t.row
        live = row is not None and t.domid is not None
        return DomainInfo(
            name=t.name,
            uuid=t.uuid,
            state=t.state,
            reason=t.reason,
            max_memory_kib=defn.memory_kib,
            memory_kib=row.mem_mib * 1024 if live and row else defn.current_memory_kib,
            vcpus=row.vcpus if live and row and row.vcpus else defn.current_vcpus,
            cpu_time_ns=int(row.cpu_time_s * 1e9) if live and row else 0,
            id=t.domid,
            hv_type=defn.hv_type,
            owner=defn.owner,
            groups=defn.placement_groups,
        )

    async def info(self, ref: str) -> DomainInfo:
        t = self._get(ref)
        await self.reconcile()
        return self._info(t)

    async def list_domains(self, include_inactive: bool = True) -> list[DomainInfo]:
        await self.reconcile()
        return [
            self._info(t)
            for t in self._tracked.values()
            if include_inactive or t.state != DomainState.SHUTOFF
        ]

    async def xml(self, ref: str) -> str:
        t = self._get(ref)
        return self._defs[t.uuid].to_xml(domain_id=t.domid)

    async def host_resources(self) -> HostResources:
        info = await self.xl.info(timeout=self.settings.list_timeout)
        return HostResources(
            cpus=int(info.get("nr_cpus", "0")),
            memory_total_kib=int(info.get("total_memory", "0")) * 1024,
            memory_free_kib=int(info.get("free_memory", "0")) * 1024,
            arch=info.get("machine", platform.machine()),
            cpu_model=f"xen-{info.get('xen_version', '?')} {info.get('hw_caps', '')[:17]}",
            hypervisor=self.name,
        )

    async def stats(
        self, refs: list[str] | None = None, groups: frozenset[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        tracked = list(self._tracked.values()) if refs is None else [self._get(r) for r in refs]
        await self.reconcile()
        want = groups or frozenset(STATS_GROUPS)
        return {t.name: self._stats(t, want) for t in tracked}

    def _stats(self, t: Tracked, want: frozenset[str]) -> dict[str, Any]:
        """Only figures xl really gives: state, cpu time, memory, vcpus, device names."""
        defn, info = self._defs[t.uuid], self._info(t)
        out: dict[str, Any] = {}
        if "state" in want:
            out["state.state"] = int(t.state)
            out["state.reason"] = reason_code(t.state, t.reason)
        if "cpu-total" in want and t.domid is not None:
            out["cpu.time"] = info.cpu_time_ns
        if "balloon" in want:
            out["balloon.current"] = info.memory_kib
            out["balloon.maximum"] = defn.memory_kib
        if "vcpu" in want:
            out["vcpu.current"] = info.vcpus
            out["vcpu.maximum"] = defn.vcpus
        if "interface" in want:
            out["net.count"] = len(defn.interfaces) if t.domid is not None else 0
        if "block" in want:
            out["block.count"] = len(defn.disks)
            for n, disk in enumerate(defn.disks):
                out[f"block.{n}.name"] = disk.target_dev
                if disk.source_path:
                    out[f"block.{n}.path"] = disk.source_path
        return out

    async def host_stats(self) -> dict[str, Any]:
        res = await self.host_resources()
        return {
            "cpu.count": res.cpus,
            "memory.total": res.memory_total_kib,
            "memory.free": res.memory_free_kib,
            "domains.active": sum(t.domid is not None for t in self._tracked.values()),
        }

    # --- migration ----------------------------------------------------------------------
    async def migrate_begin(self, ref: str) -> str:
        t = self._get(ref)
        self._require(t, *_LIVE, DomainState.PAUSED, verb="migrate")
        return self._defs[t.uuid].to_xml()

    async def migrate_prepare(self, xml: str, params: MigrationParams) -> str:
        defn = parse_domain_xml(xml)
        check_supported(defn)
        old = self._tracked.get(defn.uuid)
        if old is not None and old.active:
            raise OperationInvalid(f"domain '{defn.name}' is already active here")
        rows = await self.xl.list_verbose(timeout=self.settings.list_timeout)
        await self._save(defn)
        t = self._remember(defn)
        t.incoming, t.migrated_away, t.intent = True, False, "migrate_in"
        t.exclude = frozenset(r.domid for r in rows if r.uuid == defn.uuid)
        return make_uri(self.settings.migrate_host)

    async def migrate_perform(self, ref: str, uri: str, params: MigrationParams) -> None:
        t = self._get(ref)
        self._require(t, *_LIVE, DomainState.PAUSED, verb="migrate")
        assert t.domid is not None
        if t.uuid in self._jobs and self._jobs[t.uuid].finished is None:
            raise OperationInvalid(f"domain '{t.name}' is already migrating")
        job = MigrationJob(t.domid, parse_uri(uri))
        self._jobs[t.uuid] = job
        t.intent = "migrate_out"
        s = self.settings

        async def run() -> None:
            try:
                await job.run(self.xl, s.migrate_ssh, s.migrate_timeout)
            finally:
                if job.status != "completed" and t.intent == "migrate_out":
                    t.intent = None  # xl resumes the source itself on failure
                self._emit(t, "migration", None, **to_wire(job.to_status()))
                self._dirty.set()

        job.task = self._tasks.spawn(run(), f"migrate:{t.name}")
        self._emit(t, "migration", None, **to_wire(job.to_status()))

    async def migrate_status(self, ref: str) -> MigrationStatus:
        t = self._get(ref)
        job = self._jobs.get(t.uuid)
        return job.to_status() if job else MigrationStatus(status=MigrationState.NONE)

    async def migrate_cancel(self, ref: str) -> None:
        t = self._get(ref)
        job = self._jobs.get(t.uuid)
        if job is None or job.finished is not None or job.task is None:
            raise OperationInvalid(f"domain '{t.name}' has no migration in progress")
        job.task.cancel()
        await asyncio.wait([job.task])  # our own caller's cancellation still reaches us

    async def migrate_finish(self, ref: str, success: bool) -> None:
        t = self._get(ref)
        if not t.incoming:
            raise OperationInvalid(f"domain '{t.name}' is not an incoming migration")
        if not success:
            if t.domid is not None:
                with contextlib.suppress(VirtbusError):
                    await self.xl.destroy(t.domid)
            await asyncio.to_thread(self._forget, t.uuid)
            return
        await self._wait_for(lambda: t.domid is not None, self.settings.start_timeout, "incoming")
        if t.state == DomainState.PAUSED and t.row is not None and t.row.paused:
            assert t.domid is not None
            await self.xl.unpause(t.domid)
        async with self._lock:
            t.incoming, t.intent, t.exclude = False, None, frozenset()
            if not (t.state == DomainState.RUNNING and t.reason == "migrated"):
                t.state, t.reason = DomainState.RUNNING, "migrated"
                self._emit(t, "resumed", "migrated")

    async def migrate_confirm(self, ref: str, success: bool) -> None:
        t = self._get(ref)
        job = self._jobs.pop(t.uuid, None)
        if job is not None and job.task is not None and not job.task.done():
            raise OperationInvalid(f"domain '{t.name}' is still migrating")
        if success:
            await self._wait_for(lambda: t.migrated_away, self.settings.xl_timeout, "source gone")
            await asyncio.to_thread(self._forget, t.uuid)
        else:
            t.intent = None
            await self.reconcile()
