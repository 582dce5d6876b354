"""The rows storage takes: a stored reading and a dead letter, by column name.

Writers, the spool and the drainer all speak these; agents build them from events.
NamedTuples: named for readers, plain tuples for the drivers (and cheap to build, once
per reading on the hot path).
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

__all__ = ["READING_COLUMNS", "REJECTION_COLUMNS", "ReadingRow", "RejectionRow"]


class ReadingRow(NamedTuple):
    """One row of ``sensor_readings``."""

    device_id: str
    sensor_id: str
    ts: datetime
    value: float | None  # NULL exactly when value_text is set
    unit: str | None
    quality: str | None
    seq: int | None
    site: str | None
    area: str | None
    line: str | None
    asset: str | None
    sensor_type: str | None
    received_at: datetime
    correlation_id: str
    value_text: str | None = None  # non-numeric values (Sparkplug strings, arrays, DataSets)


class RejectionRow(NamedTuple):
    """One row of ``rejected_messages``, and whether it may be stored already."""

    received_at: datetime
    topic: str
    payload: bytes  # the first ``ingest.max_payload_bytes`` of it
    payload_sha256: str
    payload_size: int
    reason: str
    error: str
    device_id: str | None
    correlation_id: str
    # A redelivery (MQTT DUP) or a replay from the spool: stored only if not there yet.
    redelivered: bool = False

    def values(self) -> tuple[object, ...]:
        """The column values, in ``REJECTION_COLUMNS`` order."""
        return self[: len(REJECTION_COLUMNS)]


READING_COLUMNS = ReadingRow._fields
REJECTION_COLUMNS = RejectionRow._fields[:-1]
