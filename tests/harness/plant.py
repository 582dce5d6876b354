"""A small plant for the anomaly tests: a registry, an ``[anomaly]`` config, readings one
minute apart (``ts`` explicit, so alert times are known in advance), and the outbound alert
and maintenance events as parsed JSON."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.harness.daemon import Collector, Daemon

T0 = datetime(2026, 12, 1, tzinfo=UTC)
KINDS = ("out_of_range", "flatline", "anomaly")

# plc-1 drives pump-7 (tasks are per asset); plc-2 has no asset (tasks are per device).
REGISTRY = """
[[devices]]
device_id = "plc-1"
site = "north"
asset = "pump-7"
[devices.sensors.temp]
sensor_type = "temperature"
unit = "degC"
max = 100
[devices.sensors.temp2]
sensor_type = "temperature"
unit = "degC"
max = 100
[devices.sensors.flow]
sensor_type = "flow"
[devices.sensors.pressure]
sensor_type = "pressure"

[[devices]]
device_id = "plc-2"
site = "south"
[devices.sensors.temp]
sensor_type = "temperature"
max = 100
"""

# Every test learns fast and by reading time: alerts at known readings, no day of warm-up.
ANOMALY = """
[anomaly]
warmup_readings = 100
warmup_seconds = 0
clear_seconds = 600
cooldown_seconds = 600
flatline_seconds = 1800
flatline_readings = 10
"""

# One detector per sensor type, so each sensor's alerts come from one rule only.
ONE_KIND_PER_TYPE = """
[anomaly.sensor_types.temperature]
kinds = ["out_of_range"]
[anomaly.sensor_types.flow]
kinds = ["anomaly"]
[anomaly.sensor_types.pressure]
kinds = ["flatline"]
"""


def write_plant(directory: Path, anomaly: str = ONE_KIND_PER_TYPE) -> Path:
    """The registry and an ``ingestd.toml`` naming it, in ``directory``; the config's path.
    ``anomaly`` is appended to the ``[anomaly]`` section (sub-tables or more keys)."""
    directory.mkdir(parents=True, exist_ok=True)
    registry = directory / "devices.toml"
    registry.write_text(REGISTRY)
    config = directory / "ingestd.toml"
    config.write_text(f'[ingest]\nregistry_file = "{registry}"\n{ANOMALY}{anomaly}')
    return config


def at(minute: int) -> datetime:
    return T0 + timedelta(minutes=minute)


def iso(ts: datetime) -> str:
    """A time as the events write it (ISO-8601 UTC, microseconds, Z)."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def reading(device: str, sensor: str, minute: int, value: float) -> tuple[str, bytes]:
    """One JSON reading on the default source, ``sensors/{device}/{sensor}``."""
    body = {"value": value, "ts": iso(at(minute))}
    return f"sensors/{device}/{sensor}", json.dumps(body).encode()


def readings(
    device: str, sensor: str, values: Iterable[tuple[int, float]]
) -> list[tuple[str, bytes]]:
    return [reading(device, sensor, minute, value) for minute, value in values]


def warm(minute: int) -> float:
    """A normal temperature: moves a little, far below the registry's max of 100."""
    return 50.0 + 0.5 * (minute % 4)


def events(collector: Collector) -> list[dict[str, Any]]:
    """Every message the collector received, parsed, in arrival order."""
    with collector._lock:
        messages = list(collector.messages)
    return [json.loads(message.payload) for message in messages]


def as_utc(value: Any) -> datetime | None:
    """A timestamp column as an aware datetime (SQLite returns text, PostgreSQL datetimes)."""
    if value is None:
        return None
    ts = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def counters(daemon: Daemon, name: str) -> dict[str, float]:
    """A counter by alert kind, e.g. ``ingestd_anomaly_alerts_total``."""
    metrics = daemon.metrics()
    return {kind: metrics[f'{name}{{kind="{kind}"}}'] for kind in KINDS}


def settled(
    daemon: Daemon,
    judged: int,
    stored: Callable[[], tuple[int, int]],
    before: tuple[int, int] = (0, 0),
) -> bool:
    """This process judged ``judged`` readings and every alert change it raised is stored:
    ``stored()`` (alert rows, closed ones) equals ``before`` (the rows at its start) plus
    (opened, closed) by its counters."""
    if daemon.metric("ingestd_anomaly_readings_judged_total") < judged:
        return False
    opened = sum(counters(daemon, "ingestd_anomaly_alerts_total").values())
    closed = sum(counters(daemon, "ingestd_anomaly_alerts_closed_total").values())
    return stored() == (before[0] + opened, before[1] + closed)
