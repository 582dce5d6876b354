"""The anomaly and maintenance metrics: alerts by kind, tracked series, skipped work,
detector time, and maintenance tasks by status and priority."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agents.anomaly.rules import KINDS
from db.rows import TASK_PRIORITIES, TASK_STATUSES

__all__ = ["AnomalyMetrics"]

# Seconds the detectors take per batch of stored readings (a batch: up to batch_size rows).
_BATCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class AnomalyMetrics:
    """What the AnomalyAgent and the MaintenanceAgent report."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.alerts = Counter(
            "ingestd_anomaly_alerts_total",
            "Alerts opened, by kind (out_of_range, flatline, anomaly).",
            ("kind",),
            registry=registry,
        )
        self.closed = Counter(
            "ingestd_anomaly_alerts_closed_total",
            "Alerts closed after their series was normal for anomaly.clear_seconds, by kind.",
            ("kind",),
            registry=registry,
        )
        for kind in KINDS:
            self.alerts.labels(kind)
            self.closed.labels(kind)
        self.series = Gauge(
            "ingestd_anomaly_series", "Series whose state is held in memory.", registry=registry
        )
        self.evicted = Counter(
            "ingestd_anomaly_series_evicted_total",
            "Series dropped from memory beyond anomaly.max_series (least recently seen).",
            registry=registry,
        )
        self.skipped = Counter(
            "ingestd_anomaly_readings_skipped_total",
            "Stored readings not judged, or judged against the limits only, by why: queue "
            "(the agent fell behind), budget (the adaptive detector was over "
            "anomaly.max_busy_fraction), late (older than a reading of its series already "
            "judged).",
            ("cause",),
            registry=registry,
        )
        for cause in ("queue", "budget", "late"):
            self.skipped.labels(cause)
        self.judged = Counter(
            "ingestd_anomaly_readings_judged_total",
            "Stored readings the detectors judged.",
            registry=registry,
        )
        self.detector_seconds = Histogram(
            "ingestd_anomaly_detector_seconds",
            "Time the detectors took per batch of stored readings.",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.snapshot_errors = Counter(
            "ingestd_anomaly_snapshot_errors_total",
            "Learned state that could not be written to or read from the state directory.",
            registry=registry,
        )
        self.tasks = Gauge(
            "ingestd_maintenance_tasks",
            "Maintenance tasks in the database, by status and priority.",
            ("status", "priority"),
            registry=registry,
        )
        for status in TASK_STATUSES:
            for priority in TASK_PRIORITIES:
                self.tasks.labels(status, priority)
