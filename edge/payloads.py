"""What the simulator publishes: good payloads, deliberately bad ones, and their order.

Every bad payload is named by the rejection reason the daemon must store for it, so an
end-to-end test can compare the simulator's report with the daemon's
``rejected_messages``.
"""

from __future__ import annotations

import random
from datetime import datetime

import orjson

from edge.codecs import encode_json, encode_value
from edge.readings import (
    BAD_TIMESTAMP,
    BAD_TYPE,
    BAD_VALUE,
    MALFORMED_JSON,
    MISSING_VALUE,
    NOT_UTF8,
    TOPIC_MISMATCH,
    format_ts,
)
from edge.signals import Series, device_ids, make_series
from edge.simulation import Message, PayloadFormat, SimulatorOptions

__all__ = [
    "JSON_BAD_REASONS",
    "VALUE_BAD_REASONS",
    "MessageFactory",
    "bad_payload",
    "bad_variants",
    "good_payload",
]

# Bad kinds per format, each named by the reason the daemon must reject it with.
JSON_BAD_REASONS = (
    MALFORMED_JSON,
    NOT_UTF8,
    MISSING_VALUE,
    BAD_TYPE,
    BAD_TIMESTAMP,
    TOPIC_MISMATCH,
    BAD_VALUE,
)
VALUE_BAD_REASONS = (NOT_UTF8, MISSING_VALUE, BAD_TYPE, BAD_VALUE)


def good_payload(fmt: PayloadFormat, series: Series, now: datetime, batch: int = 1) -> bytes:
    """The next ``batch`` readings of ``series`` as a payload (a JSON array when batch > 1)."""
    if fmt == "value":
        return encode_value(series.next(now).value)
    parts = []
    for _ in range(batch):
        sample = series.next(now)
        parts.append(encode_json(sample.value, sample.ts, series.unit, sample.seq))
    return parts[0] if batch == 1 else b"[" + b",".join(parts) + b"]"


def bad_payload(
    fmt: PayloadFormat, reason: str, series: Series, now: datetime, rng: random.Random
) -> bytes:
    """A payload for ``series``'s topic that the daemon must reject with ``reason``."""
    return rng.choice(bad_variants(fmt, reason, series, now, rng))


def bad_variants(
    fmt: PayloadFormat, reason: str, series: Series, now: datetime, rng: random.Random
) -> list[bytes]:
    """Every way this simulator gets a ``fmt`` payload wrong for ``reason``."""
    return _bad_json(reason, series, now, rng) if fmt == "json" else _bad_value(reason, rng)


def _bad_json(reason: str, series: Series, now: datetime, rng: random.Random) -> list[bytes]:
    """Ways a misbehaving device or gateway gets a JSON payload wrong."""
    value = round(rng.uniform(1.0, 100.0), 2)
    ts = format_ts(now)
    fields = f'"value": {value}, "ts": "{ts}"'
    variants: dict[str, list[str | bytes]] = {
        MALFORMED_JSON: [
            f'{{{fields}, "unit": "de',  # truncated mid-string
            f"{{{fields},}}",  # trailing comma
            f"{{'value': {value}}}",  # single quotes
            f"{{{fields}}} }}",  # garbage after the document
        ],
        NOT_UTF8: [
            f'{{"value": {value}, "unit": "'.encode() + b'\xb0C"}',  # a Latin-1 degree sign
            '{"value": 1.5}'.encode("utf-16"),  # UTF-16 with its BOM
        ],
        MISSING_VALUE: [
            orjson.dumps({"ts": ts, "unit": series.unit}),
            orjson.dumps({"val": value, "ts": ts}),
            b"[]",
        ],
        BAD_TYPE: [
            orjson.dumps({"value": str(value), "ts": ts}),
            orjson.dumps({"value": None, "ts": ts}),
            orjson.dumps({"value": True}),
            orjson.dumps([value]),
            orjson.dumps(value),
        ],
        BAD_TIMESTAMP: [
            orjson.dumps({"value": value, "ts": text})
            for text in ("yesterday", "2024-02-30T10:00:00Z", "17/03/2024 10:00", "")
        ],
        TOPIC_MISMATCH: [
            orjson.dumps({"value": value, "ts": ts, "device_id": f"not-{series.device_id}"}),
            orjson.dumps({"value": value, "sensor_id": f"{series.sensor_id}-2"}),
        ],
        BAD_VALUE: [
            f'{{"value": {word}, "ts": "{ts}"}}' for word in ("NaN", "Infinity", "-Infinity")
        ],
    }
    return [v if isinstance(v, bytes) else v.encode() for v in variants[reason]]


def _bad_value(reason: str, rng: random.Random) -> list[bytes]:
    """Ways a device gets a bare-number payload wrong."""
    value = round(rng.uniform(1.0, 100.0), 2)
    variants = {
        NOT_UTF8: [f"{value}".encode() + b"\xb0C"],
        MISSING_VALUE: [b"", b" \n"],
        BAD_TYPE: [b"ERR", b"OVERRANGE", f"{value}".replace(".", ",").encode()],  # decimal comma
        BAD_VALUE: [b"nan", b"inf", b"-Infinity"],
    }
    return variants[reason]


class MessageFactory:
    """Messages in publishing order: round-robin over every series, a seeded share bad."""

    def __init__(self, options: SimulatorOptions) -> None:
        self.series = make_series(device_ids(options.devices, options.device_prefix), options.seed)
        self._topics = [f"{options.topic_prefix}/{s.device_id}/{s.sensor_id}" for s in self.series]
        seeded = options.seed is not None
        self._rng = random.Random(f"{options.seed}/bad") if seeded else random.Random()
        self._format: PayloadFormat = options.format
        self._bad_ratio = options.bad_ratio
        self._batch = options.batch
        self._reasons = JSON_BAD_REASONS if options.format == "json" else VALUE_BAD_REASONS
        self._next = 0

    def next(self, now: datetime) -> Message:
        """The next message, its readings stamped at ``now``."""
        index = self._next
        self._next = (index + 1) % len(self.series)
        series, topic = self.series[index], self._topics[index]
        if self._bad_ratio and self._rng.random() < self._bad_ratio:
            reason = self._rng.choice(self._reasons)
            return Message(
                topic, bad_payload(self._format, reason, series, now, self._rng), 0, reason
            )
        payload = good_payload(self._format, series, now, self._batch)
        return Message(topic, payload, self._batch)
