"""Typed settings: every timeout, backoff and limit lives here, never as a literal in code."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from virtbus.bus.topology import CALL_QUEUE_TYPES
from virtbus.config import LOG_LEVELS, Key, keys_of, nested, setting
from virtbus.protocol.codec import DecodeLimits

DEFAULT_BUS_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_CALL_TIMEOUT = 30.0  # s
DEFAULT_HEARTBEAT_INTERVAL = 2.0  # s; the CLI listens 2.5 s for hosts
DEFAULT_POLICY = Path("/etc/virtbus/policy.toml")  # the same file on every host


def bus_url_from_env(explicit: str | None = None) -> str:
    """``--bus`` wins, then ``VIRTBUS_BUS_URL``, then the local RabbitMQ."""
    return explicit or os.environ.get("VIRTBUS_BUS_URL") or DEFAULT_BUS_URL


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential, capped, jittered (full jitter between delay/2 and delay)."""

    initial: float = 0.2
    maximum: float = 10.0
    factor: float = 2.0
    jitter: float = 0.5


@dataclass(frozen=True, slots=True)
class BusSettings:
    url: str = field(
        default=DEFAULT_BUS_URL,
        metadata=setting("bus URL: amqp://, amqps:// (TLS) or memory://", flag="bus",
                         kind="bus_url"),
    )  # fmt: skip
    tls_ca: Path | None = field(
        default=None,
        metadata=setting("CA certificate the broker's TLS certificate must chain to "
                         "(amqps://; default: the system's CAs)"),
    )  # fmt: skip
    tls_cert: Path | None = field(
        default=None,
        metadata=setting("client certificate (amqps://): its CN is the bus user, "
                         "through SASL EXTERNAL (no password in the URL)"),
    )  # fmt: skip
    tls_key: Path | None = field(
        default=None, metadata=setting("the client certificate's private key")
    )
    call_timeout: float = field(
        default=DEFAULT_CALL_TIMEOUT,
        metadata=setting("default deadline of a call (s)", positive=True),
    )
    connect_timeout: float = field(
        default=5.0, metadata=setting("deadline of connecting to the broker (s)", positive=True)
    )
    confirm_timeout: float = field(
        default=10.0, metadata=setting("wait for a publisher confirm (s)", positive=True)
    )
    call_queue_type: str = field(
        default="quorum",
        metadata=setting("type of the call queues this daemon serves: quorum (replicated, "
                         "for a RabbitMQ cluster) or classic (one broker: quicker calls)",
                         flag="call_queue_type", choices=CALL_QUEUE_TYPES),
    )  # fmt: skip
    prefetch: int = field(
        default=64, metadata=setting("unacknowledged calls held at once", minimum=1)
    )  # bounds an agent's work queue
    stop_grace: float = field(
        default=10.0, metadata=setting("calls in hand may finish this long at stop (s)", minimum=0)
    )
    trusted_publishers: tuple[str, ...] = field(
        default=(),
        metadata=setting("bus users whose events and heartbeats are believed for any host "
                         "(else only the host's own user; a dev setup's shared agent user)"),
    )  # fmt: skip
    subscription_buffer: int = 1000  # messages a subscriber may have pending
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    reconnect: Backoff = field(default_factory=Backoff)


@dataclass(frozen=True, slots=True)
class StorageSettings:
    """Where an agent's storage pools may live, and the bounds of volume operations."""

    roots: tuple[Path, ...] = field(
        default=(Path("/var/lib/virtbus/images"),),
        metadata=setting("directories dir and fs pool targets must be inside"),
    )
    devices: tuple[str, ...] = field(
        default=(), metadata=setting("glob patterns of the block devices pools may use")
    )
    max_capacity: int = field(
        default=1 << 50, metadata=setting("largest volume capacity accepted (bytes)", minimum=1)
    )
    chunk_size: int = field(
        default=1 << 20,  # below the 4 MiB frame limit
        metadata=setting("bytes per vol-upload/vol-download chunk", minimum=4096),
    )
    transfer_idle_timeout: float = field(
        default=60.0,
        metadata=setting("a transfer without a chunk this long is failed (s)", positive=True),
    )
    transfer_window: int = field(
        default=8, metadata=setting("chunks a client may have in flight", minimum=1)
    )


@dataclass(frozen=True, slots=True)
class NetworkSettings:
    """Where an agent's virtual networks live and how their helpers are supervised."""

    namespace: str | None = field(
        default=None,
        metadata=setting("network namespace (ip netns) the networks' bridges, firewall"
                         " tables and dnsmasq live in (default: the host's own)"),
    )  # fmt: skip
    underlay_address: str | None = field(
        default=None,
        metadata=setting("this host's address on the underlay that carries cluster networks'"
                         " VXLAN (in the namespace; none: no cluster networks here)"),
    )  # fmt: skip
    dnsmasq_restart_limit: int = field(
        default=5,
        metadata=setting("dnsmasq restarts within a minute before giving up", minimum=1),
    )
    dnsmasq_start_timeout: float = field(
        default=10.0,
        metadata=setting("wait for a started dnsmasq to write its pid file (s)", positive=True),
    )


@dataclass(frozen=True, slots=True)
class AgentSettings:
    host: str = field(
        default_factory=socket.gethostname,
        metadata=setting("this host's name on the bus", flag=True),
    )
    driver: str = field(
        default="test", metadata=setting("hypervisor driver", flag=True, kind="choice")
    )
    state_dir: Path = field(
        default=Path("/var/lib/virtbus"),
        metadata=setting("durable state (definitions, outbox)", flag=True),
    )
    run_dir: Path | None = field(
        default=None,
        metadata=setting("sockets and pid files (default STATE_DIR/run)", flag=True),
    )
    log_level: str = field(
        default="INFO", metadata=setting("logging level", flag=True, choices=LOG_LEVELS)
    )
    heartbeat_interval: float = field(
        default=DEFAULT_HEARTBEAT_INTERVAL,
        metadata=setting("seconds between heartbeats", flag=True, positive=True),
    )
    metrics_interval: float = field(
        default=10.0,
        metadata=setting("seconds between metrics passes on virtbus.metrics", flag=True,
                         positive=True, metavar="S"),
    )  # fmt: skip
    metrics_listen: str | None = field(
        default=None,
        metadata=setting("serve Prometheus metrics on http://ADDR:PORT/metrics (default off)",
                         flag=True, kind="listen", metavar="ADDR:PORT"),
    )  # fmt: skip
    command_timeout: float = field(
        default=300.0, metadata=setting("a command running longer is failed (s)", positive=True)
    )
    prepared_timeout: float = field(
        default=10.0,
        metadata=setting(
            "wait this long for a migration's destination to confirm the URI its prepare"
            " answered, before perform is refused (s)",
            positive=True,
        ),
    )
    shutdown_grace: float = field(
        default=10.0,
        metadata=setting("time for the commands in hand at SIGTERM (s)", minimum=0),
    )
    call_memory: int = field(
        default=10_000, metadata=setting("recent call ids remembered for redelivery", minimum=1)
    )
    event_buffer: int = field(
        default=100_000, metadata=setting("events held while the broker is away", minimum=1)
    )
    event_publish_window: int = field(
        default=256,
        metadata=setting("events published before their confirms are awaited", minimum=1),
    )
    rejected_events_max_bytes: int = field(
        default=16 << 20,
        metadata=setting("size of outbox/rejected.log before it rotates", minimum=1),
    )
    # A start is refused when the host's active guests would then want more than this
    # many vCPUs per host CPU, or this much memory per byte of host memory (the
    # scheduler's ratios, checked again by the agent itself for every driver).
    cpu_overcommit: float = field(
        default=4.0,
        metadata=setting("vCPUs of active guests per host CPU (start limit)", flag=True,
                         positive=True, metavar="R"),
    )  # fmt: skip
    memory_overcommit: float = field(
        default=1.0,
        metadata=setting("guest memory per host memory (start limit)", flag=True,
                         positive=True, metavar="R"),
    )  # fmt: skip
    labels: dict[str, str] = field(
        default_factory=dict,
        metadata=setting('labels of this host for placement (KEY = "VALUE")', flag="label"),
    )
    # Where incoming live migrations listen: an address the other hosts can reach.
    migration_address: str = field(
        default="127.0.0.1",
        metadata=setting("address other hosts stream live migrations to", flag=True,
                         metavar="ADDR"),
    )  # fmt: skip
    driver_options: dict[str, str] = field(
        default_factory=dict,
        metadata=setting("driver tuning (KEY = VALUE; each driver refuses unknown keys)",
                         flag="driver_option"),
    )  # fmt: skip
    audit_max_bytes: int = field(
        default=64 << 20,
        metadata=setting("size of STATE_DIR/audit/audit.log before it rotates", minimum=4096),
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
    storage: StorageSettings = field(default_factory=StorageSettings, metadata=nested("storage."))
    network: NetworkSettings = field(default_factory=NetworkSettings, metadata=nested("network."))
    bus: BusSettings = field(default_factory=BusSettings, metadata=nested("bus."))

    @property
    def runtime_dir(self) -> Path:
        return self.run_dir or self.state_dir / "run"


def agent_keys(drivers: Sequence[str]) -> tuple[Key, ...]:
    """The keys of ``agent.toml`` (``drivers``: the driver names this agent knows)."""
    return keys_of(AgentSettings, choices={"driver": drivers})
