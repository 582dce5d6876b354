"""Sparkplug B encoding: metrics and payloads as an edge node writes them.

Used by the simulator and the tests; the daemon only reads (``edge.sparkplug``). Signed
Int8/16/32 are written sign-extended to 32 bits (as Tahu's Java encoder does), Int64 as
64-bit two's complement, arrays packed little-endian (BooleanArray: a 4-byte count, then
the bits most significant first; StringArray: NUL-terminated UTF-8). A value that does not
fit its datatype raises ValueError or TypeError: that is a bug in the caller.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeAlias

from edge.sparkplug_b_pb2 import Payload
from edge.sparkplug_values import (
    ARRAY_TYPES,
    BASIC_TYPES,
    DATATYPES,
    PACKED_CODES,
    SIGNED_BITS,
    UNSIGNED_BITS,
)

__all__ = ["DataSetSpec", "TemplateSpec", "encode_metric", "encode_payload", "pack_array"]

_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)

Holder: TypeAlias = Payload.Metric | Payload.DataSet.DataSetValue | Payload.Template.Parameter
# Datatype numbers as plain ints, for use at run time (an attribute of the generated
# enum wrapper costs about a microsecond).
_BOOLEAN = DATATYPES["Boolean"]
_BOOLEAN_ARRAY = DATATYPES["BooleanArray"]
_BYTES = DATATYPES["Bytes"]
_DATA_SET = DATATYPES["DataSet"]
_DATE_TIME = DATATYPES["DateTime"]
_DATE_TIME_ARRAY = DATATYPES["DateTimeArray"]
_DOUBLE = DATATYPES["Double"]
_FILE = DATATYPES["File"]
_FLOAT = DATATYPES["Float"]
_INT32 = DATATYPES["Int32"]
_STRING = DATATYPES["String"]
_STRING_ARRAY = DATATYPES["StringArray"]
_TEMPLATE = DATATYPES["Template"]
_TEXT = DATATYPES["Text"]
_UUID = DATATYPES["UUID"]


@dataclass(frozen=True, slots=True)
class DataSetSpec:
    """A DataSet to encode: column names, their datatypes (names or numbers), rows."""

    columns: Sequence[str]
    types: Sequence[str | int]
    rows: Sequence[Sequence[object]] = ()


@dataclass(frozen=True, slots=True)
class TemplateSpec:
    """A Template to encode: an instance (``template_ref`` set) or a definition."""

    template_ref: str | None
    metrics: Sequence[Payload.Metric] = ()  # members, from encode_metric
    parameters: Sequence[tuple[str, str | int, object]] = ()  # (name, datatype, value)
    version: str | None = None
    is_definition: bool = field(default=False)


def encode_payload(
    metrics: Iterable[Payload.Metric], *, seq: int | None, timestamp_ms: int
) -> bytes:
    """A serialized Payload of ``metrics``; ``seq`` None for NDEATH and commands."""
    payload = Payload(timestamp=timestamp_ms, metrics=metrics)
    if seq is not None:
        payload.seq = seq
    return payload.SerializeToString()


def encode_metric(
    *,
    name: str | None = None,
    alias: int | None = None,
    datatype: int,
    value: object,
    timestamp_ms: int | None,
    quality: int | None = None,
    is_null: bool = False,
) -> Payload.Metric:
    """One metric: its name and/or alias, datatype, timestamp, value (or is_null)."""
    metric = Payload.Metric(datatype=datatype)
    if name is not None:
        metric.name = name
    if alias is not None:
        metric.alias = alias
    if timestamp_ms is not None:
        metric.timestamp = timestamp_ms
    if quality is not None:
        metric.properties.keys.append("Quality")
        metric.properties.values.add(type=_INT32, int_value=quality)
    if is_null:
        metric.is_null = True
    else:
        _set_value(metric, _datatype(datatype), value)
    return metric


def _set_value(metric: Payload.Metric, datatype: int, value: object) -> None:
    if datatype in BASIC_TYPES:
        _set_basic(metric, datatype, value)
    elif datatype in (_BYTES, _FILE):
        metric.bytes_value = _bytes(value)
    elif datatype in ARRAY_TYPES:
        metric.bytes_value = pack_array(datatype, _sequence(value))
    elif datatype == _DATA_SET and isinstance(value, DataSetSpec):
        _fill_dataset(metric.dataset_value, value)
    elif datatype == _TEMPLATE and isinstance(value, TemplateSpec):
        _fill_template(metric.template_value, value)
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as datatype {datatype}")


def _set_basic(holder: Holder, datatype: int, value: object) -> None:
    """Set the value field of a metric, DataSet cell or template parameter."""
    if value is None and not isinstance(holder, Payload.Metric):
        return  # a null cell or parameter: no value field
    if datatype in SIGNED_BITS or datatype in UNSIGNED_BITS:
        _set_integer(holder, datatype, _int(value))
    elif datatype == _DATE_TIME:
        holder.long_value = _ms(value) & _MASK64
    elif datatype == _FLOAT:
        holder.float_value = _float(value)
    elif datatype == _DOUBLE:
        holder.double_value = _float(value)
    elif datatype == _BOOLEAN and isinstance(value, bool):
        holder.boolean_value = value
    elif datatype in (_STRING, _TEXT, _UUID) and isinstance(value, str):
        holder.string_value = value
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as datatype {datatype}")


def _set_integer(holder: Holder, datatype: int, value: int) -> None:
    bits = SIGNED_BITS.get(datatype) or UNSIGNED_BITS[datatype]
    low, high = (-(1 << (bits - 1)), 1 << (bits - 1)) if datatype in SIGNED_BITS else (0, 1 << bits)
    if not low <= value < high:
        raise ValueError(f"{value} is out of range for datatype {datatype}")
    if bits == 64:
        holder.long_value = value & _MASK64
    else:
        holder.int_value = value & _MASK32  # signed ones sign-extended to 32 bits


def pack_array(datatype: int, values: Sequence[object]) -> bytes:
    """The bytes_value of an array datatype."""
    if datatype == _BOOLEAN_ARRAY:
        bits = bytearray((len(values) + 7) // 8)
        for index, flag in enumerate(values):
            if not isinstance(flag, bool):
                raise TypeError(f"BooleanArray element {flag!r} is not a bool")
            bits[index // 8] |= flag << (7 - index % 8)
        return struct.pack("<I", len(values)) + bytes(bits)
    if datatype == _STRING_ARRAY:
        return b"".join(_str(item).encode() + b"\0" for item in values)
    if datatype == _DATE_TIME_ARRAY:
        return struct.pack(f"<{len(values)}q", *(_ms(item) for item in values))
    code = PACKED_CODES.get(_datatype(datatype))
    if code is None:
        raise ValueError(f"datatype {datatype} is not an array type")
    numbers = [_float(item) if code in "fd" else _int(item) for item in values]
    try:
        return struct.pack(f"<{len(numbers)}{code}", *numbers)
    except struct.error as exc:
        raise ValueError(f"cannot pack {values!r} as datatype {datatype}: {exc}") from None


def _fill_dataset(dataset: Payload.DataSet, spec: DataSetSpec) -> None:
    types = [_datatype(kind) for kind in spec.types]
    if len(types) != len(spec.columns):
        raise ValueError("a DataSet needs one type per column")
    dataset.num_of_columns = len(types)
    dataset.columns.extend(spec.columns)
    dataset.types.extend(types)
    for values in spec.rows:
        if len(values) != len(types):
            raise ValueError(f"DataSet row {values!r} does not have {len(types)} cells")
        row = dataset.rows.add()
        for kind, value in zip(types, values, strict=True):
            _set_basic(row.elements.add(), kind, value)


def _fill_template(template: Payload.Template, spec: TemplateSpec) -> None:
    template.is_definition = spec.is_definition
    if spec.template_ref is not None:
        template.template_ref = spec.template_ref
    if spec.version is not None:
        template.version = spec.version
    template.metrics.extend(spec.metrics)
    for name, kind, value in spec.parameters:
        parameter = template.parameters.add(name=name, type=_datatype(kind))
        _set_basic(parameter, parameter.type, value)


def _datatype(kind: str | int) -> int:
    number = DATATYPES.get(kind) if isinstance(kind, str) else kind
    if number is None:
        raise ValueError(f"unknown datatype {kind!r}")
    return number


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not an int")
    return value


def _float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{value!r} is not a number")
    return float(value)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a str")
    return value


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes | bytearray):
        raise TypeError(f"{value!r} is not bytes")
    return bytes(value)


def _sequence(value: object) -> Sequence[object]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(f"{value!r} is not a sequence")
    return value


def _ms(value: object) -> int:
    """ms since the epoch of an aware datetime, or an int taken as ms already."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{value!r} is naive: give it a time zone")
        return (value - _EPOCH) // _ONE_MS
    return _int(value)
