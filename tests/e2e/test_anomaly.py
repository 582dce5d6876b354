"""Anomaly detection end to end: readings through MQTT into ``ingestd run``, alerts and
maintenance tasks out (rows, events, metrics), on PostgreSQL and on the embedded SQLite.

Readings are a minute apart with explicit ``ts``, so every alert's opening and closing
reading follows from the rules: an episode opens on the first abnormal reading and closes
on the first reading at least ``clear_seconds`` (here 10 minutes) after its last abnormal
one; a frozen value is an episode once it has repeated ``flatline_readings`` times over
``flatline_seconds``.
"""

from __future__ import annotations

import contextlib
import random
import signal
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.e2e.queries import query
from tests.harness.daemon import Collector, Daemon, publish_all
from tests.harness.loop_thread import LoopThread
from tests.harness.plant import (
    as_utc,
    at,
    counters,
    events,
    iso,
    readings,
    settled,
    warm,
    write_plant,
)
from tests.harness.servers import Mosquitto, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CLEAR = 10  # clear_seconds in minutes (readings)
TEMP_SPIKE = (120, 121, 122)  # temp above its max of 100
TEMP2_SPIKE = 125  # one reading of temp2 above 100, after temp's alert opened
FROZEN = range(60, 100)  # pressure repeats one value
FLATLINE_OPENS = FROZEN.start + 30  # 30 min frozen (flatline_seconds), 31 repeats >= 10
SHIFT = 300  # flow jumps from ~20 to ~80 here and stays
EVENT_FIELDS = {
    "event_id", "correlation_id", "alert_id", "ts", "closed_at", "device_id", "sensor_id",
    "value", "kind", "score", "state", "detail", "unit", "site", "area", "line", "asset",
    "sensor_type", "task_id",
}  # fmt: skip
ALERT_SQL = (
    "SELECT id, device_id, sensor_id, kind, ts, closed_at, task_id, score, value, asset,"
    " sensor_type FROM anomaly_alerts ORDER BY sensor_id, ts"
)
TASK_SQL = (
    "SELECT id, subject, kind, device_id, sensor_id, status, priority, description,"
    " alert_count FROM maintenance_tasks ORDER BY kind"
)


def history() -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """temp, flow and pressure interleaved by minute; then temp2 (after temp's alert)."""
    rng = random.Random(1)
    temp = {m: 130.0 + m - TEMP_SPIKE[0] if m in TEMP_SPIKE else warm(m) for m in range(200)}
    flow = {m: (80.0 if m >= SHIFT else 20.0) + rng.uniform(-1, 1) for m in range(2 * SHIFT)}
    pressure = {m: 9.99 if m in FROZEN else 5.0 + 0.1 * (m % 10) for m in range(150)}
    first: list[tuple[str, bytes]] = []
    for minute in range(2 * SHIFT):
        for sensor, values in (("temp", temp), ("flow", flow), ("pressure", pressure)):
            if minute in values:
                first += readings("plc-1", sensor, [(minute, values[minute])])
    temp2 = [(m, 150.0 if m == TEMP2_SPIKE else 40.0 + 0.1 * (m % 3)) for m in range(200)]
    return first, readings("plc-1", "temp2", temp2)


def pg_alert_counts(url: str) -> Callable[[], tuple[int, int]]:
    """(alert rows, closed ones) in the PostgreSQL database at ``url``."""

    def counts() -> tuple[int, int]:
        row = query(url, "SELECT count(*), count(closed_at) FROM anomaly_alerts")[0]
        return int(row[0]), int(row[1])

    return counts


def start_plant_daemon(factory: Callable[..., Daemon], workdir: Path, url: str | None) -> Daemon:
    daemon = factory(url)  # the default batches_in_flight: judged in reading order all the same
    daemon.args = ("-c", str(write_plant(workdir)))
    daemon.start()
    return daemon


def test_spike_level_shift_and_frozen_sensor_give_exactly_the_expected_alerts(
    tmp_path: Path, mosquitto: Mosquitto, migrated_pg: str, daemon_factory: Callable[..., Daemon]
) -> None:
    daemon = start_plant_daemon(daemon_factory, tmp_path / "plant", migrated_pg)
    alert_events = Collector(mosquitto.port, "ingestd/alerts/#")
    task_events = Collector(mosquitto.port, "ingestd/maintenance/#")
    first, second = history()
    publish_all(mosquitto.port, first)
    wait_until(
        lambda: query(migrated_pg, "SELECT 1 FROM anomaly_alerts WHERE sensor_id = 'temp'"), 30
    )
    publish_all(mosquitto.port, second)
    total = len(first) + len(second)
    wait_until(lambda: settled(daemon, total, pg_alert_counts(migrated_pg)), 60, interval=0.2)
    alerts = [dict(r) for r in query(migrated_pg, ALERT_SQL)]
    tasks = [dict(r) for r in query(migrated_pg, TASK_SQL)]
    closed = sum(1 for a in alerts if a["closed_at"] is not None)
    wait_until(
        lambda: alert_events.count() == len(alerts) + closed and task_events.count() == 4,
        10,
        message=lambda: f"alert events {events(alert_events)}, task events {events(task_events)}",
    )

    assert_alert_rows(alerts, tasks)
    assert_task_rows(tasks, alerts)
    assert_alert_events(alert_events, alerts)
    assert_task_events(task_events, tasks)
    assert counters(daemon, "ingestd_anomaly_alerts_total") == {
        "out_of_range": 2, "flatline": 1, "anomaly": 1,
    }  # fmt: skip
    assert counters(daemon, "ingestd_anomaly_alerts_closed_total") == {
        "out_of_range": 2, "flatline": 1, "anomaly": closed - 3,
    }  # fmt: skip
    metrics = daemon.metrics()
    assert metrics["ingestd_anomaly_readings_judged_total"] == total
    assert metrics['ingestd_anomaly_readings_skipped_total{cause="queue"}'] == 0
    assert metrics['ingestd_anomaly_readings_skipped_total{cause="budget"}'] == 0
    alert_events.close()
    task_events.close()


def assert_alert_rows(alerts: list[dict[str, Any]], tasks: list[dict[str, Any]]) -> None:
    got = [(a["sensor_id"], a["kind"], a["ts"], a["closed_at"]) for a in alerts]
    flow = next(a for a in alerts if a["sensor_id"] == "flow")
    assert got == [
        ("flow", "anomaly", at(SHIFT), flow["closed_at"]),  # one alert, whenever it closes
        ("pressure", "flatline", at(FLATLINE_OPENS), at(FROZEN[-1] + CLEAR)),
        ("temp", "out_of_range", at(TEMP_SPIKE[0]), at(TEMP_SPIKE[-1] + CLEAR)),
        ("temp2", "out_of_range", at(TEMP2_SPIKE), at(TEMP2_SPIKE + CLEAR)),
    ]
    assert flow["closed_at"] is None or flow["closed_at"] > at(SHIFT)
    assert {a["device_id"] for a in alerts} == {"plc-1"}
    assert {a["asset"] for a in alerts} == {"pump-7"}
    assert [a["value"] for a in alerts[1:]] == [9.99, 130.0, 150.0]
    assert flow["value"] > 70
    assert [a["sensor_type"] for a in alerts] == ["flow", "pressure", "temperature", "temperature"]
    task_of = {t["kind"]: t["id"] for t in tasks}
    assert [a["task_id"] for a in alerts] == [
        task_of["anomaly"],
        task_of["flatline"],
        task_of["out_of_range"],
        task_of["out_of_range"],
    ]
    assert all(0 <= a["score"] <= 1 for a in alerts)


def assert_task_rows(tasks: list[dict[str, Any]], alerts: list[dict[str, Any]]) -> None:
    flow_score = next(a["score"] for a in alerts if a["kind"] == "anomaly")
    got = [(t["kind"], t["subject"], t["device_id"], t["sensor_id"], t["status"],
            t["priority"], t["alert_count"]) for t in tasks]  # fmt: skip
    assert got == [
        ("anomaly", "pump-7", "plc-1", "flow", "open",
         "high" if flow_score >= 0.9 else "medium", 1),
        ("flatline", "pump-7", "plc-1", "pressure", "open", "medium", 1),
        ("out_of_range", "pump-7", "plc-1", "temp", "open", "high", 2),
    ]  # fmt: skip
    for task in tasks:
        assert "pump-7" in task["description"]
        assert f"sensor {task['sensor_id']}" in task["description"]
    out_of_range = tasks[2]["description"]
    assert "above the registry's max 100" in out_of_range, out_of_range
    assert f"since {at(TEMP_SPIKE[0]).isoformat()}" in out_of_range, out_of_range


def assert_alert_events(collector: Collector, alerts: list[dict[str, Any]]) -> None:
    assert {m.qos for m in collector.messages} == {1}
    got = events(collector)
    by_key = {(e["alert_id"], e["state"]): e for e in got}
    assert len(by_key) == len(got), "an alert event came twice"
    assert len({e["event_id"] for e in got}) == len(got)
    expected = {(a["id"], "open") for a in alerts}
    expected |= {(a["id"], "closed") for a in alerts if a["closed_at"] is not None}
    assert set(by_key) == expected
    for alert in alerts:
        opened = by_key[(alert["id"], "open")]
        assert set(opened) == EVENT_FIELDS
        assert (opened["device_id"], opened["sensor_id"], opened["kind"]) == (
            "plc-1", alert["sensor_id"], alert["kind"],
        )  # fmt: skip
        assert (opened["ts"], opened["closed_at"]) == (iso(alert["ts"]), None)
        assert (opened["value"], opened["score"]) == (alert["value"], alert["score"])
        assert (opened["task_id"], opened["asset"], opened["site"]) == (
            alert["task_id"], "pump-7", "north",
        )  # fmt: skip
        assert opened["correlation_id"]
        if alert["closed_at"] is not None:
            closing = by_key[(alert["id"], "closed")]
            assert (closing["ts"], closing["closed_at"]) == (
                iso(alert["ts"]),
                iso(alert["closed_at"]),
            )
            assert (closing["kind"], closing["sensor_id"]) == (alert["kind"], alert["sensor_id"])
    assert sorted(collector.topics()) == sorted(
        f"ingestd/alerts/plc-1/{e['sensor_id']}" for e in got
    )


def assert_task_events(collector: Collector, tasks: list[dict[str, Any]]) -> None:
    assert {m.qos for m in collector.messages} == {1}
    assert set(collector.topics()) == {"ingestd/maintenance/plc-1"}
    got = events(collector)
    assert Counter(e["change"] for e in got) == {"opened": 3, "attached": 1}
    assert len({e["event_id"] for e in got}) == len(got)
    by_id = {t["id"]: t for t in tasks}
    for event in got:
        task = by_id[event["task_id"]]
        assert (event["kind"], event["subject"], event["status"], event["priority"]) == (
            task["kind"], "pump-7", "open", task["priority"],
        )  # fmt: skip
        assert event["description"] == task["description"]
        assert event["alert_count"] == (2 if event["change"] == "attached" else 1)
    attached = next(e for e in got if e["change"] == "attached")
    assert attached["kind"] == "out_of_range"
    assert attached["last_alert_at"] == iso(at(TEMP2_SPIKE))


def sqlite_rows(database: Path, sql: str) -> list[dict[str, Any]]:
    if not database.exists():
        return []
    with contextlib.closing(sqlite3.connect(database)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(sql)]


def test_embedded_sqlite_default_stores_the_alert_and_its_task(
    tmp_path: Path, mosquitto: Mosquitto, daemon_factory: Callable[..., Daemon]
) -> None:
    daemon = start_plant_daemon(daemon_factory, tmp_path / "plant", None)
    assert "INGESTD_DATABASE__URL" not in daemon.env
    database = daemon.workdir / "var" / "ingestd.db"
    spike = (20, 21)
    values = [(m, 140.0 if m in spike else warm(m)) for m in range(40)]
    publish_all(mosquitto.port, readings("plc-1", "temp", values))

    def counts() -> tuple[int, int]:
        rows = sqlite_rows(
            database, "SELECT count(*) AS n, count(closed_at) AS c FROM anomaly_alerts"
        )
        return (rows[0]["n"], rows[0]["c"]) if rows else (0, 0)

    wait_until(lambda: settled(daemon, len(values), counts) and counts() == (1, 1), 30)
    alerts = sqlite_rows(database, ALERT_SQL)
    tasks = sqlite_rows(database, TASK_SQL)
    assert [(a["device_id"], a["sensor_id"], a["kind"], as_utc(a["ts"]), as_utc(a["closed_at"]),
             a["value"]) for a in alerts] == [
        ("plc-1", "temp", "out_of_range", at(spike[0]), at(spike[-1] + CLEAR), 140.0)
    ]  # fmt: skip
    assert [(t["subject"], t["kind"], t["sensor_id"], t["status"], t["priority"],
             t["alert_count"]) for t in tasks] == [
        ("pump-7", "out_of_range", "temp", "open", "high", 1)
    ]  # fmt: skip
    assert alerts[0]["task_id"] == tasks[0]["id"]
    assert "pump-7" in tasks[0]["description"]


def test_restart_keeps_learned_state_and_the_open_episode(
    tmp_path: Path, mosquitto: Mosquitto, migrated_pg: str, daemon_factory: Callable[..., Daemon]
) -> None:
    """A clean stop saves what the detectors learned: after the restart the flow detector
    is past its warm-up (a fresh one would open nothing for 100 readings) and temp's open
    episode still knows its last abnormal reading (the database's open alert alone says
    only when it opened, which would close it 9 minutes early)."""
    daemon = start_plant_daemon(daemon_factory, tmp_path / "plant", migrated_pg)
    alert_events = Collector(mosquitto.port, "ingestd/alerts/#")
    rng = random.Random(2)
    spike = range(100, 110)
    temp = [(m, 120.0 if m in spike else warm(m)) for m in range(110)]
    flow = [(m, 20.0 + rng.uniform(-1, 1)) for m in range(200)]
    publish_all(mosquitto.port, readings("plc-1", "temp", temp) + readings("plc-1", "flow", flow))
    wait_until(lambda: settled(daemon, 310, pg_alert_counts(migrated_pg)), 30, interval=0.1)
    wait_until(lambda: alert_events.count() == 1, 10)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0
    snapshot = daemon.workdir / "var" / "anomaly.db"
    saved = sqlite_rows(snapshot, "SELECT device_id, sensor_id FROM series")
    assert {(r["device_id"], r["sensor_id"]) for r in saved} == {
        ("plc-1", "temp"),
        ("plc-1", "flow"),
    }

    daemon.start()
    wait_until(lambda: daemon.metric("ingestd_anomaly_series") > 0, 20)
    metrics = daemon.metrics()
    assert metrics["ingestd_anomaly_series"] == 2
    assert metrics["ingestd_messages_received_total"] == 0  # learned before any reading
    temp = [(m, warm(m)) for m in range(110, 131)]
    flow = [(m, 80.0 + rng.uniform(-1, 1)) for m in range(200, 220)]
    publish_all(mosquitto.port, readings("plc-1", "temp", temp) + readings("plc-1", "flow", flow))
    before = (1, 0)  # temp's alert, open
    wait_until(lambda: settled(daemon, 41, pg_alert_counts(migrated_pg), before), 30, interval=0.1)
    alerts = [dict(r) for r in query(migrated_pg, ALERT_SQL)]
    assert [(a["sensor_id"], a["kind"], a["ts"]) for a in alerts] == [
        ("flow", "anomaly", at(200)), ("temp", "out_of_range", at(spike.start)),
    ]  # fmt: skip
    assert alerts[1]["closed_at"] == at(spike[-1] + CLEAR)
    assert daemon.metric('ingestd_anomaly_alerts_total{kind="out_of_range"}') == 0
    wait_until(lambda: alert_events.count() >= 3, 10)
    temp_events = [
        (e["state"], e["alert_id"]) for e in events(alert_events) if e["sensor_id"] == "temp"
    ]
    assert temp_events == [("open", alerts[1]["id"]), ("closed", alerts[1]["id"])]
    alert_events.close()


@contextlib.contextmanager
def key_held(url: str, device: str, sensor: str, ts: datetime) -> Iterator[None]:
    """Another session inserts this reading's key and keeps its transaction open, so the
    daemon's write of that reading waits on the unique index; rolled back at the end."""
    loop = LoopThread("key-holder")
    loop.start()
    conn = loop.call(asyncpg.connect(url))
    transaction = conn.transaction()
    try:
        loop.call(transaction.start())
        loop.call(conn.execute(
            "INSERT INTO sensor_readings (ts, device_id, sensor_id, value, received_at,"
            " correlation_id) VALUES ($1, $2, $3, 0, now(), 'key-holder')", ts, device, sensor,
        ))  # fmt: skip
        yield
    finally:
        loop.call(transaction.rollback())
        loop.call(conn.close())
        loop.stop()


def test_a_batch_committed_late_is_judged_in_reading_order(
    tmp_path: Path, mosquitto: Mosquitto, migrated_pg: str, daemon_factory: Callable[..., Daemon]
) -> None:
    """The spike's batch commits after the batch of the readings that follow it (its write
    waits on a lock), as any slower transaction may with several batches in flight."""
    daemon = daemon_factory(migrated_pg)  # the default batches_in_flight
    daemon.args = ("-c", str(write_plant(tmp_path / "plant")))
    daemon.start()
    publish_all(mosquitto.port, readings("plc-1", "temp", [(m, warm(m)) for m in range(120)]))
    wait_until(lambda: daemon.metric("ingestd_anomaly_readings_judged_total") == 120, 30)
    with key_held(migrated_pg, "plc-1", "temp", at(120)):
        publish_all(mosquitto.port, readings("plc-1", "temp", [(120, 130.0)]))
        wait_until(lambda: query(migrated_pg, "SELECT 1 FROM pg_locks WHERE NOT granted"), 20)
        after = [(m, warm(m)) for m in range(121, 141)]
        publish_all(mosquitto.port, readings("plc-1", "temp", after))
        committed = "SELECT count(*) FROM sensor_readings WHERE correlation_id <> 'key-holder'"
        wait_until(lambda: query(migrated_pg, committed)[0][0] == 140, 30)
        # The later batch is committed, but announced only after the spike's batch.
        assert daemon.metric("ingestd_anomaly_readings_judged_total") == 120
    wait_until(lambda: settled(daemon, 141, pg_alert_counts(migrated_pg)), 30, interval=0.1)
    alerts = [dict(r) for r in query(migrated_pg, ALERT_SQL)]
    assert [(a["ts"], a["closed_at"]) for a in alerts] == [(at(120), at(120 + CLEAR))]
