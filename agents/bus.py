"""Typed publish/subscribe with a bounded inbox per subscriber.

``publish`` awaits room in every subscriber's inbox, so a slow consumer slows its
producers instead of growing memory; every such wait is counted.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any, Generic, TypeVar

from daemon.metrics import Metrics

E = TypeVar("E")


class Inbox(asyncio.Queue[E], Generic[E]):
    """A bounded queue that also hands out everything waiting, up to a limit, in one go."""

    def __init__(self, name: str, maxsize: int) -> None:
        super().__init__(maxsize)
        self.name = name

    async def get_batch(self, limit: int) -> list[E]:
        """Wait for one event, then take whatever else is already waiting (natural batching)."""
        batch = [await self.get()]
        while len(batch) < limit:
            try:
                batch.append(self.get_nowait())
            except asyncio.QueueEmpty:
                break
        return batch


class Bus:
    """Routes each event to the inboxes subscribed to its exact type."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._routes: dict[type[Any], list[Inbox[Any]]] = defaultdict(list)
        self.inboxes: list[Inbox[Any]] = []

    def inbox(self, name: str, maxsize: int, *event_types: type[Any]) -> Inbox[Any]:
        """A new inbox receiving every event of ``event_types``."""
        inbox: Inbox[Any] = Inbox(name, maxsize)
        for event_type in event_types:
            self._routes[event_type].append(inbox)
        self.inboxes.append(inbox)
        self._metrics.queue_depth.labels(name).set_function(inbox.qsize)
        self._metrics.queue_capacity.labels(name).set(maxsize)
        return inbox

    async def publish(self, event: object) -> None:
        """Deliver ``event`` to its subscribers, waiting for room (backpressure)."""
        for inbox in self._routes.get(type(event), ()):
            if inbox.full():
                self._metrics.queue_waits.labels(inbox.name).inc()
                await inbox.put(event)
            else:
                inbox.put_nowait(event)

    def publish_nowait(self, event: object) -> None:
        """Deliver without waiting; raises ``asyncio.QueueFull`` if an inbox has no room."""
        for inbox in self._routes.get(type(event), ()):
            inbox.put_nowait(event)

    def has_room(self, event_type: type[Any], count: int = 1) -> bool:
        return all(
            inbox.maxsize - inbox.qsize() >= count for inbox in self._routes.get(event_type, ())
        )

    def pending(self) -> int:
        return sum(inbox.qsize() for inbox in self.inboxes)
