"""How a series is judged: which detectors run and when an alert opens, closes and may open
again; the ``[anomaly]`` configuration as the AnomalyAgent takes it.

Times are the readings' own (``ts``), never the wall clock: a replay of history and the
live stream give the same alerts, and a backlog is judged by when it was measured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agents.anomaly.settings import DetectorSettings

__all__ = ["ANOMALY", "FLATLINE", "KINDS", "OUT_OF_RANGE", "AnomalySettings", "SeriesRules"]

OUT_OF_RANGE = "out_of_range"  # beyond the registry's min/max (enrichment's quality flag)
FLATLINE = "flatline"  # a series that used to move has repeated one value for too long
ANOMALY = "anomaly"  # the adaptive detector's score reached the threshold
KINDS = (OUT_OF_RANGE, FLATLINE, ANOMALY)


@dataclass(frozen=True, slots=True)
class SeriesRules:
    """The rules of one series: ``[anomaly]``, or its sensor type's overrides of it."""

    kinds: frozenset[str] = frozenset(KINDS)
    """Detectors that may open alerts on this series."""

    alert_threshold: float = 0.5
    """Score (0-1) of the adaptive detector at which an ``anomaly`` alert opens."""

    warmup_readings: int = 300
    """Readings the adaptive detector only learns from, per series."""

    warmup_seconds: float = 86_400.0
    """Reading time a series is learned before the adaptive detector may open an alert: a
    whole daily cycle, so the first trip through a series' range is not an anomaly."""

    clear_seconds: float = 600.0
    """An open alert closes once its series has been normal this long (by reading time)."""

    cooldown_seconds: float = 600.0
    """After an alert closes, another of the same series and kind opens no sooner than this."""

    flatline_seconds: float = 1800.0
    """A moving series that repeats one value this long (and ``flatline_readings`` times)
    is frozen: a stuck sensor or a gateway replaying its last value."""

    flatline_readings: int = 10
    """Repeats needed besides the time: two readings an hour apart are not a frozen sensor."""

    priority: str | None = None
    """The least priority of tasks raised from this series (low, medium, high)."""

    def detector_settings(self) -> DetectorSettings:
        """The adaptive detector's settings under these rules."""
        return DetectorSettings(warmup=self.warmup_readings, alert_threshold=self.alert_threshold)


@dataclass(frozen=True, slots=True)
class AnomalySettings:
    """Everything the AnomalyAgent needs from ``[anomaly]``."""

    rules: SeriesRules = SeriesRules()
    by_sensor_type: Mapping[str, SeriesRules] = field(default_factory=dict)
    max_series: int = 2000
    """Series held in memory (~12 KB each); the least recently seen beyond it are dropped."""
    snapshot_seconds: float = 60.0
    """How often learned state is written to the state directory."""
    max_busy_fraction: float = 0.03
    """Share of the event loop the detectors may take (~8.7 us a reading for the adaptive
    one: 0.03 judges ~3,400 readings/s in full); beyond it, readings skip the adaptive
    detector, so a backlog drain stays within ~10 % of its speed without detection."""
    auto_close_tasks: bool = False
    """Close a maintenance task by itself once every alert it holds has closed."""

    def rules_for(self, sensor_type: str | None) -> SeriesRules:
        """The rules of a sensor of this type (the registry's ``sensor_type``)."""
        if sensor_type is None:
            return self.rules
        return self.by_sensor_type.get(sensor_type, self.rules)
