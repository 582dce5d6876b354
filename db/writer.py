"""What every storage backend offers the PersistenceAgent, and the row shapes they share."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

from agents.events import RawMessage, RejectedMessage
from edge.codecs import Reading

READING_COLUMNS = (
    "device_id", "sensor_id", "ts", "value", "unit", "quality", "seq", "site", "area",
    "line", "asset", "sensor_type", "received_at", "correlation_id",
)  # fmt: skip
REJECTION_COLUMNS = (
    "received_at", "topic", "payload", "payload_sha256", "payload_size", "reason", "error",
    "device_id", "correlation_id",
)  # fmt: skip


Row = tuple[object, ...]


class StorageError(Exception):
    """The database could not take a batch (unreachable, failing, timed out): retry later."""


class RowRejected(StorageError):
    """The database refused the data itself: retrying the same rows cannot succeed."""


@dataclass(slots=True)
class WriteResult:
    """Which readings of a batch were new rows, and how many rejections were stored."""

    new: list[bool]
    rejections_stored: int


class Writer(Protocol):
    """A storage backend: one idempotent transaction per batch."""

    max_payload_bytes: int  # how much of a rejected payload is stored

    async def start(self) -> None: ...

    async def write(
        self, readings: list[tuple[Reading, RawMessage]], rejections: list[RejectedMessage]
    ) -> WriteResult: ...

    async def close(self, grace_seconds: float = 5.0) -> None: ...


def reading_row(reading: Reading, message: RawMessage) -> Row:
    return (
        reading.device_id, reading.sensor_id, reading.ts, reading.value, reading.unit,
        reading.quality, reading.seq, reading.site, reading.area, reading.line, reading.asset,
        reading.sensor_type, message.received_at, message.correlation_id,
    )  # fmt: skip


def rejection_row(rejection: RejectedMessage, max_payload_bytes: int) -> Row:
    message = rejection.message
    return (
        message.received_at,
        message.topic,
        message.payload[:max_payload_bytes],
        hashlib.sha256(message.payload).hexdigest(),
        len(message.payload),
        rejection.reason,
        rejection.error,
        rejection.device_id,
        message.correlation_id,
    )


def reading_from_row(row: Row) -> tuple[Reading, RawMessage]:
    """A stored row as the reading and message the Publisher's processed events describe."""
    fields: Any = row  # the column order of READING_COLUMNS
    reading = Reading(*fields[:12])
    message = RawMessage(-1, "", b"", 0, fields[12], 0.0, fields[13])
    return reading, message
