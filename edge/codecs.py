"""Payload codecs shared by the simulator (encode) and the daemon (decode).

``decode`` turns one MQTT payload into readings or raises ``PayloadError`` with a stable
machine reason; it never raises anything else, whatever bytes arrive (a property test
feeds it arbitrary input).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

# Stable rejection reasons (stored in rejected_messages.reason and the metric label).
MALFORMED_JSON = "malformed_json"
NOT_UTF8 = "not_utf8"
MISSING_VALUE = "missing_value"
MISSING_FIELD = "missing_field"
BAD_TYPE = "bad_type"
BAD_VALUE = "bad_value"
BAD_TIMESTAMP = "bad_timestamp"
TOPIC_MISMATCH = "topic_mismatch"
UNKNOWN_TOPIC = "unknown_topic"
PAYLOAD_TOO_LARGE = "payload_too_large"
STORAGE_REJECTED = "storage_rejected"
STALE_RETAINED = "stale_retained"
INTERNAL_ERROR = "internal_error"

MAX_ID_LENGTH = 128
MAX_TEXT_LENGTH = 64
_MIN_EPOCH = 0.0  # 1970-01-01
_MAX_EPOCH = 253402300799.0  # 9999-12-31T23:59:59
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NON_FINITE = frozenset({"nan", "inf", "infinity"})


class PayloadError(Exception):
    """A payload that cannot become readings; ``reason`` is a stable machine code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(slots=True)
class Reading:
    """One measurement. Owned by one agent at a time as it moves down the bus."""

    device_id: str
    sensor_id: str
    ts: datetime
    value: float
    unit: str | None = None
    quality: str | None = None
    seq: int | None = None
    site: str | None = None
    area: str | None = None
    line: str | None = None
    asset: str | None = None
    sensor_type: str | None = None


def decode(
    payload: bytes, fmt: str, fields: dict[str, str], received_at: datetime
) -> list[Reading]:
    """Readings of one payload in format ``fmt`` (json or value) with topic ``fields``."""
    if fmt == "value":
        return [_reading(fields, _decode_value(payload), received_at)]
    if not payload.strip():
        raise PayloadError(MISSING_VALUE, "empty payload: expected a JSON object or array")
    document = _load_json(payload)
    if isinstance(document, dict):
        return [_from_object(document, fields, received_at, "")]
    if isinstance(document, list):
        if not document:
            raise PayloadError(MISSING_VALUE, "empty array: no readings")
        readings = [
            _from_object(item, fields, received_at, f"[{index}] ")
            for index, item in enumerate(document)
        ]
        _check_distinct(readings)
        return readings
    raise PayloadError(BAD_TYPE, f"expected a JSON object or array, got {_kind(document)}")


def _check_distinct(readings: list[Reading]) -> None:
    # Two readings of one sensor at one instant would store only the first: say so instead.
    seen: dict[tuple[str, str, datetime], int] = {}
    for index, reading in enumerate(readings):
        key = (reading.device_id, reading.sensor_id, reading.ts)
        if key in seen:
            raise PayloadError(
                BAD_TIMESTAMP,
                f"[{seen[key]}] and [{index}] are readings of the same sensor at the same ts"
                " (give each reading its own ts)",
            )
        seen[key] = index


def has_own_ts(reading: Reading, received_at: datetime) -> bool:
    """Whether the payload gave the reading's ts (``decode`` uses ``received_at`` otherwise)."""
    return reading.ts is not received_at


def _load_json(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        pass
    # Slow path, failures only: tell bad UTF-8 from bad JSON, and let the stricter checks
    # below explain NaN/Infinity literals and huge integers that orjson refuses.
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(NOT_UTF8, f"payload is not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise PayloadError(MALFORMED_JSON, f"malformed JSON: {_short(exc)}") from None


def _decode_value(payload: bytes) -> float:
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise PayloadError(NOT_UTF8, f"payload is not UTF-8 (byte {exc.start})") from None
    if not text:
        raise PayloadError(MISSING_VALUE, "empty payload: expected a number")
    if text.lower().lstrip("+-") in _NON_FINITE:
        raise PayloadError(BAD_VALUE, f"value must be a finite number, got {text[:40]!r}")
    # float() also takes "1_000" and non-ASCII digits; a device sends plain decimal text.
    if not _DECIMAL.fullmatch(text):
        raise PayloadError(BAD_TYPE, f"expected a bare number, got {text[:40]!r}")
    value = float(text)
    if not math.isfinite(value):
        raise PayloadError(BAD_VALUE, f"value must be a finite number, got {text[:40]!r}")
    return value


def _from_object(item: Any, fields: dict[str, str], received_at: datetime, at: str) -> Reading:
    if not isinstance(item, dict):
        raise PayloadError(BAD_TYPE, f"{at}expected an object, got {_kind(item)}")
    if "value" not in item:
        raise PayloadError(MISSING_VALUE, f"{at}'value' is required")
    value = item["value"]
    if type(value) is bool or not isinstance(value, int | float):
        raise PayloadError(BAD_TYPE, f"{at}value must be a number, got {_kind(value)}")
    try:
        value = float(value)
    except OverflowError:
        raise PayloadError(BAD_VALUE, f"{at}value is out of range for a float") from None
    if not math.isfinite(value):
        raise PayloadError(BAD_VALUE, f"{at}value must be a finite number, got {value}")
    own = dict(fields)
    for key in ("device_id", "sensor_id"):
        if key in item:
            body = _text(item[key], key, at, MAX_ID_LENGTH)
            if key in fields and body != fields[key]:
                raise PayloadError(
                    TOPIC_MISMATCH, f"{at}{key} {body!r} contradicts the topic's {fields[key]!r}"
                )
            own[key] = body
    reading = _reading(own, value, received_at, at)
    if "ts" in item:
        reading.ts = parse_ts(item["ts"], at)
    if item.get("unit") is not None:
        reading.unit = _text(item["unit"], "unit", at, MAX_TEXT_LENGTH)
    quality = item.get("quality")
    if quality is not None:
        if type(quality) is int:
            quality = str(quality)
        reading.quality = _text(quality, "quality", at, MAX_TEXT_LENGTH)
    seq = item.get("seq")
    if seq is not None:
        if type(seq) is not int or not -(2**63) <= seq < 2**63:
            raise PayloadError(BAD_TYPE, f"{at}seq must be a 64-bit integer, got {_kind(seq)}")
        reading.seq = seq
    return reading


def _reading(fields: dict[str, str], value: float, received_at: datetime, at: str = "") -> Reading:
    try:
        device_id, sensor_id = fields["device_id"], fields["sensor_id"]
    except KeyError as exc:
        raise PayloadError(
            MISSING_FIELD, f"{at}{exc.args[0]} is in neither the topic nor the payload"
        ) from None
    for key, text in fields.items():
        limit = MAX_ID_LENGTH if key.endswith("_id") else MAX_TEXT_LENGTH
        if len(text) > limit or "\x00" in text:
            raise PayloadError(BAD_VALUE, f"{at}{key} is longer than {limit} characters")
    return Reading(
        device_id=device_id,
        sensor_id=sensor_id,
        ts=received_at,
        value=value,
        unit=fields.get("unit"),
        site=fields.get("site"),
        area=fields.get("area"),
        line=fields.get("line"),
        asset=fields.get("asset"),
    )


def parse_ts(raw: Any, at: str = "") -> datetime:
    """An aware UTC datetime from an ISO-8601 string (naive means UTC) or epoch seconds."""
    if isinstance(raw, str):
        try:
            ts = datetime.fromisoformat(raw)
        except ValueError:
            ts = _lenient_iso(raw, at)
        try:
            ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
        except OverflowError:
            raise PayloadError(BAD_TIMESTAMP, f"{at}ts {raw[:40]!r} is out of range") from None
        if ts < _EPOCH:
            raise PayloadError(BAD_TIMESTAMP, f"{at}ts {raw[:40]!r} is before 1970")
        return ts
    if type(raw) is bool or not isinstance(raw, int | float):
        raise PayloadError(
            BAD_TIMESTAMP, f"{at}ts must be ISO-8601 or epoch seconds, got {_kind(raw)}"
        )
    try:
        seconds = float(raw)
    except OverflowError:
        raise PayloadError(BAD_TIMESTAMP, f"{at}ts is out of range") from None
    if not _MIN_EPOCH <= seconds <= _MAX_EPOCH:  # also false for NaN
        raise PayloadError(BAD_TIMESTAMP, f"{at}ts {raw!r} is not epoch seconds in 1970..9999")
    return datetime.fromtimestamp(seconds, UTC)


def _lenient_iso(raw: str, at: str) -> datetime:
    # RFC 3339 allows a lowercase 't'/'z', and gateways pad with spaces.
    try:
        return datetime.fromisoformat(raw.strip().upper())
    except ValueError:
        raise PayloadError(BAD_TIMESTAMP, f"{at}ts {raw[:40]!r} is not ISO-8601") from None


def _text(raw: Any, key: str, at: str, limit: int) -> str:
    if not isinstance(raw, str):
        raise PayloadError(BAD_TYPE, f"{at}{key} must be a string, got {_kind(raw)}")
    if not raw or len(raw) > limit or "\x00" in raw:
        raise PayloadError(BAD_VALUE, f"{at}{key} must be 1..{limit} characters without NUL")
    if not raw.isascii():
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
            raise PayloadError(BAD_VALUE, f"{at}{key} is not valid Unicode text") from None
    return raw


def _kind(raw: Any) -> str:
    if raw is None:
        return "null"
    if isinstance(raw, bool):
        return "boolean"
    if isinstance(raw, int | float):
        return "number"
    if isinstance(raw, str):
        return "string"
    if isinstance(raw, list):
        return "array"
    if isinstance(raw, dict):
        return "object"
    return type(raw).__name__


def _short(exc: BaseException) -> str:
    return str(exc)[:120] or type(exc).__name__


def format_ts(ts: datetime) -> str:
    """ISO-8601 UTC with microseconds and a Z, as the processed events carry it."""
    if ts.tzinfo is not UTC:
        ts = ts.astimezone(UTC)
    # orjson writes the date and time about 3x faster than isoformat() (two per processed
    # event), but leaves out a zero fraction: the fraction is added here, always 6 digits.
    return f"{orjson.dumps(ts)[1:20].decode()}.{ts.microsecond:06d}Z"


def encode_json(
    value: float,
    ts: datetime | None = None,
    unit: str | None = None,
    seq: int | None = None,
    quality: str | None = None,
) -> bytes:
    """A JSON payload as a well-behaved device sends it."""
    body: dict[str, Any] = {"value": value}
    if ts is not None:
        body["ts"] = format_ts(ts)
    if unit is not None:
        body["unit"] = unit
    if quality is not None:
        body["quality"] = quality
    if seq is not None:
        body["seq"] = seq
    return orjson.dumps(body)


def encode_value(value: float) -> bytes:
    """A plain-value payload: the bare number as text."""
    return repr(float(value)).encode()
