"""Live migration of the QEMU driver: libvirt's v3 steps (begin, prepare, perform, status,
cancel, finish, confirm) and the ``_migrations`` jobs map; the QMP sequences themselves are
in :mod:`drivers.qemu.migration`.

A mixin of :class:`drivers.qemu.driver.QemuDriver`, split out of it unchanged; it uses the
driver's registry and helpers declared below for typing.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drivers.qemu import events as ev
from drivers.qemu import migration as mig
from drivers.qemu.argv import QemuPaths, build_command, graphics_needing_ports
from drivers.qemu.domain import Domain, Run
from drivers.qemu.monitor import EventQueue
from drivers.qemu.process import log_tail, spawn
from virtbus.domain import parse_domain_xml
from virtbus.errors import (
    ConfigUnsupported,
    MigrateFailed,
    OperationFailed,
    OperationInvalid,
    OperationTimeout,
    VirtbusError,
)
from virtbus.protocol.base import to_wire
from virtbus.protocol.events import DomainState
from virtbus.protocol.migration import MigrationParams, MigrationState, MigrationStatus

if TYPE_CHECKING:
    from drivers.qemu.capabilities import QemuCapabilities
    from drivers.qemu.settings import QemuSettings
    from drivers.qemu.state import StateStore
    from virtbus.domain import DomainDefinition

S = DomainState
HV_TYPES = ("qemu", "kvm")


class QemuMigrations:
    """The migration steps; ``QemuDriver`` supplies the registry and start helpers."""

    if TYPE_CHECKING:
        _settings: QemuSettings
        _store: StateStore
        _run_dir: Path
        _domains: dict[str, Domain]
        _by_name: dict[str, str]
        _next_id: int
        _migrations: dict[str, mig.Job]

        def _get(self, ref: str) -> Domain: ...
        def _add(self, defn: DomainDefinition) -> Domain: ...
        async def _persist(self, defn: DomainDefinition) -> None: ...
        def kvm_usable(self) -> bool: ...
        async def _check_files(self, defn: DomainDefinition) -> None: ...
        async def capabilities(self) -> QemuCapabilities | None: ...

    migration_settings = mig.MigrationSettings()  # replace per instance to tune

    def _incoming(self, dom: Domain) -> bool:
        """A transient domain: an incoming migration not finished yet."""
        job = self._migrations.get(dom.defn.uuid)
        return job is not None and job.role == "destination" and not job.finished

    async def migrate_begin(self, ref: str) -> str:
        dom = self._get(ref)
        run = dom.require(S.RUNNING, S.PAUSED, verb="migrate")
        job = self._migrations.get(dom.defn.uuid)
        if ev.Pending.INCOMING in run.pending or (job is not None and job.active):
            raise OperationInvalid(f"domain '{dom.defn.name}' is already migrating")
        return run.live.to_xml()  # what the source runs: the destination must run the same

    async def migrate_prepare(self, xml: str, params: MigrationParams) -> str:
        """Start an incoming QEMU (``-incoming defer``, paused) and ``migrate-incoming``."""
        defn = parse_domain_xml(xml)
        if defn.hv_type not in HV_TYPES:
            raise ConfigUnsupported(f"domain type '{defn.hv_type}' is not supported here")
        other = self._by_name.get(defn.name)
        if other is not None and other != defn.uuid:
            raise OperationFailed(f"domain '{defn.name}' already exists with uuid {other}")
        dom = self._domains.get(defn.uuid)
        if dom is not None and (dom.run is not None or dom.state != S.SHUTOFF):
            raise OperationInvalid(f"domain '{defn.name}' is already active on this host")
        if defn.hv_type == "kvm" and not self.kvm_usable():
            raise ConfigUnsupported(f"domain '{defn.name}' needs KVM: /dev/kvm is not usable")
        await self._check_files(defn)
        live = defn.copy()
        ports = {index: free_tcp_port() for index in graphics_needing_ports(live)}
        launch = build_command(
            live, QemuPaths(self._run_dir), kvm_available=self.kvm_usable(), incoming="defer",
            emulator=self._settings.emulator, graphics_ports=ports, caps=await self.capabilities(),
        )  # fmt: skip
        qmp_socket, logfile = Path(launch.qmp_socket), Path(launch.logfile)
        await self._store.check_bind_paths(launch.bind_paths)
        await self._store.remove_own_sockets((*launch.sockets, qmp_socket))
        process = await spawn(list(launch.argv), uuid=live.uuid, logfile=logfile)
        run = Run(
            self._next_id, live, process, qmp_socket, EventQueue(self._settings.event_queue),
            pidfile=Path(launch.pidfile), logfile=logfile, sockets=tuple(launch.sockets),
            job={"migration": "incoming", "params": to_wire(params), "new_domain": dom is None},
        )  # fmt: skip
        self._next_id += 1
        job = mig.Job("destination", params, self.migration_settings, defn=defn,
                      new_domain=dom is None)  # fmt: skip
        run.migration = job
        run.pending.add(ev.Pending.INCOMING)
        dom = dom or self._add(defn)
        previous = dom.reason
        dom.run, dom.state, dom.reason = run, S.PAUSED, "migration"
        self._migrations[defn.uuid] = job
        try:
            await dom.attach(run)
            execute = run.monitor.execute  # type: ignore[union-attr]
            await mig.configure(execute, params, "destination", self.migration_settings)
            uri = await mig.start_incoming(execute, params, self.migration_settings)
            await dom.save_status(run)
        except BaseException as exc:
            await dom.abort_start(run, previous)
            self._drop_incoming(dom, job)
            if isinstance(exc, VirtbusError | OSError):
                tail = await log_tail(logfile, self._settings.log_tail_bytes)
                raise MigrateFailed(
                    f"cannot prepare the incoming migration of '{defn.name}': {exc}"
                    + (f"\n--- log tail ({logfile}):\n{tail}" if tail else "")
                ) from exc
            raise
        dom.helper(run, self._watch_incoming(dom, run, job), f"qemu-incoming-{defn.name}")
        dom.emit("started", "migrated")  # libvirt emits it at prepare (paused, migration)
        return uri

    async def _watch_incoming(self, dom: Domain, run: Run, job: mig.Job) -> None:
        """An incoming QEMU that ends before finish(True) takes its transient domain along
        (the run's teardown cancels this helper after setting ``ended``)."""
        try:
            await run.ended.wait()
        finally:
            if run.ended.is_set() and not job.finished:
                self._drop_incoming(dom, job)

    def _drop_incoming(self, dom: Domain, job: mig.Job) -> None:
        if self._migrations.get(dom.defn.uuid) is job:
            del self._migrations[dom.defn.uuid]
        if job.new_domain and dom.run is None and self._domains.get(dom.defn.uuid) is dom:
            del self._domains[dom.defn.uuid]  # transient: vanishes without `undefined`
            self._by_name.pop(dom.defn.name, None)

    async def migrate_perform(self, ref: str, uri: str, params: MigrationParams) -> None:
        """Configure the source and ``migrate``; a job task follows and reports progress."""
        mig.parse_tcp_uri(uri)
        dom = self._get(ref)
        run = dom.require(S.RUNNING, S.PAUSED, verb="migrate")
        old = self._migrations.get(dom.defn.uuid)
        if ev.Pending.INCOMING in run.pending or (old is not None and old.active):
            raise OperationInvalid(f"domain '{dom.defn.name}' is already migrating")

        async def execute(cmd: str, args: dict[str, Any] | None = None) -> Any:
            return await dom.execute(run, cmd, args)

        settings = self.migration_settings
        try:
            await mig.configure(execute, params, "source", settings)
        except VirtbusError as exc:
            raise MigrateFailed(
                f"cannot configure the migration of '{dom.defn.name}': {exc}"
            ) from exc
        job = mig.Job("source", params, settings)
        self._migrations[dom.defn.uuid] = run.migration = job
        run.pending -= {ev.Pending.MIGRATED_OUT}
        run.pending.add(ev.Pending.MIGRATING)
        emit = lambda st: dom.emit("migration", None, to_wire(st))  # noqa: E731
        dom.helper(run, job.follow(execute, emit), f"qemu-migrate-{dom.defn.name}")
        run.job = {"migration": "outgoing", "uri": uri, "params": to_wire(params)}
        try:
            await execute("migrate", {"uri": uri})
        except VirtbusError as exc:
            job.end(MigrationState.FAILED, str(exc))
            run.pending.discard(ev.Pending.MIGRATING)
            run.job = None
            raise MigrateFailed(f"migration of '{dom.defn.name}' to {uri} failed: {exc}") from exc
        await dom.save_status(run)

    async def migrate_status(self, ref: str) -> MigrationStatus:
        dom = self._get(ref)
        job = self._migrations.get(dom.defn.uuid)
        if job is None:
            return MigrationStatus(status=MigrationState.NONE)
        run = dom.run
        if job.active and run is not None and run.monitor is not None:
            try:
                fresh = mig.status_from_query(await run.monitor.execute("query-migrate"))
            except VirtbusError:
                return job.status
            if fresh.status != "none":
                fresh.passes = max(fresh.passes, job.status.passes)
                return fresh
        return job.status

    async def migrate_cancel(self, ref: str) -> None:
        dom = self._get(ref)
        job = self._migrations.get(dom.defn.uuid)
        if job is None or job.role != "source" or not job.active or dom.run is None:
            raise OperationInvalid(f"no migration in progress for domain '{dom.defn.name}'")
        if job.in_postcopy:  # libvirt refuses too: the destination already runs the guest
            raise OperationInvalid(
                f"cannot cancel the migration of '{dom.defn.name}' in postcopy mode"
            )
        await dom.execute(dom.run, "migrate_cancel")
        if not await job.wait_done(self.migration_settings.cancel_wait):
            raise OperationTimeout(f"migration of '{dom.defn.name}' did not stop after cancel")

    async def migrate_finish(self, ref: str, success: bool) -> None:
        """Destination: resume and own the definition, or kill the incoming QEMU."""
        dom = self._get(ref)
        job = self._migrations.get(dom.defn.uuid)
        run = dom.run
        if job is None or job.role != "destination":
            raise OperationInvalid(f"domain '{dom.defn.name}' is not an incoming migration")
        if not success or run is None:
            if run is not None:
                run.pending.add(ev.Pending.DESTROY)  # with INCOMING: stopped(failed)
                await dom.stop_process(run)
                await self._wait_ended(dom, run)
            self._drop_incoming(dom, job)
            if success:
                raise MigrateFailed(f"the incoming QEMU of '{dom.defn.name}' is gone")
            return
        try:
            await self._resume_incoming(dom, run, job)
        except VirtbusError as exc:  # as libvirt: a failed finish kills the destination
            await self.migrate_finish(ref, False)
            raise MigrateFailed(f"cannot finish the migration of '{dom.defn.name}': {exc}") from exc

    async def _resume_incoming(self, dom: Domain, run: Run, job: mig.Job) -> None:
        settings = self.migration_settings
        done = ("completed", "postcopy-active")
        if job.status.status not in done:  # the MIGRATION event may still be on its way
            fresh = mig.status_from_query(await dom.execute(run, "query-migrate"))
            if fresh.status in done:
                job.status = fresh
            elif not await job.wait_status(lambda st: st.status in done, settings.finish_wait):
                raise MigrateFailed(f"incoming migration is '{job.status.status}', not completed")
        job.finished = True
        defn = job.defn or run.live.copy()
        await self._persist(defn)
        dom.defn = defn
        dom.emit("defined", "added" if job.new_domain else "updated")
        await dom.execute(run, "cont")  # RESUME with INCOMING: resumed(migrated)
        await dom.wait(run, lambda: ev.Pending.INCOMING not in run.pending, "migrate_finish")
        if self._migrations.get(dom.defn.uuid) is job:
            del self._migrations[dom.defn.uuid]
        run.migration, run.job = None, None
        await dom.save_status(run)

    async def migrate_confirm(self, ref: str, success: bool) -> None:
        """Source: stop and forget the old instance, or resume it if the migration paused it."""
        dom = self._get(ref)
        uuid = dom.defn.uuid
        job = self._migrations.get(uuid)
        run = dom.run
        if success:
            if job is not None and job.active:  # its last MIGRATION event may be on its way
                done = mig.TERMINAL
                await job.wait_status(lambda st: st.status in done, self._settings.qmp_timeout)
            if job is None or job.status.status != "completed":
                raise OperationInvalid(f"migration of domain '{dom.defn.name}' has not completed")
            if run is not None:
                run.pending.add(ev.Pending.MIGRATED_OUT)  # its exit: stopped(migrated)
                await dom.stop_process(run)
                await self._wait_ended(dom, run)
            self._migrations.pop(uuid, None)
            await self._store.remove_definition(uuid)
            self._domains.pop(uuid, None)
            self._by_name.pop(dom.defn.name, None)
            dom.emit("undefined", "removed")
            return
        if job is not None and job.active and not job.in_postcopy:
            await self.migrate_cancel(ref)
        self._migrations.pop(uuid, None)
        if run is None:
            return
        run.migration, run.job = None, None
        if job is not None and job.in_postcopy:
            dom.state, dom.reason = S.PAUSED, "postcopy_failed"
            dom.emit("suspended", "postcopy_failed")
            run.pending.discard(ev.Pending.MIGRATING)
            raise MigrateFailed(
                f"the migration of '{dom.defn.name}' failed after switching to postcopy: the"
                " guest's memory is split between the hosts, it cannot be resumed here"
            )
        if dom.state == S.PAUSED and dom.reason == "migration":
            run.pending.add(ev.Pending.RESUME)
            try:
                await dom.execute(run, "cont")  # RESUME with MIGRATING: resumed(migrated)
                await dom.wait(run, lambda: ev.Pending.RESUME not in run.pending, "confirm")
            finally:
                run.pending.discard(ev.Pending.RESUME)
        run.pending.discard(ev.Pending.MIGRATING)
        await dom.save_status(run)

    async def _wait_ended(self, dom: Domain, run: Run) -> None:
        try:
            await asyncio.wait_for(run.ended.wait(), self._settings.exit_wait)
        except TimeoutError:
            await dom.on_exit(run)  # the event task is stuck: finish it here


def free_tcp_port() -> int:
    """A port free right now on 127.0.0.1, for a SPICE server QEMU cannot autoport."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
