"""Live migration of the QEMU driver: libvirt's v3 steps (begin, prepare, perform, status,
cancel, finish, confirm), the jobs in flight and their reattach after an agent restart.
The QMP sequences themselves are in :mod:`drivers.qemu.migration`.

:class:`MigrationSteps` is a collaborator of the driver: it finds domains in the
:class:`~drivers.qemu.registry.DomainRegistry`, starts an incoming QEMU through the
:class:`~drivers.qemu.launch.Launcher` (the same launch as ``start``) and owns the map of
jobs by uuid; nothing else touches those jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os.path
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from drivers.qemu import copy_storage as cs
from drivers.qemu import events as ev
from drivers.qemu import external
from drivers.qemu import migration as mig
from drivers.qemu.launch import check_type
from virtbus.domain import parse_domain_xml
from virtbus.errors import (
    InvalidArgument,
    MigrateFailed,
    OperationInvalid,
    OperationTimeout,
    VirtbusError,
)
from virtbus.protocol.base import decode, to_wire
from virtbus.protocol.events import DomainState
from virtbus.protocol.migration import (
    CopyDisk,
    MigrationParams,
    MigrationState,
    MigrationStatus,
    NbdTarget,
)

if TYPE_CHECKING:
    from drivers.qemu.domain import Domain, Run
    from drivers.qemu.launch import Launcher
    from drivers.qemu.registry import DomainRegistry
    from drivers.qemu.settings import QemuSettings
    from drivers.qemu.state import RunStatus, StateStore

log = logging.getLogger(__name__)
S = DomainState
#: announce-self's timing (ms), QEMU's own defaults for its announcement after a migration
ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}


def job_kind(status: RunStatus) -> str | None:
    """``incoming``/``outgoing`` when a run's status says it was in a live migration."""
    kind = (status.job or {}).get("migration")
    return kind if kind in ("incoming", "outgoing") else None


class MigrationSteps:
    """The migration steps of one driver (see module docstring)."""

    def __init__(
        self, registry: DomainRegistry, launcher: Launcher, store: StateStore,
        settings: QemuSettings, migration: mig.MigrationSettings,
    ) -> None:  # fmt: skip
        self._registry = registry
        self._launcher = launcher
        self._store = store
        self._settings = settings
        self._migration = migration
        self._jobs: dict[str, mig.Job] = {}  # by uuid: live migrations in or out

    def transient(self, dom: Domain) -> bool:
        """An incoming migration not finished yet: its domain is not persistent here."""
        job = self._jobs.get(dom.defn.uuid)
        return job is not None and job.role == "destination" and not job.finished

    def _check_idle(self, dom: Domain, run: Run) -> None:
        job = self._jobs.get(dom.defn.uuid)
        if ev.Pending.INCOMING in run.pending or (job is not None and job.active):
            raise OperationInvalid(f"domain '{dom.defn.name}' is already migrating")

    def check_tls(self, params: MigrationParams) -> None:
        """libvirt's migrate_tls_force: this host migrates (in or out) only over TLS; asked
        at begin (source) and prepare (destination), before anything moves."""
        if self._settings.migrate_tls_force and not params.tls:
            raise OperationInvalid(
                "this host allows migration only over TLS (migrate_tls_force): migrate with"
                " --tls (params.tls)"
            )

    async def _tls_setup(self, execute: mig.Execute, params: MigrationParams,
                         role: mig.Role, uuid: str) -> None:  # fmt: skip
        """The side's credentials in its QEMU. A QEMU of an unprivileged user (qemu_user,
        qemu_uid_range) cannot read the host's keys: it is handed a copy of the files its
        side needs in its own run dir, owned by its uid, removed again once QEMU loaded
        them (tls-creds-x509 reads its files once, when it is created)."""
        if not params.tls:
            return
        cfg = self._settings
        user = self._launcher.qemu_user(uuid)
        if user is None:
            await mig.tls_setup(execute, role, cfg.migrate_tls_x509_cert_dir,
                                cfg.migrate_tls_x509_verify)  # fmt: skip
            return
        source = Path(cfg.migrate_tls_x509_cert_dir)
        copy = self._launcher.own_dir(uuid) / "migrate-tls"
        await asyncio.to_thread(mig.tls_copy, source, role, copy, user.uid, user.gid)
        try:
            await mig.tls_setup(execute, role, str(copy), cfg.migrate_tls_x509_verify,
                                shown=str(source))  # fmt: skip
        finally:
            await asyncio.to_thread(shutil.rmtree, copy, True)

    async def begin(self, ref: str) -> str:
        dom = self._registry.get(ref)
        run = dom.require(S.RUNNING, S.PAUSED, verb="migrate")
        self._check_idle(dom, run)
        return run.live.to_xml()  # what the source runs: the destination must run the same

    async def prepare(self, xml: str, params: MigrationParams) -> str:
        """Launch an incoming QEMU (``-incoming defer``, paused) and ``migrate-incoming``."""
        self.check_tls(params)
        defn = parse_domain_xml(xml)
        check_type(defn)
        self._launcher.check_listen(defn.name, "the incoming migration", params.listen)
        self._registry.check_free(defn)
        dom = self._registry.by_uuid(defn.uuid)
        if dom is not None and (dom.run is not None or dom.state != S.SHUTOFF):
            raise OperationInvalid(f"domain '{defn.name}' is already active on this host")
        job = mig.Job("destination", params, self._migration, defn=defn, new_domain=dom is None)
        dom = dom or self._registry.add(defn)
        self._jobs[defn.uuid] = job
        record = {"migration": "incoming", "params": to_wire(params), "new_domain": job.new_domain}

        def failure(detail: str) -> MigrateFailed:
            return MigrateFailed(
                f"cannot prepare the incoming migration of '{defn.name}': {detail}"
            )

        try:
            async with self._launcher.launch(
                dom, defn.copy(), pending=ev.Pending.INCOMING, reason="migration",
                incoming="defer", job=record, failure=failure,
            ) as launched:  # fmt: skip
                run = launched.run
                run.migration = job
                execute = functools.partial(dom.execute, run)
                await self._tls_setup(execute, params, "destination", defn.uuid)
                await mig.configure(execute, params, "destination", self._migration)
                uri = await mig.start_incoming(execute, params, self._migration)
                await dom.save_status(run)
        except BaseException:
            self._drop_incoming(dom, job)
            raise
        self._watch_incoming(dom, run, job)
        dom.emit("started", "migrated")  # libvirt emits it at prepare (paused, migration)
        return uri

    def _watch_incoming(self, dom: Domain, run: Run, job: mig.Job) -> None:
        """An incoming QEMU that ends before finish(True) takes its transient domain along
        (the run's teardown cancels this helper after setting ``ended``)."""

        async def watch() -> None:
            try:
                await run.ended.wait()
            finally:
                if run.ended.is_set() and not job.finished:
                    self._drop_incoming(dom, job)

        dom.helper(run, watch(), f"qemu-incoming-{dom.defn.name}")

    def _drop_incoming(self, dom: Domain, job: mig.Job) -> None:
        if self._jobs.get(dom.defn.uuid) is job:
            del self._jobs[dom.defn.uuid]
        if job.new_domain and dom.run is None:
            self._registry.remove(dom)  # transient: vanishes without `undefined`
            self._launcher.free_uid(dom.defn.uuid)  # the uid its launch took here

    def _follow(self, dom: Domain, run: Run, job: mig.Job) -> None:
        """The source's job task: progress from QMP, published as ``migration`` events."""
        emit = lambda st: dom.emit("migration", None, to_wire(st))  # noqa: E731
        execute = functools.partial(dom.execute, run)
        dom.helper(run, job.follow(execute, emit), f"qemu-migrate-{dom.defn.name}")

    async def perform(self, ref: str, uri: str, params: MigrationParams) -> None:
        """Configure the source and ``migrate``; a job task follows and reports progress."""
        mig.parse_tcp_uri(uri)
        self.check_tls(params)
        dom = self._registry.get(ref)
        run = dom.require(S.RUNNING, S.PAUSED, verb="migrate")
        self._check_idle(dom, run)
        execute = functools.partial(dom.execute, run)
        try:
            await self._tls_setup(execute, params, "source", dom.defn.uuid)
            await mig.configure(execute, params, "source", self._migration,
                                mig.tls_hostname(params, uri))  # fmt: skip
        except VirtbusError as exc:
            if params.tls:
                await mig.tls_teardown(execute)
            raise MigrateFailed(
                f"cannot configure the migration of '{dom.defn.name}': {exc}"
            ) from exc
        job = mig.Job("source", params, self._migration)
        self._jobs[dom.defn.uuid] = run.migration = job
        run.pending -= {ev.Pending.MIGRATED_OUT}
        run.pending.add(ev.Pending.MIGRATING)
        self._follow(dom, run, job)
        run.job = {"migration": "outgoing", "uri": uri, "params": to_wire(params)}
        try:
            await execute("migrate", {"uri": uri})
        except VirtbusError as exc:
            job.end(MigrationState.FAILED, str(exc))
            run.pending.discard(ev.Pending.MIGRATING)
            run.job = None
            if params.tls:
                await mig.tls_teardown(execute)
            raise MigrateFailed(f"migration of '{dom.defn.name}' to {uri} failed: {exc}") from exc
        await dom.save_status(run)

    # --- copy-storage (drivers/qemu/copy_storage.py) --------------------------------------
    async def disks(self, ref: str, incremental: bool = False) -> list[CopyDisk]:
        """Source: each disk a copy-storage migration moves, with QEMU's size and format
        (``incremental``: and the name and format of its top image's backing)."""
        dom = self._registry.get(ref)
        run = dom.require(S.RUNNING, S.PAUSED, verb="migrate")
        disks = cs.copied_disks(run.live)
        out = []
        for disk, info in zip(disks, await external.inserted(dom, run, disks), strict=True):
            image = info.get("image") if isinstance(info.get("image"), dict) else {}
            assert isinstance(image, dict)
            fmt = str(info.get("drv") or "raw")
            if fmt not in ("raw", "qcow2"):
                raise InvalidArgument(
                    f"disk '{disk.target_dev}' of domain '{dom.defn.name}' is {fmt}:"
                    " copy-storage makes raw and qcow2 volumes only"
                )
            backing = image.get("backing-image") if incremental else None
            base = base_format = None
            if isinstance(backing, dict):
                base = os.path.basename(str(backing.get("filename") or "")) or None
                base_format = str(backing.get("format") or "raw")
                if base_format not in ("raw", "qcow2"):
                    raise InvalidArgument(f"the backing of disk '{disk.target_dev}' is"
                                          f" {base_format}: raw and qcow2 only")  # fmt: skip
            out.append(CopyDisk(
                target=disk.target_dev, format=fmt,
                capacity=int(image.get("virtual-size") or 0),
                allocation=int(image.get("actual-size") or 0),
                backing=base, backing_format=base_format,
            ))  # fmt: skip
        return out

    async def nbd_start(self, ref: str, targets: list[str], listen: str) -> NbdTarget:
        """Destination: serve the incoming instance's disks over NBD (once per prepare)."""
        dom = self._registry.get(ref)
        job, run = self._jobs.get(dom.defn.uuid), dom.run
        if job is None or job.role != "destination" or job.finished or run is None:
            raise OperationInvalid(f"domain '{dom.defn.name}' is not an incoming migration")
        if job.nbd_targets:
            raise OperationInvalid(f"the disks of '{dom.defn.name}' are already served")
        by_target = {d.target_dev: d for d in run.live.disks}
        unknown = sorted(set(targets) - set(by_target))
        if unknown:
            raise InvalidArgument(
                f"domain '{dom.defn.name}' has no disk {', '.join(unknown)} here to copy into"
            )
        disks = [by_target[t] for t in targets]
        infos = await external.inserted(dom, run, disks)
        nodes = {d.target_dev: str(i["node-name"]) for d, i in zip(disks, infos, strict=True)}
        execute = functools.partial(dom.execute, run)
        tls = mig.TLS_ID if job.params.tls else None  # prepare added the server's object
        served = await cs.serve(execute, nodes, listen, self._migration.incoming_attempts, tls)
        job.nbd_targets = list(nodes)
        run.job = {**(run.job or {}), "nbd": job.nbd_targets}  # a restarted agent stops it too
        await dom.save_status(run)
        return served

    async def perform_copy(
        self, ref: str, uri: str, params: MigrationParams, nbd: NbdTarget
    ) -> None:
        """Source: mirror the disks into the destination's exports; the job task sends
        memory once they are ready (:meth:`Job.copy_then_follow`)."""
        mig.parse_tcp_uri(uri)
        if not params.copy_storage:
            raise InvalidArgument("an NBD target is given without copy-storage")
        self.check_tls(params)
        dom = self._registry.get(ref)
        run = dom.require(S.RUNNING, S.PAUSED, verb="migrate")
        self._check_idle(dom, run)
        disks = cs.copied_disks(run.live)
        infos = await external.inserted(dom, run, disks)
        nodes = {d.target_dev: str(i["node-name"]) for d, i in zip(disks, infos, strict=True)}
        execute = functools.partial(dom.execute, run)
        hostname = mig.tls_hostname(params, uri)
        try:
            await self._tls_setup(execute, params, "source", dom.defn.uuid)
            await mig.configure(execute, params, "source", self._migration, hostname)
        except VirtbusError as exc:
            if params.tls:
                await mig.tls_teardown(execute)
            raise MigrateFailed(
                f"cannot configure the migration of '{dom.defn.name}': {exc}"
            ) from exc
        speed = (params.bandwidth_mib_s or 0) * cs.MIB
        mirrors = cs.Mirrors(nbd, nodes, poll=self._migration.mirror_poll, speed=speed,
                             top_only=params.copy_storage_inc,
                             tls=(mig.TLS_ID, hostname) if params.tls else None)  # fmt: skip
        mirrors.changed = _job_changed(dom, run, mirrors)
        try:
            await mirrors.start(execute)  # undoes itself on failure
        except VirtbusError:
            if params.tls:
                await mig.tls_teardown(execute)
            raise
        job = mig.Job("source", params, self._migration, mirrors=mirrors)
        self._jobs[dom.defn.uuid] = run.migration = job
        run.pending -= {ev.Pending.MIGRATED_OUT}
        run.pending.add(ev.Pending.MIGRATING)
        run.job = {"migration": "outgoing", "uri": uri, "params": to_wire(params)}
        emit = lambda st: dom.emit("migration", None, to_wire(st))  # noqa: E731
        dom.helper(run, job.copy_then_follow(execute, emit, uri), f"qemu-migrate-{dom.defn.name}")
        await dom.save_status(run)

    async def status(self, ref: str) -> MigrationStatus:
        dom = self._registry.get(ref)
        job = self._jobs.get(dom.defn.uuid)
        if job is None:
            return MigrationStatus(status=MigrationState.NONE)
        run = dom.run
        if job.active and run is not None and run.monitor is not None:
            try:
                fresh = mig.status_from_query(await run.monitor.execute("query-migrate"))
            except VirtbusError:
                return job.status
            if job.mirrors is not None:
                return job.current()  # its task follows the disks and then QEMU's status
            if fresh.status != "none":
                fresh.passes = max(fresh.passes, job.status.passes)
                return fresh
        return job.current() if job.mirrors is not None else job.status

    async def wait(self, ref: str, timeout: float) -> None:
        """Source: until the job reached an end state, or ``timeout``. The job notes QEMU's
        ``MIGRATION`` event as the event task reads it, before its follower's
        ``query-migrate`` and the ``migration`` event that follows: the end is told here
        first."""
        dom = self._registry.get(ref)
        job = self._jobs.get(dom.defn.uuid)
        if job is None or job.role != "source":
            return
        await job.wait_status(lambda st: st.status in mig.TERMINAL, timeout)

    async def cancel(self, ref: str) -> None:
        dom = self._registry.get(ref)
        job = self._jobs.get(dom.defn.uuid)
        if job is None or job.role != "source" or not job.active or dom.run is None:
            raise OperationInvalid(f"no migration in progress for domain '{dom.defn.name}'")
        if job.in_postcopy:  # libvirt refuses too: the destination already runs the guest
            raise OperationInvalid(
                f"cannot cancel the migration of '{dom.defn.name}' in postcopy mode"
            )
        job.cancel_requested = True  # a copy-storage job still mirroring stops by itself
        if job.mirrors is None or job.mirrors.ready:
            await dom.execute(dom.run, "migrate_cancel")
        if not await job.wait_done(self._migration.cancel_wait):
            raise OperationTimeout(f"migration of '{dom.defn.name}' did not stop after cancel")

    async def finish(self, ref: str, success: bool) -> None:
        """Destination: resume and own the definition, or kill the incoming QEMU."""
        dom = self._registry.get(ref)
        job = self._jobs.get(dom.defn.uuid)
        run = dom.run
        if job is None or job.role != "destination":
            raise OperationInvalid(f"domain '{dom.defn.name}' is not an incoming migration")
        if not success or run is None:
            if run is not None:
                run.pending.add(ev.Pending.DESTROY)  # with INCOMING: stopped(failed)
                await dom.stop_process(run)
                await dom.wait_ended(run)
            self._drop_incoming(dom, job)
            if success:
                raise MigrateFailed(f"the incoming QEMU of '{dom.defn.name}' is gone")
            return
        try:
            await self._resume_incoming(dom, run, job)
        except VirtbusError as exc:  # as libvirt: a failed finish kills the destination
            await self.finish(ref, False)
            raise MigrateFailed(f"cannot finish the migration of '{dom.defn.name}': {exc}") from exc

    async def _resume_incoming(self, dom: Domain, run: Run, job: mig.Job) -> None:
        done = ("completed", "postcopy-active")
        if job.status.status not in done:  # the MIGRATION event may still be on its way
            fresh = mig.status_from_query(await dom.execute(run, "query-migrate"))
            if fresh.status in done:
                job.status = fresh
            elif not await job.wait_status(
                lambda st: st.status in done, self._migration.finish_wait
            ):
                raise MigrateFailed(f"incoming migration is '{job.status.status}', not completed")
        if job.nbd_targets or job.params.copy_storage:  # the mirrors were completed
            await cs.stop_serving(functools.partial(dom.execute, run), job.nbd_targets)
            job.nbd_targets = []  # no export of the running guest's disks stays open
        if job.params.tls:  # the guest runs here now: a later migration starts plain
            await mig.tls_teardown(functools.partial(dom.execute, run))
        job.finished = True
        defn = job.defn or run.live.copy()
        await self._store.save_definition(defn)
        dom.defn = defn
        dom.emit("defined", "added" if job.new_domain else "updated")
        await dom.execute(run, "cont")  # RESUME with INCOMING: resumed(migrated)
        await self._announce(dom, run)
        await dom.wait(run, lambda: ev.Pending.INCOMING not in run.pending, "migrate_finish")
        if self._jobs.get(dom.defn.uuid) is job:
            del self._jobs[dom.defn.uuid]
        run.migration, run.job = None, None
        await dom.save_status(run)

    async def _announce(self, dom: Domain, run: Run) -> None:
        """RARPs of the guest's MACs from its new host, now that it runs (QEMU's own
        announcement went while it was still paused): the bridges on the way, a cluster
        network's other hosts too, learn where it went. Best effort: the guest runs."""
        try:
            await dom.execute(run, "announce-self", ANNOUNCE)
        except VirtbusError as exc:
            log.warning("domain %s: announce-self failed: %s", dom.defn.name, exc)

    async def confirm(self, ref: str, success: bool) -> None:
        """Source: stop and forget the old instance, or resume it if the migration paused it."""
        dom = self._registry.get(ref)
        uuid = dom.defn.uuid
        job = self._jobs.get(uuid)
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
                await dom.wait_ended(run)
            self._jobs.pop(uuid, None)
            await self._store.remove_definition(uuid)
            await asyncio.to_thread(self._launcher.forget, uuid)  # the TPM state moved
            self._registry.remove(dom)
            dom.emit("undefined", "removed")
            return
        if job is not None and job.active and not job.in_postcopy:
            await self.cancel(ref)
        self._jobs.pop(uuid, None)
        if run is None:
            return
        run.migration, run.job = None, None
        if job is None or job.params.tls:  # (no job: after a restart, it may have been)
            await mig.tls_teardown(functools.partial(dom.execute, run))
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

    # --- after an agent restart -----------------------------------------------------------
    async def reattach(self, dom: Domain, status: RunStatus) -> None:
        """The migration job a reattached run was in, so a coordinator that asks
        (``migrate_status``, ``info``) hears the truth and can finish or roll it back.

        An incoming QEMU whose migration was not finished stays transient and paused
        (migration): only ``finish`` resumes it or kills it. An outgoing one gets its job
        back from ``query-migrate`` (QEMU kept migrating while we were away); an outgoing
        copy-storage one is rolled back (:meth:`_roll_back_copy`).
        """
        kind = job_kind(status)
        run = dom.run
        job_map = status.job or {}
        params = decode(dict(job_map.get("params") or {}), MigrationParams)
        if kind == "incoming":
            new_domain = bool(job_map.get("new_domain", True))
            job = mig.Job("destination", params, self._migration,
                          defn=dom.defn.copy(), new_domain=new_domain)  # fmt: skip
            job.nbd_targets = [str(t) for t in job_map.get("nbd") or []]
            if run is None:  # the incoming QEMU died meanwhile: nothing came of it
                self._drop_incoming(dom, job)
                return
            run.migration = job
            run.pending.add(ev.Pending.INCOMING)
            dom.state, dom.reason = S.PAUSED, "migration"  # never resumed by a reattach
            self._jobs[dom.defn.uuid] = job
            self._watch_incoming(dom, run, job)
            await self._refresh_job(dom, run, job)
            log.warning("domain %s: incoming migration reattached (%s), kept paused",
                        dom.defn.name, job.status.status)  # fmt: skip
        elif kind == "outgoing" and run is not None and params.copy_storage:
            await self._roll_back_copy(dom, run, params)
        elif kind == "outgoing" and run is not None:
            job = mig.Job("source", params, self._migration)
            await self._refresh_job(dom, run, job)
            if job.status.status == "none":  # it never started (or QEMU forgot it)
                run.job = None
                await dom.save_status(run)
                return
            self._jobs[dom.defn.uuid] = run.migration = job
            run.pending.add(ev.Pending.MIGRATING)
            if job.active:
                self._follow(dom, run, job)
            log.warning("domain %s: outgoing migration reattached (%s)",
                        dom.defn.name, job.status.status)  # fmt: skip

    async def _roll_back_copy(self, dom: Domain, run: Run, params: MigrationParams) -> None:
        """A copy-storage migration whose source agent restarted is rolled back, as
        libvirt's qemuProcessRecoverMigrationOut cancels an unfinished outgoing migration
        and its NBD copy: QEMU cannot carry it on by itself (``migrate`` is sent only once
        the mirrors are ready, and ``pause-before-switchover`` waits for us to complete
        them), and the sequence that would was in the lost process. The stream is
        cancelled, the mirrors found by their names are cancelled and their NBD nodes
        closed; the job stays, failed, so the coordinator's next ``status`` rolls the
        migration back (``finish(false)`` removes the destination's volumes,
        ``confirm(false)`` resumes a guest the migration paused)."""
        execute = functools.partial(dom.execute, run)
        job = mig.Job("source", params, self._migration)
        run.migration = job  # MIGRATION events feed it while the stream is cancelled
        run.pending.add(ev.Pending.MIGRATING)  # a resume after the cancel: resumed(migrated)
        try:
            fresh = mig.status_from_query(await execute("query-migrate"))
            if fresh.status in mig.ACTIVE:  # memory was being sent: stop it first
                job.status = fresh
                await execute("migrate_cancel")
                await job.wait_status(lambda st: st.status in mig.TERMINAL,
                                      self._migration.cancel_wait)  # fmt: skip
            mirrors = await cs.Mirrors.found(execute, self._migration.mirror_poll)
            if mirrors is not None:
                mirrors.changed = _job_changed(dom, run, mirrors)
                await mirrors.abort(execute)
            if params.tls:
                await mig.tls_teardown(execute)
        except VirtbusError as exc:
            log.error("domain %s: rolling back its copy-storage migration after the restart:"
                      " %s", dom.defn.name, exc)  # fmt: skip
        job.end(MigrationState.FAILED, "the source's agent restarted during the copy-storage"
                " migration: the disk mirrors were cancelled")  # fmt: skip
        self._jobs[dom.defn.uuid] = job
        run.job = None  # nothing of it is left to undo after another restart
        await dom.save_status(run)
        log.warning("domain %s: copy-storage migration rolled back after the agent restarted",
                    dom.defn.name)  # fmt: skip

    async def _refresh_job(self, dom: Domain, run: Run, job: mig.Job) -> None:
        """The job's status from ``query-migrate`` (an end status ends the job)."""
        try:
            fresh = mig.status_from_query(await dom.execute(run, "query-migrate"))
        except VirtbusError as exc:
            log.warning("domain %s: query-migrate after reattach: %s", dom.defn.name, exc)
            return
        job.status = fresh
        if fresh.status in mig.POSTCOPY:
            job.postcopy_started = True
        if fresh.status in mig.TERMINAL:
            job.end(fresh.status, fresh.error)


def _job_changed(dom: Domain, run: Run, mirrors: cs.Mirrors) -> Callable[[float], Awaitable[None]]:
    """Mirrors' wait: until a JOB_STATUS_CHANGE of one of theirs (the event task notes
    them in ``run.job_states``) or the seconds given."""

    async def changed(seconds: float) -> None:
        seen = {j: run.job_states.get(j) for j in mirrors.job_ids()}
        with contextlib.suppress(OperationTimeout):
            await dom.wait(run, lambda: any(run.job_states.get(j) != v for j, v in seen.items()),
                           "mirror", timeout=seconds)  # fmt: skip

    return changed
