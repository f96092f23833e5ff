"""The scheduler's typed settings: every limit and timeout in one place.

Fields with :func:`virtbus.config.setting` metadata are the keys of ``scheduler.toml``,
and flags of ``virtbus-scheduler`` where ``flag`` is set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.placement import PlacementPolicy
from virtbus.config import LOG_LEVELS, Key, keys_of, nested, setting
from virtbus.settings import DEFAULT_POLICY, Backoff, BusSettings


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    state_dir: Path = field(
        default=Path("/var/lib/virtbus-scheduler"),
        metadata=setting("local cache of the journal (the journal is on the bus)", flag=True),
    )
    log_level: str = field(
        default="INFO", metadata=setting("logging level", flag=True, choices=LOG_LEVELS)
    )
    host_down_after: float = field(
        default=6.0,  # 3 missed heartbeats at 2 s
        metadata=setting("a host silent this long is down (s)", flag=True, positive=True,
                         metavar="S"),
    )  # fmt: skip
    placement: PlacementPolicy = field(default_factory=PlacementPolicy, metadata=nested())
    max_outbound_per_host: int = field(
        default=2,
        metadata=setting("migrations leaving one host at once", flag="max_outbound",
                         name="max_outbound", minimum=1),
    )  # fmt: skip
    max_migrations: int = field(
        default=8,
        metadata=setting("migrations in flight in the cluster", flag=True, minimum=1),
    )
    migration_timeout: float = field(
        default=600.0,
        metadata=setting("default timeout of a migration (s)", flag=True, positive=True,
                         metavar="S"),
    )  # fmt: skip
    step_timeout: float = field(
        default=30.0,
        metadata=setting("deadline of each agent call of a migration (s)", flag=True,
                         positive=True, metavar="S"),
    )  # fmt: skip
    progress_poll: float = field(
        default=0.5,
        metadata=setting("longest wait of one migration.status long poll (s)", positive=True),
    )
    cleanup_timeout: float = field(
        default=30.0,
        metadata=setting("retry rollback steps this long (s)", flag=True, positive=True,
                         metavar="S"),
    )  # fmt: skip
    cleanup_retry: float = 0.5  # pause between retries of a cleanup step (s)
    # a cleanup left to a host that stayed silent: retried this way (and on its heartbeats)
    cleanup_backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.5, maximum=10.0))
    long_poll_max: float = 30.0  # longest wait of a scheduler.migration long poll (s)
    claim_ttl: float = field(
        default=120.0, metadata=setting("a placement claims its host this long (s)", positive=True)
    )
    fanout_timeout: float = field(
        default=5.0, metadata=setting("deadline of calls to every host (s)", positive=True)
    )
    leader_probe: float = field(
        default=1.0,
        metadata=setting("a standby checks for leadership this often (s)", positive=True),
    )
    journal_fsync: bool = field(
        default=False,
        metadata=setting("fsync every journal write (survives losing the host; slower)",
                         flag=True),
    )  # fmt: skip
    history: int = field(default=200, metadata=setting("finished migrations remembered", minimum=0))
    container_stop_timeout: float = field(
        default=30.0,
        metadata=setting("a drain's container shutdown, then destroy (s)", positive=True),
    )
    audit_max_bytes: int = field(
        default=64 << 20,
        metadata=setting("size of STATE_DIR/audit.log before it rotates", minimum=4096),
    )
    audit_keep: int = field(
        default=5, metadata=setting("rotated audit logs kept (audit.log.1 ...)", minimum=1)
    )
    policy: Path = field(
        default=DEFAULT_POLICY,
        metadata=setting("the security policy; absent: development mode, every bus user is "
                         "an admin", flag=True),
    )  # fmt: skip
    uvloop: bool = field(
        default=False,
        metadata=setting("run on uvloop's event loop (pip install 'virtbus[uvloop]')",
                         flag=True),
    )  # fmt: skip
    bus: BusSettings = field(default_factory=BusSettings, metadata=nested("bus."))


def scheduler_keys(weighers: Sequence[str] | None = None) -> tuple[Key, ...]:
    """The keys of ``scheduler.toml``."""
    return keys_of(SchedulerSettings, choices={"weigher": weighers} if weighers else None)
