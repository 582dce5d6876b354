"""One series' judgement: its detectors and its alert episodes.

Each kind has its own episode: it opens when its detector fires (unless the kind is in
cooldown), stays open while the detector keeps firing, and closes once the series has
been normal for ``clear_seconds`` of reading time. At most one episode per kind is open,
so one episode is one alert whatever its length.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import NamedTuple

from agents.anomaly.detector import AnomalyDetector
from agents.anomaly.rules import ANOMALY, FLATLINE, KINDS, OUT_OF_RANGE, SeriesRules
from agents.anomaly.settings import DetectorSettings
from agents.anomaly.state import SnapshotError, SnapshotReader

__all__ = ["Finding", "Series"]

# A frozen value is suspicious only on a series that usually moves: at least this share of
# its readings changed value (an EWMA over ~20 readings, taken when the value last changed).
# Switches, setpoints and counters that change now and then never flatline.
_MOVING = 0.5
_CHANGE_ALPHA = 0.05
_SNAPSHOT_VERSION = 1
# A reading this far ahead of its receipt and of its series is a clock jump, not a reading
# from the future: it does not move the series' clock.
_MAX_AHEAD = timedelta(days=1)


class Finding(NamedTuple):
    """An alert of this series opening or closing on one reading."""

    opens: bool  # False: it closes
    kind: str
    score: float
    detail: str
    opened: datetime  # when the episode began (the opening reading's ts)


class _Episode:
    __slots__ = ("last_abnormal", "opened")

    def __init__(self, opened: datetime, last_abnormal: datetime) -> None:
        self.opened = opened
        self.last_abnormal = last_abnormal


class Series:
    """State of one ``(device_id, sensor_id)``: detectors, open episodes, cooldowns."""

    __slots__ = (
        "_change_rate",
        "_detector",
        "_first_ts",
        "_last_closed",
        "_moving_when_frozen",
        "_newest",
        "_same_count",
        "_same_since",
        "_same_value",
        "_settings",
        "episodes",
        "late",
        "rules",
        "score",
    )

    def __init__(self, rules: SeriesRules, detector: DetectorSettings | None = None) -> None:
        """``detector``: the adaptive detector's settings when not the rules' own (replay)."""
        self.rules = rules
        self._settings = detector or rules.detector_settings()
        self.score = 0.0  # the adaptive detector's last reported score (0 unless a record)
        self._detector: AnomalyDetector | None = None  # made on the first adaptive reading
        self._first_ts: datetime | None = None  # of the first adaptive reading
        self._newest: datetime | None = None  # the latest ts judged in full
        self.late = False  # the last reading was older than _newest: limits only
        self._same_value: float | None = None
        self._same_since: datetime | None = None
        self._same_count = 0
        self._change_rate = 0.0
        self._moving_when_frozen = False
        self.episodes: dict[str, _Episode] = {}
        self._last_closed: dict[str, datetime] = {}

    # ------------------------------------------------------------------ judging
    def judge(
        self,
        ts: datetime,
        value: float,
        out_of_range: str | None,
        adaptive: bool,
        received_at: datetime | None = None,
    ) -> list[Finding]:
        """Learn one reading and say which alerts open or close on it.

        ``out_of_range``: why the reading is beyond the registry's limits, or None;
        ``adaptive``: run the adaptive detector (False when it is over its time budget).
        A reading older than one already judged (spooled readings replayed after live ones,
        a device sending out of order) is checked against the limits only: the other
        detectors learn a series in time order and cannot place it. So is a reading more
        than a day ahead of both its receipt and the series (a device clock that jumped):
        it does not move the series' clock, or one bad timestamp would silence the rest.
        """
        kinds = self.rules.kinds
        findings: list[Finding] = []
        self._close_disabled(findings, ts)
        newest = self._newest
        ahead = (
            received_at is not None
            and newest is not None
            and ts - received_at > _MAX_AHEAD
            and ts - newest > _MAX_AHEAD
        )
        clock = newest if ahead and newest is not None else ts
        if OUT_OF_RANGE in kinds:
            why = out_of_range
            self._step(findings, OUT_OF_RANGE, ts, why is not None, 1.0, why, clock)
        self.late = ahead or (newest is not None and ts < newest)
        if self.late:
            return findings
        self._newest = ts
        if FLATLINE in kinds:
            frozen = self._frozen(ts, value)
            self._step(findings, FLATLINE, ts, frozen is not None, 1.0, frozen)
        if ANOMALY in kinds and adaptive:
            if self._detector is None or self._first_ts is None:
                self._detector = AnomalyDetector(self._settings)
                self._first_ts = ts
            verdict = self._detector.update(ts, value)
            self.score = verdict.score
            abnormal = verdict.likelihood >= self._settings.alert_threshold
            warm = (ts - self._first_ts).total_seconds() >= self.rules.warmup_seconds
            opens = (verdict.alert and warm) or ANOMALY in self.episodes
            detail = f"value {value:g} unlike this series' recent behaviour"
            self._step(findings, ANOMALY, ts, abnormal and opens, verdict.likelihood, detail)
        return findings

    def _step(
        self,
        findings: list[Finding],
        kind: str,
        ts: datetime,
        abnormal: bool,
        score: float,
        detail: str | None,
        clock: datetime | None = None,
    ) -> None:
        """``clock``: the time the episode goes by (``ts`` unless that is far ahead)."""
        now = ts if clock is None else clock
        episode = self.episodes.get(kind)
        if abnormal:
            if episode is not None:
                episode.last_abnormal = max(episode.last_abnormal, now)
                return
            closed = self._last_closed.get(kind)
            if closed is not None and now - closed < timedelta(seconds=self.rules.cooldown_seconds):
                return
            self.episodes[kind] = _Episode(ts, now)
            findings.append(Finding(True, kind, score, detail or kind, ts))
        elif episode is not None and now - episode.last_abnormal >= timedelta(
            seconds=self.rules.clear_seconds
        ):
            del self.episodes[kind]
            self._last_closed[kind] = now
            detail = f"normal since {episode.last_abnormal.isoformat()}"
            findings.append(Finding(False, kind, score, detail, episode.opened))

    def _close_disabled(self, findings: list[Finding], ts: datetime) -> None:
        """Episodes of a kind these rules no longer run (its sensor type changed, or an
        alert resumed from the database) close now: nothing would ever close them."""
        for kind in [k for k in self.episodes if k not in self.rules.kinds]:
            episode = self.episodes.pop(kind)
            self._last_closed[kind] = ts
            detail = f"{kind} no longer checked on this series"
            findings.append(Finding(False, kind, 0.0, detail, episode.opened))

    def retune(self, rules: SeriesRules) -> None:
        """New rules (the series' sensor type changed): a detector learned under other
        settings starts over; open episodes of kinds now off close on the next reading."""
        settings = rules.detector_settings()
        if settings != self._settings:
            self._settings = settings
            self._detector = None
            self._first_ts = None
        self.rules = rules

    @property
    def newest(self) -> datetime | None:
        """The latest reading time judged in full."""
        return self._newest

    def _frozen(self, ts: datetime, value: float) -> str | None:
        """Why the series counts as frozen at this reading, or None."""
        if value != self._same_value:
            changed = self._same_value is not None
            if self._same_count > 1:  # the repeats since the last change count as no change
                self._change_rate *= (1.0 - _CHANGE_ALPHA) ** (self._same_count - 1)
            self._change_rate += _CHANGE_ALPHA * (changed - self._change_rate)
            self._same_value, self._same_since, self._same_count = value, ts, 1
            self._moving_when_frozen = self._change_rate >= _MOVING
            return None
        self._same_count += 1
        since = self._same_since
        assert since is not None
        if (
            self._moving_when_frozen
            and self._same_count >= self.rules.flatline_readings
            and (ts - since).total_seconds() >= self.rules.flatline_seconds
        ):
            return f"value {value:g} repeated {self._same_count} times since {since.isoformat()}"
        return None

    # ------------------------------------------------------------------ episodes
    def resume(self, kind: str, opened: datetime) -> None:
        """An alert the database holds open (after a restart): continue its episode."""
        if kind not in self.episodes:
            self.episodes[kind] = _Episode(opened, opened)

    # ------------------------------------------------------------------ state
    def snapshot(self) -> dict[str, object]:
        """Plain JSON data: what :meth:`restore` continues from."""
        return {
            "version": _SNAPSHOT_VERSION,
            "detector": None if self._detector is None else self._detector.snapshot(),
            "first_ts": _iso(self._first_ts),
            "newest": _iso(self._newest),
            "same_value": self._same_value,
            "same_since": _iso(self._same_since),
            "same_count": self._same_count,
            "change_rate": self._change_rate,
            "moving_when_frozen": self._moving_when_frozen,
            "episodes": {
                k: [e.opened.isoformat(), e.last_abnormal.isoformat()]
                for k, e in self.episodes.items()
            },
            "last_closed": {k: ts.isoformat() for k, ts in self._last_closed.items()},
        }

    @classmethod
    def restore(cls, rules: SeriesRules, state: Mapping[str, object]) -> Series:
        """A series that continues from a snapshot. Detector state learned under other
        settings is dropped (it relearns); a malformed snapshot raises SnapshotError."""
        r = SnapshotReader(state, _SNAPSHOT_VERSION)
        series = cls(rules)
        raw = state.get("detector")
        if isinstance(raw, Mapping):
            detector = AnomalyDetector.from_snapshot(raw)
            if detector.settings == series._settings:
                series._detector = detector
                series._first_ts = _time(state.get("first_ts"))
        series._newest = _time(state.get("newest"))
        series._same_value = r.optional_number("same_value")
        series._same_since = _time(state.get("same_since"))
        series._same_count = r.count("same_count")
        series._change_rate = r.number("change_rate")
        series._moving_when_frozen = bool(state.get("moving_when_frozen"))
        for kind, pair in r.mapping("episodes").items():
            if not isinstance(pair, list) or len(pair) != 2:
                raise SnapshotError("snapshot field episodes holds [opened, last_abnormal] pairs")
            series.episodes[_kind(kind)] = _Episode(_required(pair[0]), _required(pair[1]))
        for kind, closed in r.mapping("last_closed").items():
            series._last_closed[_kind(kind)] = _required(closed)
        return series


def _iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.isoformat()


def _time(raw: object) -> datetime | None:
    if raw is None:
        return None
    return _required(raw)


def _required(raw: object) -> datetime:
    try:
        ts = datetime.fromisoformat(str(raw))
    except ValueError:
        raise SnapshotError(f"snapshot time {raw!r:.40} is not ISO-8601") from None
    if ts.tzinfo is None:
        raise SnapshotError(f"snapshot time {raw!r:.40} has no offset")
    return ts


def _kind(raw: object) -> str:
    if raw not in KINDS:
        raise SnapshotError(f"snapshot names an unknown alert kind {raw!r:.20}")
    return str(raw)
