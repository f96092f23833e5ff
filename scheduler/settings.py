"""The scheduler's typed settings: every limit and timeout in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from scheduler.placement import PlacementPolicy
from virtbus.settings import Backoff


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    state_dir: Path = Path("/var/lib/virtbus-scheduler")
    host_down_after: float = 6.0  # s without a heartbeat: the host is down (3 missed at 2 s)
    placement: PlacementPolicy = field(default_factory=PlacementPolicy)
    max_outbound_per_host: int = 2  # migrations leaving one host at once
    max_migrations: int = 8  # migrations in flight in the whole cluster
    migration_timeout: float = 600.0  # default --timeout of a migration (s)
    step_timeout: float = 30.0  # deadline of each agent call of a migration step (s)
    progress_poll: float = 0.5  # query migration.status at least this often (s)
    cleanup_timeout: float = 30.0  # keep retrying a rollback/confirm step this long (s)
    cleanup_retry: float = 0.5  # pause between retries of a cleanup step (s)
    # a cleanup left to a host that stayed silent: retried this way (and on its heartbeats)
    cleanup_backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.5, maximum=10.0))
    long_poll_max: float = 30.0  # longest wait of a scheduler.migration long poll (s)
    claim_ttl: float = 120.0  # a placement's claim on a host, until the host reports it (s)
    fanout_timeout: float = 5.0  # deadline of calls to every host (scheduler.domains) (s)
    leader_probe: float = 1.0  # a standby checks this often whether it became active (s)
    journal_fsync: bool = False  # fsync each journal write (survives a host crash; slower)
    history: int = 200  # finished migrations remembered for status queries
