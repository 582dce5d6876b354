"""All of ingestd's Prometheus metrics, built on an injected ``CollectorRegistry``.

Counters touched once per message are plain integer attributes exported by a collector
at scrape time: an ``inc()`` takes a lock per call, and the hot path runs tens of
thousands of times a second.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Devices tracked for last-seen; beyond this, new device ids are counted, not tracked (a
# flood of bogus ids must not grow memory or the scrape without bound).
MAX_TRACKED_DEVICES = 10_000
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class _HotCounters(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        yield CounterMetricFamily(
            "ingestd_messages_received",
            "MQTT messages delivered to ingestd, redeliveries included.",
            value=m.received,
        )
        yield CounterMetricFamily(
            "ingestd_readings_stored", "Readings newly written to the database.", value=m.stored
        )
        yield CounterMetricFamily(
            "ingestd_readings_duplicate",
            "Readings already stored (redeliveries, republished data): not written again.",
            value=m.duplicates,
        )
        yield CounterMetricFamily(
            "ingestd_acks_sent",
            "PUBACKs released to the broker after the outcome was durable.",
            value=m.acks_sent,
        )
        yield CounterMetricFamily(
            "ingestd_spool_corrupt",
            "Spool files (or records) found unreadable and moved aside.",
            value=m.spool_corrupt(),
        )
        gauges = (
            ("ingestd_inflight_messages", "Messages received, not yet acknowledged.", m.inflight),
            ("ingestd_inflight_window", "The in-flight window ingestd enforces.", m.window),
            ("ingestd_spool_bytes", "Bytes of batches waiting in the spool.", m.spool_bytes),
            ("ingestd_spool_readings", "Readings waiting in the spool.", m.spool_readings),
            ("ingestd_spool_rejections", "Rejections waiting in the spool.", m.spool_rejections),
            ("ingestd_spool_oldest_age_seconds", "Age of the oldest spooled batch.", m.spool_age),
        )
        for name, text, probe in gauges:
            yield GaugeMetricFamily(name, text, value=probe())
        yield GaugeMetricFamily("ingestd_ready", "1 while /readyz answers 200.", value=m.ready())
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


class Metrics:
    """The metrics object every agent reports through."""

    def seen(self, device_ids: set[str], now: float) -> None:
        """Record that these devices' readings were just made durable."""
        last_seen = self.last_seen
        for device_id in device_ids:
            if device_id in last_seen or len(last_seen) < MAX_TRACKED_DEVICES:
                last_seen[device_id] = now
            else:
                self.untracked_devices += 1

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.received = 0
        self.stored = 0
        self.duplicates = 0
        self.acks_sent = 0
        self.inflight: Callable[[], float] = lambda: 0
        self.window: Callable[[], float] = lambda: 0
        self.spool_bytes: Callable[[], float] = lambda: 0
        self.spool_readings: Callable[[], float] = lambda: 0
        self.spool_rejections: Callable[[], float] = lambda: 0
        self.spool_age: Callable[[], float] = lambda: 0
        self.spool_corrupt: Callable[[], float] = lambda: 0
        self.ready: Callable[[], float] = lambda: 0
        self.last_seen: dict[str, float] = {}  # device_id -> unix time
        self.untracked_devices = 0
        registry.register(_HotCounters(self))

        def counter(name: str, text: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, text, labels, registry=registry)

        def gauge(name: str, text: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, text, labels, registry=registry)

        self.info = Info("ingestd_build", "ingestd version.", registry=registry)
        self.rejected = counter(
            "ingestd_messages_rejected_total",
            "Messages stored as rejections, by reason.",
            ("reason",),
        )
        self.mqtt_connected = gauge("ingestd_mqtt_connected", "1 while connected to the broker.")
        self.mqtt_connects = counter("ingestd_mqtt_connects_total", "Successful broker connects.")
        self.mqtt_disconnects = counter(
            "ingestd_mqtt_disconnects_total", "Connections lost or refused, by cause.", ("cause",)
        )
        self.acks_discarded = counter(
            "ingestd_acks_discarded_total",
            "Acknowledgements not sent because their connection was gone (the broker redelivers).",
        )
        self.intake_paused = gauge(
            "ingestd_intake_paused",
            "1 while socket reads are paused: the in-flight window is full.",
        )
        self.intake_pauses = counter(
            "ingestd_intake_pauses_total", "Times the in-flight window filled and reads paused."
        )
        self.queue_depth = gauge(
            "ingestd_queue_depth", "Events waiting in an agent inbox.", ("inbox",)
        )
        self.queue_capacity = gauge(
            "ingestd_queue_capacity", "Bound of an agent inbox.", ("inbox",)
        )
        self.queue_waits = counter(
            "ingestd_queue_full_waits_total",
            "Times a producer waited for room in an inbox.",
            ("inbox",),
        )
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
        self.end_to_end_seconds = Histogram(
            "ingestd_end_to_end_latency_seconds",
            "From MQTT receipt to a durable outcome (row committed or rejection stored).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.database_up = gauge("ingestd_database_up", "1 while the database takes writes.")
        self.database_outages = counter(
            "ingestd_database_outages_total", "Times the database became unreachable or failing."
        )
        self.spool_replayed = counter(
            "ingestd_spool_replayed_total", "Spooled readings written to the database."
        )
        self.spool_full = gauge(
            "ingestd_spool_full", "1 while the spool has no room: acknowledgements are withheld."
        )
        self.database_errors = counter(
            "ingestd_database_errors_total", "Failed database operations, by kind.", ("kind",)
        )
        self.events_published = counter(
            "ingestd_events_published_total", "Events published on MQTT, by kind.", ("kind",)
        )
        self.events_dropped = counter(
            "ingestd_events_dropped_total",
            "Events not published (broker away or outbound queue full), by kind.",
            ("kind",),
        )
        self.unstorable = counter(
            "ingestd_messages_unstorable_total",
            "Messages the database refused even as an ASCII-escaped dead letter (logged).",
        )
        self.agent_restarts = counter(
            "ingestd_agent_restarts_total", "Agents restarted after a crash.", ("agent",)
        )
        self.agent_alive = gauge("ingestd_agent_up", "1 while an agent runs.", ("agent",))
        self.registry_devices = gauge(
            "ingestd_registry_devices", "Devices known to the enrichment registry."
        )
