"""A streaming anomaly detector for one (device, sensor) series: no configuration, O(1) work
and ~10 KB of state per series, time taken from the readings' ``ts`` (never the wall clock).

The algorithm, per reading:

1. Six one-step predictions ("views") of the value: L the last value, E an EWMA level,
   D a time-of-day profile plus an offset, W a time-of-week profile plus an offset, S the
   last value plus the daily profile's step, T the same with the weekly profile. Profiles
   are per-bin means (288 bins of 5 min, 336 of 30 min). L/E fit random walks and noisy
   levels, D/W contextual anomalies (the daily peak that does not come), S/T a seasonal
   shape from wherever the level is now.
2. Each view keeps an EWMA of its absolute error (the scale, horizon ~100 readings) and a
   slower one (~500) that picks the view the series is judged by, with hysteresis.
3. Surprise = |value - prediction| / scale, capped at ``cap`` and scaled to [0, 1].
4. Anomaly likelihood as in Numenta's HTM detector: the mean of the last ``short``
   surprises against the long-run (EWMA) distribution of that mean; the score is the
   log-scaled Gaussian tail, so 0.5 is a tail probability of 1e-5.
5. A value beyond the all-time range by more than 5 % of it scores 1 (a spatial anomaly).
6. Record filter: a score is reported only when it beats every score of the previous
   ``record_window`` readings, else 0: one detection per episode at any threshold.
7. An alert opens at score >= ``alert_threshold`` unless one opened in the last
   ``cooldown`` readings; the first ``warmup`` readings only learn.

Why this one: chosen on the 18 NAB series in ../shared/data/nab (standard profile, NAB
score 0-100; published: Numenta HTM 61.3, ARTime 67.1, relative entropy 50.0). Tried, with
the threshold swept: an EWMA z-score with the likelihood 28.0; relative entropy over
windows 36.5; a seasonal ensemble 20.8; single views 21-35, with the record filter 39-48;
choosing the view by its error 56.2; this detector 59.6, and 71.3 for its alert column at
the fixed 0.5 threshold (the number a plant gets), ~10 µs per reading. Ablations: without
the record filter 36.6, without the spatial rule 56.5, without the weekly views 52.5.
docs/anomaly.md has the table and the current bench numbers (``python -m bench.nab``).
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Mapping
from datetime import datetime
from typing import NamedTuple

from agents.anomaly.settings import DetectorSettings
from agents.anomaly.state import SnapshotReader

__all__ = ["AnomalyDetector", "Verdict"]

SNAPSHOT_VERSION = 1
_LOG_1E10 = math.log(1e-10)
_SQRT2 = math.sqrt(2.0)
# Arithmetic on values near float's limit overflows to inf and then NaN; nothing measured
# comes near this, and a clamped value is still far outside any seen range (scores 1).
_LIMIT = 1e100
_DAY = 86_400
_WEEK = 7 * _DAY


class Verdict(NamedTuple):
    """What one reading got: its anomaly score in [0, 1] (0 unless it is the episode's
    record), whether an alert opens on it, and its score before the record filter (how
    abnormal the series looks now: an episode lasts while this stays at the threshold)."""

    score: float
    alert: bool
    likelihood: float = 0.0


class _ViewError:
    """One view's error history: readings seen, the scale (fast EWMA), the selection error."""

    __slots__ = ("count", "scale", "select")

    def __init__(self, count: int, scale: float, select: float) -> None:
        self.count = count
        self.scale = scale
        self.select = select


class AnomalyDetector:
    """One series' detector: feed its readings in arrival order to :meth:`update`."""

    def __init__(self, settings: DetectorSettings | None = None) -> None:
        self.settings = settings = settings or DetectorSettings()
        self._n = 0
        self._last: float | None = None
        self._last_bins = (0, 0)  # (daily, weekly) bin of the previous reading
        self._level = 0.0
        self._offsets = [0.0, 0.0]  # the level shift of the daily / weekly profile
        sizes = (settings.daily_bins, settings.weekly_bins)
        self._profiles = tuple(array("d", bytes(8 * size)) for size in sizes)
        self._counts = tuple(array("q", bytes(8 * size)) for size in sizes)
        self._errors: dict[str, _ViewError] = {}
        self._view: str | None = None
        self._recent: deque[float] = deque(maxlen=settings.short)
        self._recent_sum = 0.0
        self._lik_n = 0
        self._lik_mu = 0.0
        self._lik_var = 0.0
        self._lo = 0.0
        self._hi = 0.0
        # (index, score) of the last record_window readings, scores decreasing
        self._records: deque[tuple[int, float]] = deque(maxlen=settings.record_window + 1)
        self._since_alert: int | None = None

    def update(self, ts: datetime, value: float) -> Verdict:
        """Learn one reading and judge it. A NaN or infinite value is skipped (score 0)."""
        x = float(value)
        if not math.isfinite(x):
            return Verdict(0.0, False)
        x = min(max(x, -_LIMIT), _LIMIT)
        self._n += 1
        if self._since_alert is not None:
            self._since_alert += 1
        spatial = self._spatial(x)
        bins = self._bins(ts)
        raw = self._surprise(x, self._predictions(bins))
        self._learn(x, bins)
        score = self._likelihood(raw)
        if spatial:
            score = 1.0
        if self._n <= self.settings.warmup:
            score = 0.0
        alert = score >= self.settings.alert_threshold and (
            self._since_alert is None or self._since_alert > self.settings.cooldown
        )
        if alert:
            self._since_alert = 0
        return Verdict(self._record(score), alert, score)

    # ------------------------------------------------------------------ the views
    def _bins(self, ts: datetime) -> tuple[int, int]:
        # UTC seconds since 0001-01-01 (a Monday) by integer arithmetic: an aware ts far
        # from today cannot overflow as astimezone() would. Naive means UTC.
        offset = ts.utcoffset()
        shift = offset.days * _DAY + offset.seconds if offset else 0
        seconds = (ts.toordinal() - 1) * _DAY + ts.hour * 3600 + ts.minute * 60 + ts.second
        seconds -= shift
        of_day = seconds % _DAY
        of_week = seconds % _WEEK
        return (
            of_day * self.settings.daily_bins // _DAY,
            of_week * self.settings.weekly_bins // _WEEK,
        )

    def _predictions(self, bins: tuple[int, int]) -> dict[str, float]:
        # Insertion order L, E, D, S, W, T: ties between views go to the first.
        predictions: dict[str, float] = {}
        last = self._last
        if last is not None:
            predictions["L"] = last
            predictions["E"] = self._level
        for j, (own, step) in enumerate((("D", "S"), ("W", "T"))):
            b = bins[j]
            if self._counts[j][b]:
                mean = self._profiles[j][b]
                predictions[own] = mean + self._offsets[j]
                b0 = self._last_bins[j]
                if last is not None and self._counts[j][b0]:
                    predictions[step] = last + (mean - self._profiles[j][b0])
        return predictions

    def _surprise(self, x: float, predictions: dict[str, float]) -> float:
        """The chosen view's error over its scale, in [0, 1]; every view's errors learn.

        Written out with comparisons instead of min/max calls and a key function: this
        runs for every reading of every series (the detector's hottest loop)."""
        s = self.settings
        history_of = self._errors
        select_alpha = s.select_alpha
        candidates: list[tuple[str, _ViewError, float]] = []
        best: tuple[str, _ViewError, float] | None = None
        for view, predicted in predictions.items():
            e = x - predicted
            if e < 0:
                e = -e
            history = history_of.get(view)
            if history is None:  # a candidate once it has an error history
                history_of[view] = _ViewError(1, e, e)
                continue
            rate = 1.0 / (history.count + 1)
            history.select += (rate if rate > select_alpha else select_alpha) * (e - history.select)
            entry = (view, history, e)
            candidates.append(entry)
            if best is None or history.select < best[1].select:  # ties: the first view
                best = entry
        if best is None:
            return 0.0
        chosen = next((c for c in candidates if c[0] == self._view), None)
        if chosen is None or best[1].select < s.hysteresis * chosen[1].select:
            chosen = best
            self._view = best[0]
        raw = 0.0
        floor = s.scale_floor * (self._hi - self._lo)
        scale = chosen[1].scale if chosen[1].scale > floor else floor
        if scale > 0:
            ratio = chosen[2] / scale
            raw = (ratio if ratio < s.cap else s.cap) / s.cap
        err_alpha = s.err_alpha
        for _, history, e in candidates:
            rate = 1.0 / (history.count + 1)
            history.scale += (rate if rate > err_alpha else err_alpha) * (e - history.scale)
            history.count += 1
        return raw

    def _learn(self, x: float, bins: tuple[int, int]) -> None:
        s = self.settings
        for j in (0, 1):
            b = bins[j]
            profile, counts = self._profiles[j], self._counts[j]
            if counts[b]:
                self._offsets[j] += s.offset_alpha * ((x - profile[b]) - self._offsets[j])
            counts[b] += 1
            rate = max(1.0 / counts[b], s.profile_alpha)
            profile[b] += rate * ((x - self._offsets[j]) - profile[b])
        self._level = x if self._last is None else self._level + s.level_alpha * (x - self._level)
        self._last = x
        self._last_bins = bins

    # ------------------------------------------------------------------ the score
    def _likelihood(self, raw: float) -> float:
        recent = self._recent
        if len(recent) == recent.maxlen:
            self._recent_sum -= recent[0]
        recent.append(raw)
        self._recent_sum += raw
        mean = self._recent_sum / len(recent)
        self._lik_n += 1
        if self._lik_n == 1:
            self._lik_mu = mean
            return 0.0
        std = max(math.sqrt(self._lik_var), self.settings.min_std)
        tail = 0.5 * math.erfc((mean - self._lik_mu) / std / _SQRT2)
        rate = max(1.0 / self.settings.long, 1.0 / self._lik_n)
        d = mean - self._lik_mu
        self._lik_mu += rate * d
        self._lik_var = (1.0 - rate) * (self._lik_var + rate * d * d)
        return min(1.0, max(0.0, math.log(tail + 1e-10) / _LOG_1E10))

    def _spatial(self, x: float) -> bool:
        """True for a value beyond the seen range by ``spatial_tol`` of it; widens the range."""
        if self._n == 1:
            self._lo = self._hi = x
            return False
        outside = False
        if self._hi > self._lo:
            margin = (self._hi - self._lo) * self.settings.spatial_tol
            outside = x > self._hi + margin or x < self._lo - margin
        self._lo = min(self._lo, x)
        self._hi = max(self._hi, x)
        return outside

    def _record(self, score: float) -> float:
        i, records = self._n, self._records
        while records and records[0][0] < i - self.settings.record_window:
            records.popleft()
        previous = records[0][1] if records else -1.0
        while records and records[-1][1] <= score:
            records.pop()
        records.append((i, score))
        return score if score > previous else 0.0

    # ------------------------------------------------------------------ the state
    def snapshot(self) -> dict[str, object]:
        """The whole state as plain JSON-serialisable data (settings included)."""
        return {
            "version": SNAPSHOT_VERSION,
            "settings": self.settings.as_dict(),
            "n": self._n,
            "last": self._last,
            "last_bins": list(self._last_bins),
            "level": self._level,
            "offsets": list(self._offsets),
            "profiles": [p.tolist() for p in self._profiles],
            "counts": [c.tolist() for c in self._counts],
            "views": {k: [e.count, e.scale, e.select] for k, e in self._errors.items()},
            "view": self._view,
            "recent": list(self._recent),
            "recent_sum": self._recent_sum,
            "lik_n": self._lik_n,
            "lik_mu": self._lik_mu,
            "lik_var": self._lik_var,
            "lo": self._lo,
            "hi": self._hi,
            "records": [[i, s] for i, s in self._records],
            "since_alert": self._since_alert,
        }

    def restore(self, state: Mapping[str, object]) -> None:
        """Continue from a :meth:`snapshot`, its settings included. A malformed snapshot
        raises SnapshotError and leaves this detector as it was."""
        r = SnapshotReader(state, SNAPSHOT_VERSION)
        new = AnomalyDetector(DetectorSettings.from_mapping(r.mapping("settings")))
        s = new.settings
        sizes = (s.daily_bins, s.weekly_bins)
        new._n = r.count("n")
        new._last = r.optional_number("last")
        daily, weekly = r.counts("last_bins", 2)
        new._last_bins = (daily, weekly)
        new._level = r.number("level")
        new._offsets = r.numbers("offsets", 2)
        for j, (means, counts) in enumerate(
            zip(r.number_rows("profiles", sizes), r.count_rows("counts", sizes), strict=True)
        ):
            new._profiles[j][:] = array("d", means)
            new._counts[j][:] = array("q", counts)
        new._errors = {v: _ViewError(*history) for v, history in r.views("views", "LEDSWT").items()}
        new._view = r.choice("view", new._errors)
        new._recent.extend(r.numbers("recent", None, at_most=s.short))
        new._recent_sum = r.number("recent_sum")
        new._lik_n = r.count("lik_n")
        new._lik_mu = r.number("lik_mu")
        new._lik_var = r.number("lik_var")
        new._lo = r.number("lo")
        new._hi = r.number("hi")
        new._records.extend(r.records("records", at_most=s.record_window + 1))
        new._since_alert = r.optional_count("since_alert")
        vars(self).update(vars(new))

    @classmethod
    def from_snapshot(cls, state: Mapping[str, object]) -> AnomalyDetector:
        """A detector that continues where the snapshot's left off."""
        detector = cls()
        detector.restore(state)
        return detector
