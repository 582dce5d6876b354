"""The agent lifecycle the supervisor runs: a loop over inbox batches, with health.

An agent is restarted by the supervisor after a crash; whatever it held when it
crashed is handed to ``recover`` on the next start, so no message is ever stranded
(a stranded message would block every later acknowledgement).
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from typing import Any, Protocol

from agents.bus import Bus, Inbox
from agents.metrics import PipelineMetrics

__all__ = ["Agent", "Service"]


class Service(Protocol):
    """Anything the supervisor runs, restarts and watches."""

    name: str

    async def run(self) -> None:
        """Work until cancelled; an exception is a crash."""

    def stalled(self, now: float, timeout: float) -> bool:
        """True when there is work and nothing has moved for ``timeout`` seconds."""


class Agent(ABC):
    """Base for agents: consume batches from one inbox, publish results on the bus."""

    name = "agent"
    batch_limit = 512

    def __init__(self, bus: Bus, metrics: PipelineMetrics, inbox: Inbox[Any]) -> None:
        self.bus = bus
        self.metrics = metrics
        self.inbox = inbox
        self.last_progress = time.monotonic()
        self._in_hand: list[Any] = []
        self.idle = asyncio.Event()  # set while nothing is in hand or waiting

    async def run(self) -> None:
        """Process batches until cancelled; an exception means a crash (the supervisor restarts)."""
        if self._in_hand:
            # Cleared only once recovered: if recovery crashes too, the next start retries it.
            await self.recover(self._in_hand)
            self._in_hand = []
        while True:
            if self.inbox.empty():
                self.idle.set()
            batch = await self.inbox.get_batch(self.batch_limit)
            self.idle.clear()
            self._in_hand = batch
            await self.handle(batch)
            self._in_hand = []
            self.last_progress = time.monotonic()

    @abstractmethod
    async def handle(self, batch: list[Any]) -> None:
        """Process one batch of events taken from the inbox."""

    async def recover(self, held: list[Any]) -> None:
        """Settle events held at a crash: by default, handle them again."""
        await self.handle(held)

    def has_work(self) -> bool:
        return bool(self._in_hand) or not self.inbox.empty()

    def stalled(self, now: float, timeout: float) -> bool:
        """True when there is work and nothing has moved for ``timeout`` seconds."""
        return self.has_work() and now - self.last_progress > timeout
