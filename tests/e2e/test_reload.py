"""SIGHUP: the daemon re-reads its config file while running (``systemctl reload``)."""

from __future__ import annotations

import json
import signal
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.daemon import Daemon, publish_all
from tests.harness.servers import Mosquitto, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def config_text(database: Path, registry: Path, *, max_payload: int, extra: str = "") -> str:
    return (
        f'[database]\nurl = "sqlite:///{database}"\n{extra}\n'
        f'[ingest]\nmax_payload_bytes = {max_payload}\nregistry_file = "{registry}"\n'
    )


def stored(database: Path) -> dict[float, str | None]:
    """value -> site of every stored reading."""
    with sqlite3.connect(database) as conn:
        return dict(conn.execute("SELECT value, site FROM sensor_readings").fetchall())


def rejected(database: Path) -> list[str]:
    with sqlite3.connect(database) as conn:
        return [r[0] for r in conn.execute("SELECT reason FROM rejected_messages")]


def log_events(daemon: Daemon, message: str) -> list[dict[str, object]]:
    events = []
    for line in daemon.log_text().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("msg") == message:
                events.append(event)
    return events


@dataclass
class Setup:
    daemon: Daemon
    database: Path
    registry: Path
    config: Path


@pytest.fixture
def running(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> Setup:
    """A daemon started with ``-c ingestd.toml``: SQLite, a registry file, a 1000-byte limit."""
    setup = Setup(
        daemon_factory(), tmp_path / "readings.db", tmp_path / "devices.toml",
        tmp_path / "ingestd.toml",
    )  # fmt: skip
    setup.registry.write_text('[[devices]]\ndevice_id = "d1"\nsite = "north"\n')
    setup.config.write_text(config_text(setup.database, setup.registry, max_payload=1000))
    setup.daemon.args = ("-c", str(setup.config))
    setup.daemon.start()
    return setup


def test_sighup_applies_registry_and_limits_live_and_keeps_a_bad_config_out(
    running: Setup, mosquitto: Mosquitto
) -> None:
    daemon, database, registry, config = (
        running.daemon, running.database, running.registry, running.config
    )  # fmt: skip

    def send(value: float, padding: int = 0) -> None:
        body = json.dumps({"value": value, "ts": 1_700_000_000 + value, "pad": "x" * padding})
        publish_all(mosquitto.port, [("sensors/d1/t", body.encode())])

    send(1)
    wait_until(lambda: stored(database).get(1.0) == "north", 20)

    # Registry and payload limit change: both apply without a restart or a reconnect.
    connects = daemon.metric('ingestd_mqtt_connects_total{connection="main"}')
    registry.write_text('[[devices]]\ndevice_id = "d1"\nsite = "south"\n')
    config.write_text(config_text(database, registry, max_payload=200))
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: log_events(daemon, "config reloaded"), 20)
    send(2)
    send(3, padding=300)  # over the new limit
    wait_until(lambda: stored(database).get(2.0) == "south", 20)
    wait_until(lambda: rejected(database) == ["payload_too_large"], 20)
    assert daemon.metric('ingestd_mqtt_connects_total{connection="main"}') == connects

    # An invalid file is refused: the running config stays, and the daemon keeps storing.
    config.write_text("[ingest]\nmax_payload_bytes = -5\n")
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: log_events(daemon, "reload refused, running config kept"), 20)
    send(4, padding=300)  # still over the running limit of 200
    send(5)
    wait_until(lambda: stored(database).get(5.0) == "south", 20)
    wait_until(lambda: rejected(database).count("payload_too_large") == 2, 20)
    assert daemon.process is not None
    assert daemon.process.poll() is None


def test_sighup_reconnects_for_broker_changes_and_names_what_needs_a_restart(
    running: Setup, mosquitto: Mosquitto
) -> None:
    daemon, database, registry, config = (
        running.daemon, running.database, running.registry, running.config
    )  # fmt: skip
    connects = daemon.metric('ingestd_mqtt_connects_total{connection="main"}')

    # A new source (another topic filter) needs a new subscription: a reconnect. A new
    # batch size is held by the running writer: named, not applied.
    config.write_text(
        config_text(database, registry, max_payload=1000, extra="batch_size = 10")
        + '[[ingest.sources]]\ntopic = "sensors/+/+"\n'
        + '[[ingest.sources]]\ntopic = "plant/+/+"\nformat = "value"\n'
        + 'template = "plant/{device_id}/{sensor_id}"\n'
    )
    daemon.signal(signal.SIGHUP)
    wait_until(
        lambda: daemon.metric('ingestd_mqtt_connects_total{connection="main"}') > connects, 20
    )
    wait_until(daemon.ready, 20)
    (event,) = log_events(daemon, "config reloaded")
    assert event["needs_restart"] == {"database": ["batch_size"]}
    publish_all(mosquitto.port, [("plant/d1/rpm", b"1500")])
    wait_until(lambda: 1500.0 in stored(database), 20)
    assert daemon.stop() == 0
