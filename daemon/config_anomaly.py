"""The ``[anomaly]`` section: detection on by default, tuned by reading time, with
per-sensor-type overrides (``[anomaly.sensor_types.vibration]``) keyed by the registry's
``sensor_type``."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field, model_validator

from agents.anomaly.rules import AnomalySettings, SeriesRules
from daemon.config_sections import Section

__all__ = ["AnomalyConfig", "SensorTypeRules"]

Kind = Literal["out_of_range", "flatline", "anomaly"]
Priority = Literal["low", "medium", "high"]
_ALL_KINDS: tuple[Kind, ...] = ("out_of_range", "flatline", "anomaly")


class SensorTypeRules(Section):
    """Overrides for the sensors of one type; what is not set comes from ``[anomaly]``."""

    kinds: list[Kind] | None = None
    alert_threshold: float | None = Field(default=None, gt=0, le=1)
    warmup_readings: int | None = Field(default=None, ge=0)
    warmup_seconds: float | None = Field(default=None, ge=0)
    clear_seconds: float | None = Field(default=None, ge=0)
    cooldown_seconds: float | None = Field(default=None, ge=0)
    flatline_seconds: float | None = Field(default=None, gt=0)
    flatline_readings: int | None = Field(default=None, ge=2)
    priority: Priority | None = None


class AnomalyConfig(Section):
    """Anomaly detection, alerts and maintenance tasks (docs/anomaly.md)."""

    enabled: bool = True
    kinds: list[Kind] = Field(default_factory=lambda: list(_ALL_KINDS))
    alert_threshold: float = Field(default=0.5, gt=0, le=1)
    warmup_readings: int = Field(default=300, ge=0)
    warmup_seconds: float = Field(default=86_400.0, ge=0)
    clear_seconds: float = Field(default=600.0, ge=0)
    cooldown_seconds: float = Field(default=600.0, ge=0)
    flatline_seconds: float = Field(default=1800.0, gt=0)
    flatline_readings: int = Field(default=10, ge=2)
    max_series: int = Field(default=2000, ge=1)
    snapshot_seconds: float = Field(default=60.0, gt=0)
    max_busy_fraction: float = Field(default=0.03, gt=0, le=1)
    auto_close_tasks: bool = False
    # Batches of stored readings waiting for the detectors; beyond it they are skipped.
    queue_batches: int = Field(default=64, ge=1)
    sensor_types: dict[str, SensorTypeRules] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _no_kind_twice(self) -> AnomalyConfig:
        lists = {"kinds": self.kinds} | {
            f"sensor_types.{name}.kinds": rules.kinds for name, rules in self.sensor_types.items()
        }
        for where, kinds in lists.items():
            if kinds is not None and len(set(kinds)) != len(kinds):
                raise ValueError(f"{where} lists a kind twice")
        return self

    def settings(self) -> AnomalySettings:
        """What the AnomalyAgent and the MaintenanceAgent take."""
        base = SeriesRules(
            kinds=frozenset(self.kinds),
            alert_threshold=self.alert_threshold,
            warmup_readings=self.warmup_readings,
            warmup_seconds=self.warmup_seconds,
            clear_seconds=self.clear_seconds,
            cooldown_seconds=self.cooldown_seconds,
            flatline_seconds=self.flatline_seconds,
            flatline_readings=self.flatline_readings,
        )
        by_type = {name: _override(base, rules) for name, rules in self.sensor_types.items()}
        return AnomalySettings(
            rules=base,
            by_sensor_type=by_type,
            max_series=self.max_series,
            snapshot_seconds=self.snapshot_seconds,
            max_busy_fraction=self.max_busy_fraction,
            auto_close_tasks=self.auto_close_tasks,
        )


def _override(base: SeriesRules, rules: SensorTypeRules) -> SeriesRules:
    changes = rules.model_dump(exclude_none=True)
    if "kinds" in changes:
        changes["kinds"] = frozenset(changes["kinds"])
    return replace(base, **changes)
