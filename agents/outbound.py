"""The one way out to MQTT that any agent may use: processed and failed events, alerts,
commands to edge nodes. The daemon's MQTT connection implements it."""

from __future__ import annotations

from typing import Protocol

__all__ = ["Outbound"]


class Outbound(Protocol):
    """Queues a message on the broker connection without waiting."""

    def publish(self, topic: str, payload: bytes, qos: int, *, retain: bool = False) -> bool:
        """True once queued; False when it cannot be (the broker away, the queue full)."""
