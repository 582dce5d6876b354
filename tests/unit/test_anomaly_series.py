"""One series' judgement: registry limits, frozen values, the adaptive detector, and the
alert episodes (open once, close after clear_seconds of normal, cooldown), by reading time."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from agents.anomaly.rules import ANOMALY, FLATLINE, OUT_OF_RANGE, SeriesRules
from agents.anomaly.series import Finding, Series
from agents.anomaly.state import SnapshotError

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2026, 11, 2, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
LIMITS = SeriesRules(kinds=frozenset({OUT_OF_RANGE}))
FROZEN = SeriesRules(kinds=frozenset({FLATLINE}))


def feed(
    series: Series, values: list[float], *, start: int = 0, beyond: set[int] | None = None
) -> list[tuple[int, Finding]]:
    """Readings one minute apart from T0 + ``start`` minutes; (index, finding) pairs."""
    found = []
    for i, value in enumerate(values, start=start):
        why = "beyond" if beyond and i in beyond else None
        found += [(i, f) for f in series.judge(T0 + i * MINUTE, value, why, adaptive=True)]
    return found


def test_a_limit_episode_opens_once_and_closes_after_clear_seconds() -> None:
    series = Series(LIMITS)
    beyond = set(range(10, 20))  # ten minutes beyond the limits
    found = feed(series, [1.0] * 60, beyond=beyond)
    assert [(i, f.opens, f.kind) for i, f in found] == [
        (10, True, OUT_OF_RANGE),
        (29, False, OUT_OF_RANGE),  # last abnormal at 19, normal for 600 s at 29
    ]
    opened, closed = found[0][1], found[1][1]
    assert opened.opened == T0 + 10 * MINUTE
    assert closed.opened == opened.opened
    assert (opened.score, opened.detail) == (1.0, "beyond")


def test_a_new_episode_within_the_cooldown_opens_nothing() -> None:
    series = Series(LIMITS)
    beyond = {5, 20, 40}  # closes at 15; 20 is inside the 600 s cooldown, 40 is not
    found = feed(series, [1.0] * 60, beyond=beyond)
    assert [(i, f.opens) for i, f in found] == [(5, True), (15, False), (40, True), (50, False)]


def test_a_frozen_moving_series_raises_one_flatline_then_clears() -> None:
    series = Series(FROZEN)
    moving = [float(i % 7) for i in range(60)]
    frozen = [100.0] * 40  # from minute 60; 30 minutes frozen at minute 90
    moving_again = [float(i % 5) for i in range(30)]
    found = feed(series, moving + frozen + moving_again)
    assert [(i, f.opens, f.kind) for i, f in found] == [
        (90, True, FLATLINE),
        (109, False, FLATLINE),
    ]
    assert "repeated 31 times" in found[0][1].detail


@pytest.mark.parametrize(
    "values",
    [
        [5.0] * 200,  # a constant from the start: a setpoint, not a frozen sensor
        [float(i // 30 % 2) for i in range(300)],  # a switch that flips every half hour
    ],
    ids=["constant", "switch"],
)
def test_series_that_rarely_move_never_flatline(values: list[float]) -> None:
    assert feed(Series(FROZEN), values) == []


def test_flatline_needs_the_repeats_as_well_as_the_time() -> None:
    rules = SeriesRules(kinds=frozenset({FLATLINE}), flatline_seconds=600, flatline_readings=10)
    series = Series(rules)
    feed(series, [float(i % 3) for i in range(60)])
    # Readings an hour apart: 600 s pass at once, ten repeats take ten hours.
    found = []
    for k in range(1, 12):
        found += series.judge(T0 + 60 * MINUTE + k * 60 * MINUTE, 2.0, None, adaptive=True)
    assert [f.opens for f in found] == [True]


def noisy_daily(n: int, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    return [10 + 3 * math.sin(2 * math.pi * i / 1440) + rng.gauss(0, 0.2) for i in range(n)]


def test_a_spike_on_a_learned_series_is_one_anomaly_alert() -> None:
    series = Series(SeriesRules(kinds=frozenset({ANOMALY})))
    values = noisy_daily(4000)
    values[3000] = 40.0
    found = feed(series, values)
    assert [f.opens for _, f in found] == [True, False]
    assert found[0][0] == 3000
    assert found[0][1].score >= 0.5
    assert found[1][0] - 3000 >= 10  # normal for clear_seconds (600 s) of reading time


def test_no_anomaly_on_the_learned_shape_alone() -> None:
    series = Series(SeriesRules(kinds=frozenset({ANOMALY})))
    assert feed(series, noisy_daily(4000)) == []


def test_readings_over_the_budget_skip_only_the_adaptive_detector() -> None:
    series = Series(SeriesRules())
    findings = series.judge(T0, 1.0, "beyond", adaptive=False)
    assert [f.kind for f in findings] == [OUT_OF_RANGE]
    assert series.snapshot()["detector"] is None


def test_a_restored_series_judges_as_the_original_would() -> None:
    values = noisy_daily(3000)
    values[2500] = 40.0
    original = Series(SeriesRules())
    feed(original, values[:2000], beyond={1990})
    copy = Series.restore(SeriesRules(), orjson.loads(orjson.dumps(original.snapshot())))
    assert set(copy.episodes) == {OUT_OF_RANGE}
    rest = values[2000:]
    assert feed(copy, rest, start=2000) == feed(original, rest, start=2000)


def test_a_snapshot_under_other_detector_settings_relearns_the_detector_only() -> None:
    original = Series(SeriesRules())
    feed(original, noisy_daily(500), beyond={499})
    other = SeriesRules(alert_threshold=0.7)
    copy = Series.restore(other, orjson.loads(orjson.dumps(original.snapshot())))
    assert copy.snapshot()["detector"] is None
    assert set(copy.episodes) == {OUT_OF_RANGE}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version", 9),
        ("change_rate", "x"),
        ("episodes", {"bogus": ["a", "b"]}),
        ("same_since", "x"),
    ],
)
def test_a_malformed_snapshot_is_refused_by_name(field: str, value: object) -> None:
    snapshot = Series(SeriesRules()).snapshot() | {"same_since": T0.isoformat(), field: value}
    with pytest.raises(SnapshotError):
        Series.restore(SeriesRules(), snapshot)


def test_resume_continues_an_open_alert_without_opening_another() -> None:
    series = Series(LIMITS)
    series.resume(OUT_OF_RANGE, T0 - 5 * MINUTE)
    found = feed(series, [1.0] * 20, beyond={0, 1})
    assert [(i, f.opens, f.opened) for i, f in found] == [(11, False, T0 - 5 * MINUTE)]


def test_a_late_reading_is_checked_against_the_limits_only() -> None:
    """Spooled readings replayed after live ones: the limits still catch them, the other
    detectors (which learn the series in time order) do not see them."""
    series = Series(SeriesRules(kinds=frozenset({OUT_OF_RANGE, FLATLINE})))
    feed(series, [float(i % 5) for i in range(60)], start=100)
    before = series.snapshot()
    found = series.judge(T0 + 50 * MINUTE, 999.0, "beyond", adaptive=True)
    assert series.late
    assert [(f.kind, f.opens) for f in found] == [(OUT_OF_RANGE, True)]
    after = series.snapshot()
    assert (after["same_value"], after["same_count"]) == (
        before["same_value"],
        before["same_count"],
    )
    series.judge(T0 + 160 * MINUTE, 1.0, None, adaptive=True)
    assert not series.late


def test_a_setpoint_changed_every_two_hours_never_flatlines() -> None:
    series = Series(FROZEN)
    values = [float(i // 120 % 2) * 10 + 20 for i in range(3 * 1440)]  # 3 days, 1/min
    assert feed(series, values) == []


def test_one_timestamp_a_clock_jump_ahead_does_not_silence_the_series() -> None:
    """A reading dated 2099 (received now) is checked against the limits only; the frozen
    value that follows is still caught, and the limit alert it opened still closes."""
    series = Series(SeriesRules(kinds=frozenset({OUT_OF_RANGE, FLATLINE})))
    feed(series, [float(i % 7) for i in range(60)])
    received = T0 + 60 * MINUTE
    glitch = T0.replace(year=2099)
    [opened] = series.judge(glitch, 500.0, "beyond", adaptive=True, received_at=received)
    assert (opened.opens, opened.opened) == (True, glitch)
    assert series.late
    found = []
    for minute in range(61, 110):
        at = T0 + minute * MINUTE
        found += series.judge(at, 100.0, None, adaptive=True, received_at=at)
    assert [(f.kind, f.opens) for f in found] == [
        (OUT_OF_RANGE, False),  # normal for 600 s after the jump, by the series' own clock
        (FLATLINE, True),
    ]
    assert found[0].opened == glitch


def test_new_rules_close_the_episodes_of_kinds_now_off() -> None:
    series = Series(SeriesRules())
    series.resume(FLATLINE, T0)
    series.retune(SeriesRules(kinds=frozenset({OUT_OF_RANGE})))
    [closed] = series.judge(T0 + MINUTE, 1.0, None, adaptive=True)
    assert (closed.kind, closed.opens, closed.opened) == (FLATLINE, False, T0)
