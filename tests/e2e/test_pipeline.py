"""End to end: real mosquitto and PostgreSQL, ``ingestd run`` as a process, paho as the devices."""

from __future__ import annotations

import base64
import json
import signal
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from tests.e2e.queries import query, scalar
from tests.harness.daemon import Collector, Daemon, publish_all, streaming
from tests.harness.servers import Mosquitto, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

T0 = datetime(2026, 11, 27, 7, 0, tzinfo=UTC)


def reading(device: str, sensor: str, index: int, value: float | None = None) -> tuple[str, bytes]:
    ts = (T0 + timedelta(milliseconds=index)).isoformat().replace("+00:00", "Z")
    body = {
        "value": float(index) if value is None else value,
        "ts": ts,
        "unit": "degC",
        "seq": index,
    }
    return f"sensors/{device}/{sensor}", json.dumps(body).encode()


BAD = [
    ("sensors/dev-9/temp", b"{not json", "malformed_json"),
    ("sensors/dev-9/temp", b"\xff\xfe\x00", "not_utf8"),
    ("sensors/dev-9/temp", b'{"ts": "2026-11-27T07:00:00Z"}', "missing_value"),
    ("sensors/dev-9/temp", b'{"value": "hot"}', "bad_type"),
    ("sensors/dev-9/temp", b'{"value": null}', "bad_type"),
    ("sensors/dev-9/temp", b'{"value": true}', "bad_type"),
    ("sensors/dev-9/temp", b'{"value": NaN}', "bad_value"),
    ("sensors/dev-9/temp", b'{"value": 1, "ts": "yesterday"}', "bad_timestamp"),
    ("sensors/dev-9/temp", b'{"value": 1, "device_id": "dev-8"}', "topic_mismatch"),
    ("sensors/dev-9/temp/extra", b'{"value": 1}', None),  # not subscribed: never delivered
]


def drained(daemon: Daemon, expected_received: int) -> Callable[[], bool]:
    def check() -> bool:
        m = daemon.metrics()
        return (
            m.get("ingestd_messages_received_total", 0) >= expected_received
            and m.get("ingestd_inflight_messages", 1) == 0
        )

    return check


def test_mixed_valid_and_invalid_messages(
    mosquitto: Mosquitto, migrated_pg: str, daemon_factory: Callable[..., Daemon]
) -> None:
    daemon = daemon_factory(migrated_pg)
    daemon.start()
    processed = Collector(mosquitto.port, "ingestd/processed/#")
    failed = Collector(mosquitto.port, "ingestd/failed/#")
    good = [reading(f"dev-{d}", s, i) for d in range(3) for s in ("temp", "vib") for i in range(50)]
    bad = [(topic, payload) for topic, payload, _ in BAD]
    publish_all(mosquitto.port, good + bad)

    delivered_bad = [entry for entry in BAD if entry[2] is not None]
    total = len(good) + len(delivered_bad)
    wait_until(drained(daemon, total), 30)
    wait_until(lambda: processed.count() >= len(good) and failed.count() >= len(delivered_bad), 10)

    assert scalar(migrated_pg, "SELECT count(*) FROM sensor_readings") == len(good)
    rows = {
        row[0]: row[1]
        for row in query(
            migrated_pg, "SELECT reason, count(*) FROM rejected_messages GROUP BY reason"
        )
    }
    expected: dict[str, int] = {}
    for _, _, reason in delivered_bad:
        expected[reason] = expected.get(reason, 0) + 1  # type: ignore[index]
    assert rows == expected
    metrics = daemon.metrics()
    assert metrics["ingestd_messages_received_total"] == total
    assert metrics["ingestd_readings_stored_total"] == len(good)
    assert metrics["ingestd_readings_duplicate_total"] == 0
    for reason, count in expected.items():
        assert metrics[f'ingestd_messages_rejected_total{{reason="{reason}"}}'] == count
    assert metrics["ingestd_acks_sent_total"] == total
    assert processed.count() == len(good)
    assert failed.count() == len(delivered_bad)

    event = json.loads(processed.messages[0].payload)
    assert processed.messages[0].topic.startswith("ingestd/processed/dev-")
    assert {"event_id", "correlation_id", "device_id", "sensor_id", "ts", "value"} <= set(event)
    assert event["ts"].endswith("Z")
    assert "T" in event["ts"]
    failure = json.loads(failed.messages[0].payload)
    assert failed.messages[0].topic == "ingestd/failed/dev-9"
    assert failure["reason"] in expected
    assert failure["topic"] == "sensors/dev-9/temp"
    assert base64.b64decode(failure["payload"]) in {p for _, p, _ in BAD}
    processed.close()
    failed.close()


def test_same_reading_twice_is_stored_once(
    mosquitto: Mosquitto, migrated_pg: str, daemon_factory: Callable[..., Daemon]
) -> None:
    daemon = daemon_factory(migrated_pg)
    daemon.start()
    message = reading("dev-1", "temp", 7, 21.5)
    publish_all(mosquitto.port, [message])
    wait_until(drained(daemon, 1), 20)
    publish_all(mosquitto.port, [message, message])
    wait_until(drained(daemon, 3), 20)
    assert scalar(migrated_pg, "SELECT count(*) FROM sensor_readings") == 1
    metrics = daemon.metrics()
    assert metrics["ingestd_readings_stored_total"] == 1
    assert metrics["ingestd_readings_duplicate_total"] == 2


def test_oversized_payload_is_rejected_and_truncated(
    mosquitto: Mosquitto, migrated_pg: str, daemon_factory: Callable[..., Daemon]
) -> None:
    daemon = daemon_factory(migrated_pg, INGESTD_INGEST__MAX_PAYLOAD_BYTES="1024")
    daemon.start()
    big = b'{"value": 1, "pad": "' + b"x" * 5000 + b'"}'
    publish_all(mosquitto.port, [("sensors/dev-1/temp", big), reading("dev-1", "temp", 1)])
    wait_until(drained(daemon, 2), 20)
    row = query(migrated_pg, "SELECT reason, length(payload), payload_size FROM rejected_messages")
    assert [tuple(r) for r in row] == [("payload_too_large", 1024, len(big))]
    assert scalar(migrated_pg, "SELECT count(*) FROM sensor_readings") == 1


def test_kill_9_mid_stream_loses_and_doubles_nothing(
    mosquitto: Mosquitto, migrated_pg: str, daemon_factory: Callable[..., Daemon]
) -> None:
    daemon = daemon_factory(migrated_pg)
    daemon.start()
    messages = [reading(f"dev-{i % 5}", "temp", i) for i in range(3000)]
    with streaming(mosquitto.port, messages, rate=1500) as done:
        wait_until(lambda: daemon.metric("ingestd_readings_stored_total") >= 500, 30)
        daemon.kill()
        daemon.start()
        assert done.wait(60)
    wait_until(
        lambda: scalar(migrated_pg, "SELECT count(*) FROM sensor_readings") == len(messages),
        60,
        message=lambda: f"stored {scalar(migrated_pg, 'SELECT count(*) FROM sensor_readings')}",
    )
    distinct = scalar(
        migrated_pg, "SELECT count(DISTINCT (device_id, sensor_id, ts)) FROM sensor_readings"
    )
    assert distinct == len(messages)
    assert scalar(migrated_pg, "SELECT count(*) FROM rejected_messages") == 0


def test_sigterm_under_load_exits_zero_and_acks_only_what_is_stored(
    mosquitto: Mosquitto, migrated_pg: str, daemon_factory: Callable[..., Daemon]
) -> None:
    daemon = daemon_factory(migrated_pg)
    daemon.start()
    messages = [reading(f"dev-{i % 4}", "vib", i) for i in range(4000)]
    with streaming(mosquitto.port, messages, rate=2000) as done:
        wait_until(lambda: daemon.metric("ingestd_readings_stored_total") >= 300, 30)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(10) == 0
        stored_at_exit = scalar(migrated_pg, "SELECT count(*) FROM sensor_readings")
        assert done.wait(60)
    assert '"stopped"' in daemon.log_text()
    # Everything acknowledged before the exit was stored; the rest waits in the session.
    assert stored_at_exit < len(messages)
    daemon.start()
    wait_until(
        lambda: scalar(migrated_pg, "SELECT count(*) FROM sensor_readings") == len(messages), 60
    )


def test_embedded_sqlite_default_needs_no_configuration(
    mosquitto: Mosquitto, daemon_factory: Callable[..., Daemon]
) -> None:
    daemon = daemon_factory()
    daemon.start()
    publish_all(mosquitto.port, [reading("dev-1", "temp", i) for i in range(20)])
    wait_until(drained(daemon, 20), 20)
    database = daemon.workdir / "var" / "ingestd.db"
    assert database.exists()
    with sqlite3.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM sensor_readings").fetchone()[0] == 20
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert daemon.stop() == 0


def test_run_refuses_an_unmigrated_postgresql(
    pg_url: str, daemon_factory: Callable[..., Daemon]
) -> None:
    daemon = daemon_factory(pg_url)
    daemon.start(wait_ready=False)
    assert daemon.wait(30) == 1
    assert "ingestd migrate" in daemon.log_text()
