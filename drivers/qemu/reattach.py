"""Open-time logic of the QEMU driver: reload definitions and statuses, reattach every
QEMU left running (and the live-migration job it was in), list QEMUs that are not ours.

A mixin of :class:`drivers.qemu.driver.QemuDriver`, split out of it unchanged; it uses the
driver's registry (``_domains``, ``_by_name``, ``_store``...) declared below for typing.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drivers.base import EventSink
from drivers.qemu import events as ev
from drivers.qemu import migration as mig
from drivers.qemu.domain import Domain, Run
from drivers.qemu.migrate_steps import QemuMigrations
from drivers.qemu.state import RunStatus, UnknownQemu
from virtbus.domain import parse_domain_xml
from virtbus.errors import VirtbusError
from virtbus.protocol.base import decode, to_wire
from virtbus.protocol.events import DomainState
from virtbus.protocol.migration import MigrationParams

if TYPE_CHECKING:
    from drivers.qemu.domain import Runtime

log = logging.getLogger("drivers.qemu.driver")  # the logger name used before the split
S = DomainState


class QemuReattach(QemuMigrations):
    """``open`` and the reattach of running QEMUs (and their migration jobs)."""

    if TYPE_CHECKING:
        _rt: Runtime
        _run_dir: Path
        unknown_processes: list[UnknownQemu]

    async def open(self, sink: EventSink) -> None:
        """Load definitions, reattach every QEMU left running (concurrently), reconcile."""
        self._rt.sink = sink
        await self._store.prepare()
        for defn in await self._store.load_definitions():
            self._add(defn)
        found: list[tuple[Domain, RunStatus]] = []
        for uuid in await self._store.status_uuids():
            status = await self._store.read_status(uuid)
            if status is None:
                continue
            dom = self._domains.get(uuid)
            if dom is None and _job_kind(status) == "incoming":
                dom = self._transient(status)  # never persisted before finish(True)
            elif dom is None:
                dom = await self._restore_definition(status)
            if dom is not None and dom.run is None:
                found.append((dom, status))
                self._next_id = max(self._next_id, status.id + 1)
        await asyncio.gather(*(self._reattach(dom, status) for dom, status in found))
        known = {d.run.process.pid for d in self._domains.values() if d.run is not None}
        self.unknown_processes = await self._store.unknown_qemus(known)
        for proc in self.unknown_processes:
            log.warning("QEMU pid %d (uuid %s) runs in %s but is not known to this agent;"
                        " leaving it alone", proc.pid, proc.uuid, self._run_dir)  # fmt: skip

    async def _restore_definition(self, status: RunStatus) -> Domain | None:
        """A running QEMU whose definition is lost: re-create it from the live XML."""
        try:
            defn = parse_domain_xml(status.xml)
        except VirtbusError as exc:
            log.error("status of %s has no usable XML (%s): its QEMU is left alone",
                      status.uuid, exc)  # fmt: skip
            return None
        if defn.uuid != status.uuid or defn.name in self._by_name:
            log.error("status of %s does not match its definition: left alone", status.uuid)
            return None
        log.warning("definition of running domain %s was missing: restored from its status",
                    defn.name)  # fmt: skip
        await self._persist(defn)
        return self._add(defn)

    def _transient(self, status: RunStatus) -> Domain | None:
        """The domain of an incoming migration's QEMU, in memory only (see _reattach)."""
        try:
            defn = parse_domain_xml(status.xml)
        except VirtbusError as exc:
            log.error("status of incoming %s has no usable XML (%s): its QEMU is left alone",
                      status.uuid, exc)  # fmt: skip
            return None
        if defn.uuid != status.uuid or defn.name in self._by_name:
            log.error("status of incoming %s does not match: left alone", status.uuid)
            return None
        return self._add(defn)

    async def _reattach(self, dom: Domain, status: RunStatus) -> None:
        """Reattach a QEMU, then the migration job it was in, so a coordinator that asks
        (``migrate_status``, ``info``) hears the truth and can finish or roll it back.

        An incoming QEMU whose migration was not finished stays transient and paused
        (migration): only ``migrate_finish`` resumes it or kills it. An outgoing one gets
        its job back from ``query-migrate`` (QEMU kept migrating while we were away).
        """
        kind = _job_kind(status)
        await dom.reattach(status)
        run = dom.run
        job_map = status.job or {}
        params = decode(dict(job_map.get("params") or {}), MigrationParams)
        if kind == "incoming":
            new_domain = bool(job_map.get("new_domain", True))
            job = mig.Job("destination", params, self.migration_settings,
                          defn=dom.defn.copy(), new_domain=new_domain)  # fmt: skip
            if run is None:  # the incoming QEMU died meanwhile: nothing came of it
                self._drop_incoming(dom, job)
                return
            run.migration = job
            run.pending.add(ev.Pending.INCOMING)
            dom.state, dom.reason = S.PAUSED, "migration"  # never resumed by a reattach
            self._migrations[dom.defn.uuid] = job
            dom.helper(run, self._watch_incoming(dom, run, job), f"qemu-incoming-{dom.defn.name}")
            await self._refresh_job(dom, run, job)
            log.warning("domain %s: incoming migration reattached (%s), kept paused",
                        dom.defn.name, job.status.status)  # fmt: skip
        elif kind == "outgoing" and run is not None:
            job = mig.Job("source", params, self.migration_settings)
            await self._refresh_job(dom, run, job)
            if job.status.status == "none":  # it never started (or QEMU forgot it)
                run.job = None
                await dom.save_status(run)
                return
            self._migrations[dom.defn.uuid] = run.migration = job
            run.pending.add(ev.Pending.MIGRATING)
            if job.active:
                emit = lambda st: dom.emit("migration", None, to_wire(st))  # noqa: E731

                async def execute(cmd: str, args: dict[str, Any] | None = None) -> Any:
                    return await dom.execute(run, cmd, args)

                dom.helper(run, job.follow(execute, emit), f"qemu-migrate-{dom.defn.name}")
            log.warning("domain %s: outgoing migration reattached (%s)",
                        dom.defn.name, job.status.status)  # fmt: skip

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


def _job_kind(status: RunStatus) -> str | None:
    """``incoming``/``outgoing`` when the run was in a live migration, else None."""
    job = status.job or {}
    kind = job.get("migration")
    return kind if kind in ("incoming", "outgoing") else None
