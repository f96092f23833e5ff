"""Launching a domain's QEMU: the one path that ``start`` and an incoming migration share.

:meth:`Launcher.launch` checks the host (KVM, storage files, no stray QEMU of the same
uuid), lets every launch step acquire what the domain needs on the host, builds the
command line, spawns QEMU stopped (``-S``, or ``-incoming defer``), connects QMP, starts
the domain's event task and writes the runtime values (balloon target, graphics ports,
pty paths) back into the live definition. The caller's own steps (``cont`` and the wait
for it, or the migration setup) run inside the ``async with``: if anything fails, the
QEMU is killed, the run torn down, what the steps acquired released, and the domain is
shut off again, with QEMU's log tail in the error.

Where a launch grows: a host resource a domain needs before the command line is built
(a volume lease, a tap fd) is a :class:`LaunchStep` handed to the driver. Its
``acquire`` adds to the :class:`LaunchPlan` (fds QEMU inherits, inputs of the command
line builder: add a field there and pass it on in :meth:`Launcher._command`), and its
``release`` gives it back by uuid when the launch fails or the run ends, also after an
agent restart (:meth:`drivers.qemu.domain.Runtime.release`). What the built command line
asks for (helper processes such as swtpm or virtiofsd, transient-disk overlays, an NVRAM
from its template) is prepared after the build by :mod:`drivers.qemu.companions` and
released with the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiofiles.os

from drivers.base import ResolvedTap, ResolvedVolume
from drivers.qemu import companions as comp
from drivers.qemu import confine, postparse
from drivers.qemu import events as ev
from drivers.qemu.argv import (
    QemuLaunch,
    QemuPaths,
    build_command,
    disk_paths,
    graphics_needing_ports,
)
from drivers.qemu.argv_common import ArgvSettings
from drivers.qemu.capabilities import QemuCapabilities, probe
from drivers.qemu.cgroup import DeviceCgroups
from drivers.qemu.cputune import preexec_affinity
from drivers.qemu.dac import DacLabels, QemuUser
from drivers.qemu.domain import Domain, Run, Runtime
from drivers.qemu.firmware import Descriptor, load_descriptors
from drivers.qemu.host import HostFacts
from drivers.qemu.host import probe as host_probe
from drivers.qemu.monitor import EventQueue
from drivers.qemu.process import log_tail, read_pidfile, spawn
from virtbus.domain import DomainDefinition
from virtbus.domain.model import Element
from virtbus.errors import ConfigUnsupported, OperationFailed, OperationInvalid, VirtbusError
from virtbus.protocol.events import DomainState

if TYPE_CHECKING:
    from drivers.qemu.registry import DomainRegistry

log = logging.getLogger(__name__)
S = DomainState
HV_TYPES = ("qemu", "kvm")


def check_type(defn: DomainDefinition) -> None:
    """CONFIG_UNSUPPORTED for a domain type this driver does not run."""
    if defn.hv_type not in HV_TYPES:
        raise ConfigUnsupported(
            f"domain type '{defn.hv_type}' is not supported by the qemu driver "
            f"(use {' or '.join(HV_TYPES)})"
        )


@dataclass(slots=True)
class LaunchPlan:
    """What one launch collects before QEMU is spawned (see :class:`LaunchStep`)."""

    live: DomainDefinition  # the definition QEMU runs with
    incoming: str | None = None  # ``-incoming`` (a migration's destination)
    graphics_ports: dict[int, int] = field(default_factory=dict)  # <graphics> index -> port
    pass_fds: list[int] = field(default_factory=list)  # inherited by QEMU under these numbers;
    # the agent's copies are closed once QEMU runs (or the launch failed)
    #: what each <disk type='volume'> (by disk index) resolved to (the VolumeLeases step);
    #: None while a definition is only validated (a placeholder stands in)
    volumes: dict[int, ResolvedVolume] | None = None
    #: the tap of each <interface type='network'> on the agent's networks (by interface
    #: index; drivers/qemu/taps.py), its fd in ``pass_fds``; None while only validated
    taps: dict[int, ResolvedTap] | None = None
    host: HostFacts | None = None  # this host's hugepages, NUMA nodes, CPUs, firmware
    monitor_fd: int | None = None  # the QMP socket QEMU inherits (in ``pass_fds``), not bound yet

    def close_fds(self) -> None:
        for fd in self.pass_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pass_fds.clear()


class LaunchStep(Protocol):
    """A host resource a launch acquires for a domain before its QEMU starts."""

    async def acquire(self, plan: LaunchPlan) -> None:
        """Add to ``plan`` what the command line and the spawn need."""

    async def release(self, uuid: str) -> None:
        """Give back what ``acquire`` took for domain ``uuid`` (idempotent, by uuid only:
        after an agent restart no plan is left)."""


class GraphicsPorts:
    """A TCP port for each ``<graphics>`` that QEMU cannot autoport (SPICE)."""

    async def acquire(self, plan: LaunchPlan) -> None:
        plan.graphics_ports = {i: free_tcp_port() for i in graphics_needing_ports(plan.live)}

    async def release(self, uuid: str) -> None:
        """Nothing to give back: QEMU holds the port, and closes it when it exits."""


@dataclass(frozen=True, slots=True)
class Launched:
    """What a launch hands the caller inside its ``async with``."""

    run: Run
    generated_macs: dict[int, str]  # <interface> index -> the MAC the builder made up


class Launcher:
    """Builds, spawns and attaches the QEMU of a domain (see module docstring)."""

    def __init__(self, rt: Runtime, registry: DomainRegistry, argv: ArgvSettings, *,
                 caps: QemuCapabilities | None = None,
                 pools: Callable[[], tuple[Path, ...]] = tuple,
                 dac: DacLabels | None = None, cgroups: DeviceCgroups | None = None,
                 tap_placeholders: Callable[[DomainDefinition], dict[int, ResolvedTap]]
                 = lambda _defn: {}) -> None:  # fmt: skip
        """``argv``: the command line's settings; ``caps``: the emulator's capabilities
        when already known (None: probed once); ``pools``: the active storage pools'
        targets now (a domain's files may be inside one); ``dac``: the launch step that
        gives the domain's files to the QEMU user (:mod:`drivers.qemu.dac`), if any;
        ``cgroups``: the launch step of the domains' device cgroups
        (:mod:`drivers.qemu.cgroup`), whose group each QEMU joins before it is exec'd;
        ``tap_placeholders``: stand-ins for the taps a definition's NICs get at start."""
        self._cgroups = cgroups
        self._tap_placeholders = tap_placeholders
        self._pools = pools
        self._dac = dac
        self._rt = rt
        self._settings = rt.settings
        self._registry = registry
        self._argv = argv
        # per-domain uids: QEMU's own files are in the domain's own dir, its uid's
        self._paths = QemuPaths(rt.store.run_dir,
                                private=dac is not None and dac.per_domain)  # fmt: skip
        self._kvm: bool | None = None
        self._caps: QemuCapabilities | None = caps
        self._firmware: tuple[Descriptor, ...] | None = None

    def kvm_usable(self) -> bool:
        """/dev/kvm is readable, writable and really opens (cached)."""
        if self._kvm is None:
            self._kvm = False
            if os.access("/dev/kvm", os.R_OK | os.W_OK):
                try:
                    os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
                    self._kvm = True
                except OSError:
                    pass
        return self._kvm

    async def capabilities(self) -> QemuCapabilities | None:
        """What the emulator supports (probed once; None if probing failed)."""
        if self._caps is None:
            try:
                self._caps = await probe(self._settings.emulator)
            except VirtbusError as exc:
                log.warning("cannot probe %s: %s", self._settings.emulator, exc)
                return None
        return self._caps

    async def firmware(self) -> tuple[Descriptor, ...]:
        """QEMU's firmware descriptors on this host (read once)."""
        if self._firmware is None:
            self._firmware = await asyncio.to_thread(load_descriptors, self._settings.firmware_dirs)
        return self._firmware

    async def complete(self, defn: DomainDefinition) -> None:
        """Fill in what libvirt fills in at define (:mod:`drivers.qemu.postparse`): implicit
        devices, defaults, the firmware chosen from this host's descriptors, addresses."""
        check_type(defn)
        firmware, caps = await self.firmware(), await self.capabilities()
        postparse.complete(defn, firmware=firmware, nvram_dir=self._argv.nvram_dir, caps=caps)

    def validate(self, defn: DomainDefinition) -> None:
        """Reject at define time what a launch would reject (CONFIG_UNSUPPORTED naming it);
        ``defn`` is completed already (:meth:`complete`).

        KVM availability and the binary's capabilities are checked at launch only: a
        definition may be meant for another host.
        """
        check_type(defn)
        ports = dict.fromkeys(graphics_needing_ports(defn), 5900)
        plan = LaunchPlan(defn.copy(), graphics_ports=ports)
        plan.taps = self._tap_placeholders(plan.live)
        self._command(plan, kvm=True, caps=None, completed=True)

    async def confine(self, defn: DomainDefinition, device: Element | None = None, *,
                      images: bool = False) -> None:  # fmt: skip
        """AUTH_DENIED for a host path of ``defn`` (or of the one ``device`` being added to
        it) that this host does not let a domain use (:mod:`drivers.qemu.confine`): at
        define, at hot-plug and at start (``images``: the qcow2 headers are read too)."""
        settings = self._settings.confinement()
        if not settings.enforce:
            return
        firmware = frozenset(
            p for d in await self.firmware() for p in (d.executable, d.nvram_template) if p
        )
        roots = confine.Roots(
            settings, confine.own_dir(self._rt.store.run_dir, defn.uuid), pools=self._pools(),
            nvram_dir=self._argv.nvram_dir, firmware=firmware,
        )  # fmt: skip
        if device is not None:
            for hp in confine.host_paths(device):
                await asyncio.to_thread(confine.check_path, hp, roots, defn.name)
            for what, address in confine.listen_addresses(device):
                confine.check_listen(defn.name, what, address, settings)
            return
        await asyncio.to_thread(confine.check, defn, roots, images=images)

    def check_listen(self, domain: str, what: str, address: str) -> None:
        """AUTH_DENIED unless this host lets ``domain`` listen on ``address``."""
        confine.check_listen(domain, what, address, self._settings.confinement())

    async def confine_file(self, defn: DomainDefinition, path: str, what: str) -> None:
        """AUTH_DENIED for a file the agent would write or read for ``defn`` (a save file)
        outside the places a domain's files may be: the agent runs as root."""
        settings = self._settings.confinement()
        if not settings.enforce:
            return
        roots = confine.Roots(
            settings, confine.own_dir(self._rt.store.run_dir, defn.uuid), pools=self._pools(),
            nvram_dir=self._argv.nvram_dir, firmware=frozenset(),
        )  # fmt: skip
        hp = confine.HostPath(what, path, confine.Kind.FILE)
        await asyncio.to_thread(confine.check_path, hp, roots, defn.name)

    def forget(self, uuid: str) -> None:
        """The domain is gone from this host (undefined, or migrated away): its persistent
        helper state (a TPM's) goes too, as libvirt removes it, and its uid is free. The
        helpers' logs stay (as libvirt's do), given back to the agent's user: a uid that
        is free again may be the next domain's, which must not own this one's logs."""
        comp.forget(self._argv, uuid)
        if self._dac is not None:
            comp.disown_logs(self._rt.store.run_dir, uuid)
        self.free_uid(uuid)

    def qemu_user(self, uuid: str) -> QemuUser | None:
        """Who the QEMU of ``uuid`` runs as (None: the agent's user) and its own run dir."""
        return self._dac.user(uuid) if self._dac is not None else None

    async def label_disk(self, live: DomainDefinition, el: Element, volume: str | None,
                         ) -> list[str]:  # fmt: skip
        """Give a disk being hot-plugged to the domain's QEMU user (drivers/qemu/dac.py);
        the paths given, for :meth:`unlabel_disk` (none when QEMU runs as the agent's)."""
        if self._dac is None:
            return []
        return await self._dac.acquire_disk(live, el, volume)

    async def unlabel_disk(self, uuid: str, paths: list[str]) -> None:
        """Give back what :meth:`label_disk` gave (a detached or failed hot-plug)."""
        if self._dac is not None and paths:
            await self._dac.release_disk(uuid, paths)

    def own_dir(self, uuid: str) -> Path:
        return confine.own_dir(self._rt.store.run_dir, uuid)

    def free_uid(self, uuid: str) -> None:
        """The per-domain uid of ``uuid`` (qemu_uid_range) is free again."""
        if self._dac is not None:
            self._dac.forget(uuid)

    def prune_uids(self, known: set[str]) -> None:
        """Free the per-domain uids of every domain not in ``known`` (at open)."""
        if self._dac is not None:
            self._dac.prune(known)

    def _command(self, plan: LaunchPlan, *, kvm: bool, caps: QemuCapabilities | None,
                 completed: bool = False) -> QemuLaunch:  # fmt: skip
        """The one call of the command-line builder (define-time checks and launches)."""
        return build_command(
            plan.live, self._paths, kvm_available=kvm, incoming=plan.incoming,
            emulator=self._settings.emulator, graphics_ports=plan.graphics_ports, caps=caps,
            volumes=plan.volumes, taps=plan.taps, monitor_fd=plan.monitor_fd,
            settings=self._argv, host=plan.host, completed=completed,
        )  # fmt: skip

    @contextlib.asynccontextmanager
    async def launch(
        self, dom: Domain, live: DomainDefinition, *, pending: ev.Pending, reason: str,
        failure: Callable[[str], VirtbusError], incoming: str | None = None,
        job: dict[str, Any] | None = None,
    ) -> AsyncIterator[Launched]:  # fmt: skip
        """Run ``live`` as ``dom``'s QEMU, stopped: paused (``reason``) with ``pending`` set.

        Errors before QEMU runs (host checks, the command line, exec) propagate as they
        are and leave nothing behind. Once it runs, a failure here or in the caller's
        ``async with`` body kills it and shuts the domain off again; a VirtbusError or
        OSError then becomes ``failure(detail)``, the detail ending with QEMU's log tail.
        """
        await self._check_host(dom, live)
        plan = LaunchPlan(live, incoming)
        launch, run = await self._spawn(plan, job)
        run.pending.add(pending)
        previous = dom.reason
        dom.run, dom.state, dom.reason = run, S.PAUSED, reason
        try:
            await dom.attach(run)
            pid = await read_pidfile(Path(launch.pidfile))
            if pid is not None and pid != run.process.pid:
                log.warning("pidfile of %s says %d, child is %d", live.name, pid, run.process.pid)
            await self._companions_started(dom, run, launch)
            await self._apply_runtime(run, launch)
            yield Launched(run, dict(launch.generated_macs))
        except BaseException as exc:
            await dom.abort_start(run, previous)
            if isinstance(exc, VirtbusError | OSError):
                logfile = Path(launch.logfile)
                tail = await log_tail(logfile, self._settings.log_tail_bytes)
                raise failure(
                    f"{exc}" + (f"\n--- log tail ({logfile}):\n{tail}" if tail else "")
                ) from exc
            raise

    async def _check_host(self, dom: Domain, live: DomainDefinition) -> None:
        """What this host must offer: clear errors instead of QEMU's."""
        for stray in self._registry.strays:  # its status file was lost: never run it twice
            if stray.uuid == live.uuid and await aiofiles.os.path.exists(f"/proc/{stray.pid}"):
                raise OperationInvalid(
                    f"a QEMU process this agent does not manage (pid {stray.pid}) already runs "
                    f"domain '{dom.defn.name}'; stop it before starting the domain"
                )
        await self.confine(live, images=True)  # pools and symlinks may have changed
        await aiofiles.os.makedirs(confine.own_dir(self._rt.store.run_dir, live.uuid),
                                   mode=0o700, exist_ok=True)  # fmt: skip
        if live.hv_type == "kvm" and not self.kvm_usable():
            raise ConfigUnsupported(
                f"domain '{live.name}' has type 'kvm' but /dev/kvm is not usable on this host"
            )
        for path in disk_paths(live):
            if not await aiofiles.os.path.exists(path):
                raise OperationFailed(
                    f"cannot access storage file '{path}' (domain '{live.name}'):"
                    " No such file or directory"
                )

    async def _spawn(self, plan: LaunchPlan, job: dict[str, Any] | None) -> tuple[QemuLaunch, Run]:
        """Acquire, build, spawn; on failure what the steps acquired is released."""
        live = plan.live
        companions: comp.Companions | None = None
        try:
            for step in self._rt.steps:
                await step.acquire(plan)
            plan.host = await host_probe(self._settings.firmware_dirs)  # it changes: read now
            # QMP's socket: made here and inherited (bound below, once the stale one is gone),
            # so the monitor answers as soon as QEMU runs: no waiting for QEMU to create it
            monitor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            plan.monitor_fd = monitor.detach()
            plan.pass_fds.append(plan.monitor_fd)
            launch = self._command(plan, kvm=self.kvm_usable(), caps=await self.capabilities())
            if plan.incoming is not None and launch.overlays:  # libvirt refuses it too
                raise OperationInvalid(
                    f"cannot migrate domain '{live.name}': it has transient disks (their "
                    "overlays stay on the source)"
                )
            for index, mac in launch.generated_macs.items():
                live.set_interface_mac(index, mac)
            for index, tap in (plan.taps or {}).items():
                live.set_interface_target_dev(index, tap.ifname)
            qmp_socket, logfile = Path(launch.qmp_socket), Path(launch.logfile)
            await self._rt.store.check_bind_paths(launch.bind_paths)
            await self._rt.store.remove_own_sockets((*launch.sockets, qmp_socket))  # stale
            _listen(plan.monitor_fd, qmp_socket)
            # an incoming swtpm starts empty: the TPM's state arrives in QEMU's stream
            user = self._dac.user(live.uuid) if self._dac is not None else None
            companions = await comp.prepare(launch, self._rt.store.run_dir, live.uuid,
                                            incoming=plan.incoming is not None,
                                            settings=self._settings.companions,
                                            user=user)  # fmt: skip
            process = await spawn(
                list(launch.argv), uuid=live.uuid, logfile=logfile, pass_fds=plan.pass_fds,
                env=launch.env, cpus=preexec_affinity(launch.cpu_tuning), user=user,
                cgroup=self._cgroups.procs(live.uuid) if self._cgroups is not None else None,
            )  # fmt: skip
        except BaseException:
            if companions is not None:
                await comp.release(companions, self._settings.companions)
            await self._rt.release(live.uuid)
            raise
        finally:
            plan.close_fds()
        run = Run(
            self._registry.new_run_id(), live, process, qmp_socket,
            EventQueue(self._settings.event_queue), pidfile=Path(launch.pidfile),
            logfile=logfile, sockets=tuple(launch.sockets), job=job, companions=companions,
        )  # fmt: skip
        return launch, run

    async def _companions_started(self, dom: Domain, run: Run, launch: QemuLaunch) -> None:
        """QEMU is up and paused: pinning, links, passwords, scripts; watch the helpers."""
        assert run.monitor is not None and run.companions is not None
        await comp.started(run.companions, launch, run.process.pid, run.monitor.execute,
                           self._settings.companions)  # fmt: skip
        if run.companions.helpers.processes:
            dom.helper(run, comp.watch(run.companions, dom.defn.name),
                       f"qemu-helpers-{dom.defn.name}")  # fmt: skip

    async def _apply_runtime(self, run: Run, launch: QemuLaunch) -> None:
        """Balloon target, graphics ports and pty paths, while QEMU is still stopped.

        Each QMP call here happens only when the definition needs it.
        """
        monitor = run.monitor
        assert monitor is not None
        live = run.live
        if launch.balloon and launch.balloon_target_kib is not None:
            await monitor.execute("balloon", {"value": launch.balloon_target_kib * 1024})
        for gfx in live.graphics:
            if gfx.type == "vnc" and launch.vnc is not None:
                port = None
                if launch.vnc.autoport:
                    vnc = await monitor.execute("query-vnc")
                    service = str(vnc.get("service", "")) if isinstance(vnc, dict) else ""
                    port = int(service) if service.isdigit() else None
                elif launch.vnc.display is not None:
                    port = 5900 + launch.vnc.display
                if port is not None:
                    live.set_graphics_port(gfx.index, port)
            elif gfx.type == "spice" and launch.spice is not None:
                live.set_graphics_port(gfx.index, launch.spice.port)
        ptys = [c for c in launch.chardevs if c.type == "pty"]
        if ptys:
            found = await monitor.execute("query-chardev")
            by_label = {c.get("label"): str(c.get("filename", "")) for c in found or []}
            for cd in ptys:
                name = by_label.get(cd.chardev_id, "")
                if name.startswith("pty:"):
                    live.set_chardev_source_path(cd.kind, cd.index, name[4:])
        run.live_xml = None  # runtime values written back: serialise it again


def _listen(fd: int, path: Path) -> None:
    """Bind and listen the (inherited) socket ``fd`` at ``path``; the fd stays open."""
    sock = socket.socket(fileno=fd)
    try:
        sock.bind(str(path))
        sock.listen(8)
    finally:
        sock.detach()


def free_tcp_port() -> int:
    """A port free right now on 127.0.0.1, for a SPICE server QEMU cannot autoport."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
