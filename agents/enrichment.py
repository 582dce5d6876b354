"""EnrichmentAgent: registry metadata (site, area, line, asset, type, unit) and a quality flag."""

from __future__ import annotations

from typing import Any

from agents.base import Agent
from agents.bus import Bus, Inbox
from agents.events import EnrichedMessage, RawMessage, RejectedMessage, ValidatedMessage
from agents.metrics import PipelineMetrics
from agents.reasons import INTERNAL_ERROR
from agents.registry import DeviceInfo, DeviceRegistry
from db.rows import ReadingRow
from edge.readings import Reading

__all__ = ["GOOD", "OUT_OF_RANGE", "EnrichmentAgent"]

GOOD = "good"
OUT_OF_RANGE = "out_of_range"
_UNKNOWN = DeviceInfo()


class EnrichmentAgent(Agent):
    """Fills what the device did not send from the registry and flags out-of-range values;
    the result is the rows to store."""

    name = "enrichment"

    def __init__(
        self, bus: Bus, metrics: PipelineMetrics, inbox: Inbox[Any], registry: DeviceRegistry
    ) -> None:
        super().__init__(bus, metrics, inbox)
        self.registry = registry

    async def handle(self, batch: list[ValidatedMessage]) -> None:
        for validated in batch:
            message = validated.message
            rows = [self.enrich(reading, message) for reading in validated.readings]
            await self.bus.publish(EnrichedMessage(message, rows, validated.partial))

    def enrich(self, reading: Reading, message: RawMessage) -> ReadingRow:
        """The row of one reading: what it says, then what the registry knows."""
        info = self.registry.lookup(reading.device_id, reading.sensor_id) or _UNKNOWN
        quality = reading.quality
        low, high, value = info.min_value, info.max_value, reading.value
        if value is not None and (
            (low is not None and value < low) or (high is not None and value > high)
        ):
            quality = OUT_OF_RANGE  # the range check outranks what the device says about itself
        return ReadingRow(
            reading.device_id,
            reading.sensor_id,
            reading.ts,
            reading.value,
            reading.unit or info.unit,
            quality or GOOD,
            reading.seq,
            reading.site or info.site,
            reading.area or info.area,
            reading.line or info.line,
            reading.asset or info.asset,
            info.sensor_type,
            message.received_at,
            message.correlation_id,
            reading.value_text,
        )

    async def recover(self, held: list[ValidatedMessage]) -> None:
        for validated in held:
            await self.bus.publish(
                RejectedMessage(validated.message, INTERNAL_ERROR, "enrichment failed unexpectedly")
            )
