"""The streaming detector's parameters: one frozen object, defaults from the NAB study.

Every default is the prototype's (docs/anomaly.md has the measurements); counts are in
readings, not seconds, because the detector sees readings, whatever their rate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["DetectorSettings"]

_INF = float("inf")
_POSITIVE_INTS = ("short", "long", "daily_bins", "weekly_bins")
_COUNTS = ("warmup", "cooldown", "record_window")
_FRACTIONS = (
    "alert_threshold", "hysteresis",
    "err_alpha", "select_alpha", "level_alpha", "offset_alpha", "profile_alpha",
)  # fmt: skip
_POSITIVE = ("min_std", "cap")
_NON_NEGATIVE = ("scale_floor", "spatial_tol")


@dataclass(frozen=True, slots=True)
class DetectorSettings:
    """Parameters of :class:`agents.anomaly.AnomalyDetector`; each says why it has its value."""

    warmup: int = 300
    """Readings that only learn (score 0, no alert): a new series has no error scale or
    profile yet, and its first surprises would all be alerts."""

    alert_threshold: float = 0.5
    """Score at or above which an alert opens: 0.5 is a tail probability of ~1e-5 for the
    mean of the last ``short`` surprises (the likelihood scale below)."""

    cooldown: int = 300
    """Readings after an alert before another may open: one alert per episode, as NAB
    charges every detection outside a label window."""

    short: int = 10
    """Surprises averaged before judging them (Numenta's anomaly likelihood default): one
    noisy reading is not an episode. On NAB, 5 scored higher with the threshold swept but
    lower at the fixed alert threshold, which is what users get."""

    long: int = 2000
    """Horizon (readings) of the EWMA mean/variance of that average: Numenta keeps 8640
    readings of history; an EWMA keeps the same idea in O(1) memory."""

    min_std: float = 0.03
    """Floor on the std of the averaged surprise (as Numenta): a perfectly regular series
    must not turn its first small wobble into a certain anomaly."""

    err_alpha: float = 0.01
    """EWMA rate of each view's absolute error, the scale a surprise is measured in
    (horizon ~100 readings: follows a change of noise within a few hours at 1/min)."""

    select_alpha: float = 0.002
    """EWMA rate of the error that chooses the view (horizon ~500): slower than the scale,
    so one bad stretch does not swap the model the series is judged by."""

    hysteresis: float = 0.85
    """Switch to another view only when its error is below this fraction of the current
    view's: switching is not itself a surprise, and views that tie do not flap."""

    scale_floor: float = 1e-3
    """Error scale of at least this fraction of the seen range: series that repeat exactly
    (synthetic, quantised) would otherwise have a zero scale and score every change 1."""

    cap: float = 10.0
    """An error of ``cap`` scales is as surprising as one reading gets: beyond it, the
    averaging decides, not the size of a single outlier."""

    level_alpha: float = 0.2
    """EWMA rate of the level view: a smoothed last value for noisy, wandering series."""

    offset_alpha: float = 0.05
    """Rate at which the profile views re-learn a level shift (~20 readings): the shift is
    surprising once, then the daily shape is judged at its new level."""

    profile_alpha: float = 0.1
    """Profile bins are a running mean, then an EWMA over ~10 cycles: the shape of a day
    or week adapts over weeks, not within one."""

    daily_bins: int = 288
    """Bins of the time-of-day profile (5 minutes each): finer than most plant cycles,
    coarse enough to fill within a day at one reading per minute."""

    weekly_bins: int = 336
    """Bins of the time-of-week profile (30 minutes each): shifts and weekends."""

    spatial_tol: float = 0.05
    """A value beyond the all-time range by more than this fraction of it scores 1 at once
    (Numenta's spatial anomaly): a level never seen before needs no averaging."""

    record_window: int = 200
    """A score is reported only when it beats every score of this many previous readings,
    else 0: one detection per episode at any threshold, not one per anomalous reading."""

    def __post_init__(self) -> None:
        problems = [f"{n} must be >= 1" for n in _POSITIVE_INTS if getattr(self, n) < 1]
        problems += [f"{n} must be >= 0" for n in _COUNTS if getattr(self, n) < 0]
        problems += [f"{n} must be in (0, 1]" for n in _FRACTIONS if not 0 < getattr(self, n) <= 1]
        problems += [
            f"{n} must be a positive number" for n in _POSITIVE if not 0 < getattr(self, n) < _INF
        ]
        problems += [
            f"{n} must be a number >= 0" for n in _NON_NEGATIVE if not 0 <= getattr(self, n) < _INF
        ]
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, object]) -> DetectorSettings:
        """Settings from plain data (a snapshot, ``--set`` options); ValueError names the key."""
        kinds = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(raw) - set(kinds))
        if unknown:
            raise ValueError(f"unknown detector settings: {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for name, value in raw.items():
            if kinds[name] == "int":
                if type(value) is not int:
                    raise ValueError(f"{name} must be an integer, got {value!r}")
                values[name] = value
            elif isinstance(value, int | float) and not isinstance(value, bool):
                values[name] = float(value)
            else:
                raise ValueError(f"{name} must be a number, got {value!r}")
        return cls(**values)

    def as_dict(self) -> dict[str, int | float]:
        """Plain data, the inverse of :meth:`from_mapping`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
