"""``--metrics-listen ADDR:PORT``: the agent's Prometheus ``/metrics`` page.

Per-domain series carry the names and labels of the common libvirt exporters
(``libvirt_domain_info_*``, ``libvirt_domain_block_stats_*``,
``libvirt_domain_interface_stats_*``, ``libvirt_domain_vcpu_*``,
``libvirt_domain_memory_stats_*``; labels ``domain``, ``uuid``, ``host`` and, per device,
``target_device``), so existing dashboards and alerts work unchanged. They are built at
scrape time from the last collection pass (:class:`agent.metrics.MetricsSnapshot`) by a
custom collector, so a domain's series appear and disappear with the domain and a scrape
never touches the hypervisor. The agent's own health (``virtbus_agent_*``) and the
host's figures (``virtbus_host_*``) come from the same page.

prometheus-client's HTTP server runs in its own daemon thread: the event loop never
serves a scrape. The collector only reads immutable snapshots and integer counters.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from virtbus import __version__
from virtbus.errors import InvalidArgument

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from agent.metrics import MetricsPublisher, MetricsSnapshot
    from agent.service import AgentService

log = logging.getLogger(__name__)

DOMAIN_LABELS = ["domain", "uuid", "host"]
DEVICE_LABELS = [*DOMAIN_LABELS, "target_device"]
VCPU_LABELS = [*DOMAIN_LABELS, "vcpu"]
NS = 1e-9
KIB = 1024

# One series per line: metric, kind (g gauge, c counter), libvirt field, scale (1, ns -> s,
# kib -> bytes), help. Counters get "_total" from prometheus-client.
Spec = tuple[str, str, str, str, float]
_SCALES = {"1": 1.0, "ns": NS, "kib": float(KIB)}


def _specs(text: str) -> tuple[Spec, ...]:
    rows = (line.split(maxsplit=4) for line in text.strip().splitlines())
    return tuple((name, doc, kind, field, _SCALES[scale]) for name, kind, field, scale, doc in rows)


_DOMAIN_SERIES = _specs("""
libvirt_domain_info_state g state.state 1 Domain state (libvirt's virDomainState code).
libvirt_domain_info_state_reason g state.reason 1 Reason of the domain state (libvirt's code).
libvirt_domain_info_cpu_time_seconds c cpu.time ns CPU time used by the domain, in seconds.
libvirt_domain_cpu_stats_user_time_seconds c cpu.user ns User CPU time of the domain, in seconds.
libvirt_domain_cpu_stats_system_time_seconds c cpu.system ns System CPU time of the domain, seconds.
libvirt_domain_info_maximum_memory_bytes g balloon.maximum kib Maximum memory, in bytes.
libvirt_domain_info_memory_usage_bytes g balloon.current kib Current memory (balloon), in bytes.
libvirt_domain_info_virtual_cpus g vcpu.current 1 Number of virtual CPUs of the domain.
libvirt_domain_info_maximum_virtual_cpus g vcpu.maximum 1 Maximum number of virtual CPUs.
libvirt_domain_memory_stats_rss_bytes g balloon.rss kib Resident set size of the domain's process.
libvirt_domain_memory_stats_actual_balloon_bytes g balloon.current kib Balloon size, in bytes.
libvirt_domain_memory_stats_unused_bytes g balloon.unused kib Memory the guest leaves unused.
libvirt_domain_memory_stats_available_bytes g balloon.available kib Memory the guest sees as total.
libvirt_domain_memory_stats_usable_bytes g balloon.usable kib Memory the guest can use without swap.
libvirt_domain_memory_stats_disk_cache_bytes g balloon.disk_caches kib Guest disk cache.
libvirt_domain_memory_stats_swap_in_bytes c balloon.swap_in kib Bytes the guest swapped in.
libvirt_domain_memory_stats_swap_out_bytes c balloon.swap_out kib Bytes the guest swapped out.
libvirt_domain_memory_stats_major_fault c balloon.major_fault 1 Major page faults in the guest.
libvirt_domain_memory_stats_minor_fault c balloon.minor_fault 1 Minor page faults in the guest.
libvirt_domain_cpu_stats_haltpoll_success_time_seconds c cpu.haltpoll.success.time ns Halt polls.
libvirt_domain_cpu_stats_haltpoll_fail_time_seconds c cpu.haltpoll.fail.time ns Failed halt polls.
virtbus_domain_memory_oom_kills c balloon.oom_kill 1 Processes the OOM killer ended (containers).
""")

_BLOCK_SERIES = _specs("""
libvirt_domain_block_stats_read_bytes c rd.bytes 1 Bytes read from a block device.
libvirt_domain_block_stats_read_requests c rd.reqs 1 Read requests of a block device.
libvirt_domain_block_stats_read_time_seconds c rd.times ns Time spent on reads, in seconds.
libvirt_domain_block_stats_write_bytes c wr.bytes 1 Bytes written to a block device.
libvirt_domain_block_stats_write_requests c wr.reqs 1 Write requests of a block device.
libvirt_domain_block_stats_write_time_seconds c wr.times ns Time spent on writes, in seconds.
libvirt_domain_block_stats_flush_requests c fl.reqs 1 Flush requests of a block device.
libvirt_domain_block_stats_flush_time_seconds c fl.times ns Time spent on flushes, in seconds.
libvirt_domain_block_stats_allocation g allocation 1 Highest written offset of the device, bytes.
libvirt_domain_block_stats_capacity_bytes g capacity 1 Logical size of the device, in bytes.
libvirt_domain_block_stats_physicalsize_bytes g physical 1 Physical size of the source, in bytes.
""")

_NET_SERIES = _specs("""
libvirt_domain_interface_stats_receive_bytes c rx.bytes 1 Bytes on a network interface.
libvirt_domain_interface_stats_receive_packets c rx.pkts 1 Packets on a network interface.
libvirt_domain_interface_stats_receive_errors c rx.errs 1 Errors on a network interface.
libvirt_domain_interface_stats_receive_drops c rx.drop 1 Drops on a network interface.
libvirt_domain_interface_stats_transmit_bytes c tx.bytes 1 Bytes on a network interface.
libvirt_domain_interface_stats_transmit_packets c tx.pkts 1 Packets on a network interface.
libvirt_domain_interface_stats_transmit_errors c tx.errs 1 Errors on a network interface.
libvirt_domain_interface_stats_transmit_drops c tx.drop 1 Drops on a network interface.
""")

_HOST_SERIES = _specs("""
virtbus_host_cpus g cpu.count 1 CPUs of the host.
virtbus_host_memory_total_bytes g memory.total kib Memory of the host.
virtbus_host_memory_free_bytes g memory.free kib Free memory of the host.
virtbus_host_memory_available_bytes g memory.available kib Available memory of the host.
virtbus_host_load1 g load.1 1 1-minute load average.
virtbus_host_load5 g load.5 1 5-minute load average.
virtbus_host_load15 g load.15 1 15-minute load average.
""")

_HOST_CPU_MODES = ("user", "system", "idle", "iowait")

COMMAND_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)


def parse_listen(listen: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[::1]:9177``, ``:9177`` = all addresses) -> (addr, port)."""
    addr, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"--metrics-listen wants ADDR:PORT, got {listen!r}")
    addr = addr.strip("[]") or "0.0.0.0"
    return addr, int(port)


def _family(name: str, doc: str, kind: str, labels: list[str]) -> Metric:
    if kind == "c":
        return CounterMetricFamily(name, doc, labels=labels)
    return GaugeMetricFamily(name, doc, labels=labels)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def domain_families(snap: MetricsSnapshot, host: str) -> list[Metric]:
    """Every per-domain and host family of one pass (empty families are still declared)."""
    families: dict[str, Metric] = {}

    def add(
        spec: tuple[str, str, str, str, float], labels: list[str], values: list[str], raw: Any
    ) -> None:
        name, doc, kind, _field, scale = spec
        value = _number(raw)
        if name not in families:
            families[name] = _family(name, doc, kind, labels)
        if value is not None:
            families[name].add_metric(values, value * scale)  # type: ignore[attr-defined]

    for spec in _DOMAIN_SERIES + _BLOCK_SERIES + _NET_SERIES:
        labels = DOMAIN_LABELS if spec in _DOMAIN_SERIES else DEVICE_LABELS
        families[spec[0]] = _family(spec[0], spec[1], spec[2], labels)
    vcpu_time = CounterMetricFamily(
        "libvirt_domain_vcpu_time_seconds",
        "CPU time of one vCPU thread, in seconds.",
        labels=VCPU_LABELS,
    )
    vcpu_delay = CounterMetricFamily(
        "libvirt_domain_vcpu_delay_seconds",
        "Time a vCPU waited for a host CPU, in seconds.",
        labels=VCPU_LABELS,
    )
    vcpu_state = GaugeMetricFamily(
        "libvirt_domain_vcpu_state", "vCPU state (1 running).", labels=VCPU_LABELS
    )
    for name, stats in sorted(snap.domains.items()):
        base = [name, snap.uuids.get(name, ""), host]
        for spec in _DOMAIN_SERIES:
            add(spec, DOMAIN_LABELS, base, stats.get(spec[3]))
        for n in range(int(stats.get("block.count", 0))):
            device = [*base, str(stats.get(f"block.{n}.name", n))]
            for spec in _BLOCK_SERIES:
                add(spec, DEVICE_LABELS, device, stats.get(f"block.{n}.{spec[3]}"))
        for n in range(int(stats.get("net.count", 0))):
            if f"net.{n}.name" not in stats:
                continue  # no host device (user networking)
            device = [*base, str(stats[f"net.{n}.name"])]
            for spec in _NET_SERIES:
                add(spec, DEVICE_LABELS, device, stats.get(f"net.{n}.{spec[3]}"))
        for n in range(int(stats.get("vcpu.maximum", 0))):
            labels = [*base, str(n)]
            for family, key, scale in (
                (vcpu_time, "time", NS),
                (vcpu_delay, "delay", NS),
                (vcpu_state, "state", 1),
            ):
                value = _number(stats.get(f"vcpu.{n}.{key}"))
                if value is not None:
                    family.add_metric(labels, value * scale)
    out = [*families.values(), vcpu_time, vcpu_delay, vcpu_state]
    for spec in _HOST_SERIES:
        host_family = _family(spec[0], spec[1], spec[2], ["host"])
        value = _number(snap.host.get(spec[3]))
        if value is not None:
            host_family.add_metric([host], value * spec[4])  # type: ignore[attr-defined]
        out.append(host_family)
    cpu = CounterMetricFamily(
        "virtbus_host_cpu_seconds", "Host CPU time by mode, in seconds.", labels=["host", "mode"]
    )
    for mode in _HOST_CPU_MODES:
        value = _number(snap.host.get(f"cpu.{mode}"))
        if value is not None:
            cpu.add_metric([host, mode], value * NS)
    out.append(cpu)
    return out


class AgentCollector(Collector):
    """Builds the page at scrape time from the last pass and the agent's counters."""

    def __init__(self, service: AgentService, publisher: MetricsPublisher) -> None:
        self.service = service
        self.publisher = publisher

    def collect(self) -> Iterator[Metric]:
        service, pub, host = self.service, self.publisher, self.service.host
        snap = pub.last
        up = GaugeMetricFamily(
            "libvirt_up", "Whether the last collection pass succeeded.", labels=["host"]
        )
        up.add_metric([host], 1.0 if pub.counters.last_ok else 0.0)
        yield up
        domains = GaugeMetricFamily(
            "libvirt_domains", "Domains defined on the host.", labels=["host"]
        )
        domains.add_metric([host], float(len(snap.domains) if snap else 0))
        yield domains
        if snap is not None:
            yield from domain_families(snap, host)
        yield from self._health(service, pub, host, snap)

    def _health(
        self, service: AgentService, pub: MetricsPublisher, host: str, snap: MetricsSnapshot | None
    ) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "virtbus_agent_info", "The agent (value 1).", labels=["host", "driver", "version"]
        )
        info.add_metric([host, service.driver.name, __version__], 1.0)
        yield info
        gauges: list[tuple[str, str, float]] = [
            (
                "virtbus_agent_bus_connected",
                "1 while the agent's bus connection is up.",
                1.0 if service.bus.connected else 0.0,
            ),
            (
                "virtbus_agent_outbox_depth",
                "Events waiting to be published.",
                float(len(service.outbox)),
            ),
            (
                "virtbus_agent_event_sequence",
                "Sequence number of the last event.",
                float(service.last_seq),
            ),
            (
                "virtbus_agent_metrics_interval_seconds",
                "Interval of the collection passes.",
                pub.interval,
            ),
        ]
        if snap is not None:
            gauges += [
                (
                    "virtbus_agent_stats_pass_duration_seconds",
                    "Wall time of the last pass.",
                    snap.pass_seconds,
                ),
                (
                    "virtbus_agent_stats_pass_cpu_seconds",
                    "Agent CPU time of the last pass.",
                    snap.pass_cpu_seconds,
                ),
                (
                    "virtbus_agent_stats_last_pass_timestamp_seconds",
                    "When the last pass began.",
                    snap.ts,
                ),
            ]
        qmp = getattr(service.driver, "qmp_connections", None)
        if qmp is not None:
            count = qmp() if callable(qmp) else qmp
            gauges.append(("virtbus_agent_qmp_connections", "Open QMP connections.", float(count)))
        for name, doc, value in gauges:
            family = GaugeMetricFamily(name, doc, labels=["host"])
            family.add_metric([host], value)
            yield family
        counters: list[tuple[str, str, float]] = [
            (
                "virtbus_agent_events_published",
                "Events published (broker-confirmed).",
                service.outbox.published,
            ),
            (
                "virtbus_agent_events_dropped",
                "Events dropped from a full outbox.",
                service.outbox.dropped,
            ),
            (
                "virtbus_agent_events_rejected",
                "Events that could not be published, set aside in outbox/rejected.log.",
                service.outbox.rejected,
            ),
            ("virtbus_agent_commands", "Commands executed.", service.dispatcher.executed),
            ("virtbus_agent_stats_passes", "Collection passes done.", pub.counters.passes),
            (
                "virtbus_agent_stats_failed_passes",
                "Collection passes that failed.",
                pub.counters.failed_passes,
            ),
            (
                "virtbus_agent_stats_overruns",
                "Passes longer than the interval.",
                pub.counters.overruns,
            ),
            (
                "virtbus_agent_metrics_published",
                "Metrics messages published.",
                pub.counters.published,
            ),
            (
                "virtbus_agent_metrics_unpublished",
                "Metrics messages the bus refused.",
                pub.counters.unpublished,
            ),
        ]
        for name, doc, value in counters:
            counter = CounterMetricFamily(name, doc, labels=["host"])
            counter.add_metric([host], float(value))
            yield counter


class MetricsExporter:
    """Serves ``/metrics`` on ``listen`` from a prometheus-client thread."""

    def __init__(self, listen: str, service: AgentService, publisher: MetricsPublisher) -> None:
        self.addr, self.port = parse_listen(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(service, publisher))
        self.command_seconds = Histogram(
            "virtbus_agent_command_duration_seconds",
            "Latency of commands, from delivery to reply.",
            labelnames=["host", "op"],
            buckets=COMMAND_BUCKETS,
            registry=self.registry,
        )
        self._host = service.host
        self._server: WSGIServer | None = None

    def observe_command(self, op: str, seconds: float) -> None:
        self.command_seconds.labels(self._host, op).observe(seconds)

    @property
    def bound_port(self) -> int:
        """The port really listened on (``:0`` picks a free one)."""
        return int(self._server.server_address[1]) if self._server else self.port

    async def start(self) -> None:
        try:
            server, _thread = start_http_server(self.port, addr=self.addr, registry=self.registry)
        except OSError as exc:
            raise InvalidArgument(
                f"cannot serve metrics on {self.addr}:{self.port}: {exc.strerror}"
            ) from exc
        self._server = server
        log.info("serving Prometheus metrics on http://%s:%d/metrics", self.addr, self.bound_port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)  # waits for serve_forever to return
            server.server_close()
