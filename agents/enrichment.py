"""EnrichmentAgent: registry metadata (site, area, line, asset, type, unit) and a quality flag."""

from __future__ import annotations

from typing import Any

from agents.base import Agent
from agents.bus import Bus, Inbox
from agents.events import EnrichedMessage, RejectedMessage, ValidatedMessage
from agents.registry import DeviceRegistry
from daemon.metrics import Metrics
from edge.codecs import INTERNAL_ERROR

GOOD = "good"
OUT_OF_RANGE = "out_of_range"


class EnrichmentAgent(Agent):
    """Fills what the device did not send from the registry and flags out-of-range values."""

    name = "enrichment"

    def __init__(
        self, bus: Bus, metrics: Metrics, inbox: Inbox[Any], registry: DeviceRegistry
    ) -> None:
        super().__init__(bus, metrics, inbox)
        self.registry = registry

    async def handle(self, batch: list[ValidatedMessage]) -> None:
        lookup = self.registry.lookup
        for validated in batch:
            for reading in validated.readings:
                info = lookup(reading.device_id, reading.sensor_id)
                if info is not None:
                    reading.site = reading.site or info.site
                    reading.area = reading.area or info.area
                    reading.line = reading.line or info.line
                    reading.asset = reading.asset or info.asset
                    reading.sensor_type = info.sensor_type
                    reading.unit = reading.unit or info.unit
                    low, high = info.min_value, info.max_value
                    if (low is not None and reading.value < low) or (
                        high is not None and reading.value > high
                    ):
                        # The range check outranks what the device says about itself.
                        reading.quality = OUT_OF_RANGE
                if reading.quality is None:
                    reading.quality = GOOD
            await self.bus.publish(EnrichedMessage(validated.message, validated.readings))

    async def recover(self, held: list[ValidatedMessage]) -> None:
        for validated in held:
            await self.bus.publish(
                RejectedMessage(validated.message, INTERNAL_ERROR, "enrichment failed unexpectedly")
            )
