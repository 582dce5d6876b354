"""ValidationAgent: routes and decoders turn messages into readings or rejections."""

from __future__ import annotations

from typing import Any

from agents.base import Agent
from agents.budget import InflightBudget
from agents.bus import Bus, Inbox
from agents.decoding import Router
from agents.events import RawMessage, RejectedMessage, ValidatedMessage
from agents.metrics import PipelineMetrics
from agents.reasons import INTERNAL_ERROR, PAYLOAD_TOO_LARGE, STALE_RETAINED, UNKNOWN_TOPIC
from edge.codecs import has_own_ts
from edge.readings import PartialPayloadError, PayloadError

__all__ = ["ValidationAgent"]


class ValidationAgent(Agent):
    """Decodes every message once, at the boundary; bad input becomes a rejection, never a crash."""

    name = "validation"

    def __init__(
        self,
        bus: Bus,
        metrics: PipelineMetrics,
        inbox: Inbox[Any],
        router: Router,
        max_payload_bytes: int,
        budget: InflightBudget | None = None,
    ) -> None:
        super().__init__(bus, metrics, inbox)
        # Without a budget (unit tests of this agent alone), readings are not charged.
        self.budget = budget or InflightBudget(max_bytes=2**62, max_readings=2**62)
        self.reconfigure(router, max_payload_bytes)

    def reconfigure(self, router: Router, max_payload_bytes: int) -> None:
        """New routes and size limit, applied from the next message on (SIGHUP)."""
        self.router = router
        self._max_payload_bytes = max_payload_bytes

    async def handle(self, batch: list[RawMessage]) -> None:
        publish, budget = self.bus.publish, self.budget
        for message in batch:
            outcome = self.validate(message)
            if type(outcome) is ValidatedMessage:
                count = len(outcome.readings)
                if not budget.try_charge(message.seq, count):
                    await budget.charge(message.seq, count)  # at the budget: backpressure
            await publish(outcome)

    def validate(self, message: RawMessage) -> ValidatedMessage | RejectedMessage:
        found = self.router.route(message.topic)
        if found is None:
            return RejectedMessage(
                message, UNKNOWN_TOPIC, f"topic {message.topic!r} matches no configured source"
            )
        route, fields = found
        device_id = fields.get("device_id")
        size = len(message.payload)
        if size > self._max_payload_bytes:
            return RejectedMessage(
                message,
                PAYLOAD_TOO_LARGE,
                f"payload is {size} bytes, the limit is {self._max_payload_bytes}",
                device_id,
            )
        partial = None
        try:
            readings = route.decoder.decode(message, fields)
        except PartialPayloadError as exc:  # one bad metric never loses the others
            readings = exc.readings
            partial = RejectedMessage(message, exc.reason, exc.message, exc.device_id or device_id)
        except PayloadError as exc:
            return RejectedMessage(message, exc.reason, exc.message, exc.device_id or device_id)
        if message.retain and not all(has_own_ts(r, message.received_at) for r in readings):
            # A retained copy is replayed on every (re)subscribe: stamped with the receive
            # time it would become a new row each time.
            return RejectedMessage(
                message,
                STALE_RETAINED,
                "a retained message without ts replays an old value; publish readings with ts"
                " or without the retain flag",
                device_id,
            )
        return ValidatedMessage(message, readings, partial)

    async def recover(self, held: list[RawMessage]) -> None:
        # Whatever made validation crash must not crash it again: store these as rejections.
        for message in held:
            await self.bus.publish(
                RejectedMessage(message, INTERNAL_ERROR, "validation failed unexpectedly")
            )
