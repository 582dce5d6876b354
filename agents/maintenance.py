"""MaintenanceAgent: turns alerts into maintenance work and makes both durable.

Each alert change the AnomalyAgent raises gets the task it would open (a priority from
its kind, score and sensor type, and a description a technician reads) and is stored
like readings are: committed with one idempotent transaction, or spooled while the
database is away and replayed by the drainer. The database applies it: one open task per
subject (asset, or device) and kind, later alerts attach and may raise its priority. What
was applied goes on as AlertsStored, for the alert and maintenance events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, assert_never

from agents.anomaly.metrics import AnomalyMetrics
from agents.anomaly.rules import ANOMALY, FLATLINE, OUT_OF_RANGE, AnomalySettings
from agents.base import Agent
from agents.bus import Bus, Inbox
from agents.events import AlertsRaised, AlertsStored
from agents.metrics import PipelineMetrics
from agents.retry import backoff
from agents.storage import NotDurableError, Storage
from db.rows import ALERT_OPEN, TASK_PRIORITIES, TASK_STATUSES, AlertChange
from db.writer import RowRejected, StorageError, WriteResult

__all__ = ["MaintenanceAgent", "plan_task", "priority_of"]

log = logging.getLogger("ingestd.maintenance")

# How often the task gauges are recounted (tasks also change by hand, from `ingestd tasks`).
TASK_COUNT_SECONDS = 30.0
_WHAT = {
    OUT_OF_RANGE: "Out of range",
    FLATLINE: "Frozen value",
    ANOMALY: "Unusual behaviour",
}


def priority_of(change: AlertChange, settings: AnomalySettings) -> str:
    """Limits crossed and strong anomalies (score >= 0.9) are high; frozen values and
    anomalies scoring >= 0.7 medium; weaker anomalies low. A sensor type's ``priority`` is
    the least its tasks get (critical sensors: high whatever was seen)."""
    if change.kind == OUT_OF_RANGE or (change.kind == ANOMALY and change.score >= 0.9):
        priority = "high"
    elif change.kind == ANOMALY and change.score < 0.7:
        priority = "low"
    else:
        priority = "medium"
    least = settings.rules_for(change.sensor_type).priority
    if least is not None and TASK_PRIORITIES.index(least) > TASK_PRIORITIES.index(priority):
        priority = least
    return priority


def plan_task(change: AlertChange, settings: AnomalySettings) -> AlertChange:
    """The change with the task it opens when its subject has none open for its kind."""
    if change.state != ALERT_OPEN:
        return change
    where = " / ".join(part for part in (change.site, change.area, change.line) if part)
    device = change.device_id if change.asset else ""
    context = ", ".join(part for part in (f"device {device}" if device else "", where) if part)
    description = (
        f"{_WHAT.get(change.kind, change.kind)}: sensor {change.sensor_id} of "
        f"{change.subject}{f' ({context})' if context else ''}: {change.detail}, "
        f"since {change.ts.isoformat()}"
    )
    return change._replace(priority=priority_of(change, settings), task_description=description)


class MaintenanceAgent(Agent):
    """Stores alert changes with their tasks; announces what was applied."""

    name = "maintenance"
    batch_limit = 64

    def __init__(
        self,
        bus: Bus,
        metrics: PipelineMetrics,
        inbox: Inbox[Any],
        storage: Storage,
        settings: AnomalySettings,
        anomaly_metrics: AnomalyMetrics,
        retry_max_seconds: float = 10.0,
    ) -> None:
        super().__init__(bus, metrics, inbox)
        self.storage = storage
        self.settings = settings
        self.counts = anomaly_metrics
        self._retry_max_seconds = retry_max_seconds

    async def run(self) -> None:
        counting = asyncio.create_task(self._count_tasks(), name="maintenance-counts")
        try:
            await super().run()
        finally:
            counting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await counting

    async def handle(self, batch: list[AlertsRaised]) -> None:
        changes: list[AlertChange] = []
        for event in batch:
            match event:
                case AlertsRaised():
                    changes += [plan_task(change, self.settings) for change in event.changes]
                case _:
                    assert_never(event)
        try:
            result = await self._make_durable(changes)
        except RowRejected as exc:
            # The database refuses the change itself (a bug, not an outage): log it whole.
            log.error(  # noqa: TRY400
                "alert changes refused by the database",
                extra={"error": str(exc), "changes": [str(c) for c in changes]},
            )
            return
        if result is not None and result.alerts:  # spooled: the drainer announces them
            await self.bus.publish(AlertsStored(result.alerts))
            if any(outcome.task_change for outcome in result.alerts):
                await self.refresh_counts()

    def unsaved(self) -> list[AlertChange]:
        """What it holds or has queued, not yet stored (for a stop that cancelled it)."""
        events = [*self._in_hand]
        while not self.inbox.empty():
            events.append(self.inbox.get_nowait())
        return [plan_task(c, self.settings) for event in events for c in event.changes]

    async def _make_durable(self, changes: list[AlertChange]) -> WriteResult | None:
        async for attempt in backoff(
            NotDurableError, first=0.2, cap=self._retry_max_seconds, before_sleep=self._waiting
        ):
            with attempt:
                return await self.storage.store([], [], changes, in_order=True)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _waiting(self, _state: object) -> None:
        self.last_progress = time.monotonic()  # waiting out an outage is not a stall

    async def _count_tasks(self) -> None:
        while True:
            if self.storage.database_up:
                await self.refresh_counts()
            await asyncio.sleep(TASK_COUNT_SECONDS)

    async def refresh_counts(self) -> None:
        """``ingestd_maintenance_tasks{status,priority}`` from the database."""
        try:
            counts = await self.storage.writer.task_counts()
        except StorageError as exc:
            log.debug("task counts not refreshed", extra={"error": str(exc)})
            return
        for status in TASK_STATUSES:
            for priority in TASK_PRIORITIES:
                self.counts.tasks.labels(status, priority).set(counts.get((status, priority), 0))
