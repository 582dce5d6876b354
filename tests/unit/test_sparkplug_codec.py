"""edge.sparkplug: topics, payload decoding, every datatype, quality, skips, time, encoding.

Wire examples come from the Sparkplug B 3.0 specification (chapter "Payloads": the NBIRTH,
DBIRTH, NDATA and NDEATH examples) and its array-type examples. Those print FloatArray and
DoubleArray bytes big-endian, against the text ("packed little endian") and every
implementation: those two are checked little-endian here.
"""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge import sparkplug as sp
from edge.readings import PayloadError
from edge.sparkplug import (
    DATATYPES,
    DataSetSpec,
    MetricValue,
    Payload,
    SparkplugTopic,
    TemplateSpec,
    bdseq,
    decode_payload,
    encode_metric,
    encode_payload,
    is_definition,
    metric_time,
    metric_value,
    pack_array,
    parse_topic,
    quality,
    skip_reason,
    template_definitions,
)
from edge.sparkplug_values import ARRAY_TYPES

ROOT = Path(__file__).resolve().parents[2]
T = DATATYPES
NOW = datetime(2026, 11, 27, 7, 30, 0, 123456, tzinfo=UTC)
MS = 1486144502122  # the specification's example timestamp
PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def metric(datatype: str, value: object, **kwargs: object) -> Payload.Metric:
    return encode_metric(name="m", datatype=T[datatype], value=value, timestamp_ms=MS, **kwargs)  # type: ignore[arg-type]


def wire(datatype: str, field: str, raw: object, name: str = "m") -> Payload.Metric:
    """A metric whose value field is set directly, as any encoder might have."""
    made = Payload.Metric(name=name, datatype=T[datatype])
    setattr(made, field, raw)
    return made


def value_of(made: Payload.Metric, datatype: str | None = None) -> MetricValue:
    return metric_value(made, T[datatype] if datatype else made.datatype)


def bad(made: Payload.Metric, datatype: str | None = None) -> PayloadError:
    with pytest.raises(PayloadError) as caught:
        value_of(made, datatype)
    assert caught.value.reason == sp.SPARKPLUG_BAD_METRIC
    return caught.value


def text_json(made: Payload.Metric, datatype: str | None = None) -> object:
    result = value_of(made, datatype)
    assert result.value is None
    assert result.text is not None
    return orjson.loads(result.text)


# ------------------------------------------------------------------------ generated module


def test_the_generated_module_and_stub_are_what_make_proto_writes(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PROTO_PYTHON": sys.executable,
        "PROTOC_GEN_MYPY": str(Path(sys.executable).parent / "protoc-gen-mypy"),
    }
    subprocess.run(
        [str(ROOT / "scripts" / "gen-proto.sh"), str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
    )
    for name in ("sparkplug_b_pb2.py", "sparkplug_b_pb2.pyi"):
        committed = (ROOT / "edge" / name).read_bytes()
        assert (tmp_path / name).read_bytes() == committed, f"edge/{name} is stale: make proto"


def test_the_protobuf_runtime_is_upb_and_the_schema_is_the_specifications() -> None:
    from google.protobuf.internal import api_implementation  # noqa: PLC0415

    assert api_implementation.Type() == "upb"
    assert Payload.DESCRIPTOR.full_name == "org.eclipse.tahu.protobuf.Payload"
    names = "Unknown Int8 Int16 Int32 Int64 UInt8 UInt16 UInt32 UInt64 Float Double Boolean String"
    names += " DateTime Text UUID DataSet Bytes File Template PropertySet PropertySetList"
    names += " Int8Array Int16Array Int32Array Int64Array UInt8Array UInt16Array UInt32Array"
    names += " UInt64Array FloatArray DoubleArray BooleanArray StringArray DateTimeArray"
    assert {name: number for number, name in enumerate(names.split())} == DATATYPES
    fields = {f.name: f.number for f in Payload.Metric.DESCRIPTOR.fields}
    assert fields == {
        "name": 1, "alias": 2, "timestamp": 3, "datatype": 4, "is_historical": 5,
        "is_transient": 6, "is_null": 7, "metadata": 8, "properties": 9, "int_value": 10,
        "long_value": 11, "float_value": 12, "double_value": 13, "boolean_value": 14,
        "string_value": 15, "bytes_value": 16, "dataset_value": 17, "template_value": 18,
        "extension_value": 19,
    }  # fmt: skip
    top = {f.name: f.number for f in Payload.DESCRIPTOR.fields}
    assert top == {"timestamp": 1, "metrics": 2, "seq": 3, "uuid": 4, "body": 5}


def test_reasons_and_exports() -> None:
    assert sp.SPARKPLUG_REASONS == (
        "sparkplug_malformed", "sparkplug_bad_topic", "sparkplug_unknown_alias",
        "sparkplug_no_birth", "sparkplug_no_bdseq", "sparkplug_bad_metric",
    )  # fmt: skip
    assert sp.SKIP_REASONS == ("bytes", "file", "null", "transient")
    assert all(hasattr(sp, name) for name in sp.__all__)


def test_the_codec_loads_no_mqtt_client_and_nothing_of_the_daemon() -> None:
    probe = (
        "import sys, edge.sparkplug\n"
        "print(sorted({m.split('.')[0] for m in sys.modules}"
        " & {'paho', 'aiomqtt', 'daemon', 'agents', 'db'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------- topics


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("spBv1.0/plant/NBIRTH/edge1", SparkplugTopic("plant", "NBIRTH", "edge1", None)),
        ("spBv1.0/plant/NDEATH/edge1", SparkplugTopic("plant", "NDEATH", "edge1", None)),
        ("spBv1.0/plant/NDATA/edge1", SparkplugTopic("plant", "NDATA", "edge1", None)),
        ("spBv1.0/plant/NCMD/edge1", SparkplugTopic("plant", "NCMD", "edge1", None)),
        ("spBv1.0/plant/DBIRTH/edge1/d1", SparkplugTopic("plant", "DBIRTH", "edge1", "d1")),
        ("spBv1.0/plant/DDEATH/edge1/d1", SparkplugTopic("plant", "DDEATH", "edge1", "d1")),
        ("spBv1.0/plant/DDATA/edge1/d1", SparkplugTopic("plant", "DDATA", "edge1", "d1")),
        ("spBv1.0/plant/DCMD/edge1/d1", SparkplugTopic("plant", "DCMD", "edge1", "d1")),
        (
            "spBv1.0/Sparkplug B Devices/DDATA/Raspberry Pi/Pibrella",
            SparkplugTopic("Sparkplug B Devices", "DDATA", "Raspberry Pi", "Pibrella"),
        ),
        ("spBv1.0/STATE/ingestd", SparkplugTopic("", "STATE", "ingestd", None)),
    ],
)
def test_good_topics(topic: str, expected: SparkplugTopic) -> None:
    assert parse_topic(topic) == expected


def test_node_and_device_ids() -> None:
    node = parse_topic("spBv1.0/plant/NDATA/edge1")
    device = parse_topic("spBv1.0/plant/DDATA/edge1/press-7")
    assert (node.node_id, node.device_id) == ("plant/edge1", "plant/edge1")
    assert (device.node_id, device.device_id) == ("plant/edge1", "plant/edge1/press-7")


@pytest.mark.parametrize(
    "topic",
    [
        "spBv1.0/plant/NBIRTH/edge1/dev",  # node verb with a device
        "spBv1.0/plant/NDEATH/edge1/dev",
        "spBv1.0/plant/NDATA/edge1/dev",
        "spBv1.0/plant/NCMD/edge1/dev",
        "spBv1.0/plant/DBIRTH/edge1",  # device verb without one
        "spBv1.0/plant/DDEATH/edge1",
        "spBv1.0/plant/DDATA/edge1",
        "spBv1.0/plant/DCMD/edge1",
        "spBv1.0/plant/ndata/edge1",  # verbs are upper case
        "spBv1.0/plant/STATE/edge1",
        "spBv1.0/plant/XDATA/edge1",
        "spBv1.0/plant/DDATA/edge1/dev/extra",
        "spBv1.0/plant/NDATA",
        "spBv1.0/plant",
        "spBv1.0",
        "spBv1.0/STATE",
        "spBv1.0/STATE/",
        "spBv1.0/STATE/host/extra",
        "spBv1.0//NDATA/edge1",
        "spBv1.0/plant/NDATA/",
        "spBv1.0/plant/DDATA/edge1/",
        "spAv1.0/plant/NDATA/edge1",
        "STATE/host",
        "sensors/dev-001/temp",
        "",
        "/spBv1.0/plant/NDATA/edge1",
    ],
)
def test_bad_topics(topic: str) -> None:
    with pytest.raises(PayloadError) as caught:
        parse_topic(topic)
    assert caught.value.reason == sp.SPARKPLUG_BAD_TOPIC


# ------------------------------------------------------------------------ payload decoding


@pytest.mark.parametrize(
    "payload",
    [
        b"\x12\xff\x01\x0a",  # a metric longer than the payload
        b"\x0f",  # wire type 7
        b'{"value": 1.5}',
        b"\x08\x80\x80\x80",  # an unterminated varint
        b"\x12\x02\x50",  # a metric whose int_value has no value
        b"\x00",  # field number 0
    ],
)
def test_malformed_payloads(payload: bytes) -> None:
    with pytest.raises(PayloadError) as caught:
        decode_payload(payload)
    assert caught.value.reason == sp.SPARKPLUG_MALFORMED


def test_an_empty_payload_is_an_empty_payload() -> None:
    assert decode_payload(b"") == Payload()


def test_a_metric_name_that_is_not_utf8_makes_the_payload_malformed() -> None:
    raw = b"\x12\x04\x0a\x02\xff\xfe"  # metrics[0].name = b"\xff\xfe"
    with pytest.raises(PayloadError) as caught:
        decode_payload(raw)
    assert caught.value.reason == sp.SPARKPLUG_MALFORMED


def test_a_string_value_that_is_not_utf8_is_a_bad_metric() -> None:
    # metrics[0]: name "s", datatype String (12), string_value b"\xff"
    raw = b"\x12\x08\x0a\x01s\x20\x0c\x7a\x01\xff"
    [made] = decode_payload(raw).metrics
    assert "not UTF-8" in bad(made).message


@given(st.binary(max_size=512))
@PROPERTY_SETTINGS
def test_any_bytes_decode_or_raise_payload_error(payload: bytes) -> None:
    decoded: Payload | None
    reason: str | None
    try:
        decoded = decode_payload(payload)
    except PayloadError as exc:
        decoded, reason = None, exc.reason
    else:
        reason = None
    if decoded is None:
        assert reason == sp.SPARKPLUG_MALFORMED
    else:
        assert all(isinstance(made.name, str) for made in decoded.metrics)


# ---------------------------------------------------- the specification's payload examples


def test_the_specifications_nbirth_example() -> None:
    examples = [
        ("bdSeq", "UInt64", 0, 0.0),
        ("Node Control/Reboot", "Boolean", False, 0.0),
        ("Node Control/Rebirth", "Boolean", False, 0.0),
        ("Node Control/Next Server", "Boolean", False, 0.0),
        ("Node Control/Scan Rate", "Int64", 3000, 3000.0),
        ("Properties/Hardware Make", "String", "Raspberry Pi", "Raspberry Pi"),
        ("Properties/Hardware Model", "String", "Pi 3 Model B", "Pi 3 Model B"),
        ("Properties/OS", "String", "Raspbian", "Raspbian"),
        ("Properties/OS Version", "String", "Jessie with PIXEL/11.01.2017", None),
        ("Supply Voltage", "Float", 12.1, 12.1),
    ]
    metrics = [
        encode_metric(name=name, alias=i + 1, datatype=T[kind], value=value, timestamp_ms=MS)
        for i, (name, kind, value, _) in enumerate(examples)
    ]
    payload = decode_payload(encode_payload(metrics, seq=0, timestamp_ms=MS))
    assert (payload.seq, payload.timestamp, bdseq(payload)) == (0, MS, 0)
    for made, (name, _, value, expected) in zip(payload.metrics, examples, strict=True):
        assert made.name == name
        got = value_of(made)
        if isinstance(value, str):
            assert got == MetricValue(None, value)
        else:
            assert isinstance(expected, float)
            assert got == MetricValue(expected, None)
        assert metric_time(made, payload, NOW) == datetime(2017, 2, 3, 17, 55, 2, 122000, UTC)
        assert (skip_reason(made, made.datatype), quality(made)) == (None, "good")


def test_the_specifications_dbirth_ndata_and_ndeath_examples() -> None:
    names = ["Inputs/A", "Inputs/B", "Outputs/LEDs/Green", "Properties/Hardware Make"]
    kinds = ["Boolean", "Boolean", "Boolean", "String"]
    values: list[object] = [False, False, False, "Pibrella"]
    metrics = [
        encode_metric(name=n, alias=i, datatype=T[k], value=v, timestamp_ms=MS)
        for i, (n, k, v) in enumerate(zip(names, kinds, values, strict=True))
    ]
    dbirth = decode_payload(encode_payload(metrics, seq=1, timestamp_ms=MS))
    assert dbirth.seq == 1
    assert [value_of(m) for m in dbirth.metrics] == [
        MetricValue(0.0, None), MetricValue(0.0, None), MetricValue(0.0, None),
        MetricValue(None, "Pibrella"),
    ]  # fmt: skip
    voltage = encode_metric(name="Supply Voltage", datatype=T["Float"], value=12.3, timestamp_ms=MS)
    ndata = decode_payload(encode_payload([voltage], seq=2, timestamp_ms=MS))
    assert value_of(ndata.metrics[0]) == MetricValue(12.3, None)
    death = encode_metric(name="bdSeq", datatype=T["UInt64"], value=0, timestamp_ms=MS)
    ndeath = decode_payload(encode_payload([death], seq=None, timestamp_ms=MS))
    assert not ndeath.HasField("seq")
    assert bdseq(ndeath) == 0


# ----------------------------------------------------------------------------------- integers


@pytest.mark.parametrize(
    ("datatype", "field", "raw", "expected"),
    [
        ("Int8", "int_value", 0x80, -128),  # 8-bit two's complement
        ("Int8", "int_value", 0xFFFFFF80, -128),  # sign-extended to 32 bits (Tahu)
        ("Int8", "long_value", 2**64 - 128, -128),  # sign-extended to 64 bits
        ("Int8", "long_value", 0xFFFFFF80, -128),  # to 32, then widened unsigned
        ("Int8", "int_value", 127, 127),
        ("Int8", "int_value", 0xFF, -1),
        ("Int8", "int_value", 0xFFFFFFFF, -1),
        ("Int8", "int_value", 0, 0),
        ("Int16", "int_value", 0x8000, -32768),
        ("Int16", "int_value", 0xFFFF8000, -32768),
        ("Int16", "int_value", 32767, 32767),
        ("Int16", "int_value", 0xFFFF, -1),
        ("Int32", "int_value", 2**31, -(2**31)),
        ("Int32", "int_value", 2**31 - 1, 2**31 - 1),
        ("Int32", "int_value", 2**32 - 1, -1),
        ("Int32", "long_value", 2**64 - 2**31, -(2**31)),
        ("Int64", "long_value", 2**63, -(2**63)),
        ("Int64", "long_value", 2**63 - 1, 2**63 - 1),
        ("Int64", "long_value", 2**64 - 1, -1),
        ("Int64", "int_value", 7, 7),
        ("UInt8", "int_value", 255, 255),
        ("UInt16", "int_value", 65535, 65535),
        ("UInt32", "int_value", 2**32 - 1, 2**32 - 1),
        ("UInt32", "long_value", 2**32 - 1, 2**32 - 1),  # Tahu's Java encoder uses long_value
        ("UInt64", "long_value", 2**64 - 1, 2**64 - 1),
        ("UInt64", "long_value", 0, 0),
    ],
)
def test_integers(datatype: str, field: str, raw: int, expected: int) -> None:
    assert value_of(wire(datatype, field, raw)) == MetricValue(float(expected), None)


@pytest.mark.parametrize(
    ("datatype", "field", "raw"),
    [
        ("Int8", "int_value", 256),
        ("Int8", "int_value", 0xFFFFFF7F),  # -129 sign-extended
        ("Int8", "int_value", 2**31),
        ("Int8", "long_value", 2**63),
        ("Int16", "int_value", 65536),
        ("Int16", "int_value", 0xFFFF7FFF),
        ("Int32", "long_value", 2**32),
        ("Int32", "long_value", 2**63),
        ("UInt8", "int_value", 256),
        ("UInt16", "int_value", 65536),
        ("UInt32", "long_value", 2**32),
    ],
)
def test_integers_out_of_range_are_bad_metrics(datatype: str, field: str, raw: int) -> None:
    assert "out of range" in bad(wire(datatype, field, raw)).message


@pytest.mark.parametrize(
    ("datatype", "value", "field", "raw"),
    [
        ("Int8", -128, "int_value", 0xFFFFFF80),
        ("Int8", -1, "int_value", 0xFFFFFFFF),
        ("Int8", 127, "int_value", 127),
        ("Int16", -32768, "int_value", 0xFFFF8000),
        ("Int32", -(2**31), "int_value", 2**31),
        ("Int64", -(2**63), "long_value", 2**63),
        ("Int64", 2**63 - 1, "long_value", 2**63 - 1),
        ("UInt8", 255, "int_value", 255),
        ("UInt16", 65535, "int_value", 65535),
        ("UInt32", 2**32 - 1, "int_value", 2**32 - 1),
        ("UInt64", 2**64 - 1, "long_value", 2**64 - 1),
    ],
)
def test_integers_are_encoded_as_tahu_does(datatype: str, value: int, field: str, raw: int) -> None:
    made = metric(datatype, value)
    assert (made.WhichOneof("value"), getattr(made, field)) == (field, raw)
    assert value_of(made) == MetricValue(float(value), None)


@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        ("Int8", 128),
        ("Int8", -129),
        ("UInt8", -1),
        ("UInt8", 256),
        ("Int64", 2**63),
        ("UInt64", -1),
    ],
)
def test_encoding_refuses_integers_out_of_range(datatype: str, value: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        metric(datatype, value)


SIGNED = {"Int8": 8, "Int16": 16, "Int32": 32, "Int64": 64}
UNSIGNED = {"UInt8": 8, "UInt16": 16, "UInt32": 32, "UInt64": 64}


@given(st.data())
@PROPERTY_SETTINGS
def test_every_integer_round_trips(data: st.DataObject) -> None:
    datatype = data.draw(st.sampled_from([*SIGNED, *UNSIGNED]))
    if datatype in SIGNED:
        bits = SIGNED[datatype]
        value = data.draw(st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    else:
        value = data.draw(st.integers(0, 2 ** UNSIGNED[datatype] - 1))
    assert value_of(metric(datatype, value)) == MetricValue(float(value), None)
    if datatype in ("Int8", "Int16", "Int32"):  # and as N-bit two's complement
        raw = value % 2 ** SIGNED[datatype]
        assert value_of(wire(datatype, "int_value", raw)) == MetricValue(float(value), None)


# ------------------------------------------------------------------- floats, booleans, text


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (12.1, 12.1),
        (12.3, 12.3),
        (-0.5, -0.5),
        (0.0, 0.0),
        (3.4028234663852886e38, 3.4028235e38),  # the largest float32
        (1e-45, 1e-45),  # the smallest subnormal
        (16777217.0, 16777216.0),  # past float32 precision
    ],
)
def test_float_reads_as_the_shortest_decimal_of_its_float32(value: float, expected: float) -> None:
    assert value_of(metric("Float", value)) == MetricValue(expected, None)


@pytest.mark.parametrize("value", [1.7976931348623157e308, -2.5, 5e-324, 0.1])
def test_double(value: float) -> None:
    assert value_of(metric("Double", value)) == MetricValue(value, None)


@pytest.mark.parametrize(
    ("datatype", "field"), [("Float", "float_value"), ("Double", "double_value")]
)
@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_bad_metrics(datatype: str, field: str, number: float) -> None:
    assert "finite" in bad(wire(datatype, field, number)).message


def test_booleans_are_one_and_zero() -> None:
    assert value_of(metric("Boolean", True)) == MetricValue(1.0, None)
    assert value_of(metric("Boolean", False)) == MetricValue(0.0, None)


@pytest.mark.parametrize("datatype", ["String", "Text", "UUID"])
@pytest.mark.parametrize("text", ["Test", "", "grüße ✓", "6f1c6b4e-2d6a-4f0e-9a7d-2b7c1d9e0f3a"])
def test_text_types(datatype: str, text: str) -> None:
    assert value_of(metric(datatype, text)) == MetricValue(None, text)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (MS, "2017-02-03T17:55:02.122000Z"),
        (0, "1970-01-01T00:00:00.000000Z"),
        (2**64 - 1, "1969-12-31T23:59:59.999000Z"),  # int64 -1
        (253402300799999, "9999-12-31T23:59:59.999000Z"),
    ],
)
def test_datetime_is_iso_utc_text(raw: int, expected: str) -> None:
    assert value_of(wire("DateTime", "long_value", raw)) == MetricValue(None, expected)


def test_datetime_encodes_from_an_aware_datetime_or_ms() -> None:
    aware = datetime(2017, 2, 3, 18, 55, 2, 122000, tzinfo=timezone(timedelta(hours=1)))
    assert metric("DateTime", aware).long_value == MS == metric("DateTime", MS).long_value
    assert metric("DateTime", -1).long_value == 2**64 - 1
    with pytest.raises(ValueError, match="naive"):
        metric("DateTime", datetime(2017, 2, 3))


@pytest.mark.parametrize("raw", [253402300800000, 2**63 - 1, 2**63])
def test_datetime_beyond_year_9999_or_before_year_1_is_a_bad_metric(raw: int) -> None:
    assert "years 1..9999" in bad(wire("DateTime", "long_value", raw)).message


# --------------------------------------------------------------------------------- mismatches


@pytest.mark.parametrize(
    ("datatype", "field", "raw"),
    [
        ("Int32", "string_value", "12"),
        ("Int8", "float_value", 1.0),
        ("UInt64", "double_value", 1.0),
        ("Float", "double_value", 1.0),
        ("Double", "float_value", 1.0),
        ("Double", "int_value", 1),
        ("Boolean", "int_value", 1),
        ("String", "int_value", 1),
        ("UUID", "bytes_value", b"\x00"),
        ("DateTime", "string_value", "2024-01-01T00:00:00Z"),
        ("Int16Array", "int_value", 1),
        ("DataSet", "string_value", "{}"),
        ("Template", "string_value", "{}"),
        ("Int32", "dataset_value", Payload.DataSet()),
    ],
)
def test_a_value_field_that_does_not_match_the_datatype_is_a_bad_metric(
    datatype: str, field: str, raw: object
) -> None:
    made = Payload.Metric(name="Line 1/Speed", datatype=T[datatype])
    if isinstance(raw, Payload.DataSet):
        made.dataset_value.CopyFrom(raw)
    else:
        setattr(made, field, raw)
    error = bad(made)
    assert error.message.startswith("Line 1/Speed: ")
    assert datatype in error.message


def test_a_metric_without_a_value_is_a_bad_metric_named_by_its_alias() -> None:
    made = Payload.Metric(alias=42, datatype=T["Int32"])
    error = bad(made)
    assert error.message == "alias 42: Int32 metric has no value"
    made.is_null = True
    assert "is null" in bad(made).message


@pytest.mark.parametrize(
    "datatype", ["Unknown", "Bytes", "File", "PropertySet", "PropertySetList", 99]
)
def test_datatypes_that_are_not_stored_are_bad_metrics(datatype: str | int) -> None:
    number = T[datatype] if isinstance(datatype, str) else datatype
    made = Payload.Metric(name="m", datatype=number, bytes_value=b"\x01")
    with pytest.raises(PayloadError) as caught:
        metric_value(made, number)
    assert caught.value.reason == sp.SPARKPLUG_BAD_METRIC


def test_the_datatype_given_wins_over_the_metrics_own() -> None:
    # DATA by alias: the caller passes the birth's datatype
    made = Payload.Metric(alias=3, int_value=0xFFFFFFFF)
    assert metric_value(made, T["Int32"]) == MetricValue(-1.0, None)
    assert metric_value(made, T["UInt32"]) == MetricValue(float(2**32 - 1), None)


# --------------------------------------------------------------------------------- arrays


# The specification's array examples (decimal values and their bytes_value).
SPEC_ARRAYS = [
    ("Int8Array", [-23, 123], "e97b"),  # printed as 0xEF 0x7B, but 0xEF is -17
    ("Int16Array", [-30000, 30000], "d08a3075"),
    ("Int32Array", [-1, 315338746], "fffffffffaafcb12"),
    (
        "Int64Array",
        [-4270929666821191986, -3601064768563266876],
        "ce0672ac189cbac4c4ba9c18ac7206ce",
    ),
    ("UInt8Array", [23, 250], "17fa"),
    ("UInt16Array", [30, 52360], "1e0088cc"),
    ("UInt32Array", [52, 3293969225], "3400000049fb55c4"),
    ("UInt64Array", [52, 16444743074749521625], "3400000000000000d99e02d1b27637e4"),
    ("FloatArray", [1.23, 89.341], "a4709d3f98aeb242"),  # little-endian (see the docstring)
    ("DoubleArray", [12.354213, 1022.9123213], "d7a205685bb528408e171c6f4cf78f40"),
    (
        "BooleanArray",
        [False, False, True, True, False, True, False, False, True, True, False, True],
        "0c00000034d0",
    ),
    ("StringArray", ["ABC", "hello"], "4142430068656c6c6f00"),
]


@pytest.mark.parametrize(("datatype", "values", "hex_bytes"), SPEC_ARRAYS)
def test_the_specifications_array_examples(
    datatype: str, values: list[object], hex_bytes: str
) -> None:
    made = metric(datatype, values)
    assert made.bytes_value.hex() == hex_bytes
    assert text_json(made) == values


def test_datetime_array_elements_are_iso_strings() -> None:
    # The specification's example instants, 8 little-endian bytes each.
    made = metric("DateTimeArray", [1256102875335, 1656107875000])
    assert made.bytes_value.hex() == "c7d0907524010000b8bab89781010000"
    assert text_json(made) == ["2009-10-21T05:27:55.335000Z", "2022-06-24T21:57:55.000000Z"]


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("Int8Array", [-128, 127, 0]),
        ("Int16Array", [-32768, 32767]),
        ("Int32Array", [-(2**31), 2**31 - 1]),
        ("Int64Array", [-(2**63), 2**63 - 1]),
        ("UInt8Array", [0, 255]),
        ("UInt16Array", [0, 65535]),
        ("UInt32Array", [0, 2**32 - 1]),
        ("UInt64Array", [0, 2**64 - 1]),  # exact in JSON
        ("FloatArray", [0.1, -3.4028235e38]),
        ("DoubleArray", [0.1, 1.7976931348623157e308]),
        ("BooleanArray", [True] * 8 + [False]),
        ("BooleanArray", [True] * 8),
        ("StringArray", ["", "a", "grüße"]),
        ("StringArray", [""]),
    ],
)
def test_every_array_type_round_trips_with_its_boundaries(
    datatype: str, values: list[object]
) -> None:
    assert text_json(metric(datatype, values)) == values


@pytest.mark.parametrize("datatype", sorted(ARRAY_TYPES))
def test_an_empty_array_is_an_empty_list(datatype: int) -> None:
    made = Payload.Metric(name="m", datatype=datatype, bytes_value=pack_array(datatype, []))
    assert value_of(made) == MetricValue(None, "[]")


@pytest.mark.parametrize(
    ("datatype", "raw", "problem"),
    [
        ("Int16Array", b"\x01\x02\x03", "not a whole"),
        ("Int64Array", b"\x00" * 12, "not a whole"),
        ("DoubleArray", b"\x00" * 7, "not a whole"),
        ("BooleanArray", b"\x01\x00", "shorter"),
        ("BooleanArray", b"\x09\x00\x00\x00\xff", "bytes of bits"),
        ("BooleanArray", b"\x01\x00\x00\x00\xff\xff", "bytes of bits"),
        ("StringArray", b"ok\x00\xff\x00", "not UTF-8"),
        ("FloatArray", struct.pack("<2f", 1.0, math.nan), "finite"),
        ("DoubleArray", struct.pack("<d", -math.inf), "finite"),
        ("DateTimeArray", struct.pack("<q", 253402300800000), "years 1..9999"),
    ],
)
def test_bad_arrays(datatype: str, raw: bytes, problem: str) -> None:
    assert problem in bad(wire(datatype, "bytes_value", raw)).message


def test_a_string_array_without_its_last_terminator_is_forgiven() -> None:
    assert text_json(wire("StringArray", "bytes_value", b"ABC\x00hello")) == ["ABC", "hello"]


# -------------------------------------------------------------------------------- DataSet


def test_dataset_with_every_basic_type_and_a_null_cell() -> None:
    columns = ["i8", "u64", "f", "d", "b", "s", "t", "when"]
    types = ["Int8", "UInt64", "Float", "Double", "Boolean", "String", "Text", "DateTime"]
    rows: list[list[object]] = [
        [-128, 2**64 - 1, 1.1, 2.5, True, "x", "y", MS],
        [127, 0, None, -0.25, False, "", "z", 0],
    ]
    made = metric("DataSet", DataSetSpec(columns, types, rows))
    assert made.dataset_value.num_of_columns == 8
    assert text_json(made) == {
        "columns": columns,
        "types": types,
        "rows": [
            [-128, 2**64 - 1, 1.1, 2.5, True, "x", "y", "2017-02-03T17:55:02.122000Z"],
            [127, 0, None, -0.25, False, "", "z", "1970-01-01T00:00:00.000000Z"],
        ],
    }


def test_dataset_types_may_be_given_as_numbers_and_may_be_empty() -> None:
    assert text_json(metric("DataSet", DataSetSpec(["a"], [3], [[-1]]))) == {
        "columns": ["a"],
        "types": ["Int32"],
        "rows": [[-1]],
    }
    assert text_json(metric("DataSet", DataSetSpec([], []))) == {
        "columns": [],
        "types": [],
        "rows": [],
    }


def _dataset(
    columns: list[str], types: list[int], cells: list[list[dict[str, object]]]
) -> Payload.Metric:
    made = Payload.Metric(name="table", datatype=T["DataSet"])
    made.dataset_value.columns.extend(columns)
    made.dataset_value.types.extend(types)
    for cells_of_row in cells:
        row = made.dataset_value.rows.add()
        for cell in cells_of_row:
            row.elements.add(**cell)
    return made


@pytest.mark.parametrize(
    ("made", "problem"),
    [
        (_dataset(["a", "b"], [T["Int32"]], []), "disagree"),
        (_dataset(["a"], [T["Int32"]], [[{"int_value": 1}, {"int_value": 2}]]), "2 cells"),
        (_dataset(["a"], [T["Int32"]], [[{"string_value": "1"}]]), "carries string_value"),
        (_dataset(["a"], [T["Int8"]], [[{"int_value": 300}]]), "out of range"),
        (_dataset(["a"], [T["DataSet"]], []), "column of type DataSet"),
        (_dataset(["a"], [99], []), "column of type datatype 99"),
        (_dataset(["a"], [T["Double"]], [[{"double_value": math.nan}]]), "finite"),
    ],
)
def test_bad_datasets(made: Payload.Metric, problem: str) -> None:
    error = bad(made)
    assert problem in error.message
    assert error.message.startswith("table")


def test_dataset_num_of_columns_must_agree() -> None:
    made = metric("DataSet", DataSetSpec(["a"], ["Int32"], [[1]]))
    made.dataset_value.num_of_columns = 2
    assert "disagree" in bad(made).message


# ------------------------------------------------------------------------------ Templates


def _motor_definition() -> Payload.Metric:
    members = [
        encode_metric(name="rpm", datatype=T["UInt16"], value=0, timestamp_ms=None),
        encode_metric(name="running", datatype=T["Boolean"], value=False, timestamp_ms=None),
    ]
    spec = TemplateSpec(None, members, [("rated_kw", "Float", 0.0)], "1.0", is_definition=True)
    return encode_metric(name="Motor", datatype=T["Template"], value=spec, timestamp_ms=MS)


def test_template_instance_with_nested_values() -> None:
    inner = TemplateSpec(
        "Bearing", [encode_metric(name="temp", datatype=T["Double"], value=61.5, timestamp_ms=1)]
    )
    members = [
        encode_metric(name="rpm", datatype=T["UInt16"], value=1450, timestamp_ms=1),
        encode_metric(name="state", datatype=T["String"], value="run", timestamp_ms=1),
        encode_metric(name="phases", datatype=T["FloatArray"], value=[1.5, 2.5], timestamp_ms=1),
        encode_metric(name="since", datatype=T["DateTime"], value=MS, timestamp_ms=1),
        encode_metric(name="bearing", datatype=T["Template"], value=inner, timestamp_ms=1),
        encode_metric(name="raw", datatype=T["Bytes"], value=b"\x00", timestamp_ms=1),
        encode_metric(name="off", datatype=T["Int32"], value=None, timestamp_ms=1, is_null=True),
    ]
    spec = TemplateSpec("Motor", members, [("rated_kw", "Float", 7.5), ("id", "Int8", -3)], "1.0")
    assert text_json(metric("Template", spec)) == {
        "template_ref": "Motor",
        "version": "1.0",
        "metrics": {
            "rpm": 1450,
            "state": "run",
            "phases": [1.5, 2.5],
            "since": "2017-02-03T17:55:02.122000Z",
            "bearing": {
                "template_ref": "Bearing",
                "version": None,
                "metrics": {"temp": 61.5},
                "parameters": {},
            },
            "off": None,
        },
        "parameters": {"rated_kw": 7.5, "id": -3},
    }


def test_template_members_without_datatypes_take_them_from_the_definition() -> None:
    definition = _motor_definition()
    birth = decode_payload(encode_payload([definition], seq=0, timestamp_ms=MS))
    definitions = template_definitions(birth)
    assert list(definitions) == ["Motor"]
    assert is_definition(birth.metrics[0])
    instance = Payload.Metric(alias=9, datatype=T["Template"])
    instance.template_value.template_ref = "Motor"
    instance.template_value.metrics.add(name="rpm", int_value=1450)
    instance.template_value.metrics.add(name="running", boolean_value=True)
    instance.template_value.parameters.add(name="rated_kw", float_value=7.5)
    result = metric_value(instance, T["Template"], definitions)
    assert orjson.loads(result.text or "") == {
        "template_ref": "Motor",
        "version": None,
        "metrics": {"rpm": 1450, "running": True},
        "parameters": {"rated_kw": 7.5},
    }
    assert "no datatype" in bad(instance, "Template").message  # without the definitions


def test_a_template_definition_is_not_a_value() -> None:
    definition = _motor_definition()
    assert is_definition(definition)
    assert not is_definition(metric("Int32", 1))
    assert "definition" in bad(definition).message


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (lambda t: t.ClearField("template_ref"), "without template_ref"),
        (lambda t: t.metrics.add(datatype=T["Int32"], int_value=1), "without a name"),
        (lambda t: t.metrics.add(name="x", datatype=T["Int8"], int_value=999), "out of range"),
        (lambda t: t.parameters.add(name="p", int_value=1), "no type"),
        (lambda t: t.parameters.add(name="p", type=T["Int32"], string_value="1"), "carries"),
    ],
)
def test_bad_template_instances(build: object, problem: str) -> None:
    made = metric("Template", TemplateSpec("Motor"))
    build(made.template_value)  # type: ignore[operator]
    assert problem in bad(made).message


# ----------------------------------------------------------- skips, quality, time, bdSeq


def test_skip_reasons() -> None:
    assert skip_reason(metric("Int32", 1), T["Int32"]) is None
    assert skip_reason(metric("Int32", None, is_null=True), T["Int32"]) == sp.SKIP_NULL
    transient = metric("Int32", 1)
    transient.is_transient = True
    assert skip_reason(transient, T["Int32"]) == sp.SKIP_TRANSIENT
    assert skip_reason(metric("Bytes", b"\x00"), T["Bytes"]) == sp.SKIP_BYTES
    assert skip_reason(metric("File", b"%PDF"), T["File"]) == sp.SKIP_FILE
    both = metric("Bytes", None, is_null=True)
    both.is_transient = True
    assert skip_reason(both, T["Bytes"]) == sp.SKIP_NULL


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (None, "good"),
        (192, "good"),
        (0, "bad"),
        (500, "stale"),
        (300, "uncertain"),
        (1, "uncertain"),
    ],
)
def test_quality_codes(code: int | None, expected: str) -> None:
    assert quality(metric("Double", 1.0, quality=code)) == expected


def test_quality_from_long_value_other_properties_and_odd_values() -> None:
    made = metric("Double", 1.0)
    made.properties.keys.extend(["engUnit", "Quality"])
    made.properties.values.add(type=T["String"], string_value="degC")
    made.properties.values.add(type=T["Int64"], long_value=500)
    assert quality(made) == "stale"
    only_unit = metric("Double", 1.0)
    only_unit.properties.keys.append("engUnit")
    only_unit.properties.values.add(type=T["String"], string_value="degC")
    assert quality(only_unit) == "good"
    odd = metric("Double", 1.0)
    odd.properties.keys.append("Quality")
    odd.properties.values.add(type=T["String"], string_value="GOOD")
    assert quality(odd) == "uncertain"


def test_metric_time_falls_back_from_the_metric_to_the_payload_to_receipt() -> None:
    payload = Payload(timestamp=MS + 1000)
    with_own = metric("Int32", 1)
    assert metric_time(with_own, payload, NOW) == datetime(2017, 2, 3, 17, 55, 2, 122000, UTC)
    without = Payload.Metric(alias=1, int_value=1)
    assert metric_time(without, payload, NOW) == datetime(2017, 2, 3, 17, 55, 3, 122000, UTC)
    assert metric_time(without, Payload(), NOW) == NOW
    local = NOW.astimezone(timezone(timedelta(hours=2)))
    received = metric_time(without, Payload(), local)
    assert (received, received.tzinfo) == (NOW, UTC)


def test_an_absurd_timestamp_is_a_bad_metric() -> None:
    made = Payload.Metric(name="m", timestamp=2**64 - 1)
    with pytest.raises(PayloadError) as caught:
        metric_time(made, Payload(), NOW)
    assert caught.value.reason == sp.SPARKPLUG_BAD_METRIC
    assert caught.value.message.startswith("m: ")
    payload = Payload(timestamp=253402300800000)
    with pytest.raises(PayloadError):
        metric_time(Payload.Metric(alias=1), payload, NOW)


def test_bdseq() -> None:
    def payload_of(*metrics: Payload.Metric) -> Payload:
        return decode_payload(encode_payload(metrics, seq=None, timestamp_ms=MS))

    def named(kind: str, value: object) -> Payload.Metric:
        return encode_metric(name="bdSeq", datatype=T[kind], value=value, timestamp_ms=MS)

    assert bdseq(payload_of(named("UInt64", 7))) == 7
    assert bdseq(payload_of(metric("Int32", 1), named("Int64", 255))) == 255
    assert bdseq(payload_of(metric("Int32", 1))) is None
    assert bdseq(payload_of(named("String", "7"))) is None
    assert bdseq(payload_of(named("Int64", -1))) is None
    assert bdseq(Payload()) is None


# ---------------------------------------------------------------------------- encoding


def test_encode_metric_fields() -> None:
    made = encode_metric(
        name="Line/Speed", alias=5, datatype=T["Double"], value=1.5, timestamp_ms=MS, quality=0
    )
    assert (made.name, made.alias, made.timestamp, made.datatype) == ("Line/Speed", 5, MS, 10)
    assert list(made.properties.keys) == ["Quality"]
    assert (made.properties.values[0].type, made.properties.values[0].int_value) == (3, 0)
    by_alias = encode_metric(alias=5, datatype=T["Double"], value=1.5, timestamp_ms=None)
    assert not by_alias.HasField("name")
    assert not by_alias.HasField("timestamp")
    null = encode_metric(name="n", datatype=T["Int32"], value=None, timestamp_ms=MS, is_null=True)
    assert null.is_null
    assert null.WhichOneof("value") is None


def test_encode_payload_seq_and_timestamp() -> None:
    with_seq = Payload.FromString(encode_payload([metric("Int8", 1)], seq=255, timestamp_ms=MS))
    assert (with_seq.seq, with_seq.timestamp, len(with_seq.metrics)) == (255, MS, 1)
    without = Payload.FromString(encode_payload([], seq=None, timestamp_ms=MS))
    assert not without.HasField("seq")


@pytest.mark.parametrize(
    ("datatype", "value"),
    [
        ("Int32", "1"),
        ("Int32", 1.0),
        ("Int32", True),
        ("Double", "1.5"),
        ("Boolean", 1),
        ("String", 1),
        ("Bytes", "text"),
        ("Int8Array", "ab"),
        ("BooleanArray", [1, 0]),
        ("DataSet", {"columns": []}),
        ("Template", {}),
        ("Unknown", 1),
    ],
)
def test_encoding_refuses_values_of_the_wrong_kind(datatype: str, value: object) -> None:
    with pytest.raises(TypeError):
        metric(datatype, value)


def test_encoding_refuses_bad_arrays_and_datasets() -> None:
    with pytest.raises(ValueError, match="cannot pack"):
        metric("Int8Array", [128])
    with pytest.raises(ValueError, match="one type per column"):
        metric("DataSet", DataSetSpec(["a", "b"], ["Int8"]))
    with pytest.raises(ValueError, match="unknown datatype"):
        metric("DataSet", DataSetSpec(["a"], ["Int9"]))
    with pytest.raises(ValueError, match="cells"):
        metric("DataSet", DataSetSpec(["a"], ["Int8"], [[1, 2]]))
    with pytest.raises(ValueError, match="not an array type"):
        pack_array(T["Int32"], [1])


# ------------------------------------------------------------------------- property tests


DATATYPE_NUMBERS = st.integers(0, 40)
SCALAR_FIELDS = st.one_of(
    st.tuples(st.just("int_value"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("long_value"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("float_value"), st.floats(width=32)),
    st.tuples(st.just("double_value"), st.floats()),
    st.tuples(st.just("boolean_value"), st.booleans()),
    st.tuples(st.just("string_value"), st.text(max_size=20)),
    st.tuples(st.just("bytes_value"), st.binary(max_size=40)),
    st.tuples(st.just(None), st.none()),
)


@st.composite
def metrics(draw: st.DrawFn, depth: int = 0) -> Payload.Metric:
    """Metrics with any value field, datatype and flags, DataSets and Templates included."""
    made = Payload.Metric(datatype=draw(DATATYPE_NUMBERS))
    if draw(st.booleans()):
        made.name = draw(st.text(max_size=8))
    if draw(st.booleans()):
        made.alias = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        made.timestamp = draw(st.integers(0, 2**64 - 1))
    made.is_null = draw(st.booleans())
    made.is_transient = draw(st.booleans())
    kind = draw(
        st.sampled_from(["scalar", "scalar", "dataset", "template"] if depth < 2 else ["scalar"])
    )
    if kind == "scalar":
        field, value = draw(SCALAR_FIELDS)
        if field is not None:
            setattr(made, field, value)
    elif kind == "dataset":
        _draw_dataset(draw, made.dataset_value)
    else:
        template = made.template_value
        template.is_definition = draw(st.booleans())
        if draw(st.booleans()):
            template.template_ref = draw(st.text(max_size=5))
        template.metrics.extend(draw(st.lists(metrics(depth + 1), max_size=3)))
        for _ in range(draw(st.integers(0, 2))):
            parameter = template.parameters.add(name=draw(st.text(max_size=4)))
            parameter.type = draw(DATATYPE_NUMBERS)
            field, value = draw(SCALAR_FIELDS)
            if field not in (None, "bytes_value"):
                setattr(parameter, field, value)
    if draw(st.booleans()):
        made.properties.keys.append(draw(st.sampled_from(["Quality", "engUnit"])))
        value = made.properties.values.add(type=draw(DATATYPE_NUMBERS))
        field, raw = draw(SCALAR_FIELDS)
        if field not in (None, "bytes_value"):
            setattr(value, field, raw)
    return made


def _draw_dataset(draw: st.DrawFn, dataset: Payload.DataSet) -> None:
    width = draw(st.integers(0, 3))
    dataset.columns.extend(draw(st.lists(st.text(max_size=3), min_size=width, max_size=width)))
    dataset.types.extend(draw(st.lists(DATATYPE_NUMBERS, min_size=width, max_size=width + 1)))
    if draw(st.booleans()):
        dataset.num_of_columns = draw(st.integers(0, 4))
    for _ in range(draw(st.integers(0, 3))):
        row = dataset.rows.add()
        for _ in range(draw(st.integers(0, 4))):
            field, value = draw(SCALAR_FIELDS)
            cell = row.elements.add()
            if field not in (None, "bytes_value"):
                setattr(cell, field, value)


def _outcome(call: Callable[[], object]) -> object:
    """What ``call`` returns, or the reason of the PayloadError it raises."""
    try:
        return call()
    except PayloadError as exc:
        return exc.reason


def _exercise(made: Payload.Metric, datatype: int) -> None:
    """Everything the host calls on a metric: only PayloadError may come out."""
    assert quality(made) in {"good", "bad", "stale", "uncertain"}
    assert skip_reason(made, datatype) in {None, *sp.SKIP_REASONS}
    is_definition(made)
    when = _outcome(lambda: metric_time(made, Payload(timestamp=MS), NOW))
    assert isinstance(when, datetime) or when == sp.SPARKPLUG_BAD_METRIC
    result = _outcome(lambda: metric_value(made, datatype))
    if isinstance(result, MetricValue):
        assert (result.value is None) != (result.text is None)
        assert result.value is None or math.isfinite(result.value)
        if result.text is not None and datatype in ARRAY_TYPES:
            assert isinstance(orjson.loads(result.text), list)
    else:
        assert result == sp.SPARKPLUG_BAD_METRIC


@given(metrics(), st.one_of(DATATYPE_NUMBERS, st.just(None)))
@PROPERTY_SETTINGS
def test_any_metric_gives_a_value_or_a_bad_metric(
    made: Payload.Metric, datatype: int | None
) -> None:
    _exercise(made, made.datatype if datatype is None else datatype)


@given(st.binary(max_size=200), DATATYPE_NUMBERS)
@PROPERTY_SETTINGS
def test_any_metric_bytes_give_a_value_or_a_bad_metric(raw: bytes, datatype: int) -> None:
    try:
        payload = decode_payload(b"\x12" + bytes([len(raw)]) + raw if len(raw) < 128 else raw)
    except PayloadError:
        return
    for made in payload.metrics:
        _exercise(made, datatype)
        bdseq(payload)
