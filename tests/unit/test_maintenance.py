"""MaintenanceAgent: the task each alert would open, alert changes made durable like
readings (committed, or spooled while the database is away), and their events."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from agents.anomaly.metrics import AnomalyMetrics
from agents.anomaly.rules import ANOMALY, FLATLINE, OUT_OF_RANGE, AnomalySettings, SeriesRules
from agents.bus import Bus
from agents.events import AlertsRaised, AlertsStored
from agents.maintenance import MaintenanceAgent, plan_task, priority_of
from agents.metrics import PipelineMetrics
from agents.publisher import EventSettings, Publisher
from agents.storage import Storage
from db.rows import (
    ALERT_CLOSED,
    ALERT_OPEN,
    AlertChange,
    AlertOutcome,
    ReadingRow,
    RejectionRow,
    TaskRow,
)
from db.spool import Spool
from db.writer import WriteResult
from tests.unit.fakes import NOW, FakeOutbound, FakeWriter, drain

pytestmark = pytest.mark.timeout(30)

SETTINGS = AnomalySettings(by_sensor_type={"vibration": SeriesRules(priority="high")})


def change(kind: str = OUT_OF_RANGE, state: str = ALERT_OPEN, **fields: object) -> AlertChange:
    values: dict[str, object] = {
        "state": state, "device_id": "plc-1", "sensor_id": "temp", "kind": kind, "ts": NOW,
        "value": 130.0, "score": 1.0, "detail": "value 130 above the registry's max 100",
        "correlation_id": "corr-1",
    }  # fmt: skip
    values.update(fields)
    return AlertChange(**values)  # type: ignore[arg-type]


def task(**fields: object) -> TaskRow:
    values: dict[str, object] = {
        "id": 7, "subject": "pump-7", "kind": OUT_OF_RANGE, "device_id": "plc-1",
        "sensor_id": "temp", "status": "open", "priority": "high", "description": "d",
        "alert_count": 1, "opened_at": NOW, "last_alert_at": NOW, "updated_at": NOW,
        "acknowledged_at": None, "closed_at": None, "site": "s", "area": None, "line": None,
        "asset": "pump-7",
    }  # fmt: skip
    values.update(fields)
    return TaskRow(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "score", "sensor_type", "expected"),
    [
        (OUT_OF_RANGE, 1.0, None, "high"),
        (FLATLINE, 1.0, None, "medium"),
        (ANOMALY, 0.95, None, "high"),
        (ANOMALY, 0.75, None, "medium"),
        (ANOMALY, 0.6, None, "low"),
        (ANOMALY, 0.6, "vibration", "high"),  # the type's least priority
    ],
)
def test_priority_follows_kind_score_and_sensor_type(
    kind: str, score: float, sensor_type: str | None, expected: str
) -> None:
    assert priority_of(change(kind, score=score, sensor_type=sensor_type), SETTINGS) == expected


def test_the_description_names_asset_sensor_what_and_since() -> None:
    planned = plan_task(change(asset="pump-7", site="plant", line="L2"), SETTINGS)
    assert planned.priority == "high"
    assert planned.task_description == (
        "Out of range: sensor temp of pump-7 (device plc-1, plant / L2): "
        "value 130 above the registry's max 100, since 2026-11-27T07:30:00.123456+00:00"
    )
    closing = change(state=ALERT_CLOSED)
    assert plan_task(closing, SETTINGS) == closing  # a closing opens no task


class AppliedWriter(FakeWriter):
    """Applies each change as the database would the first time: an outcome per change."""

    async def write(
        self,
        readings: Sequence[ReadingRow],
        rejections: Sequence[RejectionRow],
        *,
        replay: bool = False,
        alerts: Sequence[AlertChange] = (),
    ) -> WriteResult:
        result = await super().write(readings, rejections, replay=replay, alerts=alerts)
        result.alerts = [
            AlertOutcome(c, 1, c.ts, task() if c.state == ALERT_OPEN else None,
                         "opened" if c.state == ALERT_OPEN else None)
            for c in alerts
        ]  # fmt: skip
        return result


def agent(
    bus: Bus, metrics: PipelineMetrics, storage: Storage
) -> tuple[MaintenanceAgent, AnomalyMetrics]:
    counts = AnomalyMetrics(metrics.registry)
    inbox = bus.inbox("maintenance", 8, AlertsRaised)
    return MaintenanceAgent(bus, metrics, inbox, storage, SETTINGS, counts, 0.01), counts


async def test_committed_changes_go_on_with_their_outcomes(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    writer = AppliedWriter()
    storage = Storage(writer, None, metrics)
    storage.mark_up()
    maintenance, _ = agent(bus, metrics, storage)
    stored = bus.inbox("publisher", 8, AlertsStored)
    await maintenance.handle([AlertsRaised([change(asset="pump-7")])])
    [written] = writer.alert_changes
    assert written.priority == "high"
    assert written.task_description.startswith("Out of range: sensor temp of pump-7")
    [event] = drain(stored)
    assert [o.task_change for o in event.outcomes] == ["opened"]


async def test_while_the_database_is_away_changes_are_spooled_not_announced(
    bus: Bus, metrics: PipelineMetrics, tmp_path: Path
) -> None:
    writer = AppliedWriter()
    writer.up = False
    spool = Spool(tmp_path / "spool.db", 10_000_000)
    storage = Storage(writer, spool, metrics)
    await storage.start()
    maintenance, _ = agent(bus, metrics, storage)
    stored = bus.inbox("publisher", 8, AlertsStored)
    await maintenance.handle([AlertsRaised([change(), change(FLATLINE, ts=NOW + timedelta(1))])])
    assert drain(stored) == []
    batch = await spool.oldest(100)
    assert batch is not None
    assert [c.kind for c in batch.alerts] == [OUT_OF_RANGE, FLATLINE]
    assert batch.alerts[0].priority == "high"
    await spool.close()


async def test_task_gauges_come_from_the_database(bus: Bus, metrics: PipelineMetrics) -> None:
    class Counting(FakeWriter):
        async def task_counts(self) -> dict[tuple[str, str], int]:
            return {("open", "high"): 2, ("closed", "low"): 1}

    storage = Storage(Counting(), None, metrics)
    maintenance, _ = agent(bus, metrics, storage)
    await maintenance.refresh_counts()
    get = metrics.registry.get_sample_value
    assert get("ingestd_maintenance_tasks", {"status": "open", "priority": "high"}) == 2
    assert get("ingestd_maintenance_tasks", {"status": "closed", "priority": "low"}) == 1
    assert get("ingestd_maintenance_tasks", {"status": "open", "priority": "low"}) == 0


async def test_the_publisher_sends_alert_and_task_events_at_qos_1(bus: Bus) -> None:
    metrics = PipelineMetrics(CollectorRegistry())
    outbound = FakeOutbound()
    inbox = bus.inbox("publisher", 8, AlertsStored)
    publisher = Publisher(bus, metrics, inbox, outbound, EventSettings())
    opened = change(asset="pump-7", site="s")
    closed = change(state=ALERT_CLOSED, ts=NOW + timedelta(minutes=20))
    await publisher.handle(
        [
            AlertsStored(
                [
                    AlertOutcome(opened, 3, NOW, task(), "opened"),
                    AlertOutcome(closed, 3, NOW, None, None),
                ]
            )
        ]
    )
    topics = [
        (topic, body.get("state") or body.get("change"), qos) for topic, body, qos in outbound.sent
    ]
    assert topics == [
        ("ingestd/alerts/plc-1/temp", "open", 1),
        ("ingestd/maintenance/plc-1", "opened", 1),
        ("ingestd/alerts/plc-1/temp", "closed", 1),
    ]
    alert_open, task_opened, alert_closed = (body for _, body, _ in outbound.sent)
    assert alert_open["ts"] == alert_closed["ts"] == "2026-11-27T07:30:00.123456Z"
    assert alert_closed["closed_at"] == "2026-11-27T07:50:00.123456Z"
    assert (alert_open["kind"], alert_open["score"], alert_open["asset"]) == (
        OUT_OF_RANGE,
        1.0,
        "pump-7",
    )
    assert alert_open["event_id"] != alert_closed["event_id"]
    assert (task_opened["task_id"], task_opened["status"], task_opened["priority"]) == (
        7,
        "open",
        "high",
    )
    get = metrics.registry.get_sample_value
    assert get("ingestd_events_published_total", {"kind": "alert"}) == 2
    assert get("ingestd_events_published_total", {"kind": "maintenance"}) == 1
