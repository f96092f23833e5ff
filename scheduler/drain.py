"""Host drain: mark a host draining and live-migrate every running domain off it.

Each domain is placed through the filters on its own (the draining host and other
draining hosts are filtered out; claims spread the burst); the coordinator's limits bound
how many run at once. A domain that cannot be placed is reported with the NO_HOST reason
and stays where it is. Shut-off domains keep their definition on the drained host.

Containers cannot move live: they are listed as ``stays`` ("cannot move live") and keep
running, unless the drain was asked to stop them (``stop_containers``): then each is shut
down (destroyed if it does not stop in time), its definition moved offline and started
on its new host, one after another, in the background.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from scheduler.journal import MigrationRecord
from scheduler.migration import MigrationCoordinator
from virtbus.errors import VirtbusError
from virtbus.protocol.domain import DomainInfo
from virtbus.protocol.migration import TERMINAL_STATES, RecordState
from virtbus.protocol.scheduler import DrainDomain, DrainStatus

log = logging.getLogger(__name__)

# (domain uuid, drain host) -> the submitted migration (placed and journaled)
StartMigration = Callable[[str, str], Awaitable[MigrationRecord]]
# (domain uuid, drain host, its row to keep up to date) -> None: stop, move, start
MoveContainer = Callable[[str, str, DrainDomain], Awaitable[None]]
Spawn = Callable[[Coroutine[Any, Any, None], str], object]
STAYS = "stays"  # a container left running: it cannot move live
DONE = frozenset({*TERMINAL_STATES, STAYS})
CONTAINER_TYPES = frozenset({"lxc"})


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
        done = all(s in DONE for s in states)
        return DrainStatus(
            host=self.host,
            started=self.started,
            done=done,
            ok=done and all(s in (RecordState.COMPLETED, STAYS) for s in states),
            domains=rows,
            left=sorted(n for n, r in rows.items() if r.state == STAYS),
        )


class DrainManager:
    def __init__(self, coordinator: MigrationCoordinator) -> None:
        self._coordinator = coordinator
        self.jobs: dict[str, DrainJob] = {}

    async def drain(
        self,
        host: str,
        running: list[DomainInfo],
        start: StartMigration,
        move_container: MoveContainer | None = None,
        spawn: Spawn | None = None,
    ) -> DrainJob:
        """Start moving ``running`` (the domains of ``host``) away; returns at once.

        Containers stay unless ``move_container`` is given (with ``spawn``, which runs
        their moves in the background)."""
        job = DrainJob(host)
        self.jobs[host] = job
        containers = sorted((d for d in running if d.type in CONTAINER_TYPES), key=lambda d: d.name)
        for info in containers:
            job.domains[info.name] = (
                DrainDomain(state=STAYS, error="cannot move live")
                if move_container is None
                else DrainDomain(state=RecordState.QUEUED)
            )
        if move_container is not None and spawn is not None and containers:
            spawn(self._move_all(host, containers, job, move_container), f"drain-move:{host}")
        for info in sorted(running, key=lambda d: d.name):
            if info.type in CONTAINER_TYPES:
                continue
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

    async def _move_all(self, host: str, containers: list[DomainInfo], job: DrainJob,
                        move: MoveContainer) -> None:  # fmt: skip
        for info in containers:
            await move(info.uuid, host, job.domains[info.name])

    def status(self, host: str) -> DrainJob | None:
        return self.jobs.get(host)
