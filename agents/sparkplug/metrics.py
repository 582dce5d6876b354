"""How many edge nodes and devices are online, as gauges."""

from __future__ import annotations

from agents.metrics import PipelineMetrics
from agents.sparkplug.births import BirthCache

__all__ = ["SparkplugCounts"]


class SparkplugCounts:
    """Keeps ``ingestd_sparkplug_edge_nodes{state}`` and ``..._devices{state}`` current."""

    def __init__(self, births: BirthCache, metrics: PipelineMetrics) -> None:
        self._births = births
        self._metrics = metrics
        self.refresh()

    def refresh(self) -> None:
        """Recount after a change (births and deaths are rare: a scan is fine)."""
        for devices, gauge in (
            (False, self._metrics.sparkplug_nodes),
            (True, self._metrics.sparkplug_devices),
        ):
            for online, state in ((True, "online"), (False, "offline")):
                gauge.labels(state).set(self._births.count(devices=devices, online=online))
