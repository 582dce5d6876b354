"""ValidationAgent: topic templates and payload codecs turn messages into readings or rejections."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from paho.mqtt.client import topic_matches_sub

from agents.base import Agent
from agents.bus import Bus, Inbox
from agents.events import RawMessage, RejectedMessage, ValidatedMessage
from daemon.config import SourceConfig
from daemon.metrics import Metrics
from edge.codecs import (
    INTERNAL_ERROR,
    PAYLOAD_TOO_LARGE,
    STALE_RETAINED,
    UNKNOWN_TOPIC,
    PayloadError,
    decode,
    has_own_ts,
)
from edge.topics import TopicTemplate

# Topics seen are cached with their source; plants have thousands, not millions, and the
# cache is simply cleared if a misbehaving publisher floods it with unique topics.
_TOPIC_CACHE_LIMIT = 100_000


class TopicRouter:
    """Finds the source (format and template) a topic belongs to, first match wins."""

    def __init__(self, sources: Sequence[SourceConfig]) -> None:
        self._sources = [
            (source.topic, source.format, TopicTemplate.parse(source.template, source.topic))
            for source in sources
        ]
        self._cache: dict[str, tuple[str, dict[str, str]] | None] = {}

    def route(self, topic: str) -> tuple[str, dict[str, str]] | None:
        """The payload format and the topic's named fields, or None for an unknown topic."""
        try:
            return self._cache[topic]
        except KeyError:
            pass
        found = None
        for topic_filter, fmt, template in self._sources:
            if topic_matches_sub(topic_filter, topic):
                fields = template.match(topic)
                if fields is not None:
                    found = (fmt, fields)
                    break
        if len(self._cache) >= _TOPIC_CACHE_LIMIT:
            self._cache.clear()
        self._cache[topic] = found
        return found


class ValidationAgent(Agent):
    """Decodes every message once, at the boundary; bad input becomes a rejection, never a crash."""

    name = "validation"

    def __init__(
        self,
        bus: Bus,
        metrics: Metrics,
        inbox: Inbox[Any],
        sources: Sequence[SourceConfig],
        max_payload_bytes: int,
    ) -> None:
        super().__init__(bus, metrics, inbox)
        self.reconfigure(sources, max_payload_bytes)

    def reconfigure(self, sources: Sequence[SourceConfig], max_payload_bytes: int) -> None:
        """New sources and size limit, applied from the next message on (SIGHUP)."""
        self._router = TopicRouter(sources)
        self._max_payload_bytes = max_payload_bytes

    async def handle(self, batch: list[RawMessage]) -> None:
        publish = self.bus.publish
        for message in batch:
            await publish(self.validate(message))

    def validate(self, message: RawMessage) -> ValidatedMessage | RejectedMessage:
        route = self._router.route(message.topic)
        if route is None:
            return RejectedMessage(
                message, UNKNOWN_TOPIC, f"topic {message.topic!r} matches no configured source"
            )
        fmt, fields = route
        device_id = fields.get("device_id")
        size = len(message.payload)
        if size > self._max_payload_bytes:
            return RejectedMessage(
                message,
                PAYLOAD_TOO_LARGE,
                f"payload is {size} bytes, the limit is {self._max_payload_bytes}",
                device_id,
            )
        try:
            readings = decode(message.payload, fmt, fields, message.received_at)
        except PayloadError as exc:
            return RejectedMessage(message, exc.reason, exc.message, device_id)
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
        return ValidatedMessage(message, readings)

    async def recover(self, held: list[RawMessage]) -> None:
        # Whatever made validation crash must not crash it again: store these as rejections.
        for message in held:
            await self.bus.publish(
                RejectedMessage(message, INTERNAL_ERROR, "validation failed unexpectedly")
            )
