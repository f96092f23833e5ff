"""Open-time logic of the QEMU driver: reload definitions and statuses, reattach every
QEMU left running (and, through the migration steps, the live-migration job it was in),
list the QEMUs that are not ours.

:class:`Reattacher` is a collaborator of the driver: it fills the
:class:`~drivers.qemu.registry.DomainRegistry` from the :class:`~drivers.qemu.state.StateStore`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from drivers.qemu.migrate_steps import job_kind
from virtbus.domain import parse_domain_xml
from virtbus.errors import VirtbusError

if TYPE_CHECKING:
    from drivers.qemu.domain import Domain
    from drivers.qemu.migrate_steps import MigrationSteps
    from drivers.qemu.registry import DomainRegistry
    from drivers.qemu.state import RunStatus, StateStore

log = logging.getLogger(__name__)


class Reattacher:
    """What ``open`` does (see module docstring)."""

    def __init__(
        self, registry: DomainRegistry, store: StateStore, migrations: MigrationSteps
    ) -> None:
        self._registry = registry
        self._store = store
        self._migrations = migrations

    async def open(self) -> None:
        """Load definitions, reattach every QEMU left running (concurrently), reconcile."""
        await self._store.prepare()
        for defn in await self._store.load_definitions():
            self._registry.add(defn)
        found: list[tuple[Domain, RunStatus]] = []
        uuids = await self._store.status_uuids()
        for uuid, status in zip(uuids, await self._store.read_statuses(uuids), strict=True):
            if status is None:
                continue
            dom = self._registry.by_uuid(uuid)
            if dom is None:
                dom = await self._orphan(status)
            if dom is not None and dom.run is None:
                found.append((dom, status))
                self._registry.seen_run_id(status.id)
        await asyncio.gather(*(self._reattach(dom, status) for dom, status in found))
        known = {d.run.process.pid for d in self._registry if d.run is not None}
        strays = await self._store.unknown_qemus(known)
        self._registry.strays = strays
        for proc in strays:
            log.warning("QEMU pid %d (uuid %s) runs in %s but is not known to this agent;"
                        " leaving it alone", proc.pid, proc.uuid, self._store.run_dir)  # fmt: skip

    async def _orphan(self, status: RunStatus) -> Domain | None:
        """The domain of a running QEMU that has no definition here, from its live XML: an
        incoming migration's stays in memory only (never persisted before finish(True)),
        any other's definition was lost and is restored."""
        incoming = job_kind(status) == "incoming"
        what = "incoming " if incoming else ""
        try:
            defn = parse_domain_xml(status.xml)
        except VirtbusError as exc:
            log.error("status of %s%s has no usable XML (%s): its QEMU is left alone",
                      what, status.uuid, exc)  # fmt: skip
            return None
        if defn.uuid != status.uuid or self._registry.name_taken(defn.name):
            log.error("status of %s%s does not match its definition: left alone", what, status.uuid)
            return None
        if not incoming:
            log.warning("definition of running domain %s was missing: restored from its status",
                        defn.name)  # fmt: skip
            await self._store.save_definition(defn)
        return self._registry.add(defn)

    async def _reattach(self, dom: Domain, status: RunStatus) -> None:
        """Reattach a QEMU, then the migration job it was in."""
        await dom.reattach(status)
        await self._migrations.reattach(dom, status)
