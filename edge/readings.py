"""The domain at the bottom of every layer: a reading, why a payload is refused, time.

Everything here is shared by the daemon's pipeline and the plant-floor simulator, and
imports nothing of ingestd's but the error root.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from edge.errors import IngestdError

__all__ = [
    "BAD_TIMESTAMP",
    "BAD_TYPE",
    "BAD_VALUE",
    "DECODER_REASONS",
    "MALFORMED_JSON",
    "MISSING_FIELD",
    "MISSING_VALUE",
    "NOT_UTF8",
    "TOPIC_MISMATCH",
    "PartialPayloadError",
    "PayloadError",
    "Reading",
    "format_ts",
    "parse_ts",
]

# Stable rejection reasons a decoder gives (stored in rejected_messages.reason and the
# metric label). Reasons only the pipeline gives live in ``agents.reasons``.
MALFORMED_JSON = "malformed_json"
NOT_UTF8 = "not_utf8"
MISSING_VALUE = "missing_value"
MISSING_FIELD = "missing_field"
BAD_TYPE = "bad_type"
BAD_VALUE = "bad_value"
BAD_TIMESTAMP = "bad_timestamp"
TOPIC_MISMATCH = "topic_mismatch"
DECODER_REASONS = (
    MALFORMED_JSON, NOT_UTF8, MISSING_VALUE, MISSING_FIELD, BAD_TYPE, BAD_VALUE, BAD_TIMESTAMP,
    TOPIC_MISMATCH,
)  # fmt: skip

_MIN_EPOCH = 0.0  # 1970-01-01
_MAX_EPOCH = 253402300799.0  # 9999-12-31T23:59:59
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class PayloadError(IngestdError):
    """A payload that cannot become readings; ``reason`` is a stable machine code."""

    def __init__(self, reason: str, message: str, device_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.device_id = device_id  # when the decoder knows it (else the topic's field)


class PartialPayloadError(PayloadError):
    """Part of a payload is bad: ``readings`` are the good rest, to be stored anyway."""

    def __init__(
        self, reason: str, message: str, readings: list[Reading], device_id: str | None = None
    ) -> None:
        super().__init__(reason, message, device_id)
        self.readings = readings


@dataclass(slots=True)
class Reading:
    """One measurement as a payload gave it, with what its topic said about it."""

    device_id: str
    sensor_id: str
    ts: datetime
    value: float | None  # None exactly when value_text is set
    unit: str | None = None
    quality: str | None = None
    seq: int | None = None
    site: str | None = None
    area: str | None = None
    line: str | None = None
    asset: str | None = None
    value_text: str | None = None  # a non-numeric value (Sparkplug strings, arrays, DataSets)


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
            BAD_TIMESTAMP, f"{at}ts must be ISO-8601 or epoch seconds, got {kind_of(raw)}"
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


def format_ts(ts: datetime) -> str:
    """ISO-8601 UTC with microseconds and a Z, as the processed events carry it."""
    if ts.tzinfo is not UTC:
        ts = ts.astimezone(UTC)
    # orjson writes the date and time about 3x faster than isoformat() (two per processed
    # event), but leaves out a zero fraction: the fraction is added here, always 6 digits.
    return f"{orjson.dumps(ts)[1:20].decode()}.{ts.microsecond:06d}Z"


def kind_of(raw: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
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
