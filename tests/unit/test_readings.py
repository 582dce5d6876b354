"""edge.readings: parse_ts, format_ts, kind_of, PayloadError and the decoder reasons."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge import readings
from edge.errors import IngestdError
from edge.readings import DECODER_REASONS, PayloadError, format_ts, kind_of, parse_ts

PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def bad_ts(raw: object, at: str = "") -> PayloadError:
    with pytest.raises(PayloadError) as info:
        parse_ts(raw, at)
    assert info.value.reason == readings.BAD_TIMESTAMP
    return info.value


# ------------------------------------------------------------------------------ PayloadError


def test_payload_error_carries_reason_and_message() -> None:
    error = PayloadError(readings.BAD_TYPE, "value must be a number, got string")
    assert (error.reason, error.message) == ("bad_type", "value must be a number, got string")
    assert str(error) == "value must be a number, got string"
    assert isinstance(error, IngestdError)


def test_decoder_reasons_are_the_stable_codes() -> None:
    assert DECODER_REASONS == (
        "malformed_json", "not_utf8", "missing_value", "missing_field", "bad_type", "bad_value",
        "bad_timestamp", "topic_mismatch",
    )  # fmt: skip


# ------------------------------------------------------------------------------ parse_ts


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("2026-11-27T07:30:00Z", datetime(2026, 11, 27, 7, 30, tzinfo=UTC)),
     ("2026-11-27T07:30:00.123456Z", datetime(2026, 11, 27, 7, 30, 0, 123456, tzinfo=UTC)),
     ("2026-11-27T09:30:00+02:00", datetime(2026, 11, 27, 7, 30, tzinfo=UTC)),
     ("2026-11-27T02:00:00-05:30", datetime(2026, 11, 27, 7, 30, tzinfo=UTC)),
     ("2026-11-27T07:30:00", datetime(2026, 11, 27, 7, 30, tzinfo=UTC)),
     ("2026-11-27 07:30:00.5", datetime(2026, 11, 27, 7, 30, 0, 500000, tzinfo=UTC)),
     ("2026-11-27t07:30:00z", datetime(2026, 11, 27, 7, 30, tzinfo=UTC)),
     (" 2026-11-27T07:30:00Z\t", datetime(2026, 11, 27, 7, 30, tzinfo=UTC)),
     (1700000000, datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
     (1700000000.25, datetime(2023, 11, 14, 22, 13, 20, 250000, tzinfo=UTC)),
     (0, datetime(1970, 1, 1, tzinfo=UTC)),
     (253402300799, datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC))],
)  # fmt: skip
def test_parse_ts_forms(raw: object, expected: datetime) -> None:
    ts = parse_ts(raw)
    assert ts == expected
    assert ts.utcoffset() == timedelta(0)
    assert ts.tzinfo is UTC


@pytest.mark.parametrize(
    "raw",
    ["yesterday", "2026-13-01T00:00:00Z", "2026-11-27 25:00", "", "1700000000", -1, -0.5,
     253402300800, float("inf"), float("-inf"), float("nan"), 10**400, True, False, None, [],
     {}],
)  # fmt: skip
def test_parse_ts_refuses(raw: object) -> None:
    assert bad_ts(raw).message


@pytest.mark.parametrize("raw", ["0001-01-01T00:00:00", "1969-12-31T23:59:59.999999Z"])
def test_iso_timestamps_before_1970_are_refused_like_epoch_seconds(raw: str) -> None:
    assert "before 1970" in bad_ts(raw).message


def test_iso_out_of_range_after_utc_conversion() -> None:
    assert "out of range" in bad_ts("0001-01-01T00:00:00+01:00").message


def test_parse_ts_error_names_where_it_is() -> None:
    assert bad_ts("never", "[3] ").message.startswith("[3] ts 'never'")
    assert bad_ts(True, "[0] ").message == ("[0] ts must be ISO-8601 or epoch seconds, got boolean")


def test_parse_ts_quotes_at_most_40_characters() -> None:
    assert "x" * 41 not in bad_ts("x" * 1000).message


# ------------------------------------------------------------------------------ format_ts


def test_format_ts() -> None:
    assert format_ts(datetime(2026, 11, 27, 7, 30, 0, 123456, tzinfo=UTC)) == (
        "2026-11-27T07:30:00.123456Z"
    )
    assert format_ts(datetime(2026, 11, 27, 7, 30, tzinfo=UTC)) == "2026-11-27T07:30:00.000000Z"
    plus_two = timezone(timedelta(hours=2))
    assert (
        format_ts(datetime(2026, 11, 27, 9, 30, tzinfo=plus_two)) == "2026-11-27T07:30:00.000000Z"
    )


def test_format_ts_pads_the_year() -> None:
    assert format_ts(datetime(1, 1, 1, tzinfo=UTC)) == "0001-01-01T00:00:00.000000Z"


@given(st.datetimes(min_value=datetime(1970, 1, 1), timezones=st.just(UTC)))
@PROPERTY_SETTINGS
def test_format_ts_round_trips_through_parse_ts(ts: datetime) -> None:
    text = format_ts(ts)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", text)
    assert parse_ts(text) == ts


@given(
    st.datetimes(
        min_value=datetime(1970, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.builds(timezone, st.timedeltas(timedelta(hours=-23), timedelta(hours=23))),
    )
)
@PROPERTY_SETTINGS
def test_format_ts_of_any_offset_is_the_same_instant(ts: datetime) -> None:
    assert parse_ts(format_ts(ts)) == ts


# ------------------------------------------------------------------------------ kind_of


@pytest.mark.parametrize(
    ("raw", "kind"),
    [(None, "null"), (True, "boolean"), (False, "boolean"), (0, "number"), (1.5, "number"),
     ("", "string"), ([], "array"), ({}, "object"), (b"x", "bytes")],
)  # fmt: skip
def test_kind_of_names_json_types(raw: object, kind: str) -> None:
    assert kind_of(raw) == kind
