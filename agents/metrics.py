"""The pipeline's Prometheus metrics, built on an injected ``CollectorRegistry``.

Counters touched once per reading are plain integers exported by a collector at scrape
time (``Counter.inc()`` takes a lock per call, and the hot path runs tens of thousands of
times a second). Every label value known in advance starts at 0, so a dashboard panel or
an alert rule has a series from the first scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agents.reasons import REASONS
from db.writer import ERROR_KINDS
from edge.sparkplug import SKIP_REASONS

__all__ = ["EVENT_KINDS", "LATENCY_BUCKETS", "MAX_TRACKED_DEVICES", "PipelineMetrics"]

# Devices tracked for last-seen; beyond this, new device ids are counted, not tracked (a
# flood of bogus ids must not grow memory or the scrape without bound).
MAX_TRACKED_DEVICES = 10_000
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
EVENT_KINDS = ("processed", "failed", "alert", "maintenance")


class PipelineMetrics:
    """What the agents report: outcomes, queues, storage, outbound events, agent health."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.stored = 0
        self.duplicates = 0
        self.last_seen: dict[str, float] = {}  # device_id -> unix time
        self.untracked_devices = 0
        registry.register(_ReadingCounters(self))
        self._declare_outcomes(registry)
        self._declare_queues(registry)
        self._declare_storage(registry)
        self._declare_agents(registry)
        self._declare_sparkplug(registry)

    def seen(self, device_ids: Iterable[str], now: float) -> None:
        """Record that these devices' readings were just made durable."""
        last_seen = self.last_seen
        for device_id in device_ids:
            if device_id in last_seen or len(last_seen) < MAX_TRACKED_DEVICES:
                last_seen[device_id] = now
            else:
                self.untracked_devices += 1

    def track_inbox(self, name: str, capacity: int, depth: Callable[[], float]) -> None:
        """Declare an inbox's series; its depth is read at scrape time."""
        self.queue_capacity.labels(name).set(capacity)
        self.queue_depth.labels(name).set_function(depth)
        self.queue_waits.labels(name)

    def track_agent(self, name: str) -> None:
        """Declare an agent's series before it first runs."""
        self.agent_alive.labels(name)
        self.agent_restarts.labels(name)

    def _declare_outcomes(self, registry: CollectorRegistry) -> None:
        self.rejected = Counter(
            "ingestd_messages_rejected_total",
            "Messages stored as rejections, by reason.",
            ("reason",),
            registry=registry,
        )
        for reason in REASONS:
            self.rejected.labels(reason)
        self.unstorable = Counter(
            "ingestd_messages_unstorable_total",
            "Messages the database refused even as an ASCII-escaped dead letter (logged).",
            registry=registry,
        )
        self.events_published = Counter(
            "ingestd_events_published_total",
            "Events published on MQTT, by kind.",
            ("kind",),
            registry=registry,
        )
        self.events_dropped = Counter(
            "ingestd_events_dropped_total",
            "Events not published (broker away or outbound queue full), by kind.",
            ("kind",),
            registry=registry,
        )
        for kind in EVENT_KINDS:
            self.events_published.labels(kind)
            self.events_dropped.labels(kind)
        self.end_to_end_seconds = Histogram(
            "ingestd_end_to_end_latency_seconds",
            "From MQTT receipt to a durable outcome (row committed or rejection stored).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.registry_devices = Gauge(
            "ingestd_registry_devices",
            "Devices known to the enrichment registry.",
            registry=registry,
        )

    def _declare_queues(self, registry: CollectorRegistry) -> None:
        self.queue_depth = Gauge(
            "ingestd_queue_depth",
            "Events waiting in an agent inbox.",
            ("inbox",),
            registry=registry,
        )
        self.queue_capacity = Gauge(
            "ingestd_queue_capacity", "Bound of an agent inbox.", ("inbox",), registry=registry
        )
        self.queue_waits = Counter(
            "ingestd_queue_full_waits_total",
            "Times a producer waited for room in an inbox.",
            ("inbox",),
            registry=registry,
        )

    def _declare_storage(self, registry: CollectorRegistry) -> None:
        self.batch_size = Histogram(
            "ingestd_batch_size_readings",
            "Readings per database batch.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.write_seconds = Histogram(
            "ingestd_write_duration_seconds",
            "Time to commit one batch.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.database_up = Gauge(
            "ingestd_database_up", "1 while the database takes writes.", registry=registry
        )
        self.database_outages = Counter(
            "ingestd_database_outages_total",
            "Times the database became unreachable or failing.",
            registry=registry,
        )
        self.database_errors = Counter(
            "ingestd_database_errors_total",
            "Failed database operations, by kind (unreachable, timeout, failed).",
            ("kind",),
            registry=registry,
        )
        for kind in ERROR_KINDS:
            self.database_errors.labels(kind)
        self.spool_replayed = Counter(
            "ingestd_spool_replayed_total",
            "Spooled readings written to the database.",
            registry=registry,
        )
        self.spool_full = Gauge(
            "ingestd_spool_full",
            "1 while the spool has no room: acknowledgements are withheld.",
            registry=registry,
        )

    def _declare_agents(self, registry: CollectorRegistry) -> None:
        self.agent_restarts = Counter(
            "ingestd_agent_restarts_total",
            "Agents restarted after a crash.",
            ("agent",),
            registry=registry,
        )
        self.agent_alive = Gauge(
            "ingestd_agent_up", "1 while an agent runs.", ("agent",), registry=registry
        )

    def _declare_sparkplug(self, registry: CollectorRegistry) -> None:
        self.sparkplug_skipped = Counter(
            "ingestd_sparkplug_metrics_skipped_total",
            "Sparkplug metrics not stored as readings (bytes, file, null, transient, template"
            " definitions), by reason.",
            ("reason",),
            registry=registry,
        )
        for reason in (*SKIP_REASONS, "definition"):
            self.sparkplug_skipped.labels(reason)
        self.sparkplug_seq_errors = Counter(
            "ingestd_sparkplug_seq_errors_total",
            "Sparkplug messages whose seq was not the next one of their edge node.",
            registry=registry,
        )
        self.sparkplug_rebirth_requests = Counter(
            "ingestd_sparkplug_rebirth_requests_total",
            "Rebirth requests (NCMD Node Control/Rebirth) sent to edge nodes.",
            registry=registry,
        )
        self.sparkplug_stale_deaths = Counter(
            "ingestd_sparkplug_stale_deaths_total",
            "NDEATHs whose bdSeq is not the current birth's: ignored.",
            registry=registry,
        )
        self.sparkplug_nodes = Gauge(
            "ingestd_sparkplug_edge_nodes",
            "Sparkplug edge nodes known, by state (online, offline).",
            ("state",),
            registry=registry,
        )
        self.sparkplug_devices = Gauge(
            "ingestd_sparkplug_devices",
            "Sparkplug devices known, by state (online, offline).",
            ("state",),
            registry=registry,
        )
        for state in ("online", "offline"):
            self.sparkplug_nodes.labels(state)
            self.sparkplug_devices.labels(state)


class _ReadingCounters(Collector):
    def __init__(self, metrics: PipelineMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        yield CounterMetricFamily(
            "ingestd_readings_stored", "Readings newly written to the database.", value=m.stored
        )
        yield CounterMetricFamily(
            "ingestd_readings_duplicate",
            "Readings already stored (redeliveries, republished data): not written again.",
            value=m.duplicates,
        )
        last_seen = GaugeMetricFamily(
            "ingestd_device_last_seen_timestamp_seconds",
            "Unix time of the device's last reading made durable (stored or spooled).",
            labels=("device_id",),
        )
        for device_id, seen in list(m.last_seen.items()):
            last_seen.add_metric((device_id,), seen)
        yield last_seen
        yield CounterMetricFamily(
            "ingestd_devices_untracked",
            f"Readings of devices beyond the {MAX_TRACKED_DEVICES} tracked for last-seen.",
            value=m.untracked_devices,
        )
