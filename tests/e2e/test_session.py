"""The MQTT session: persistence across restarts (v3.1.1 and v5), the in-flight window, status."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import scalar
from harness.daemon import Collector, Daemon, publish_all
from harness.servers import Mosquitto, wait_until

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
