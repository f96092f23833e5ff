"""The metrics publisher: one collection pass per interval, one message per domain and host.

Every ``metrics_interval`` seconds the agent asks its driver for every domain's libvirt
domstats (``Driver.stats()``: the driver collects all domains concurrently) and for the
host's figures, then publishes on ``virtbus.metrics``:

- ``<host>.<domain>``, op ``metrics.domain``, body ``{host, domain, uuid, ts, interval,
  stats: {libvirt field: value}}`` — one per domain, inactive ones included (their
  ``state.state`` is 5, shutoff), as ``virsh domstats`` lists them;
- ``<host>._host``, op ``metrics.host``, body ``{host, ts, interval, domains, pass_ms,
  pass_cpu_ms, stats: {cpu.*, memory.*, load.*}}``.

The pass runs in its own task, outside the per-domain command chains, so it never waits
behind a lifecycle command nor holds one up; a pass is bounded (``metrics_timeout``) and
a pass that overruns its interval makes the next start late rather than overlap. Metrics
are best-effort: published without confirms and dropped (counted) while the bus is away
— the next pass has fresher numbers anyway.

The last pass is kept as an immutable :class:`MetricsSnapshot` for the Prometheus
exporter (:mod:`agent.exporter`), which reads it from its HTTP thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from drivers.base import Driver
from virtbus.aio import TaskGroup
from virtbus.bus.base import Bus
from virtbus.bus.topology import HOST_METRICS_WORD, METRICS_EXCHANGE
from virtbus.errors import VirtbusError
from virtbus.protocol import ops
from virtbus.protocol.envelope import Envelope, Kind
from virtbus.protocol.events import routing_key, routing_word

if TYPE_CHECKING:
    from agent.exporter import MetricsExporter
    from agent.service import AgentService

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """One collection pass (never mutated after it is published)."""

    ts: float  # wall clock at the start of the pass
    pass_seconds: float  # wall time of the collection
    pass_cpu_seconds: float  # agent CPU time spent during the collection
    domains: dict[str, dict[str, Any]]  # name -> libvirt domstats fields
    uuids: dict[str, str]  # name -> uuid
    host: dict[str, Any]


def domain_routing_key(host: str, domain: str) -> str:
    return routing_key(routing_word(host), routing_word(domain))


def host_routing_key(host: str) -> str:
    return routing_key(routing_word(host), HOST_METRICS_WORD)


@dataclass(slots=True)
class PublisherCounters:
    passes: int = 0
    failed_passes: int = 0
    published: int = 0
    unpublished: int = 0  # messages the bus refused (broker away)
    overruns: int = 0  # passes that took longer than the interval
    last_ok: bool = False  # the latest pass succeeded


class MetricsPublisher:
    """Collects and publishes every ``interval`` seconds (see module docstring)."""

    def __init__(
        self,
        *,
        host: str,
        driver: Driver,
        bus: Bus,
        interval: float,
        timeout: float | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("metrics interval must be positive")
        self.host = host
        self.driver = driver
        self.bus = bus
        self.interval = interval
        self.timeout = timeout if timeout is not None else interval
        self.last: MetricsSnapshot | None = None
        self.counters = PublisherCounters()
        self._bus_warned = False

    async def collect(self) -> MetricsSnapshot:
        """One pass over all domains and the host (bounded by ``timeout``)."""
        ts, t0, c0 = time.time(), time.perf_counter(), time.process_time()
        async with asyncio.timeout(self.timeout):
            domains, host = await asyncio.gather(self.driver.stats(), self.driver.host_stats())
        uuids = {}
        for name in domains:
            ref = self.driver.lookup(name)
            uuids[name] = ref.uuid if ref is not None else ""
        return MetricsSnapshot(
            ts=ts,
            pass_seconds=time.perf_counter() - t0,
            pass_cpu_seconds=time.process_time() - c0,
            domains=domains,
            uuids=uuids,
            host=host,
        )

    def envelopes(self, snap: MetricsSnapshot) -> list[tuple[str, Envelope]]:
        """(routing key, envelope) of every message of one pass; the host's comes last."""
        out = [
            (
                domain_routing_key(self.host, name),
                Envelope(
                    kind=Kind.METRICS,
                    op=ops.METRICS_DOMAIN,
                    src=self.host,
                    body={
                        "host": self.host,
                        "domain": name,
                        "uuid": snap.uuids.get(name, ""),
                        "ts": snap.ts,
                        "interval": self.interval,
                        "stats": stats,
                    },
                ),
            )
            for name, stats in snap.domains.items()
        ]
        host_body = {
            "host": self.host,
            "ts": snap.ts,
            "interval": self.interval,
            "domains": len(snap.domains),
            "pass_ms": round(snap.pass_seconds * 1e3, 3),
            "pass_cpu_ms": round(snap.pass_cpu_seconds * 1e3, 3),
            "stats": snap.host,
        }
        out.append(
            (
                host_routing_key(self.host),
                Envelope(kind=Kind.METRICS, op=ops.METRICS_HOST, src=self.host, body=host_body),
            )
        )
        return out

    async def publish(self, snap: MetricsSnapshot) -> None:
        """Send one pass, all messages concurrently; failures are counted, not raised."""
        sends = [self.bus.publish(METRICS_EXCHANGE, key, env) for key, env in self.envelopes(snap)]
        results = await asyncio.gather(*sends, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        for exc in failed:
            if not isinstance(exc, VirtbusError | ConnectionError):
                raise exc  # a bug, not a missing broker
        self.counters.published += len(results) - len(failed)
        self.counters.unpublished += len(failed)
        if failed and not self._bus_warned:
            log.warning("metrics not published (%d messages): %s", len(failed), failed[0])
        self._bus_warned = bool(failed)

    async def one_pass(self) -> MetricsSnapshot | None:
        try:
            snap = await self.collect()
        except (VirtbusError, TimeoutError) as exc:
            self.counters.failed_passes += 1
            self.counters.last_ok = False
            log.warning("metrics collection failed: %s", str(exc) or "timed out")
            return None
        except Exception:  # a driver bug must not end the agent's metrics for good
            self.counters.failed_passes += 1
            self.counters.last_ok = False
            log.exception("metrics collection failed unexpectedly")
            return None
        self.counters.passes += 1
        self.counters.last_ok = True
        self.last = snap
        await self.publish(snap)
        return snap

    async def run(self) -> None:
        """Forever: a pass at once, then one every ``interval`` (fixed rate, never overlapping)."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            await self.one_pass()
            next_at += self.interval
            now = loop.time()
            if next_at < now:  # the pass overran: skip the ticks it ate
                self.counters.overruns += 1
                next_at += ((now - next_at) // self.interval + 1) * self.interval
            await asyncio.sleep(next_at - now)


class AgentMetrics:
    """Composition of the agent's metrics: publisher, optional exporter, command timing.

    The service creates it in its constructor (the exporter observes the dispatcher),
    starts it once the call queue is served and stops it first at stop.
    """

    def __init__(self, service: AgentService) -> None:
        settings = service.settings
        self.service = service
        self.publisher = MetricsPublisher(
            host=service.host,
            driver=service.driver,
            bus=service.bus,
            interval=settings.metrics_interval,
        )
        self.exporter: MetricsExporter | None = None
        if settings.metrics_listen:
            from agent.exporter import MetricsExporter

            exporter = MetricsExporter(settings.metrics_listen, service, self.publisher)
            service.dispatcher.add_observer(
                lambda op, seconds, _reply: exporter.observe_command(op, seconds)
            )
            self.exporter = exporter
        self._tasks = TaskGroup(f"metrics:{service.host}", on_crash=self._crashed)

    def _crashed(self, name: str, exc: BaseException) -> None:
        log.error("metrics task %s died (%r): stopping the agent", name, exc)
        self.service.failed.set()

    async def start(self) -> None:
        if self.exporter is not None:
            await self.exporter.start()
        self._tasks.spawn(self.publisher.run(), name="publisher")

    async def stop(self) -> None:
        await self._tasks.cancel_all()
        if self.exporter is not None:
            await self.exporter.stop()
