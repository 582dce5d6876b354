"""The streaming anomaly detector (agents/anomaly): what it flags, what it does not, its state."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.anomaly import AnomalyDetector, DetectorSettings, SnapshotError, Verdict

T0 = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday
STEP = timedelta(minutes=5)
DAY = 288  # readings per day at one per 5 minutes

Series = list[tuple[datetime, float]]


def daily_cycle(days: int, seed: int = 0, noise: float = 0.5) -> Series:
    """20 ± 5 over each day, Gaussian noise: a plant's daily rhythm, nothing anomalous."""
    rng = random.Random(seed)
    return [
        (T0 + i * STEP, 20 + 5 * math.sin(2 * math.pi * i / DAY) + rng.gauss(0, noise))
        for i in range(days * DAY)
    ]


def run(series: Series, detector: AnomalyDetector | None = None) -> list[Verdict]:
    detector = detector or AnomalyDetector()
    return [detector.update(ts, value) for ts, value in series]


def alerts(verdicts: list[Verdict]) -> list[int]:
    return [i for i, v in enumerate(verdicts) if v.alert]


def test_a_daily_cycle_is_not_an_anomaly() -> None:
    verdicts = run(daily_cycle(14))
    assert alerts(verdicts) == []
    assert max(v.score for v in verdicts[2 * DAY :]) < 0.4


def test_a_spike_alerts_on_its_reading() -> None:
    series = daily_cycle(14)
    spike = 10 * DAY + 100
    series[spike] = (series[spike][0], series[spike][1] + 8)
    verdicts = run(series)
    assert alerts(verdicts) == [spike]
    assert verdicts[spike].score == 1.0


def test_a_level_shift_alerts_once() -> None:
    shift = 10 * DAY
    series = [(ts, v + (4 if i >= shift else 0)) for i, (ts, v) in enumerate(daily_cycle(14))]
    assert alerts(run(series)) in ([shift], [shift + 1])


def test_the_peak_that_does_not_come_alerts() -> None:
    """Values inside the seen range, wrong for the time of day: the daily profile's case."""
    start = 10 * DAY + 54  # three hours around the daily peak held at the day's mean
    rng = random.Random(1)
    series = [
        (ts, 20 + rng.gauss(0, 0.5) if start <= i < start + 36 else v)
        for i, (ts, v) in enumerate(daily_cycle(14))
    ]
    found = alerts(run(series))
    assert len(found) == 1
    assert start <= found[0] < start + 6


def test_one_alert_per_episode() -> None:
    """An hour of wild readings is one episode: one alert, a few rising scores, not 60."""
    start = 10 * DAY
    rng = random.Random(2)
    series = [
        (ts, v + (rng.uniform(-6, 6) if start <= i < start + 60 else 0))
        for i, (ts, v) in enumerate(daily_cycle(14))
    ]
    verdicts = run(series)
    found = alerts(verdicts)
    assert len(found) == 1
    assert start <= found[0] < start + 5
    assert 1 <= sum(v.score >= 0.5 for v in verdicts) <= 5


def test_alerts_repeat_only_after_the_cooldown() -> None:
    cooldown = DetectorSettings().cooldown
    series = daily_cycle(14)
    spikes = {10 * DAY: 60.0, 10 * DAY + cooldown // 2: 80.0, 10 * DAY + cooldown + 50: 110.0}
    for i, value in spikes.items():  # each far beyond the range seen before: each scores 1
        series[i] = (series[i][0], value)
    assert alerts(run(series)) == [10 * DAY, 10 * DAY + cooldown + 50]


def test_warm_up_only_learns() -> None:
    warmup = DetectorSettings().warmup
    series = daily_cycle(3)
    for i in (50, 150, 250):
        series[i] = (series[i][0], 1000.0 * i)
    verdicts = run(series)
    assert all(v == Verdict(0.0, False) for v in verdicts[:warmup])


def test_a_frozen_series_is_quiet() -> None:
    verdicts = run([(T0 + i * STEP, 42.0) for i in range(5000)])
    assert alerts(verdicts) == []
    assert max(v.score for v in verdicts) < 0.1


def test_time_going_backwards_or_standing_still_is_fine() -> None:
    """NAB's machine_temperature goes back 12 rows; some files repeat timestamps."""
    series = daily_cycle(4)
    back = [(ts - 12 * STEP, v) for ts, v in series[2 * DAY : 2 * DAY + 12]]
    same = [(series[-1][0], v) for _, v in series[:20]]
    verdicts = run(series[: 2 * DAY] + back + series[2 * DAY :] + same)
    assert all(0.0 <= v.score <= 1.0 for v in verdicts)


def test_nan_and_infinity_are_skipped() -> None:
    detector = AnomalyDetector()
    for value in (math.nan, math.inf, -math.inf):
        assert detector.update(T0, value) == Verdict(0.0, False)
    assert detector.snapshot() == AnomalyDetector().snapshot()


def test_time_zones_do_not_matter_only_the_instant() -> None:
    """Profiles bin UTC time: the same instants in +05:30 or naive (= UTC) score the same."""
    series = daily_cycle(4, seed=3)
    india = timezone(timedelta(hours=5, minutes=30))
    assert run([(ts.astimezone(india), v) for ts, v in series]) == run(series)
    assert run([(ts.replace(tzinfo=None), v) for ts, v in series]) == run(series)


def test_snapshot_round_trip_continues_identically() -> None:
    series = daily_cycle(6, seed=4)
    series[5 * DAY] = (series[5 * DAY][0], 99.0)
    reference = run(series)
    half = 3 * DAY + 17
    first = AnomalyDetector()
    head = run(series[:half], first)
    blob = json.dumps(first.snapshot(), allow_nan=False)
    second = AnomalyDetector.from_snapshot(json.loads(blob))
    assert second.snapshot() == first.snapshot()
    assert head + run(series[half:], second) == reference


def test_restore_keeps_the_snapshot_settings() -> None:
    tuned = DetectorSettings(cooldown=50, warmup=10)
    detector = AnomalyDetector(tuned)
    run(daily_cycle(1), detector)
    assert AnomalyDetector.from_snapshot(detector.snapshot()).settings == tuned


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"version": 2}, "version"),
        ({"n": -1}, "n"),
        ({"level": "x"}, "level"),
        ({"profiles": [[0.0] * 3, [0.0] * 336]}, "profiles"),
        ({"views": {"Q": [1, 0.0, 0.0]}}, "views"),
        ({"view": "Z"}, "view"),
        ({"settings": {"cooldown": 1.5}}, "cooldown"),
        ({"records": [[1, 0.5]] * 500}, "records"),
    ],
)
def test_a_bad_snapshot_is_refused_and_changes_nothing(
    change: dict[str, object], complaint: str
) -> None:
    detector = AnomalyDetector()
    run(daily_cycle(1), detector)
    before = detector.snapshot()
    with pytest.raises(ValueError, match=complaint):
        detector.restore({**before, **change})
    assert detector.snapshot() == before
    with pytest.raises(SnapshotError):
        detector.restore({"settings": {}})


def test_state_is_bounded() -> None:
    """~10 KB of profiles per series, whatever the series' length."""
    detector = AnomalyDetector()
    run(daily_cycle(3), detector)
    early = len(json.dumps(detector.snapshot()))
    run(daily_cycle(40, seed=5), detector)
    late = detector.snapshot()
    assert len(json.dumps(late)) < 1.2 * early + 2000
    assert len(json.dumps(late)) < 40_000
    profiles = [a.itemsize * len(a) for a in (*detector._profiles, *detector._counts)]
    assert sum(profiles) == 8 * 2 * (288 + 336)
    assert isinstance(late["records"], list)
    assert len(late["records"]) <= DetectorSettings().record_window + 1


@pytest.mark.parametrize(
    "change",
    [{"short": 0}, {"err_alpha": 0.0}, {"hysteresis": 1.5}, {"cap": math.inf}, {"warmup": -1}],
)
def test_settings_are_checked(change: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(change))):
        DetectorSettings.from_mapping(change)


def test_settings_round_trip_as_plain_data() -> None:
    tuned = DetectorSettings(cooldown=600, alert_threshold=0.6)
    assert DetectorSettings.from_mapping(tuned.as_dict()) == tuned
    with pytest.raises(ValueError, match="unknown"):
        DetectorSettings.from_mapping({"cooldwn": 600})


finite = st.floats(allow_nan=False, allow_infinity=False)
instants = st.datetimes(
    timezones=st.one_of(st.none(), st.timezones(), st.just(timezone(timedelta(hours=-23))))
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(instants, finite), min_size=1, max_size=400))
def test_any_finite_readings_give_scores_in_0_1(readings: Series) -> None:
    detector = AnomalyDetector(DetectorSettings(warmup=5, short=3, long=20))
    for ts, value in readings:
        score, alert, _ = detector.update(ts, value)
        assert 0.0 <= score <= 1.0
        assert isinstance(alert, bool)
    json.dumps(detector.snapshot(), allow_nan=False)  # still finite, still restorable
    AnomalyDetector.from_snapshot(detector.snapshot())
