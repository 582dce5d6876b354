"""AnomalyAgent: judges every stored reading, off the acknowledgement path.

It reads the ReadingsStored events the Publisher also reads, through an inbox that never
makes the pipeline wait: when the agent falls behind, whole batches are skipped and
counted (``ingestd_anomaly_readings_skipped_total{cause="queue"}``), and the adaptive
detector, the costly one, stays within a share of the event loop (``cause="budget"``).
Registry limits and frozen values are checked on every reading it takes.

Per-series state is bounded (``anomaly.max_series``, least recently seen dropped first)
and saved to the state directory every ``anomaly.snapshot_seconds`` and at a clean stop;
alerts the database holds open are resumed at start, so a restart neither forgets what
was learned nor opens a second alert for an episode.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import orjson

from agents.anomaly.metrics import AnomalyMetrics
from agents.anomaly.rules import AnomalySettings
from agents.anomaly.series import Finding, Series
from agents.anomaly.state import SnapshotError
from agents.base import Agent
from agents.bus import Bus, Inbox
from agents.enrichment import OUT_OF_RANGE
from agents.events import AlertsRaised, ReadingsStored
from agents.metrics import PipelineMetrics
from agents.registry import DeviceRegistry
from db.rows import ALERT_CLOSED, ALERT_OPEN, AlertChange, ReadingRow
from db.series_store import SeriesStore, SeriesStoreError
from db.writer import OpenAlert, StorageError

__all__ = ["AnomalyAgent"]

log = logging.getLogger("ingestd.anomaly")

SeriesKey = tuple[str, str]
# Sparkplug's bad and stale qualities: the value is not a measurement (a stale one repeats
# by definition), so no detector learns from it.
_NOT_MEASURED = frozenset({"bad", "stale"})
# Seconds of detector time the budget may bank while idle: a burst after a quiet spell
# (~10,000 readings) is judged whole, a sustained flood only up to max_busy_fraction.
_BUDGET_BURST = 0.1
# Series without an open alert are evicted first; this many are looked at to find one.
_EVICTION_SCAN = 32


class AnomalyAgent(Agent):
    """Detectors and alert episodes per (device_id, sensor_id), fed by stored readings."""

    name = "anomaly"
    batch_limit = 64

    def __init__(
        self,
        bus: Bus,
        metrics: PipelineMetrics,
        inbox: Inbox[Any],
        settings: AnomalySettings,
        anomaly_metrics: AnomalyMetrics,
        registry: DeviceRegistry,
        store: SeriesStore | None = None,
        open_alerts: Callable[[], Awaitable[list[OpenAlert]]] | None = None,
    ) -> None:
        super().__init__(bus, metrics, inbox)
        self.settings = settings
        self.counts = anomaly_metrics
        self.registry = registry
        self.store = store
        self._open_alerts = open_alerts
        self.series: OrderedDict[SeriesKey, Series] = OrderedDict()
        self._changed: set[SeriesKey] = set()
        self._forgotten: set[SeriesKey] = set()
        self._sensor_types: dict[SeriesKey, str | None] = {}
        self._budget = _BUDGET_BURST
        self._refilled = time.monotonic()
        self._saved = time.monotonic()
        self._resumed = False
        self.pending: list[AlertChange] = []  # decided, not yet handed to the MaintenanceAgent

    def overflow(self, event: ReadingsStored) -> None:
        """The inbox is full: this batch is not judged (the pipeline never waits for us)."""
        self.counts.skipped.labels("queue").inc(len(event.rows))

    async def run(self) -> None:
        if not self._resumed:
            await self._resume()
            self._resumed = True
        await super().run()

    # ------------------------------------------------------------------ judging
    async def handle(self, batch: list[ReadingsStored]) -> None:
        # Changes go on self as they are made: a crash mid-batch (or a cancel at a stop)
        # leaves them for recover() or the stop to store, instead of losing an opening the
        # series state already holds.
        changes = self.pending
        judged = late = 0
        for event in batch:
            if not event.rows:
                continue
            adaptive = self._within_budget()
            started = time.perf_counter()
            for row in event.rows:
                if row.value is None or row.quality in _NOT_MEASURED:
                    continue
                series = self._series_of(row)
                why = self._out_of_range(row) if row.quality == OUT_OF_RANGE else None
                for finding in series.judge(row.ts, row.value, why, adaptive, row.received_at):
                    changes.append(self._change(row, finding))
                judged += 1
                late += series.late
            elapsed = time.perf_counter() - started
            self._budget -= elapsed
            self.counts.detector_seconds.observe(elapsed)
            if not adaptive:
                self.counts.skipped.labels("budget").inc(len(event.rows))
        if judged:
            self.counts.judged.inc(judged)
        if late:
            self.counts.skipped.labels("late").inc(late)
        await self._publish_pending()
        if time.monotonic() - self._saved >= self.settings.snapshot_seconds:
            await self.save()

    async def recover(self, held: list[ReadingsStored]) -> None:
        """After a crash: publish what was decided; the batch is not judged again (its
        series already learned part of it, and learning twice would skew them)."""
        self.counts.skipped.labels("queue").inc(sum(len(event.rows) for event in held))
        await self._publish_pending()

    async def _publish_pending(self) -> None:
        changes, self.pending = self.pending, []
        if not changes:
            return
        for change in changes:
            counter = self.counts.alerts if change.state == ALERT_OPEN else self.counts.closed
            counter.labels(change.kind).inc()
        await self.bus.publish(AlertsRaised(changes))

    def _within_budget(self) -> bool:
        now = time.monotonic()
        refill = (now - self._refilled) * self.settings.max_busy_fraction
        self._budget = min(_BUDGET_BURST, self._budget + refill)
        self._refilled = now
        return self._budget > 0

    def _series_of(self, row: ReadingRow) -> Series:
        key = (row.device_id, row.sensor_id)
        series = self.series.get(key)
        if series is None:
            series = self._admit(key, Series(self.settings.rules_for(row.sensor_type)))
            self._sensor_types[key] = row.sensor_type
        else:
            self.series.move_to_end(key)
            if row.sensor_type != self._sensor_types.get(key):  # the registry changed
                series.retune(self.settings.rules_for(row.sensor_type))
                self._sensor_types[key] = row.sensor_type
        self._changed.add(key)
        return series

    def _admit(self, key: SeriesKey, series: Series) -> Series:
        self.series[key] = series
        self._forgotten.discard(key)
        while len(self.series) > self.settings.max_series:
            self._evict()
        self.counts.series.set(len(self.series))
        return series

    def _evict(self) -> None:
        """Drop the least recently seen series, preferring one without an open alert (never
        the one just admitted); the alerts of an evicted series are closed, as nothing
        would close them any more."""
        keys = list(itertools.islice(self.series, min(_EVICTION_SCAN, len(self.series) - 1)))
        victim = next((k for k in keys if not self.series[k].episodes), keys[0])
        evicted = self.series.pop(victim)
        for kind, episode in evicted.episodes.items():
            self.pending.append(_eviction_closing(victim, kind, episode.opened, evicted.newest))
        self._sensor_types.pop(victim, None)
        self._changed.discard(victim)
        self._forgotten.add(victim)
        self.counts.evicted.inc()

    def _out_of_range(self, row: ReadingRow) -> str:
        info = self.registry.lookup(row.device_id, row.sensor_id)
        low = info.min_value if info else None
        high = info.max_value if info else None
        if high is not None and row.value is not None and row.value > high:
            return f"value {row.value:g} above the registry's max {high:g}"
        if low is not None and row.value is not None and row.value < low:
            return f"value {row.value:g} below the registry's min {low:g}"
        return f"value {row.value:g} outside the registry's limits"

    def _change(self, row: ReadingRow, finding: Finding) -> AlertChange:
        return AlertChange(
            state=ALERT_OPEN if finding.opens else ALERT_CLOSED,
            device_id=row.device_id,
            sensor_id=row.sensor_id,
            kind=finding.kind,
            ts=row.ts,
            value=row.value,
            score=round(min(1.0, max(0.0, finding.score)), 6),
            detail=finding.detail,
            correlation_id=row.correlation_id,
            unit=row.unit,
            site=row.site,
            area=row.area,
            line=row.line,
            asset=row.asset,
            sensor_type=row.sensor_type,
            auto_close_task=self.settings.auto_close_tasks and not finding.opens,
        )

    # ------------------------------------------------------------------ state
    async def _resume(self) -> None:
        """Learned state from the state directory, then the alerts the database holds open."""
        if self.store is not None:
            try:
                saved = await self.store.load(self.settings.max_series)
            except SeriesStoreError as exc:
                self.counts.snapshot_errors.inc()
                log.error("anomaly state not loaded; detectors relearn", extra={"error": str(exc)})  # noqa: TRY400
                saved = {}
            for key, body in reversed(saved.items()):  # oldest first: the newest end up recent
                self._restore(key, body)
        if self._open_alerts is not None:
            try:
                open_alerts = await self._open_alerts()
            except StorageError as exc:
                log.warning("open alerts not loaded", extra={"error": str(exc)})
                open_alerts = []
            for alert in open_alerts:
                key = (alert.device_id, alert.sensor_id)
                series = self.series.get(key)
                if series is None:  # not in the snapshot: a crash before its first save
                    rules = self.settings.rules_for(alert.sensor_type)
                    series = self._admit(key, Series(rules))
                    self._sensor_types[key] = alert.sensor_type
                series.resume(alert.kind, alert.ts)
        if self.series:
            log.info("anomaly state resumed", extra={"series": len(self.series)})

    def _restore(self, key: SeriesKey, body: bytes) -> None:
        try:
            document = orjson.loads(body)
            sensor_type = document.get("sensor_type")
            rules = self.settings.rules_for(sensor_type)
            series = Series.restore(rules, document["series"])
        except (orjson.JSONDecodeError, SnapshotError, KeyError, TypeError, AttributeError) as exc:
            self.counts.snapshot_errors.inc()
            log.warning("series state not restored", extra={"series": key, "error": str(exc)})
            return
        self._admit(key, series)
        self._sensor_types[key] = sensor_type

    async def save(self) -> None:
        """Write the series that changed since the last save (and forget evicted ones)."""
        self._saved = time.monotonic()
        if self.store is None or not (self._changed or self._forgotten):
            return
        changed = {
            key: orjson.dumps(
                {"sensor_type": self._sensor_types.get(key), "series": self.series[key].snapshot()}
            )
            for key in self._changed
            if key in self.series
        }
        forgotten = set(self._forgotten)
        try:
            await self.store.save(changed, forgotten)
        except SeriesStoreError as exc:
            self.counts.snapshot_errors.inc()
            log.error("anomaly state not saved", extra={"error": str(exc)})  # noqa: TRY400
            return
        self._changed.difference_update(changed)
        self._forgotten.difference_update(forgotten)


def _eviction_closing(
    key: SeriesKey, kind: str, opened: datetime, newest: datetime | None
) -> AlertChange:
    return AlertChange(
        state=ALERT_CLOSED,
        device_id=key[0],
        sensor_id=key[1],
        kind=kind,
        ts=newest or opened,
        value=None,
        score=0.0,
        detail="no longer watched: more series than anomaly.max_series",
        correlation_id=None,
    )
