"""Rejection reasons the pipeline gives (a decoder's own are in ``edge.readings``)."""

from __future__ import annotations

from edge.readings import DECODER_REASONS
from edge.sparkplug import SPARKPLUG_REASONS

__all__ = [
    "INTERNAL_ERROR",
    "PAYLOAD_TOO_LARGE",
    "REASONS",
    "STALE_RETAINED",
    "STORAGE_REJECTED",
    "UNKNOWN_TOPIC",
]

UNKNOWN_TOPIC = "unknown_topic"
PAYLOAD_TOO_LARGE = "payload_too_large"
STALE_RETAINED = "stale_retained"
STORAGE_REJECTED = "storage_rejected"
INTERNAL_ERROR = "internal_error"

# Every reason a rejection can carry: the metric's label values, known from the start.
REASONS = (
    *DECODER_REASONS, *SPARKPLUG_REASONS, UNKNOWN_TOPIC, PAYLOAD_TOO_LARGE, STALE_RETAINED,
    STORAGE_REJECTED, INTERNAL_ERROR,
)  # fmt: skip
