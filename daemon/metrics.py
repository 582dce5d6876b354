"""The daemon's metrics: the MQTT intake and acknowledgements, and the whole composed.

``Metrics`` holds the pipeline's metrics (``agents.metrics``) beside the intake's, on one
injected ``CollectorRegistry``. What is read from live objects at scrape time (in-flight
count, spool size, readiness) is exported by collectors registered when the daemon is
wired, never by callables written into a metrics object.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agents.budget import InflightBudget
from agents.metrics import PipelineMetrics
from db.spool import Spool

__all__ = [
    "DISCONNECT_CAUSES",
    "BudgetCollector",
    "ConnectionMetrics",
    "IntakeMetrics",
    "Metrics",
    "ReadinessCollector",
    "SpoolCollector",
    "WindowCollector",
]

DISCONNECT_CAUSES = ("connect_failed", "lost")


@dataclass(frozen=True, slots=True)
class ConnectionMetrics:
    """The series of one broker connection (``connection`` label: main, sparkplug)."""

    connected: Gauge
    connects: Counter
    disconnects: dict[str, Counter]  # by cause


class IntakeMetrics:
    """The broker connections, the in-flight window and the acknowledgements."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = 0  # plain integers: touched once per message
        self.acks_sent = 0
        self.mqtt_connected = Gauge(
            "ingestd_mqtt_connected",
            "1 while connected to the broker, by connection.",
            ("connection",),
            registry=registry,
        )
        self.mqtt_connects = Counter(
            "ingestd_mqtt_connects_total",
            "Successful broker connects, by connection.",
            ("connection",),
            registry=registry,
        )
        self.mqtt_disconnects = Counter(
            "ingestd_mqtt_disconnects_total",
            "Connections lost or refused, by connection and cause.",
            ("connection", "cause"),
            registry=registry,
        )
        self.acks_discarded = Counter(
            "ingestd_acks_discarded_total",
            "Acknowledgements not sent because their connection was gone (the broker redelivers).",
            registry=registry,
        )
        self.intake_paused = Gauge(
            "ingestd_intake_paused",
            "1 while socket reads are paused: the in-flight window is full.",
            registry=registry,
        )
        self.intake_pauses = Counter(
            "ingestd_intake_pauses_total",
            "Times the in-flight window filled and reads paused.",
            registry=registry,
        )
        registry.register(_IntakeCounters(self))

    def connection(self, name: str) -> ConnectionMetrics:
        """The series of connection ``name``, declared (at 0) on first use."""
        return ConnectionMetrics(
            self.mqtt_connected.labels(name),
            self.mqtt_connects.labels(name),
            {cause: self.mqtt_disconnects.labels(name, cause) for cause in DISCONNECT_CAUSES},
        )


class Metrics:
    """Every metric of one daemon, on one registry."""

    def __init__(self, registry: CollectorRegistry, version: str) -> None:
        self.registry = registry
        self.pipeline = PipelineMetrics(registry)
        self.intake = IntakeMetrics(registry)
        Info("ingestd_build", "ingestd version.", registry=registry).info({"version": version})


class _IntakeCounters(Collector):
    def __init__(self, metrics: IntakeMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "ingestd_messages_received",
            "MQTT messages delivered to ingestd, redeliveries included.",
            value=self._metrics.received,
        )
        yield CounterMetricFamily(
            "ingestd_acks_sent",
            "PUBACKs released to the broker after the outcome was durable.",
            value=self._metrics.acks_sent,
        )


class Window(Protocol):
    """The in-flight window as the AckTracker keeps it."""

    window: int

    @property
    def pending(self) -> int: ...


class WindowCollector(Collector):
    """The in-flight windows (one per broker connection) and what fills them, summed."""

    def __init__(self, trackers: list[Window]) -> None:
        self._trackers = trackers

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "ingestd_inflight_messages",
            "Messages received, not yet acknowledged.",
            value=sum(tracker.pending for tracker in self._trackers),
        )
        yield GaugeMetricFamily(
            "ingestd_inflight_window",
            "The in-flight window ingestd enforces (per broker connection, summed).",
            value=sum(tracker.window for tracker in self._trackers),
        )


class BudgetCollector(Collector):
    """What the messages in flight carry, against the budgets (``agents.budget``)."""

    def __init__(self, budget: InflightBudget) -> None:
        self._budget = budget

    def collect(self) -> Iterator[Metric]:
        budget = self._budget
        gauges = (
            ("ingestd_inflight_bytes", "Payload bytes of the messages in flight.", budget.bytes),
            (
                "ingestd_inflight_bytes_budget",
                "The payload bytes in flight ingestd allows (mqtt.max_inflight_bytes).",
                budget.max_bytes,
            ),
            ("ingestd_inflight_readings", "Decoded readings in flight.", budget.readings),
            (
                "ingestd_inflight_readings_budget",
                "The readings in flight ingestd allows (ingest.max_inflight_readings).",
                budget.max_readings,
            ),
        )
        for name, text, value in gauges:
            yield GaugeMetricFamily(name, text, value=value)


class SpoolCollector(Collector):
    """What waits in the spool (all 0 when there is none: the embedded SQLite database)."""

    def __init__(self, spool: Spool | None) -> None:
        self._spool = spool

    def collect(self) -> Iterator[Metric]:
        spool = self._spool
        stats = spool.stats if spool is not None else None
        yield CounterMetricFamily(
            "ingestd_spool_corrupt",
            "Spool files (or records) found unreadable and moved aside.",
            value=spool.corrupt_files if spool is not None else 0,
        )
        gauges = (
            ("ingestd_spool_bytes", "Bytes of batches waiting in the spool.", "bytes"),
            ("ingestd_spool_readings", "Readings waiting in the spool.", "readings"),
            ("ingestd_spool_rejections", "Rejections waiting in the spool.", "rejections"),
        )
        for name, text, field in gauges:
            yield GaugeMetricFamily(name, text, value=getattr(stats, field) if stats else 0)
        yield GaugeMetricFamily(
            "ingestd_spool_oldest_age_seconds",
            "Age of the oldest spooled batch.",
            value=stats.oldest_age() if stats else 0,
        )


class ReadinessCollector(Collector):
    """``ingestd_ready``: 1 exactly when ``/readyz`` answers 200."""

    def __init__(self, not_ready_reason: Callable[[], str | None]) -> None:
        self._not_ready_reason = not_ready_reason

    def collect(self) -> Iterator[Metric]:
        ready = self._not_ready_reason() is None
        yield GaugeMetricFamily("ingestd_ready", "1 while /readyz answers 200.", value=ready)
