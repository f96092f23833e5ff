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
from typing import Any

from scheduler.journal import MigrationRecord
from scheduler.migration import MigrationCoordinator
from virtbus.errors import VirtbusError

log = logging.getLogger(__name__)

# (domain uuid, drain host) -> the submitted migration (placed and journaled)
StartMigration = Callable[[str, str], Awaitable[MigrationRecord]]


@dataclass(slots=True)
class DrainJob:
    host: str
    started: float = field(default_factory=time.time)
    domains: dict[str, dict[str, Any]] = field(default_factory=dict)  # by name
    migrations: dict[str, str] = field(default_factory=dict)  # domain name -> migration id

    def to_map(self, coordinator: MigrationCoordinator) -> dict[str, Any]:
        rows = {}
        for name, row in self.domains.items():
            mig_id = self.migrations.get(name)
            rec = coordinator.for_domain(mig_id) if mig_id else None
            if rec is not None:
                row = {
                    **row,
                    "state": rec.state,
                    "phase": rec.phase,
                    "destination": rec.destination,
                    "error": rec.error,
                    "progress": rec.progress,
                }
            rows[name] = row
        states = [r["state"] for r in rows.values()]
        done = all(s in ("completed", "failed", "cancelled") for s in states)
        return {
            "host": self.host,
            "started": self.started,
            "done": done,
            "ok": done and all(s == "completed" for s in states),
            "domains": rows,
        }


class DrainManager:
    def __init__(self, coordinator: MigrationCoordinator) -> None:
        self._coordinator = coordinator
        self.jobs: dict[str, DrainJob] = {}

    async def drain(
        self, host: str, running: list[dict[str, Any]], start: StartMigration
    ) -> DrainJob:
        """Start moving ``running`` (DomainInfo maps of ``host``) away; returns at once."""
        job = DrainJob(host)
        self.jobs[host] = job
        for info in sorted(running, key=lambda d: d["name"]):
            name = info["name"]
            try:
                record = await start(info["uuid"], host)
            except VirtbusError as exc:
                log.warning("drain of %s: %s stays: %s", host, name, exc)
                job.domains[name] = {"state": "failed", "error": str(exc), "destination": None}
                continue
            job.domains[name] = {"state": record.state, "destination": record.destination}
            job.migrations[name] = record.id
        return job

    def status(self, host: str) -> DrainJob | None:
        return self.jobs.get(host)
