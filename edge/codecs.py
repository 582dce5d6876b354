"""The json and value payload codecs, shared by the simulator (encode) and the daemon (decode).

``decode_json`` and ``decode_value`` turn one MQTT payload into readings or raise
``PayloadError`` with a stable machine reason; they never raise anything else, whatever
bytes arrive (a property test feeds them arbitrary input).
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from typing import Any

import orjson

from edge.readings import (
    BAD_TIMESTAMP,
    BAD_TYPE,
    BAD_VALUE,
    MALFORMED_JSON,
    MISSING_FIELD,
    MISSING_VALUE,
    NOT_UTF8,
    TOPIC_MISMATCH,
    PayloadError,
    Reading,
    format_ts,
    kind_of,
    parse_ts,
)

__all__ = ["decode_json", "decode_value", "encode_json", "encode_value", "has_own_ts"]

MAX_ID_LENGTH = 128
MAX_TEXT_LENGTH = 64
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NON_FINITE = frozenset({"nan", "inf", "infinity"})


def decode_json(payload: bytes, fields: dict[str, str], received_at: datetime) -> list[Reading]:
    """Readings of a JSON object or array; ``fields`` are what the topic named."""
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
    raise PayloadError(BAD_TYPE, f"expected a JSON object or array, got {kind_of(document)}")


def decode_value(payload: bytes, fields: dict[str, str], received_at: datetime) -> list[Reading]:
    """The one reading of a bare-number payload, stamped with the receive time."""
    return [_reading(fields, _decode_value(payload), received_at)]


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
        raise PayloadError(BAD_TYPE, f"{at}expected an object, got {kind_of(item)}")
    if "value" not in item:
        raise PayloadError(MISSING_VALUE, f"{at}'value' is required")
    value = item["value"]
    if type(value) is bool or not isinstance(value, int | float):
        raise PayloadError(BAD_TYPE, f"{at}value must be a number, got {kind_of(value)}")
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
            raise PayloadError(BAD_TYPE, f"{at}seq must be a 64-bit integer, got {kind_of(seq)}")
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


def _text(raw: Any, key: str, at: str, limit: int) -> str:
    if not isinstance(raw, str):
        raise PayloadError(BAD_TYPE, f"{at}{key} must be a string, got {kind_of(raw)}")
    if not raw or len(raw) > limit or "\x00" in raw:
        raise PayloadError(BAD_VALUE, f"{at}{key} must be 1..{limit} characters without NUL")
    if not raw.isascii():
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
            raise PayloadError(BAD_VALUE, f"{at}{key} is not valid Unicode text") from None
    return raw


def _short(exc: BaseException) -> str:
    return str(exc)[:120] or type(exc).__name__


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
