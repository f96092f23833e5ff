"""Host drain: mark a host draining and live-migrate every running domain off it.

Each domain is placed through the filters on its own (the draining host and other
draining hosts are filtered out; claims spread the burst); the coordinator's limits bound
how many run at once. A domain that cannot be placed is reported with the NO_HOST reason
and stays where it is. Shut-off domains keep their definition on the drained host.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from scheduler.journal import MigrationRecord
from scheduler.migration import MigrationCoordinator
from virtbus.errors import VirtbusError
from virtbus.protocol.domain import DomainInfo
from virtbus.protocol.migration import TERMINAL_STATES, RecordState
from virtbus.protocol.scheduler import DrainDomain, DrainStatus

log = logging.getLogger(__name__)

# (domain uuid, drain host) -> the submitted migration (placed and journaled)
StartMigration = Callable[[str, str], Awaitable[MigrationRecord]]


@dataclass(slots=True)
class DrainJob:
    host: str
    started: float = field(default_factory=time.time)
    domains: dict[str, DrainDomain] = field(default_factory=dict)  # by name
    migrations: dict[str, str] = field(default_factory=dict)  # domain name -> migration id

    def status(self, coordinator: MigrationCoordinator) -> DrainStatus:
        rows = {}
        for name, row in self.domains.items():
            mig_id = self.migrations.get(name)
            rec = coordinator.for_domain(mig_id) if mig_id else None
            if rec is not None:
                row = DrainDomain(
                    state=rec.state,
                    phase=rec.phase,
                    destination=rec.destination,
                    error=rec.error,
                    progress=dict(rec.progress),
                )
            rows[name] = row
        states = [r.state for r in rows.values()]
        done = all(s in TERMINAL_STATES for s in states)
        return DrainStatus(
            host=self.host,
            started=self.started,
            done=done,
            ok=done and all(s == RecordState.COMPLETED for s in states),
            domains=rows,
        )


class DrainManager:
    def __init__(self, coordinator: MigrationCoordinator) -> None:
        self._coordinator = coordinator
        self.jobs: dict[str, DrainJob] = {}

    async def drain(self, host: str, running: list[DomainInfo], start: StartMigration) -> DrainJob:
        """Start moving ``running`` (the domains of ``host``) away; returns at once."""
        job = DrainJob(host)
        self.jobs[host] = job
        for info in sorted(running, key=lambda d: d.name):
            name = info.name
            try:
                record = await start(info.uuid, host)
            except VirtbusError as exc:
                log.warning("drain of %s: %s stays: %s", host, name, exc)
                job.domains[name] = DrainDomain(state=RecordState.FAILED, error=str(exc))
                continue
            job.domains[name] = DrainDomain(state=record.state, destination=record.destination)
            job.migrations[name] = record.id
        return job

    def status(self, host: str) -> DrainJob | None:
        return self.jobs.get(host)
