"""AnomalyAgent: stored readings in, alert changes out; skips instead of making anyone wait,
bounded series, learned state kept across a restart."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agents.anomaly.agent import AnomalyAgent
from agents.anomaly.metrics import AnomalyMetrics
from agents.anomaly.rules import FLATLINE, OUT_OF_RANGE, AnomalySettings, SeriesRules
from agents.bus import Bus
from agents.events import AlertsRaised, ReadingsStored
from agents.metrics import PipelineMetrics
from agents.registry import DeviceRegistry
from db.rows import ALERT_CLOSED, ALERT_OPEN, ReadingRow
from db.series_store import SeriesStore
from db.writer import OpenAlert, StorageError
from tests.unit.fakes import NOW, drain, row

pytestmark = pytest.mark.timeout(30)

LIMITS = AnomalySettings(rules=SeriesRules(kinds=frozenset({OUT_OF_RANGE})))
REGISTRY = DeviceRegistry([{"device_id": "d1", "sensor_id": "temp", "max_value": 100}])


def at(minute: int, value: float = 50.0, sensor: str = "temp", **extra: Any) -> ReadingRow:
    quality = "out_of_range" if value > 100 else "good"
    return row("d1", sensor, value, quality=quality, **extra)._replace(
        ts=NOW + timedelta(minutes=minute)
    )


def make(
    bus: Bus,
    metrics: PipelineMetrics,
    settings: AnomalySettings = LIMITS,
    *,
    store: SeriesStore | None = None,
    open_alerts: Any = None,
    queue: int = 16,
) -> tuple[AnomalyAgent, Any, AnomalyMetrics]:
    counts = AnomalyMetrics(metrics.registry)
    inbox = bus.inbox("anomaly", queue, ReadingsStored)
    agent = AnomalyAgent(bus, metrics, inbox, settings, counts, REGISTRY, store, open_alerts)
    inbox.overflow = agent.overflow
    return agent, bus.inbox("maintenance", 64, AlertsRaised), counts


def value(metrics: PipelineMetrics, name: str, **labels: str) -> float:
    sample = metrics.registry.get_sample_value(name, labels)
    assert sample is not None, name
    return sample


async def test_a_reading_beyond_the_registry_limit_opens_one_alert_with_its_context(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    agent, out, _ = make(bus, metrics)
    rows = [at(0), at(1, 130.0, site="s", asset="pump-7", unit="C"), at(2, 140.0), at(3)]
    await agent.handle([ReadingsStored(rows)])
    [raised] = drain(out)
    [change] = raised.changes
    assert (change.state, change.kind, change.ts, change.value) == (
        ALERT_OPEN, OUT_OF_RANGE, rows[1].ts, 130.0
    )  # fmt: skip
    assert (change.site, change.asset, change.unit, change.subject) == (
        "s",
        "pump-7",
        "C",
        "pump-7",
    )
    assert change.detail == "value 130 above the registry's max 100"
    assert change.correlation_id == rows[1].correlation_id
    assert value(metrics, "ingestd_anomaly_alerts_total", kind=OUT_OF_RANGE) == 1
    # Normal for clear_seconds (600 s) after the last abnormal reading: closed, once.
    await agent.handle([ReadingsStored([at(11), at(12), at(13)])])
    [raised] = drain(out)
    assert [(c.state, c.ts) for c in raised.changes] == [(ALERT_CLOSED, at(12).ts)]


async def test_text_values_and_bad_quality_are_not_judged(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    agent, out, _ = make(bus, metrics)
    rows = [at(0)._replace(value=None, value_text="on"), at(1, 130.0)._replace(quality="bad")]
    await agent.handle([ReadingsStored(rows)])
    assert drain(out) == []
    assert agent.series == {}


async def test_a_full_inbox_skips_and_counts_and_never_makes_the_pipeline_wait(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    _, _, _ = make(bus, metrics, queue=2)
    for _ in range(5):  # the agent is not running: only two fit
        async with asyncio.timeout(1):
            await bus.publish(ReadingsStored([at(0), at(1)]))
    assert value(metrics, "ingestd_anomaly_readings_skipped_total", cause="queue") == 6
    assert value(metrics, "ingestd_queue_full_waits_total", inbox="anomaly") == 0


async def test_over_its_time_budget_only_the_adaptive_detector_is_skipped(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    settings = AnomalySettings(max_busy_fraction=1e-9)
    agent, out, _ = make(bus, metrics, settings)
    agent._budget = -1.0  # overspent
    await agent.handle([ReadingsStored([at(0), at(1, 130.0)])])
    assert [c.kind for c in drain(out)[0].changes] == [OUT_OF_RANGE]
    assert value(metrics, "ingestd_anomaly_readings_skipped_total", cause="budget") == 2


async def test_series_beyond_the_cap_evict_the_least_recent_without_an_open_alert(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    agent, out, _ = make(bus, metrics, AnomalySettings(rules=LIMITS.rules, max_series=2))
    await agent.handle([ReadingsStored([at(0, 130.0, sensor="temp"), at(0, sensor="b")])])
    await agent.handle([ReadingsStored([at(1, sensor="c")])])
    # "temp" is the least recently seen but has an open alert: "b" goes.
    assert list(agent.series) == [("d1", "temp"), ("d1", "c")]
    assert value(metrics, "ingestd_anomaly_series") == 2
    assert value(metrics, "ingestd_anomaly_series_evicted_total") == 1
    assert len(drain(out)) == 1


async def test_a_restart_resumes_learned_state_and_open_episodes(
    bus: Bus, metrics: PipelineMetrics, tmp_path: Path
) -> None:
    store = SeriesStore(tmp_path / "anomaly.db")
    settings = AnomalySettings(rules=SeriesRules(kinds=frozenset({OUT_OF_RANGE, FLATLINE})))
    agent, out, _ = make(bus, metrics, settings, store=store)
    await agent.handle([ReadingsStored([at(0), at(1, 130.0)])])
    assert len(drain(out)) == 1
    await agent.save()
    await store.close()

    again_store = SeriesStore(tmp_path / "anomaly.db")
    fresh = PipelineMetrics(CollectorRegistry())
    again, out2, _ = make(Bus(fresh), fresh, settings, store=again_store)
    await again._resume()
    assert list(again.series) == [("d1", "temp")]
    await again.handle([ReadingsStored([at(2, 140.0)])])  # the same episode: nothing new
    assert drain(out2) == []
    await again.handle([ReadingsStored([at(12)])])
    assert [c.state for c in drain(out2)[0].changes] == [ALERT_CLOSED]
    await again_store.close()


async def test_alerts_open_in_the_database_are_resumed_at_start(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    async def open_alerts() -> list[OpenAlert]:
        return [OpenAlert("d1", "temp", OUT_OF_RANGE, NOW - timedelta(minutes=5))]

    agent, out, _ = make(bus, metrics, open_alerts=open_alerts)
    await agent._resume()
    await agent.handle([ReadingsStored([at(0, 130.0), at(10)])])
    [raised] = drain(out)
    assert [(c.state, c.ts) for c in raised.changes] == [(ALERT_CLOSED, at(10).ts)]


async def test_a_database_away_at_start_resumes_from_the_snapshot_alone(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    async def open_alerts() -> list[OpenAlert]:
        raise StorageError("connection refused", "unreachable")

    agent, _, _ = make(bus, metrics, open_alerts=open_alerts)
    await agent._resume()
    assert agent.series == {}


async def test_an_unreadable_snapshot_row_is_skipped_and_counted(
    bus: Bus, metrics: PipelineMetrics, tmp_path: Path
) -> None:
    store = SeriesStore(tmp_path / "anomaly.db")
    await store.save({("d1", "temp"): b"{not json", ("d1", "b"): b'{"series": {"version": 9}}'}, [])
    agent, _, _ = make(bus, metrics, store=store)
    await agent._resume()
    assert agent.series == {}
    assert value(metrics, "ingestd_anomaly_snapshot_errors_total") == 2
    await store.close()


async def test_an_evicted_series_closes_its_open_alerts(bus: Bus, metrics: PipelineMetrics) -> None:
    agent, out, _ = make(bus, metrics, AnomalySettings(rules=LIMITS.rules, max_series=1))
    await agent.handle([ReadingsStored([at(0, 130.0)])])
    await agent.handle([ReadingsStored([at(1, sensor="other")])])
    assert list(agent.series) == [("d1", "other")]
    changes = [change for raised in drain(out) for change in raised.changes]
    assert [(c.sensor_id, c.state) for c in changes] == [
        ("temp", ALERT_OPEN),
        ("temp", ALERT_CLOSED),
    ]
    assert changes[1].ts == at(0).ts
    assert "max_series" in changes[1].detail


async def test_after_a_crash_decided_changes_are_published_not_judged_again(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    agent, out, _ = make(bus, metrics)
    held = [ReadingsStored([at(0, 130.0)])]
    spike = held[0].rows[0]  # judged, then the agent crashed before publishing
    found = agent._series_of(spike).judge(spike.ts, 130.0, "beyond", adaptive=True)
    agent.pending += [agent._change(spike, finding) for finding in found]
    await agent.recover(held)
    [raised] = drain(out)
    assert [c.state for c in raised.changes] == [ALERT_OPEN]
    assert value(metrics, "ingestd_anomaly_readings_skipped_total", cause="queue") == 1
