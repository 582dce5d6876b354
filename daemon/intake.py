"""Intake: ingestd's broker connections, seen from the pipeline as one.

One connection carries the JSON and value sources (persistent session); a second one is
opened for Sparkplug sources (the host's clean session with its STATE). They share the
in-flight budget; message numbers interleave (``seq % stride`` is the connection), so
settling routes each number back to the connection it came on.
"""

from __future__ import annotations

import asyncio

from agents.budget import InflightBudget
from agents.bus import Inbox
from agents.events import RawMessage
from daemon.config import Config
from daemon.metrics import IntakeMetrics
from daemon.mqtt import MqttSource
from daemon.sessions import PersistentSession, SparkplugSession

__all__ = ["Intake"]


class Intake:
    """The broker connections and what they share."""

    def __init__(self, config: Config, inbox: Inbox[RawMessage], metrics: IntakeMetrics) -> None:
        self.budget = InflightBudget(
            config.mqtt.max_inflight_bytes,
            config.ingest.max_inflight_readings,
            largest_payload=config.ingest.max_payload_bytes,
        )
        stride = 2 if config.sparkplug_sources else 1
        self.main = MqttSource(
            config, inbox, metrics, PersistentSession(config), self.budget, tag=0, stride=stride
        )
        self.sparkplug: MqttSource | None = None
        if config.sparkplug_sources:
            self.sparkplug = MqttSource(
                config, inbox, metrics, SparkplugSession(config), self.budget, tag=1, stride=2
            )
        self._stride = stride

    @property
    def host_outbound(self) -> MqttSource:
        """Where the Sparkplug host sends NCMDs and device states: its own connection."""
        return self.sparkplug or self.main

    @property
    def sources(self) -> list[MqttSource]:
        return [self.main, *([self.sparkplug] if self.sparkplug else [])]

    def settle(self, seqs: list[int]) -> None:
        """Messages are durable: release their acks, each on its own connection."""
        if self.sparkplug is None:
            self.main.settle(seqs)
            return
        self.main.settle([seq for seq in seqs if not seq % 2])
        self.sparkplug.settle([seq for seq in seqs if seq % 2])

    def not_ready_reason(self) -> str | None:
        for source in self.sources:
            if not source.connected.is_set():
                return f"broker not connected ({source.session.name})"
            if source.subscription_problem:
                return source.subscription_problem
        return None

    @property
    def pending(self) -> int:
        """Messages received and not yet acknowledged, on every connection."""
        return sum(source.tracker.pending for source in self.sources)

    def stop_intake(self) -> None:
        for source in self.sources:
            source.stop_intake()

    async def wait_drained(self) -> None:
        await asyncio.gather(*(source.tracker.wait_drained() for source in self.sources))

    async def close(self) -> None:
        await asyncio.gather(*(source.close() for source in self.sources))

    async def reconfigure(self, config: Config) -> None:
        await asyncio.gather(*(source.reconfigure(config) for source in self.sources))
