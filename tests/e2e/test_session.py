"""The MQTT session: persistence across restarts (v3.1.1 and v5), the in-flight window, status."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.queries import query, scalar
from tests.harness.daemon import Collector, Daemon, paho_client, publish_all
from tests.harness.servers import Mosquitto, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def readings(count: int, device: str = "dev-1") -> list[tuple[str, bytes]]:
    topic = f"sensors/{device}/temp"
    return [
        (topic, json.dumps({"value": i, "ts": 1_790_000_000 + i / 1000}).encode())
        for i in range(count)
    ]


def stored(url: str) -> int:
    return int(scalar(url, "SELECT count(*) FROM sensor_readings"))


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_messages_published_while_down_arrive_after_restart(
    protocol: str, mosquitto: Mosquitto, migrated_pg: str, daemon_factory: Callable[..., Daemon]
) -> None:
    daemon = daemon_factory(migrated_pg, INGESTD_MQTT__PROTOCOL=protocol)
    daemon.start()
    publish_all(mosquitto.port, readings(100))
    wait_until(lambda: stored(migrated_pg) == 100, 20)
    assert daemon.stop() == 0
    publish_all(mosquitto.port, readings(300)[100:])  # queued in the persistent session
    daemon.start()
    wait_until(lambda: stored(migrated_pg) == 300, 30)
    assert daemon.metric("ingestd_readings_duplicate_total") == 0


def test_small_windows_stall_nothing(
    tmp_path: Path, migrated_pg: str, daemon_factory: Callable[..., Daemon]
) -> None:
    # A stock mosquitto allows 20 unacknowledged messages; the daemon's own window is smaller
    # still, so intake must pause and resume many times without losing anything.
    with Mosquitto(tmp_path / "stock", extra_conf="max_inflight_messages 20\n") as broker:
        daemon = daemon_factory(
            migrated_pg, INGESTD_MQTT__URL=broker.url, INGESTD_MQTT__MAX_INFLIGHT="8"
        )
        daemon.start()
        publish_all(broker.port, readings(2000, "dev-7"))
        wait_until(lambda: stored(migrated_pg) == 2000, 60)
        metrics = daemon.metrics()
        assert metrics["ingestd_inflight_window"] == 8
        assert metrics["ingestd_intake_pauses_total"] > 0
        assert metrics["ingestd_acks_sent_total"] == 2000
        assert daemon.stop() == 0


def test_status_topic_says_online_then_offline(
    mosquitto: Mosquitto, daemon_factory: Callable[..., Daemon]
) -> None:
    daemon = daemon_factory()
    daemon.start()
    online = Collector(mosquitto.port, "ingestd/status")
    wait_until(lambda: online.count() >= 1, 10)
    assert online.messages[0].payload == b"online"
    assert online.messages[0].retain
    online.close()
    assert daemon.stop() == 0
    offline = Collector(mosquitto.port, "ingestd/status")
    wait_until(lambda: offline.count() >= 1, 10)
    assert offline.messages[-1].payload == b"offline"
    offline.close()


def test_killed_daemon_leaves_offline_will(
    mosquitto: Mosquitto, daemon_factory: Callable[..., Daemon]
) -> None:
    daemon = daemon_factory(INGESTD_MQTT__KEEPALIVE_SECONDS="5")
    daemon.start()
    watcher = Collector(mosquitto.port, "ingestd/status")
    wait_until(lambda: watcher.count() >= 1, 10)
    daemon.kill()
    wait_until(lambda: watcher.messages[-1].payload == b"offline", 15)
    watcher.close()


def test_a_long_pause_keeps_the_connection(
    mosquitto: Mosquitto, tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    # The database blocks for longer than two keepalive intervals while the window is full:
    # reads stay paused all that time, and the connection must survive it.
    database = tmp_path / "locked.db"
    daemon = daemon_factory(
        f"sqlite:///{database}",
        INGESTD_MQTT__KEEPALIVE_SECONDS="5",
        INGESTD_MQTT__MAX_INFLIGHT="50",
    )
    daemon.start()
    lock = sqlite3.connect(database, isolation_level=None, timeout=30)
    lock.execute("BEGIN EXCLUSIVE")
    publish_all(mosquitto.port, readings(300, "dev-3"))
    wait_until(lambda: daemon.metric("ingestd_intake_paused") == 1, 20)
    paused_at = time.monotonic()
    wait_until(lambda: time.monotonic() - paused_at > 12, 20)  # > 2 x keepalive, paused
    assert daemon.metric("ingestd_inflight_messages") == 50
    lock.execute("ROLLBACK")
    lock.close()
    wait_until(lambda: daemon.metric("ingestd_readings_stored_total") == 300, 30)
    assert daemon.metric('ingestd_mqtt_connects_total{connection="main"}') == 1
    assert daemon.metric("ingestd_acks_discarded_total") == 0
    assert daemon.stop() == 0


def test_retained_readings_are_stored_once_across_restarts(
    mosquitto: Mosquitto, migrated_pg: str, daemon_factory: Callable[..., Daemon]
) -> None:
    publisher = paho_client(mosquitto.port)
    with_ts = publisher.publish(
        "sensors/dev-r/temp", b'{"value": 1, "ts": 1790000000}', 1, retain=True
    )
    without_ts = publisher.publish("sensors/dev-r/vib", b'{"value": 2}', 1, retain=True)
    with_ts.wait_for_publish(10)
    without_ts.wait_for_publish(10)
    publisher.loop_stop()
    publisher.disconnect()
    daemon = daemon_factory(migrated_pg)
    for _ in range(3):  # every (re)subscribe replays the retained messages
        daemon.start()
        wait_until(lambda: daemon.metric("ingestd_messages_received_total") >= 2, 20)
        wait_until(lambda: daemon.metric("ingestd_inflight_messages") == 0, 20)
        assert daemon.stop() == 0
    assert stored(migrated_pg) == 1
    reasons = query(migrated_pg, "SELECT reason FROM rejected_messages")
    assert [row[0] for row in reasons] == ["stale_retained"]
