"""Sparkplug B metric values, read by their declared datatype.

What the specification leaves open is settled here, the same way for every reader:

* Integer datatypes accept either integer field (Tahu's Java encoder sends UInt32 in
  ``long_value``). Signed Int8/16/32 arrive as N-bit or as sign-extended two's complement
  (to 32 bits, or to 64 in ``long_value``): all decode to the same negative number. Any
  other bit pattern is out of range for the type.
* Float values are given as the shortest decimal that rounds to the same float32 (a
  device's 12.3 reads 12.3, not 12.300000190734863).
* NaN and infinities are refused everywhere (the database column is a finite float, and
  JSON has neither).
* DateTime (and DateTimeArray) values are ms since the epoch, read as int64 two's
  complement, and must fall within years 1..9999.
* Arrays are packed little-endian; BooleanArray is a 4-byte little-endian count followed
  by the bits, most significant bit first; StringArray is NUL-terminated UTF-8 (a missing
  last terminator is forgiven).

Every failure is a ``PayloadError(SPARKPLUG_BAD_METRIC, "<metric>: ...")``: one bad
metric, never the whole payload.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeAlias

import orjson

from edge.readings import PayloadError, format_ts
from edge.sparkplug_b_pb2 import DataType, Payload

__all__ = [
    "ARRAY_TYPES",
    "BASIC_TYPES",
    "DATATYPES",
    "DATATYPE_NAMES",
    "SPARKPLUG_BAD_METRIC",
    "JsonValue",
    "MetricValue",
    "Templates",
    "bad_metric",
    "datetime_of_ms",
    "metric_label",
    "metric_value",
    "shortest_float32",
]

SPARKPLUG_BAD_METRIC = "sparkplug_bad_metric"

JsonValue: TypeAlias = bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"] | None
Holder: TypeAlias = (
    Payload.Metric
    | Payload.DataSet.DataSetValue
    | Payload.Template.Parameter
    | Payload.PropertyValue
)
Templates: TypeAlias = Mapping[str, Payload.Template]  # template definitions by name
# Names what failed in an error: a text, or the metric itself (named only on failure).
Label: TypeAlias = str | Payload.Metric

DATATYPES: dict[str, int] = {name: int(number) for name, number in DataType.items()}
DATATYPE_NAMES: dict[int, str] = {number: name for name, number in DATATYPES.items()}

SIGNED_BITS: dict[int, int] = {
    DataType.Int8: 8,
    DataType.Int16: 16,
    DataType.Int32: 32,
    DataType.Int64: 64,
}
UNSIGNED_BITS: dict[int, int] = {
    DataType.UInt8: 8,
    DataType.UInt16: 16,
    DataType.UInt32: 32,
    DataType.UInt64: 64,
}
_TEXT_TYPES = frozenset({DataType.String, DataType.Text, DataType.UUID})
# The types a DataSet column or a template parameter may have.
BASIC_TYPES = frozenset(
    {*SIGNED_BITS, *UNSIGNED_BITS, *_TEXT_TYPES, DataType.Float, DataType.Double}
    | {DataType.Boolean, DataType.DateTime}
)
# struct codes of the packed little-endian array types (DateTimeArray: int64 ms).
PACKED_CODES: dict[int, str] = {
    DataType.Int8Array: "b",
    DataType.Int16Array: "h",
    DataType.Int32Array: "i",
    DataType.Int64Array: "q",
    DataType.UInt8Array: "B",
    DataType.UInt16Array: "H",
    DataType.UInt32Array: "I",
    DataType.UInt64Array: "Q",
    DataType.FloatArray: "f",
    DataType.DoubleArray: "d",
    DataType.DateTimeArray: "q",
}
ARRAY_TYPES = frozenset({*PACKED_CODES, DataType.BooleanArray, DataType.StringArray})

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_MS = (datetime(1, 1, 1, tzinfo=UTC) - _EPOCH) // timedelta(milliseconds=1)
_MAX_MS = (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - _EPOCH) // timedelta(
    milliseconds=1
)
_FLOAT32 = struct.Struct("<f")
_FLOAT32_MIN_NORMAL = 2.0**-126
# Datatype numbers as plain ints, for use at run time (an attribute of the generated
# enum wrapper costs about a microsecond).
_BOOLEAN = DATATYPES["Boolean"]
_BOOLEAN_ARRAY = DATATYPES["BooleanArray"]
_BYTES = DATATYPES["Bytes"]
_DATA_SET = DATATYPES["DataSet"]
_DATE_TIME = DATATYPES["DateTime"]
_DATE_TIME_ARRAY = DATATYPES["DateTimeArray"]
_DOUBLE = DATATYPES["Double"]
_DOUBLE_ARRAY = DATATYPES["DoubleArray"]
_FILE = DATATYPES["File"]
_FLOAT = DATATYPES["Float"]
_FLOAT_ARRAY = DATATYPES["FloatArray"]
_STRING_ARRAY = DATATYPES["StringArray"]
_TEMPLATE = DATATYPES["Template"]


@dataclass(frozen=True, slots=True)
class MetricValue:
    """What one metric stores: a number in ``value`` or else a string in ``text``."""

    value: float | None
    text: str | None


def bad_metric(label: Label, problem: str) -> PayloadError:
    """The error for one metric that cannot be stored."""
    text = label if isinstance(label, str) else metric_label(label)
    return PayloadError(SPARKPLUG_BAD_METRIC, f"{text}: {problem}")


def metric_label(metric: Payload.Metric) -> str:
    """How errors name a metric: its name, else its alias."""
    if metric.HasField("name") and isinstance(metric.name, str):
        return metric.name[:200]
    if metric.HasField("alias"):
        return f"alias {metric.alias}"
    return "metric without name or alias"


def datetime_of_ms(ms: int, label: Label, what: str = "timestamp") -> datetime:
    """An aware UTC datetime from ms since the epoch, within years 1..9999."""
    if not _MIN_MS <= ms <= _MAX_MS:
        raise bad_metric(label, f"{what} {ms} ms is not within years 1..9999")
    return _EPOCH + timedelta(milliseconds=ms)


def metric_value(
    metric: Payload.Metric, datatype: int, templates: Templates | None = None
) -> MetricValue:
    """The value of ``metric`` read as ``datatype``.

    Integers, Float, Double and Boolean (1/0) give ``value``; String, Text, UUID and
    DateTime (ISO-8601 UTC) give ``text``; arrays, DataSets and Template instances give
    ``text`` as JSON. ``templates`` (definitions by name, from the NBIRTH) supply the
    datatypes an instance's members or parameters leave out.
    """
    if metric.WhichOneof("value") is None:
        state = "is null" if metric.is_null else "has no value"
        raise bad_metric(metric, f"{_type_name(datatype)} metric {state}")
    if datatype in BASIC_TYPES:
        basic = _basic(metric, datatype, metric)
        if isinstance(basic, str):
            return MetricValue(None, basic)
        return MetricValue(float(basic), None)
    document = _structured(metric, datatype, metric_label(metric), templates or {})
    return MetricValue(None, orjson.dumps(document).decode())


# --- basic types: metrics, DataSet cells, template parameters --------------------------------


def _optional_basic(holder: Holder, datatype: int, label: Label) -> bool | int | float | str | None:
    """A DataSet cell or template parameter: None when it has no value (a null)."""
    if holder.WhichOneof("value") is None:
        return None
    return _basic(holder, datatype, label)


def _basic(holder: Holder, datatype: int, label: Label) -> bool | int | float | str:
    """A basic-type value as JSON would hold it."""
    which = holder.WhichOneof("value")
    if datatype in SIGNED_BITS or datatype in UNSIGNED_BITS:
        return _integer(holder, datatype, label)
    if datatype == _FLOAT and which == "float_value":
        return _finite(shortest_float32(holder.float_value), label)
    if datatype == _DOUBLE and which == "double_value":
        return _finite(holder.double_value, label)
    if datatype == _BOOLEAN and which == "boolean_value":
        return holder.boolean_value
    if datatype in _TEXT_TYPES and which == "string_value":
        return _text(holder.string_value, label)
    if datatype == _DATE_TIME:
        ms = _to_signed(_raw_integer(holder, datatype, label), 64)
        return format_ts(datetime_of_ms(ms, label, "DateTime"))
    if datatype not in BASIC_TYPES:
        raise bad_metric(label, f"{_type_name(datatype)} is not a basic type")
    raise bad_metric(label, f"declared {_type_name(datatype)} but carries {which or 'no value'}")


def _raw_integer(holder: Holder, datatype: int, label: Label) -> int:
    which = holder.WhichOneof("value")
    if which == "int_value":
        return holder.int_value
    if which == "long_value":
        return holder.long_value
    raise bad_metric(label, f"declared {_type_name(datatype)} but carries {which}")


def _integer(holder: Holder, datatype: int, label: Label) -> int:
    raw = _raw_integer(holder, datatype, label)
    width = 32 if holder.WhichOneof("value") == "int_value" else 64
    if datatype in UNSIGNED_BITS:
        if raw >> UNSIGNED_BITS[datatype]:
            raise bad_metric(label, f"{raw} is out of range for {_type_name(datatype)}")
        return raw
    bits = SIGNED_BITS[datatype]
    if not raw >> bits:  # N-bit two's complement (for Int64, the whole field)
        return _to_signed(raw, bits)
    if raw >> (bits - 1) == (1 << (width - bits + 1)) - 1:  # sign-extended to the field
        return raw - (1 << width)
    if width == 64 and raw >> (bits - 1) == (1 << (33 - bits)) - 1:  # to 32 bits, then widened
        return raw - (1 << 32)
    raise bad_metric(label, f"{raw} is out of range for {_type_name(datatype)}")


def _to_signed(raw: int, bits: int) -> int:
    return raw - (1 << bits) if raw >> (bits - 1) & 1 else raw


def _finite(number: float, label: Label) -> float:
    if not math.isfinite(number):
        raise bad_metric(label, f"{number} is not a finite number")
    return number


def shortest_float32(number: float) -> float:
    """The shortest decimal that is the same float32 as ``number`` (a float32 widened)."""
    if not math.isfinite(number):
        return number
    # Six digits find the shortest form of every normal float32 that has one of up to six
    # digits (the usual case: one try); subnormals are coarser and may need fewer.
    for digits in range(6 if abs(number) >= _FLOAT32_MIN_NORMAL else 1, 10):
        candidate = float(f"{number:.{digits}g}")
        try:
            if _FLOAT32.unpack(_FLOAT32.pack(candidate))[0] == number:
                return candidate
        except OverflowError:  # rounded past the largest float32
            continue
    return number


def _text(value: str | bytes, label: Label) -> str:
    # The upb runtime hands back proto2 strings that are not UTF-8 as bytes.
    if not isinstance(value, str):
        raise bad_metric(label, "a string that is not UTF-8")
    return value


def _type_name(datatype: int) -> str:
    return DATATYPE_NAMES.get(datatype, f"datatype {datatype}")


# --- arrays, DataSets, templates ---------------------------------------------------------------


def _structured(
    metric: Payload.Metric, datatype: int, label: str, templates: Templates
) -> JsonValue:
    """Arrays as lists, a DataSet or Template instance as an object."""
    which = metric.WhichOneof("value")
    if datatype in ARRAY_TYPES and which == "bytes_value":
        return _array(metric.bytes_value, datatype, label)
    if datatype == _DATA_SET and which == "dataset_value":
        return _dataset(metric.dataset_value, label)
    if datatype == _TEMPLATE and which == "template_value":
        return _template(metric.template_value, label, templates)
    if datatype in ARRAY_TYPES or datatype in (_DATA_SET, _TEMPLATE):
        raise bad_metric(label, f"declared {_type_name(datatype)} but carries {which}")
    raise bad_metric(label, f"{_type_name(datatype)} is not a storable metric type")


def _array(data: bytes, datatype: int, label: str) -> list[JsonValue]:
    if datatype == _BOOLEAN_ARRAY:
        return list(_booleans(data, label))
    if datatype == _STRING_ARRAY:
        parts = data.split(b"\0")
        if parts[-1] == b"":  # the last terminator
            parts.pop()
        try:
            return [part.decode() for part in parts]
        except UnicodeDecodeError:
            raise bad_metric(label, "a StringArray element that is not UTF-8") from None
    code = PACKED_CODES[datatype]
    size = struct.calcsize(code)
    if len(data) % size:
        raise bad_metric(label, f"{len(data)} bytes is not a whole {_type_name(datatype)}")
    items = [item for (item,) in struct.iter_unpack(f"<{code}", data)]
    if datatype == _FLOAT_ARRAY:
        return [_finite(shortest_float32(item), label) for item in items]
    if datatype == _DOUBLE_ARRAY:
        return [_finite(item, label) for item in items]
    if datatype == _DATE_TIME_ARRAY:
        return [format_ts(datetime_of_ms(item, label, "DateTime")) for item in items]
    return items


def _booleans(data: bytes, label: str) -> list[bool]:
    if len(data) < 4:
        raise bad_metric(label, "a BooleanArray shorter than its 4-byte count")
    (count,) = struct.unpack_from("<I", data)
    if len(data) - 4 != (count + 7) // 8:
        raise bad_metric(label, f"a BooleanArray of {count} with {len(data) - 4} bytes of bits")
    return [bool(data[4 + i // 8] >> (7 - i % 8) & 1) for i in range(count)]


def _dataset(dataset: Payload.DataSet, label: str) -> dict[str, JsonValue]:
    columns: list[JsonValue] = [_text(column, label) for column in dataset.columns]
    types = list(dataset.types)
    if len(types) != len(columns) or (
        dataset.HasField("num_of_columns") and dataset.num_of_columns != len(columns)
    ):
        raise bad_metric(label, "a DataSet whose columns, types and num_of_columns disagree")
    for datatype in types:
        if datatype not in BASIC_TYPES:
            raise bad_metric(label, f"a DataSet column of type {_type_name(datatype)}")
    rows: list[JsonValue] = []
    for index, row in enumerate(dataset.rows):
        if len(row.elements) != len(types):
            raise bad_metric(label, f"DataSet row {index} has {len(row.elements)} cells")
        at = f"{label} row {index}"
        rows.append(
            [
                _optional_basic(cell, kind, at)
                for cell, kind in zip(row.elements, types, strict=True)
            ]
        )
    names: list[JsonValue] = [_type_name(datatype) for datatype in types]
    return {"columns": columns, "types": names, "rows": rows}


def _template(template: Payload.Template, label: str, templates: Templates) -> dict[str, JsonValue]:
    if template.is_definition:
        raise bad_metric(label, "a Template definition is not a value")
    if not template.HasField("template_ref"):
        raise bad_metric(label, "a Template instance without template_ref")
    ref = _text(template.template_ref, label)
    definition = templates.get(ref)
    member_types = {m.name: m.datatype for m in definition.metrics} if definition else {}
    metrics: dict[str, JsonValue] = {}
    for member in template.metrics:
        name = _text(member.name, label) if member.HasField("name") else ""
        at = f"{label}/{name}" if name else f"{label}: a member without a name"
        datatype = member.datatype or member_types.get(name, 0)
        if not name or not datatype:
            raise bad_metric(at, "no name" if not name else "no datatype")
        if datatype not in (_BYTES, _FILE):  # skipped, as at the top level
            metrics[name] = _member(member, datatype, at, templates)
    version = _text(template.version, label) if template.HasField("version") else None
    parameters = _parameters(template, definition, label)
    return {"template_ref": ref, "version": version, "metrics": metrics, "parameters": parameters}


def _member(member: Payload.Metric, datatype: int, label: str, templates: Templates) -> JsonValue:
    if member.is_null or member.WhichOneof("value") is None:
        return None
    if datatype in BASIC_TYPES:
        return _basic(member, datatype, label)
    return _structured(member, datatype, label, templates)


def _parameters(
    template: Payload.Template, definition: Payload.Template | None, label: str
) -> dict[str, JsonValue]:
    defaults = {p.name: p.type for p in definition.parameters} if definition else {}
    parameters: dict[str, JsonValue] = {}
    for parameter in template.parameters:
        name = _text(parameter.name, label)
        datatype = parameter.type or defaults.get(name, 0)
        if not datatype:
            raise bad_metric(f"{label} parameter {name}", "no type")
        parameters[name] = _optional_basic(parameter, datatype, f"{label} parameter {name}")
    return parameters
