"""The LXC driver: containers as domains, through Debian's lxc (liblxc 5) tools.

Commands are ``lxc-*`` subprocesses on the driver's own LXCPATH (:mod:`drivers.lxc.tools`);
events come from liblxc's monitor FIFO, read continuously (:mod:`drivers.lxc.monitor`)
and mapped to libvirt's events by a pure state machine (:mod:`drivers.lxc.events`). The
API methods mark what they ask for (an ``Intent``), run the command and wait for the
monitor's message to show its effect, so every event is emitted once, from what lxc
reported, in lxc's order.

Containers are started with ``lxc-start -d``, so they outlive the agent. A periodic
check (``reconcile_interval``) looks at each container's init (alive? a zombie counts as
dead) and freezer cgroup, and counts OOM kills; any difference from what the driver
believes, a monitor (re)connect and the agent's own start run one ``lxc-ls`` reconcile,
whose events are marked ``reconciled``. Definitions and run status live in the
container's directory (:mod:`drivers.lxc.state`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from drivers.base import DomainInfo, DomainRef, DriverEvent, EventSink, HostResources
from drivers.host import host_resources, host_stats
from drivers.lxc import cgroups as cg
from drivers.lxc import events as ev
from drivers.lxc.config import RenderContext, check_supported, init_argv, render, root_filesystem
from drivers.lxc.monitor import MonitorFifo, MonitorMessage
from drivers.lxc.paths import check_init, resolve_sources
from drivers.lxc.settings import LxcSettings
from drivers.lxc.state import ContainerFiles, RunStatus
from drivers.lxc.stats import StatsTarget, collect
from drivers.lxc.tools import LxcError, LxcTools, probe_fstype
from virtbus.aio import TaskGroup, backoff_delays
from virtbus.domain import DomainDefinition, parse_domain_xml
from virtbus.errors import (
    ConfigUnsupported,
    NoDomainError,
    NoSupport,
    OperationFailed,
    OperationInvalid,
    OperationTimeout,
    VirtbusError,
)
from virtbus.protocol.events import DomainState
from virtbus.protocol.migration import MigrationParams, MigrationState, MigrationStatus
from virtbus.store import quarantine, read_bytes

log = logging.getLogger(__name__)
S = DomainState
I = ev.Intent  # noqa: E741
NO_MIGRATION = (
    "live migration of containers is not supported (nor by libvirt's LXC driver): shut the"
    " container off and move its definition with `virtbus migrate --offline`"
)
MAC_PREFIX = "52:54:00"


class NetworkPort(Protocol):
    """Resolves ``<interface type='network'>`` to the bridge the container joins.

    The network driver (drivers/network/) will provide one; until then no network is
    known and such interfaces are refused at define time.
    """

    def available(self) -> bool: ...

    async def bridge_for(self, network: str) -> str: ...


class NoNetworks:
    def available(self) -> bool:
        return False

    async def bridge_for(self, network: str) -> str:
        raise ConfigUnsupported(
            f"network '{network}' is unknown: libvirt networks are not here yet"
        )


@dataclass(eq=False)
class Container:
    """A defined container, and its run while active."""

    defn: DomainDefinition  # the persistent definition
    files: ContainerFiles
    t: ev.Tracked
    live: DomainDefinition | None = None  # the definition it runs with
    init_pid: int | None = None
    init_started: int | None = None
    monitor_pid: int | None = None
    monitor_fd: int | None = None  # a pidfd: that very process, whoever reuses its PID later
    cgroups: cg.ContainerCgroups | None = None
    oom_kills: int | None = None
    autostart: bool = False
    restart: asyncio.Task[None] | None = None
    saving: asyncio.Task[None] | None = None
    saved: tuple[Any, ...] | None = None  # what run.json holds

    @property
    def name(self) -> str:
        return self.defn.name

    def watch_monitor(self, pid: int | None) -> None:
        """Follow lxc's monitor process ``pid`` (None: stop following the last one)."""
        if self.monitor_fd is not None:
            os.close(self.monitor_fd)
        self.monitor_pid, self.monitor_fd = pid, None
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                self.monitor_fd = os.pidfd_open(pid)

    @property
    def running_defn(self) -> DomainDefinition:
        return self.live if self.live is not None and self.t.active else self.defn


class LxcDriver:
    """The ``lxc`` driver (see module docstring)."""

    name = "lxc"

    def __init__(self, settings: LxcSettings | None = None, networks: NetworkPort | None = None):
        self.settings = s = settings or LxcSettings()
        self.tools = LxcTools(s)
        self._networks: NetworkPort = networks or NoNetworks()
        self._containers: dict[str, Container] = {}  # by uuid
        self._by_name: dict[str, str] = {}
        self._sink: EventSink = lambda _e: None
        self._changed = asyncio.Event()
        self._dirty = asyncio.Event()
        self._reconcile_lock = asyncio.Lock()
        self._tasks = TaskGroup("lxc-driver", on_crash=self._on_loop_crash)
        self._loop_delays = backoff_delays(s.loop_restart)
        self._closing = False
        self._mounts = cg.CgroupMounts()
        self.monitor: MonitorFifo | None = None
        self.reconciles = 0

    # --- plumbing ---------------------------------------------------------------------
    async def open(self, sink: EventSink) -> None:
        self._sink = sink
        self._closing = False
        await asyncio.to_thread(self.settings.lxcpath.mkdir, parents=True, exist_ok=True)
        self._mounts = await asyncio.to_thread(cg.host_mounts)
        await self._load()
        await self.reconcile()  # reattach: what happened while the agent was away
        self.monitor = MonitorFifo(
            self.settings.monitor_fifo,
            self._on_message,
            self.reconcile,
            check_interval=self.settings.monitor_check,
            reopen=self.settings.monitor_reopen,
        )
        self._spawn_loops()
        await self._autostart()

    def _spawn_loops(self) -> None:
        assert self.monitor is not None
        self._tasks.spawn(self.monitor.run(), "monitor")
        self._tasks.spawn(self._check_loop(), "check")

    def _on_loop_crash(self, task_name: str, exc: BaseException) -> None:
        """The monitor or the check loop died of a bug (TaskGroup logged it): restart it
        with backoff rather than run blind to lxc's events."""
        if self._closing or not task_name.endswith((":monitor", ":check")):
            return
        delay = next(self._loop_delays)
        log.error("lxc: %s died (%r); restarting in %.2f s", task_name, exc, delay)

        async def again() -> None:
            await asyncio.sleep(delay)
            if task_name.endswith(":monitor"):
                assert self.monitor is not None
                await self.monitor.run()
            else:
                await self._check_loop()

        self._tasks.spawn(again(), task_name.rpartition(":")[2])

    async def close(self) -> None:
        self._closing = True
        for c in self._containers.values():
            if c.restart is not None:
                c.restart.cancel()
        await self._tasks.cancel_all()
        for c in self._containers.values():
            await self._save_now(c)
            c.watch_monitor(None)  # closes its pidfd; the container keeps running
        self._sink = lambda _e: None

    async def _load(self) -> None:
        lxcpath = self.settings.lxcpath
        dirs = await asyncio.to_thread(lambda: sorted(p for p in lxcpath.iterdir() if p.is_dir()))
        for d in dirs:
            files = ContainerFiles(lxcpath, d.name)
            data = await read_bytes(files.definition)
            if data is None:
                continue
            try:
                defn = parse_domain_xml(data)
                if defn.name != d.name:
                    raise ValueError(f"holds domain '{defn.name}', not the one its directory says")
            except (ValueError, VirtbusError) as exc:
                await quarantine(files.definition, f"not a usable domain definition: {exc}")
                continue
            c = self._add(defn)
            c.autostart = await asyncio.to_thread(files.has_autostart)
            await self._load_status(c)

    async def _load_status(self, c: Container) -> None:
        data = await c.files.read_status()
        if data is None:
            return
        try:
            status = RunStatus.from_json(data)
            if status.uuid != c.defn.uuid:
                raise ValueError(f"describes uuid {status.uuid}")
            live = parse_domain_xml(status.live_xml) if status.live_xml else None
        except (ValueError, KeyError, TypeError, VirtbusError) as exc:
            await quarantine(c.files.status, f"not a usable run status: {exc}")
            return
        c.t.state, c.t.reason, c.t.intents = status.state, status.reason, set(status.intents)
        c.live, c.init_pid, c.init_started = live, status.init_pid, status.init_started
        c.oom_kills = status.oom_kills
        c.saved = self._status_key(c)

    def _add(self, defn: DomainDefinition) -> Container:
        c = Container(defn, ContainerFiles(self.settings.lxcpath, defn.name),
                      ev.Tracked(defn.name, defn.uuid))  # fmt: skip
        self._containers[defn.uuid] = c
        self._by_name[defn.name] = defn.uuid
        return c

    # --- events -------------------------------------------------------------------------
    def _emit(self, c: Container, event: str, detail: str | None, reconciled: bool = False,
              **data: Any) -> None:  # fmt: skip
        self._sink(DriverEvent(c.name, c.defn.uuid, event, detail, data, reconciled))

    def _apply(self, c: Container, outcome: ev.Outcome, reconciled: bool = False) -> None:
        for event, detail in outcome.events:
            self._emit(c, event, detail, reconciled)
        if outcome.restart and (c.restart is None or c.restart.done()):
            c.restart = self._tasks.spawn(self._restart(c), f"restart:{c.name}")
        if c.t.state == S.SHUTOFF and not c.t.active:
            c.cgroups = None
        self._save_soon(c)
        self._changed.set()
        self._changed = asyncio.Event()

    def _on_message(self, message: MonitorMessage) -> None:
        uuid = self._by_name.get(message.name)
        if uuid is None:
            return  # not one of ours (or already undefined)
        c = self._containers[uuid]
        self._apply(c, ev.on_message(c.t, message))

    async def _wait_for(self, c: Container, ready: Callable[[], bool], timeout: float,
                        what: str) -> None:  # fmt: skip
        try:
            async with asyncio.timeout(timeout):
                while not ready():
                    if self.monitor is None or not self.monitor.connected:
                        self._dirty.set()  # nobody reads the FIFO: let lxc-ls tell us
                    changed = self._changed
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.settings.reconcile_interval):
                            await changed.wait()
        except TimeoutError:
            raise OperationTimeout(
                f"timed out after {timeout} s waiting for container '{c.name}' to {what}"
            ) from None

    # --- reconcile ------------------------------------------------------------------------
    async def reconcile(self) -> None:
        """One ``lxc-ls`` pass against every container; emit what the monitor missed."""
        async with self._reconcile_lock:
            generations = {u: c.t.generation for u, c in self._containers.items()}
            rows = await self.tools.ls()
            self.reconciles += 1
            for uuid, c in list(self._containers.items()):
                if generations.get(uuid) != c.t.generation:
                    continue  # a message arrived meanwhile: it is newer than the snapshot
                row = rows.get(c.name)
                rebooted = False
                if (
                    row is not None
                    and row.pid is not None
                    and (row.pid != c.init_pid or c.cgroups is None or c.monitor_pid is None)
                ):
                    rebooted = await self._attach_process(c, row.pid)
                was_running = c.t.state == S.RUNNING
                self._apply(c, ev.observe(c.t, row.state if row else None), reconciled=True)
                if rebooted and was_running and c.t.state == S.RUNNING:
                    self._emit(c, "reboot", None, reconciled=True)
            if self._containers:
                self._changed.set()
                self._changed = asyncio.Event()

    async def _attach_process(self, c: Container, init_pid: int) -> bool:
        """Learn init's and the monitor's PIDs and the cgroups of a running container;
        True when it replaces an init we knew (the container rebooted meanwhile)."""
        facts = await asyncio.to_thread(_process_facts, init_pid, self._mounts)
        return self._adopt_facts(c, init_pid, facts)

    def _adopt_facts(self, c: Container, init_pid: int, facts: _Facts) -> bool:
        started, monitor, cgroups = facts
        rebooted = c.init_pid is not None and (c.init_pid, c.init_started) != (init_pid, started)
        c.init_pid, c.init_started, c.cgroups = init_pid, started, cgroups
        if monitor != c.monitor_pid:
            c.watch_monitor(monitor)
        if c.live is None:
            c.live = c.defn.copy()
        return rebooted

    async def _check_loop(self) -> None:
        """The periodic cheap check (see module docstring), and reconciles on demand."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.reconcile_interval):
                    await self._dirty.wait()
            try:
                if self._dirty.is_set() or self.monitor is None or not self.monitor.connected:
                    self._dirty.clear()
                    await self.reconcile()
                elif await self._differs():
                    await self.reconcile()
            except VirtbusError as exc:
                log.warning("lxc reconcile failed: %s", exc)

    async def _differs(self) -> bool:
        """Any container whose init died, or whose freezer state is not what we believe?
        Also reports new OOM kills (an ``oom_kill`` event)."""
        active = [c for c in self._containers.values() if c.t.active and c.init_pid]
        if not active:
            return False
        probes = await asyncio.to_thread(self._probe, active)
        differs = False
        for c, (alive, frozen, kills) in zip(active, probes, strict=True):
            if not alive or (frozen is not None and frozen != (c.t.state == S.PAUSED)):
                differs = True
            if kills is not None:
                if c.oom_kills is not None and kills > c.oom_kills:
                    self._emit(c, "oom_kill", None, count=kills - c.oom_kills, total=kills)
                if kills != c.oom_kills:
                    c.oom_kills = kills
                    self._save_soon(c)
        return differs

    def _probe(self, active: list[Container]) -> list[tuple[bool, bool | None, int | None]]:
        out: list[tuple[bool, bool | None, int | None]] = []
        for c in active:
            assert c.init_pid is not None
            alive = cg.process_alive(c.init_pid)
            if c.cgroups is None:
                out.append((alive, None, None))
                continue
            out.append(
                (alive, cg.frozen(c.cgroups, self._mounts),
                 cg.memory(c.cgroups, self._mounts).oom_kills)
            )  # fmt: skip
        return out

    # --- run status -------------------------------------------------------------------------
    @staticmethod
    def _status_key(c: Container) -> tuple[Any, ...]:
        return (c.t.state, c.t.reason, frozenset(c.t.intents), c.init_pid, c.oom_kills,
                id(c.live) if c.t.active else None)  # fmt: skip

    def _status(self, c: Container) -> RunStatus:
        active = c.t.active and c.live is not None
        return RunStatus(
            uuid=c.defn.uuid, state=c.t.state, reason=c.t.reason, intents=tuple(c.t.intents),
            live_xml=c.live.to_xml() if active and c.live is not None else None,
            init_pid=c.init_pid if active else None,
            init_started=c.init_started if active else None, oom_kills=c.oom_kills,
        )  # fmt: skip

    def _save_soon(self, c: Container) -> None:
        """Bring run.json up to date in the background, one write at a time, coalesced."""
        if self._status_key(c) == c.saved or self._by_name.get(c.name) != c.defn.uuid:
            return
        if c.saving is None or c.saving.done():
            c.saving = self._tasks.spawn(self._catch_up(c), f"status:{c.name}")

    async def _catch_up(self, c: Container) -> None:
        while self._status_key(c) != c.saved and self._by_name.get(c.name) == c.defn.uuid:
            key = self._status_key(c)
            try:
                await c.files.write_status(self._status(c))
            except OSError as exc:
                log.error("lxc: cannot write the status of %s: %s", c.name, exc)
                return
            c.saved = key

    async def _save_now(self, c: Container) -> None:
        if c.saving is not None:
            await asyncio.wait([c.saving])
        if self._status_key(c) != c.saved and self._by_name.get(c.name) == c.defn.uuid:
            c.saving = self._tasks.spawn(self._catch_up(c), f"status:{c.name}")
            await asyncio.shield(c.saving)

    # --- lookup -------------------------------------------------------------------------
    def lookup(self, ref: str) -> DomainRef | None:
        c = self._find(ref)
        return DomainRef(c.name, c.defn.uuid) if c else None

    def _find(self, ref: str) -> Container | None:
        c = self._containers.get(ref) or self._containers.get(ref.lower())
        if c is None and (uuid := self._by_name.get(ref)):
            c = self._containers.get(uuid)
        if c is None and len(ref) == 32:
            c = self._containers.get(f"{ref[:8]}-{ref[8:12]}-{ref[12:16]}-{ref[16:20]}-{ref[20:]}")
        return c

    def state(self, ref: str) -> tuple[DomainState, str]:
        c = self._get(ref)
        return c.t.state, c.t.reason

    def _get(self, ref: str) -> Container:
        c = self._find(ref)
        if c is None:
            raise NoDomainError(f"domain not found: no domain with matching name or uuid '{ref}'")
        return c

    @staticmethod
    def _require(c: Container, *states: DomainState, verb: str) -> None:
        if not c.t.active:
            raise OperationInvalid(f"domain '{c.name}' is not running")
        if c.t.state not in states:
            raise OperationInvalid(f"cannot {verb} domain '{c.name}': it is {c.t.state.label}")

    # --- definitions --------------------------------------------------------------------
    async def _validate(self, defn: DomainDefinition) -> dict[int, str]:
        check_supported(defn, platform.machine(), networks=self._networks.available())
        return await asyncio.to_thread(_check_paths, defn, self.settings.allowed_roots)

    async def define(self, xml: str) -> DomainRef:
        defn = parse_domain_xml(xml)
        await self._validate(defn)
        other = self._by_name.get(defn.name)
        if other is not None and other != defn.uuid:
            raise OperationFailed(f"domain '{defn.name}' already exists with uuid {other}")
        existing = self._containers.get(defn.uuid)
        if existing is not None and existing.name != defn.name:
            raise OperationFailed(
                f"domain '{existing.name}' is already defined with uuid {defn.uuid}"
            )
        files = ContainerFiles(self.settings.lxcpath, defn.name)
        await files.save_definition(defn.to_xml())
        if existing is not None:
            existing.defn = defn  # a running container keeps its live definition
            self._emit(existing, "defined", "updated")
        else:
            self._emit(self._add(defn), "defined", "added")
        return DomainRef(defn.name, defn.uuid)

    async def undefine(self, ref: str) -> None:
        c = self._get(ref)
        if c.t.active:
            raise OperationInvalid(
                f"cannot undefine domain '{c.name}': it is {c.t.state.label} (destroy it first)"
            )
        await self._wait_monitor_gone(c)
        del self._containers[c.defn.uuid]
        self._by_name.pop(c.name, None)
        if c.saving is not None:
            await asyncio.wait([c.saving])
        await c.files.remove()
        await asyncio.to_thread(_remove_empty_cgroups, self._mounts, c.name)
        self._emit(c, "undefined", "removed")

    # --- start --------------------------------------------------------------------------
    async def start(self, ref: str) -> None:
        c = self._get(ref)
        if c.t.active:
            raise OperationInvalid(f"domain '{c.name}' is already active")
        c.t.intents = {I.START}
        began = time.perf_counter()
        try:
            await self._launch(c)
            launched = time.perf_counter()
            await self._wait_for(
                c, lambda: I.START not in c.t.intents, self.settings.start_timeout, "run"
            )
            waited = time.perf_counter() - launched
            log.debug("start %s: launched in %.1f ms, running %.1f ms later", c.name,
                      (launched - began) * 1000, waited * 1000)  # fmt: skip
        except BaseException:
            c.t.intents.discard(I.START)
            if c.t.state == S.SHUTOFF:
                c.t.reason = "failed"
                self._save_soon(c)
            raise
        if c.t.state == S.SHUTOFF and c.t.reason == "failed":
            raise OperationFailed(f"container '{c.name}' failed to start (see its lxc.log)")

    async def _launch(self, c: Container) -> None:
        """Write the config and ``lxc-start -d``; returns once lxc says it runs."""
        began = time.perf_counter()
        live = c.defn.copy()
        if self._assign_devices(c, live):
            await c.files.save_definition(c.defn.to_xml())  # generated MACs persist
        sources = await self._validate(live)
        ctx = await self._render_context(c, live, sources)
        await c.files.write_config(render(live, ctx))
        await self._wait_monitor_gone(c)
        c.live, c.t.exit_status = live, None
        log.debug("launch %s: config written in %.1f ms", c.name,
                  (time.perf_counter() - began) * 1000)  # fmt: skip
        try:
            await self.tools.start(c.name, init_argv(live), str(c.files.pidfile))
        except LxcError as exc:
            tail = await _log_tail(c.files.lxc_log, self.settings.log_tail_bytes)
            raise OperationFailed(
                f"lxc could not start container '{c.name}': {exc.message}"
                + (f"\n--- {c.files.lxc_log} (tail):\n{tail}" if tail else "")
            ) from exc
        await self._learn_pids(c)

    async def _learn_pids(self, c: Container) -> None:
        """After lxc-start: the monitor (its pidfile), init (its child), the cgroups —
        in one worker-thread hop, since the start's latency counts."""
        found = await asyncio.to_thread(_started_facts, c.files.pidfile, self._mounts)
        if found is None:
            return  # stopped already: the monitor's messages tell what happened
        init_pid, facts = found
        self._adopt_facts(c, init_pid, facts)
        c.oom_kills = 0  # a fresh cgroup: every OOM kill from now on is reported
        self._save_soon(c)

    def _assign_devices(self, c: Container, live: DomainDefinition) -> bool:
        """MACs and host-side veth names for interfaces without them, written into the
        live definition (and the MACs into the persistent one); True if it changed."""
        changed = False
        for iface in live.interfaces:
            if not iface.mac:
                mac = f"{MAC_PREFIX}:{c.defn.uuid[0:2]}:{c.defn.uuid[2:4]}:{iface.index:02x}"
                live.set_interface_mac(iface.index, mac)
                if iface.index < len(c.defn.interfaces) and not c.defn.interfaces[iface.index].mac:
                    c.defn.set_interface_mac(iface.index, mac)
                    changed = True
            if not iface.target_dev:
                live.set_interface_target_dev(iface.index, f"vl{c.defn.uuid[:8]}n{iface.index}")
        return changed

    async def _render_context(self, c: Container, live: DomainDefinition,
                              sources: dict[int, str]) -> RenderContext:  # fmt: skip
        root = root_filesystem(live)
        fstypes = {}
        for fs in live.filesystems:
            if fs.type == "block" and fs is not root:
                fstypes[fs.index] = await probe_fstype(sources[fs.index], self.settings)
        bridges = {}
        for iface in live.interfaces:
            if iface.type == "bridge" and iface.source_bridge:
                bridges[iface.index] = iface.source_bridge
            elif iface.type == "network" and iface.source_network:
                bridges[iface.index] = await self._networks.bridge_for(iface.source_network)
        m, s = self._mounts, self.settings
        return RenderContext(
            container_dir=str(c.files.dir), sources=sources, block_fstypes=fstypes,
            bridges=bridges, memory_v2=m.on_v2("memory"), cpu_v2=m.on_v2("cpu"),
            cpuset_v2=m.on_v2("cpuset"), halt_signal=s.halt_signal,
            reboot_signal=s.reboot_signal, log_level=s.lxc_log_level,
        )  # fmt: skip

    async def _wait_monitor_gone(self, c: Container) -> None:
        """A stopped container's monitor process exits a moment after STOPPED; a new
        lxc-start (or an undefine) waits for it rather than race its command socket."""
        pid, fd = c.monitor_pid, c.monitor_fd
        if fd is None:
            return
        if not await wait_readable(fd, self.settings.stop_timeout):
            raise OperationTimeout(
                f"the lxc monitor (pid {pid}) of '{c.name}' did not exit after its container"
                " stopped"
            )
        c.watch_monitor(None)

    async def _restart(self, c: Container) -> None:
        """The driver's half of a reboot or reset: start the container again."""
        try:
            await self._launch(c)
            await self._wait_for(c, lambda: not c.t.restarting, self.settings.start_timeout, "run")
        except VirtbusError as exc:
            log.warning("lxc: restarting %s failed: %s", c.name, exc)
            if c.t.restarting:
                self._apply(c, ev.give_up(c.t))

    # --- lifecycle ----------------------------------------------------------------------
    async def shutdown(self, ref: str, timeout: float | None = None) -> None:
        c = self._get(ref)
        self._require(c, S.RUNNING, verb="shut down")
        c.t.intents.add(I.SHUTDOWN)
        await self._stop(c)
        if timeout is not None:
            try:
                await self._wait_for(c, lambda: not c.t.active, timeout, "shut down")
            except OperationTimeout:
                raise OperationTimeout(
                    f"domain '{c.name}' did not shut down within {timeout}s"
                ) from None

    async def _stop(self, c: Container, *, kill: bool = False, reboot: bool = False) -> None:
        try:
            await self.tools.stop(c.name, kill=kill, reboot=reboot)
        except LxcError as exc:
            if "not running" not in exc.stderr:
                raise
            self._dirty.set()  # it stopped under our feet: the monitor or lxc-ls says how

    async def destroy(self, ref: str) -> None:
        c = self._get(ref)
        if not c.t.active:
            raise OperationInvalid(f"domain '{c.name}' is not running")
        c.t.intents.add(I.DESTROY)
        if c.restart is not None and not c.restart.done():
            c.restart.cancel()
            await asyncio.wait([c.restart])
        await self._stop(c, kill=True)
        if c.t.restarting:  # caught between two runs: perhaps nothing runs to be stopped
            row = (await self.tools.ls()).get(c.name)
            if row is None or row.state == "STOPPED":
                self._apply(c, ev.give_up(c.t, "destroyed", "destroyed"))
        await self._wait_for(c, lambda: not c.t.active, self.settings.stop_timeout, "stop")

    async def reboot(self, ref: str) -> None:
        c = self._get(ref)
        self._require(c, S.RUNNING, verb="reboot")
        c.t.intents.add(I.REBOOT)
        await self._stop(c, reboot=True)

    async def reset(self, ref: str) -> None:
        """Kill every process and start again at once (a ``reboot`` event), as Xen's."""
        c = self._get(ref)
        self._require(c, S.RUNNING, S.PAUSED, verb="reset")
        c.t.intents.add(I.RESET)
        await self._stop(c, kill=True)
        await self._wait_for(
            c, lambda: (not c.t.restarting and c.t.state == S.RUNNING) or not c.t.active,
            self.settings.stop_timeout + self.settings.start_timeout, "reset",
        )  # fmt: skip

    async def suspend(self, ref: str) -> None:
        c = self._get(ref)
        self._require(c, S.RUNNING, verb="suspend")
        await self.tools.freeze(c.name)
        await self._wait_for(c, lambda: c.t.state != S.RUNNING, self.settings.command_timeout,
                             "freeze")  # fmt: skip

    async def resume(self, ref: str) -> None:
        c = self._get(ref)
        self._require(c, S.PAUSED, verb="resume")
        await self.tools.unfreeze(c.name)
        await self._wait_for(c, lambda: c.t.state != S.PAUSED, self.settings.command_timeout,
                             "thaw")  # fmt: skip

    async def set_autostart(self, ref: str, enabled: bool) -> None:
        c = self._get(ref)
        await c.files.set_autostart(enabled)
        c.autostart = enabled

    async def _autostart(self) -> None:
        """Start autostart containers that are shut off, once per host boot (the marker
        lives under lxc's rundir, which a boot empties), as libvirt does."""
        marker = self.settings.monitor_fifo.parent / "virtbus-autostarted"
        if await asyncio.to_thread(marker.exists):
            return
        await asyncio.to_thread(marker.parent.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(marker.touch)
        for c in list(self._containers.values()):
            if c.autostart and not c.t.active:
                try:
                    await self.start(c.defn.uuid)
                except VirtbusError as exc:
                    log.error("lxc: autostart of %s failed: %s", c.name, exc)

    # --- inspection ---------------------------------------------------------------------
    def _info(self, c: Container, mem: cg.MemoryFigures | None, cpu: int) -> DomainInfo:
        defn = c.running_defn
        active = c.t.active
        return DomainInfo(
            name=c.name, uuid=c.defn.uuid, state=c.t.state, reason=c.t.reason,
            max_memory_kib=defn.memory_kib,
            memory_kib=mem.usage // 1024 if mem and mem.usage is not None else
            defn.current_memory_kib,
            vcpus=defn.current_vcpus, cpu_time_ns=cpu,
            id=c.init_pid if active else None, hv_type=defn.hv_type, autostart=c.autostart,
            owner=defn.owner, groups=defn.placement_groups,
        )  # fmt: skip

    def _figures(self, cs: list[Container]) -> list[tuple[cg.MemoryFigures | None, int]]:
        out: list[tuple[cg.MemoryFigures | None, int]] = []
        for c in cs:
            # read once: this runs in a worker thread, and the loop sets c.cgroups to None
            # when the container stops (a heartbeat then died on None.dir_for)
            groups = c.cgroups
            if groups is None or not c.t.active:
                out.append((None, 0))
                continue
            cpu = cg.cpu_times(groups, self._mounts, 1).get("cpu.time", 0)
            out.append((cg.memory(groups, self._mounts), cpu))
        return out

    async def info(self, ref: str) -> DomainInfo:
        c = self._get(ref)
        [(mem, cpu)] = await asyncio.to_thread(self._figures, [c])
        return self._info(c, mem, cpu)

    async def list_domains(self, include_inactive: bool = True) -> list[DomainInfo]:
        cs = [c for c in self._containers.values() if include_inactive or c.t.active]
        figures = await asyncio.to_thread(self._figures, cs)
        return [self._info(c, mem, cpu) for c, (mem, cpu) in zip(cs, figures, strict=True)]

    async def xml(self, ref: str) -> str:
        c = self._get(ref)
        if c.t.active and c.live is not None:
            return c.live.to_xml(domain_id=c.init_pid)
        return c.defn.to_xml()

    async def host_resources(self) -> HostResources:
        return await host_resources(self.name)

    async def stats(
        self, refs: list[str] | None = None, groups: frozenset[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        cs = list(self._containers.values()) if refs is None else [self._get(r) for r in refs]
        targets = [
            StatsTarget(c.name, c.t.state, c.t.reason, c.running_defn,
                        c.cgroups if c.t.active else None, c.monitor_pid)
            for c in cs
        ]  # fmt: skip
        return await asyncio.to_thread(collect, targets, groups, self._mounts)

    async def host_stats(self) -> dict[str, Any]:
        out = await asyncio.to_thread(host_stats)
        out["domains.active"] = sum(c.t.active for c in self._containers.values())
        return out

    # --- migration: containers do not migrate live (libvirt's LXC driver neither) ----------
    async def migrate_begin(self, ref: str) -> str:
        self._get(ref)
        raise NoSupport(NO_MIGRATION)

    async def migrate_prepare(self, xml: str, params: MigrationParams) -> str:
        raise NoSupport(NO_MIGRATION)

    async def migrate_perform(self, ref: str, uri: str, params: MigrationParams) -> None:
        raise NoSupport(NO_MIGRATION)

    async def migrate_status(self, ref: str) -> MigrationStatus:
        self._get(ref)
        return MigrationStatus(status=MigrationState.NONE)

    async def migrate_cancel(self, ref: str) -> None:
        raise OperationInvalid(f"domain '{self._get(ref).name}' has no migration in progress")

    async def migrate_finish(self, ref: str, success: bool) -> None:
        raise NoSupport(NO_MIGRATION)

    async def migrate_confirm(self, ref: str, success: bool) -> None:
        raise NoSupport(NO_MIGRATION)


async def wait_exit(pid: int, timeout: float) -> bool:
    """Wait (bounded) for a process that is not our child to end; True when it did.

    A pidfd becomes readable when the process exits, reaped or not (PID 1 may leave it
    a zombie), so this waits on an event rather than polling /proc.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return await wait_readable(fd, timeout)
    finally:
        os.close(fd)


async def wait_readable(fd: int, timeout: float) -> bool:
    """Wait (bounded) until ``fd`` (a pidfd: its process exited) is readable."""
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(fd, readable)
    try:
        async with asyncio.timeout(timeout):
            await gone
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


_Facts = tuple[int | None, int | None, cg.ContainerCgroups | None]


def _check_paths(defn: DomainDefinition, roots: tuple[Path, ...]) -> dict[int, str]:
    sources = resolve_sources(defn, roots)
    check_init(defn, sources)
    return sources


def _process_facts(init_pid: int, mounts: cg.CgroupMounts) -> _Facts:
    """init's start time, its parent (lxc's monitor) and its cgroups."""
    try:
        cgroups: cg.ContainerCgroups | None = cg.container_cgroups(init_pid, mounts)
    except OSError:
        cgroups = None
    return cg.process_start_time(init_pid), _parent_of(init_pid), cgroups


def _started_facts(pidfile: Path, mounts: cg.CgroupMounts) -> tuple[int, _Facts] | None:
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    kids = cg.children(int(text)) if text.isdigit() else []
    return (kids[0], _process_facts(kids[0], mounts)) if kids else None


def _parent_of(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


def _remove_empty_cgroups(mounts: cg.CgroupMounts, name: str) -> None:
    """lxc leaves empty ``lxc.monitor.NAME`` (and ``lxc.payload.NAME-N``) cgroups behind
    when a monitor cannot remove its own: rmdir only removes empty ones."""
    bases = {*mounts.v1.values(), *([mounts.v2] if mounts.v2 else [])}
    for base in bases:
        for prefix in ("lxc.monitor.", "lxc.payload."):
            for d in [base / f"{prefix}{name}", *base.glob(f"{prefix}{name}-[0-9]*")]:
                with contextlib.suppress(OSError):
                    d.rmdir()


async def _log_tail(path: Path, size: int) -> str:
    data = await read_bytes(path)
    if not data:
        return ""
    return data[-size:].decode(errors="replace").strip()
