"""docs/operations.md names every config key, every metric and every alert that exist;
docs/anomaly.md names every ``[anomaly]`` key, every per-sensor-type override and every
anomaly and maintenance metric."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from daemon.config import Config
from daemon.config_anomaly import SensorTypeRules
from daemon.wiring import wire

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()
DOCUMENTED = set(re.findall(r"`([a-z_.]+)", OPERATIONS))
ANOMALY_GUIDE = (ROOT / "docs" / "anomaly.md").read_text()


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        if isinstance(field.default, BaseModel):
            keys += config_keys(type(field.default), f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def metric_names() -> set[str]:
    """Every metric of a wired daemon (nothing started): on PostgreSQL, so the spool's and the
    drainer's are there too, and with the collectors wiring registers (read at scrape time)."""
    config = Config(database={"url": "postgresql://docs@127.0.0.1:1/docs"})
    registry = CollectorRegistry()

    async def build() -> None:  # the MQTT client wants a running loop; nothing connects
        wire(config, registry, lambda: None)

    asyncio.run(build())
    names = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "info":
            names.add(family.name + "_info")
        else:
            names.add(family.name)
    return names


@pytest.mark.parametrize("key", config_keys(Config))
def test_every_config_key_is_documented(key: str) -> None:
    assert key in DOCUMENTED, f"{key} is missing from docs/operations.md"


@pytest.mark.parametrize("name", sorted(metric_names()))
def test_every_metric_is_documented(name: str) -> None:
    assert name in DOCUMENTED, f"{name} is missing from docs/operations.md"


def test_every_alert_is_documented() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    alerts = [r["alert"] for group in rules["groups"] for r in group["rules"] if "alert" in r]
    assert alerts
    missing = [a for a in alerts if f"`{a}`" not in OPERATIONS]
    assert not missing, f"alerts missing from docs/operations.md: {missing}"


@pytest.mark.parametrize("key", [k for k in config_keys(Config) if k.startswith("anomaly.")])
def test_every_anomaly_key_is_in_the_anomaly_guide(key: str) -> None:
    assert f"`{key}`" in ANOMALY_GUIDE, f"{key} is missing from docs/anomaly.md"


def test_every_sensor_type_override_is_in_the_anomaly_guide() -> None:
    missing = [name for name in SensorTypeRules.model_fields if f"`{name}`" not in ANOMALY_GUIDE]
    assert not missing, f"[anomaly.sensor_types.NAME] keys missing from docs/anomaly.md: {missing}"


def test_every_anomaly_metric_is_in_the_anomaly_guide() -> None:
    prefixes = ("ingestd_anomaly_", "ingestd_maintenance_")
    names = {name for name in metric_names() if name.startswith(prefixes)}
    assert len(names) >= 9
    missing = sorted(name for name in names if f"`{name}" not in ANOMALY_GUIDE)
    assert not missing, f"metrics missing from docs/anomaly.md: {missing}"
