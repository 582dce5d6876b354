"""Typed publish/subscribe with a bounded inbox per subscriber.

``publish`` awaits room in every subscriber's inbox, so a slow consumer slows its
producers instead of growing memory; every such wait is counted. An inbox with an
``overflow`` handler never makes producers wait: a full one hands the event to the
handler instead (for consumers off the acknowledgement path, which skip and count).
An event type nobody subscribed to is a wiring mistake: publishing it raises instead of
vanishing.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from agents.metrics import PipelineMetrics
from edge.errors import IngestdError

__all__ = ["Bus", "Inbox", "UnroutedEventError"]

E = TypeVar("E")


class UnroutedEventError(IngestdError):
    """An event was published that no inbox subscribes to."""


class Inbox(asyncio.Queue[E], Generic[E]):
    """A bounded queue that also hands out everything waiting, up to a limit, in one go."""

    def __init__(
        self, name: str, maxsize: int, overflow: Callable[[Any], None] | None = None
    ) -> None:
        super().__init__(maxsize)
        self.name = name
        self.overflow = overflow

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

    def __init__(self, metrics: PipelineMetrics) -> None:
        self._metrics = metrics
        self._routes: dict[type[Any], list[Inbox[Any]]] = defaultdict(list)

    def inbox(
        self,
        name: str,
        maxsize: int,
        *event_types: type[Any],
        overflow: Callable[[Any], None] | None = None,
    ) -> Inbox[Any]:
        """A new inbox receiving every event of ``event_types``; with ``overflow``, events
        that find it full go to that handler instead of waiting for room."""
        inbox: Inbox[Any] = Inbox(name, maxsize, overflow)
        for event_type in event_types:
            self._routes[event_type].append(inbox)
        self._metrics.track_inbox(name, maxsize, inbox.qsize)
        return inbox

    async def publish(self, event: object) -> None:
        """Deliver ``event`` to its subscribers, waiting for room (backpressure)."""
        inboxes = self._routes.get(type(event))
        if not inboxes:
            raise UnroutedEventError(f"no inbox subscribes to {type(event).__name__}")
        for inbox in inboxes:
            if inbox.full():
                if inbox.overflow is not None:
                    inbox.overflow(event)
                    continue
                self._metrics.queue_waits.labels(inbox.name).inc()
                await inbox.put(event)
            else:
                inbox.put_nowait(event)
