"""The events that travel on the agent bus.

Small slotted dataclasses: cheap to build on the hot path. Ownership passes with the
event (an agent never touches an event after publishing it), so none of them need
defensive copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from edge.codecs import Reading


@dataclass(slots=True)
class RawMessage:
    """An MQTT message as received, numbered in receive order for acknowledgement."""

    seq: int
    topic: str
    payload: bytes
    qos: int
    received_at: datetime  # wall clock, UTC: the default reading timestamp
    received_mono: float  # monotonic: end-to-end latency
    correlation_id: str
    # The broker may have delivered this before: its DUP flag, or a retained message replayed.
    dup: bool = False
    retain: bool = False


@dataclass(slots=True)
class ValidatedMessage:
    """A message whose payload decoded into readings (enriched in place downstream)."""

    message: RawMessage
    readings: list[Reading]


@dataclass(slots=True)
class EnrichedMessage:
    """Readings with registry metadata and quality, ready to store."""

    message: RawMessage
    readings: list[Reading]


@dataclass(slots=True)
class RejectedMessage:
    """A message that cannot become readings; stored as a dead letter."""

    message: RawMessage
    reason: str
    error: str
    device_id: str | None = None


@dataclass(slots=True)
class ReadingsStored:
    """Committed readings (new rows only), for the DataProcessed events."""

    readings: list[tuple[Reading, RawMessage]]


@dataclass(slots=True)
class RejectionsStored:
    """Committed rejections, for the DataProcessingFailed events."""

    rejections: list[RejectedMessage]
