"""edge.codecs: decode_json / decode_value reason codes and properties, and the encoders."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edge import readings as codes
from edge.codecs import decode_json, decode_value, encode_json, encode_value, has_own_ts
from edge.readings import DECODER_REASONS, PayloadError, Reading, format_ts, parse_ts

Decode = Callable[[bytes, dict[str, str], datetime], list[Reading]]

NOW = datetime(2026, 11, 27, 7, 30, 0, 123456, tzinfo=UTC)
FIELDS = {"device_id": "press-01", "sensor_id": "temp"}

PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def reject(
    payload: bytes, decode: Decode = decode_json, fields: dict[str, str] | None = None
) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        decode(payload, FIELDS if fields is None else fields, NOW)
    return info.value


def one(
    payload: bytes, decode: Decode = decode_json, fields: dict[str, str] | None = None
) -> Reading:
    readings = decode(payload, FIELDS if fields is None else fields, NOW)
    assert len(readings) == 1
    return readings[0]


# ------------------------------------------------------------------------------ json: good


def test_json_minimal_object_takes_fields_from_topic_and_ts_from_receipt() -> None:
    reading = one(b'{"value": 21.5}')
    assert reading == Reading(device_id="press-01", sensor_id="temp", ts=NOW, value=21.5)
    assert type(reading.value) is float


def test_json_integer_value_becomes_float() -> None:
    reading = one(b'{"value": 7}')
    assert reading.value == 7.0
    assert type(reading.value) is float


def test_json_all_optional_fields() -> None:
    reading = one(
        b'{"value": -3.25, "ts": "2026-01-02T03:04:05Z", "unit": "degC", "quality": "good",'
        b' "seq": 42, "device_id": "press-01", "sensor_id": "temp"}'
    )
    assert reading.value == -3.25
    assert reading.ts == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert reading.unit == "degC"
    assert reading.quality == "good"
    assert reading.seq == 42


def test_json_integer_quality_becomes_text() -> None:
    assert one(b'{"value": 1, "quality": 192}').quality == "192"


def test_json_null_optional_fields_are_ignored() -> None:
    reading = one(b'{"value": 1, "unit": null, "quality": null, "seq": null}')
    assert (reading.unit, reading.quality, reading.seq) == (None, None, None)


def test_json_body_ids_fill_fields_the_template_lacks() -> None:
    reading = one(b'{"value": 1, "sensor_id": "vib"}', fields={"device_id": "d9"})
    assert (reading.device_id, reading.sensor_id) == ("d9", "vib")


def test_json_topic_fields_fill_hierarchy_and_unit() -> None:
    fields = {**FIELDS, "site": "s1", "area": "a1", "line": "l1", "asset": "x1", "unit": "bar"}
    reading = one(b'{"value": 1}', fields=fields)
    assert (reading.site, reading.area, reading.line, reading.asset, reading.unit) == (
        "s1", "a1", "l1", "x1", "bar",
    )  # fmt: skip
    # A unit in the body wins over the topic's.
    assert one(b'{"value": 1, "unit": "psi"}', fields=fields).unit == "psi"


def test_json_huge_integer_within_float_range_is_accepted() -> None:
    # orjson refuses integers beyond 64 bits; the slow path must still take them.
    assert one(b'{"value": 123456789012345678901234567890}').value == pytest.approx(1.2345678901e29)


def test_encode_json_round_trips() -> None:
    payload = encode_json(1.5, ts=NOW, unit="V", seq=3, quality="good")
    reading = one(payload)
    assert (reading.value, reading.ts, reading.unit, reading.seq, reading.quality) == (
        1.5, NOW, "V", 3, "good",
    )  # fmt: skip


# ------------------------------------------------------------------------------- json: bad


@pytest.mark.parametrize(
    "payload",
    [b"{", b'{"value": 1,}', b"{value: 1}", b'{"value": 1} trailing', b"[1,", b"'x'", b"\x00"],
)
def test_malformed_json(payload: bytes) -> None:
    assert reject(payload).reason == codes.MALFORMED_JSON


@pytest.mark.parametrize("payload", [b"", b"   ", b"\r\n\t"])
def test_empty_json_payload_is_missing_value(payload: bytes) -> None:
    assert reject(payload).reason == codes.MISSING_VALUE


def test_deeply_nested_json_is_malformed_not_a_crash() -> None:
    assert reject(b"[" * 100_000 + b"]" * 100_000).reason == codes.MALFORMED_JSON


@pytest.mark.parametrize("payload", [b'{"value": 1, "unit": "\xff"}', b"\xc3\x28", b"\x80{}"])
def test_not_utf8(payload: bytes) -> None:
    assert reject(payload).reason == codes.NOT_UTF8


@pytest.mark.parametrize("payload", [b"{}", b'{"ts": 1700000000}', b'{"Value": 1}'])
def test_missing_value(payload: bytes) -> None:
    assert reject(payload).reason == codes.MISSING_VALUE


@pytest.mark.parametrize(
    ("literal", "kind"),
    [(b'"1.5"', "string"), (b"null", "null"), (b"true", "boolean"), (b"false", "boolean"),
     (b'{"v": 1}', "object"), (b"[1]", "array")],
)  # fmt: skip
def test_bad_type_value(literal: bytes, kind: str) -> None:
    error = reject(b'{"value": ' + literal + b"}")
    assert error.reason == codes.BAD_TYPE
    assert kind in error.message


@pytest.mark.parametrize("document", [b'"text"', b"1.5", b"null", b"true"])
def test_bad_type_top_level(document: bytes) -> None:
    assert reject(document).reason == codes.BAD_TYPE


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400"])
def test_bad_value_non_finite(literal: bytes) -> None:
    assert reject(b'{"value": ' + literal + b"}").reason == codes.BAD_VALUE


def test_bad_value_integer_too_large_for_a_float() -> None:
    assert reject(b'{"value": 1' + b"0" * 400 + b"}").reason == codes.BAD_VALUE


@pytest.mark.parametrize(
    "ts",
    [b'"yesterday"', b'"2026-13-01T00:00:00Z"', b'"2026-11-27 25:00"', b'""', b'"1700000000"',
     b"-1", b"253402300800", b"1e400", b"NaN", b"true", b"false", b"null", b"[]", b"{}"],
)  # fmt: skip
def test_bad_timestamp(ts: bytes) -> None:
    assert reject(b'{"value": 1, "ts": ' + ts + b"}").reason == codes.BAD_TIMESTAMP


def test_bad_timestamp_iso_out_of_range_after_utc_conversion() -> None:
    assert reject(b'{"value": 1, "ts": "0001-01-01T00:00:00+01:00"}').reason == codes.BAD_TIMESTAMP


@pytest.mark.parametrize("key", ["device_id", "sensor_id"])
def test_topic_mismatch(key: str) -> None:
    error = reject(orjson.dumps({"value": 1, key: "someone-else"}))
    assert error.reason == codes.TOPIC_MISMATCH
    assert key in error.message


def test_body_id_that_agrees_with_topic_is_fine() -> None:
    assert one(b'{"value": 1, "device_id": "press-01"}').device_id == "press-01"


def test_missing_field_when_neither_template_nor_body_has_sensor_id() -> None:
    error = reject(b'{"value": 1}', fields={"device_id": "d1"})
    assert error.reason == codes.MISSING_FIELD
    assert "sensor_id" in error.message


def test_missing_field_value_format() -> None:
    assert reject(b"1.0", decode_value, {"sensor_id": "s"}).reason == codes.MISSING_FIELD


@pytest.mark.parametrize(
    ("body", "reason"),
    [({"value": 1, "unit": 5}, codes.BAD_TYPE), ({"value": 1, "unit": ""}, codes.BAD_VALUE),
     ({"value": 1, "unit": "x" * 65}, codes.BAD_VALUE),
     ({"value": 1, "unit": "a\x00"}, codes.BAD_VALUE),
     ({"value": 1, "quality": True}, codes.BAD_TYPE),
     ({"value": 1, "quality": 1.5}, codes.BAD_TYPE),
     ({"value": 1, "seq": "1"}, codes.BAD_TYPE), ({"value": 1, "seq": 1.0}, codes.BAD_TYPE),
     ({"value": 1, "seq": True}, codes.BAD_TYPE), ({"value": 1, "device_id": 7}, codes.BAD_TYPE),
     ({"value": 1, "sensor_id": "s" * 129}, codes.BAD_VALUE)],
)  # fmt: skip
def test_bad_optional_fields(body: dict[str, object], reason: str) -> None:
    assert reject(json.dumps(body).encode()).reason == reason


def test_seq_must_fit_64_bits() -> None:
    assert one(b'{"value": 1, "seq": 9223372036854775807}').seq == 2**63 - 1
    assert reject(b'{"value": 1, "seq": 9223372036854775808}').reason == codes.BAD_TYPE
    assert one(b'{"value": 1, "seq": -9223372036854775808}').seq == -(2**63)


@pytest.mark.parametrize(
    "fields",
    [{"device_id": "d" * 129, "sensor_id": "s"}, {"device_id": "d\x00", "sensor_id": "s"},
     {"device_id": "d", "sensor_id": "s", "site": "x" * 65}],
)  # fmt: skip
def test_topic_fields_too_long_or_with_nul(fields: dict[str, str]) -> None:
    assert reject(b'{"value": 1}', fields=fields).reason == codes.BAD_VALUE


# ------------------------------------------------------------------------------- arrays


def test_array_of_valid_objects_gives_one_reading_each() -> None:
    readings = decode_json(
        b'[{"value": 1, "ts": 1700000000}, {"value": 2, "ts": 1700000001}, {"value": 3}]',
        FIELDS,
        NOW,
    )
    assert [r.value for r in readings] == [1.0, 2.0, 3.0]
    assert [r.ts for r in readings] == [
        datetime.fromtimestamp(1700000000, UTC), datetime.fromtimestamp(1700000001, UTC), NOW,
    ]  # fmt: skip
    assert all(r.device_id == "press-01" and r.sensor_id == "temp" for r in readings)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [('{"value": "x"}', codes.BAD_TYPE), ('{"ts": 1}', codes.MISSING_VALUE),
     ('{"value": 1, "ts": "never"}', codes.BAD_TIMESTAMP), ('{"value": NaN}', codes.BAD_VALUE),
     ('{"value": 1, "device_id": "other"}', codes.TOPIC_MISMATCH), ("5", codes.BAD_TYPE),
     ("[]", codes.BAD_TYPE), ("null", codes.BAD_TYPE)],
)  # fmt: skip
def test_one_bad_element_rejects_the_whole_array_naming_its_index(bad: str, reason: str) -> None:
    payload = f'[{{"value": 1}}, {{"value": 2}}, {bad}, {{"value": 4}}]'.encode()
    error = reject(payload)
    assert error.reason == reason
    assert error.message.startswith("[2] ")


def test_first_bad_element_of_several_is_reported() -> None:
    error = reject(b'[{"value": 1}, {"value": true}, {"ts": 1}]')
    assert (error.reason, error.message[:4]) == (codes.BAD_TYPE, "[1] ")


def test_empty_array_is_missing_value() -> None:
    assert reject(b"[]").reason == codes.MISSING_VALUE


def test_an_array_with_two_readings_of_one_sensor_at_one_instant_is_refused() -> None:
    # Without their own ts both would be stamped with the receive time: one would vanish.
    error = reject(b'[{"value": 1}, {"value": 2}]')
    assert error.reason == codes.BAD_TIMESTAMP
    assert "[0] and [1]" in error.message


def test_an_array_of_different_sensors_without_ts_is_fine() -> None:
    readings = decode_json(
        b'[{"value": 1, "sensor_id": "a"}, {"value": 2, "sensor_id": "b"}]',
        {"device_id": "press-01"},
        NOW,
    )
    assert [r.sensor_id for r in readings] == ["a", "b"]


# ------------------------------------------------------------------------------- decode_value


@pytest.mark.parametrize(
    ("payload", "value"),
    [(b"21.5", 21.5), (b"-3", -3.0), (b" 7 \n", 7.0), (b"1e3", 1000.0), (b"-0", -0.0)],
)
def test_value_format(payload: bytes, value: float) -> None:
    reading = one(payload, decode_value)
    assert reading.value == value
    assert (reading.device_id, reading.sensor_id, reading.ts) == ("press-01", "temp", NOW)


def test_value_format_round_trips_encode_value() -> None:
    assert one(encode_value(0.1), decode_value).value == 0.1


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b"", codes.MISSING_VALUE), (b"  \t\n", codes.MISSING_VALUE), (b"\xff\xfe", codes.NOT_UTF8),
     (b"abc", codes.BAD_TYPE), (b"0x10", codes.BAD_TYPE), (b'{"value": 1}', codes.BAD_TYPE),
     (b"1 2", codes.BAD_TYPE), (b"true", codes.BAD_TYPE), (b"nan", codes.BAD_VALUE),
     (b"NaN", codes.BAD_VALUE), (b"inf", codes.BAD_VALUE), (b"-Infinity", codes.BAD_VALUE),
     (b"1e400", codes.BAD_VALUE)],
)  # fmt: skip
def test_value_format_rejections(payload: bytes, reason: str) -> None:
    assert reject(payload, decode_value).reason == reason


@pytest.mark.parametrize("payload", ["1_000", "\uff11\uff12", "\u0661"])
def test_value_format_rejects_python_only_number_syntax(payload: str) -> None:
    assert reject(payload.encode(), decode_value).reason == codes.BAD_TYPE


# ------------------------------------------------------------------------------- ts


def test_ts_in_payload_is_used() -> None:
    assert one(b'{"value": 1, "ts": "2026-11-27T09:30:00+02:00"}').ts == datetime(
        2026, 11, 27, 7, 30, tzinfo=UTC
    )


@pytest.mark.parametrize("key", ["unit", "quality", "sensor_id"])
def test_lone_surrogates_in_text_fields_are_rejected(key: str) -> None:
    fields = {"device_id": "press-01"} if key == "sensor_id" else FIELDS
    error = reject(b'{"value": 1, "' + key.encode() + b'": "\\ud800"}', fields=fields)
    assert error.reason in {codes.BAD_VALUE, codes.NOT_UTF8, codes.MALFORMED_JSON}


def test_has_own_ts_tells_a_payload_ts_from_the_receive_time() -> None:
    assert not has_own_ts(one(b'{"value": 1}'), NOW)
    # Equal to the receive time, but the payload's own: it still counts as given.
    same_instant = orjson.dumps({"value": 1, "ts": format_ts(NOW)})
    reading = one(same_instant)
    assert reading.ts == NOW
    assert has_own_ts(reading, NOW)
    assert not has_own_ts(one(b"1.5", decode_value), NOW)


# ------------------------------------------------------------------------------- properties


def outcome(
    payload: bytes, decode: Decode, fields: dict[str, str], now: datetime
) -> list[Reading] | PayloadError:
    """What a decoder returns, or the PayloadError it raises (anything else propagates)."""
    try:
        return decode(payload, fields, now)
    except PayloadError as exc:
        return exc


def check_outcome(payload: bytes, decode: Decode, fields: dict[str, str], now: datetime) -> None:
    """The decoder contract: readings with finite floats, or PayloadError with a known reason."""
    readings = outcome(payload, decode, fields, now)
    if isinstance(readings, PayloadError):
        assert readings.reason in DECODER_REASONS, readings.reason
        assert isinstance(readings.message, str)
        assert readings.message
        return
    assert isinstance(readings, list)
    assert readings
    for reading in readings:
        assert isinstance(reading, Reading)
        assert type(reading.value) is float
        assert math.isfinite(reading.value)
        assert reading.ts.tzinfo is not None
        assert reading.ts.utcoffset() == timedelta(0)
        assert isinstance(reading.device_id, str)
        assert isinstance(reading.sensor_id, str)
        assert reading.device_id
        assert reading.sensor_id
        for key in ("device_id", "sensor_id"):
            if key in fields:
                assert getattr(reading, key) == fields[key]
        if reading.seq is not None:
            assert -(2**63) <= reading.seq < 2**63


field_text = st.one_of(
    st.text(
        st.characters(blacklist_characters="/+#", blacklist_categories=["Cs"]),
        min_size=1,
        max_size=12,
    ),
    st.text(min_size=1, max_size=140),  # topic levels are never empty (match() refuses them)
)
topic_fields = st.fixed_dictionaries(
    {},
    optional={
        "device_id": field_text, "sensor_id": field_text, "site": field_text, "unit": field_text,
    },
)  # fmt: skip
aware_now = st.datetimes(timezones=st.just(UTC))
decoders = st.sampled_from([decode_json, decode_value])


@given(st.binary(max_size=200), decoders, topic_fields, aware_now)
@PROPERTY_SETTINGS
def test_decode_arbitrary_bytes(
    payload: bytes, decode: Decode, fields: dict[str, str], now: datetime
) -> None:
    check_outcome(payload, decode, fields, now)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(),  # NaN and infinities included: json.dumps writes NaN/Infinity literals
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
timestamps = st.one_of(
    json_values,
    st.floats(min_value=-1e12, max_value=1e12),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.datetimes(timezones=st.none() | st.just(UTC)).map(datetime.isoformat),
    st.text(alphabet="0123456789-:TZ+. ", max_size=32),
)
reading_objects = st.fixed_dictionaries(
    {"value": st.one_of(json_values, st.floats(), st.integers())},
    optional={
        "ts": timestamps,
        "unit": st.one_of(json_values, st.text(max_size=70)),
        "quality": st.one_of(json_values, st.integers()),
        "seq": st.one_of(json_values, st.integers(min_value=-(2**70), max_value=2**70)),
        "device_id": st.one_of(json_values, st.just("press-01"), st.text(max_size=140)),
        "sensor_id": st.one_of(json_values, st.just("temp"), st.text(max_size=140)),
    },
)
documents = st.one_of(
    json_values,
    reading_objects,
    st.lists(st.one_of(reading_objects, json_values), max_size=5),
)


@given(documents, decoders, topic_fields, aware_now)
@PROPERTY_SETTINGS
def test_decode_arbitrary_json_documents(
    document: object, decode: Decode, fields: dict[str, str], now: datetime
) -> None:
    payload = json.dumps(document).encode()  # ASCII: \uXXXX escapes, NaN/Infinity literals
    check_outcome(payload, decode, fields, now)


numeric_objects = st.builds(
    lambda body, value: {**body, "value": value},
    reading_objects,
    st.floats() | st.integers(min_value=-(10**400), max_value=10**400),
)


@given(numeric_objects, aware_now)
@PROPERTY_SETTINGS
def test_valid_objects_decode_with_their_value(body: dict[str, object], now: datetime) -> None:
    value = body["value"]
    readings = outcome(json.dumps(body).encode(), decode_json, dict(FIELDS), now)
    if isinstance(readings, PayloadError):
        assert readings.reason in DECODER_REASONS
        return
    assert len(readings) == 1
    assert readings[0].value == float(value)  # type: ignore[arg-type]


@given(st.text(max_size=40), topic_fields, aware_now)
@PROPERTY_SETTINGS
def test_decode_arbitrary_text_as_value(text: str, fields: dict[str, str], now: datetime) -> None:
    check_outcome(text.encode("utf-8", "surrogatepass"), decode_value, fields, now)


safe_text = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
    min_size=1,
    max_size=64,
)
valid_objects = st.fixed_dictionaries(
    {"value": st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**53), 2**53)},
    optional={
        "ts": st.one_of(
            st.floats(min_value=0, max_value=4e9),
            st.integers(min_value=0, max_value=253402300799),
            st.datetimes(min_value=datetime(1970, 1, 2), timezones=st.just(UTC)).map(format_ts),
            st.datetimes(min_value=datetime(1970, 1, 2)).map(datetime.isoformat),
        ),
        "unit": safe_text,
        "quality": safe_text | st.integers(-1000, 1000),
        "seq": st.integers(min_value=-(2**63), max_value=2**63 - 1),
        "device_id": st.just("press-01"),
        "sensor_id": st.just("temp"),
    },
)


@given(st.lists(valid_objects, min_size=1, max_size=4), st.booleans(), aware_now)
@PROPERTY_SETTINGS
def test_valid_readings_are_never_rejected(
    bodies: list[dict[str, object]], as_array: bool, now: datetime
) -> None:
    # Readings of one sensor at one instant are refused as a whole (tested below).
    instants = [parse_ts(body["ts"]) if "ts" in body else now for body in bodies]
    assume(len(set(instants)) == len(instants))
    document: object = bodies if as_array or len(bodies) > 1 else bodies[0]
    readings = decode_json(orjson.dumps(document), FIELDS, now)
    assert len(readings) == len(bodies)
    for reading, body in zip(readings, bodies, strict=True):
        assert reading.value == float(body["value"])  # type: ignore[arg-type]
        assert reading.unit == body.get("unit")
        assert reading.seq == body.get("seq")
        if "quality" in body:
            assert reading.quality == str(body["quality"])
        if "ts" not in body:
            assert reading.ts == now
        elif isinstance(body["ts"], str) and body["ts"].endswith("Z"):
            assert format_ts(reading.ts) == body["ts"]


@given(st.floats(allow_nan=False, allow_infinity=False), aware_now)
@PROPERTY_SETTINGS
def test_finite_floats_round_trip_in_both_formats(value: float, now: datetime) -> None:
    assert decode_value(encode_value(value), FIELDS, now)[0].value == value
    assert decode_json(encode_json(value), FIELDS, now)[0].value == value
