"""Typed settings: every timeout, backoff and limit lives here, never as a literal in code."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from virtbus.protocol.codec import DecodeLimits

DEFAULT_BUS_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_CALL_TIMEOUT = 30.0  # s
DEFAULT_HEARTBEAT_INTERVAL = 2.0  # s; the CLI listens 2.5 s for hosts


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
    url: str = DEFAULT_BUS_URL
    call_timeout: float = DEFAULT_CALL_TIMEOUT  # default deadline of an RPC call
    connect_timeout: float = 5.0
    confirm_timeout: float = 10.0  # wait for a publisher confirm (s)
    prefetch: int = 64  # unacked calls an agent holds at once (bounds its work queue)
    stop_grace: float = 10.0  # a stopping RPC server waits this long for calls in hand
    subscription_buffer: int = 1000  # messages a subscriber may have pending
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    reconnect: Backoff = field(default_factory=Backoff)


@dataclass(frozen=True, slots=True)
class AgentSettings:
    host: str
    driver: str = "test"
    state_dir: Path = Path("/var/lib/virtbus")
    run_dir: Path | None = None  # default: <state_dir>/run
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    call_memory: int = 10_000  # recent call ids remembered for redelivery
    command_timeout: float = 300.0  # a command running longer is failed
    shutdown_grace: float = 10.0  # time for the command in hand at SIGTERM
    event_buffer: int = 100_000  # events held while the broker is away
    driver_options: dict[str, str] = field(default_factory=dict)
    # Where incoming live migrations listen: an address the other hosts can reach.
    migration_address: str = "127.0.0.1"  # --driver-option KEY=VALUE
    metrics_interval: float = 10.0  # s between metrics collection passes (virtbus.metrics)
    metrics_listen: str | None = None  # ADDR:PORT of the Prometheus /metrics page; None = off
    labels: dict[str, str] = field(default_factory=dict)  # --label KEY=VALUE, for placement
    # A start is refused when the host's active guests would then want more than this
    # many vCPUs per host CPU, or this much memory per byte of host memory (the
    # scheduler's ratios, checked again by the agent itself for every driver).
    cpu_overcommit: float = 4.0
    memory_overcommit: float = 1.0
    rejected_events_max_bytes: int = 16 << 20  # outbox/rejected.log rotates past this

    @property
    def runtime_dir(self) -> Path:
        return self.run_dir or self.state_dir / "run"
