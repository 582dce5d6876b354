"""Decoders by payload format, and routes: which source (filter, template, decoder) a
topic belongs to.

A decoder is chosen once per source, by its format name, when the daemon builds the
routes from the config; downstream nothing asks which one it is. A decoder is an object,
so one that needs state (a Sparkplug birth cache) or has to answer a device (a rebirth
request) gets what it needs when it is built (``DecoderContext``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agents.cache import BoundedCache
from agents.events import RawMessage
from agents.metrics import PipelineMetrics
from agents.outbound import Outbound
from edge.codecs import decode_json, decode_value
from edge.readings import Reading
from edge.topics import TopicTemplate, topic_matches

__all__ = ["Decoder", "DecoderContext", "JsonDecoder", "Route", "Router", "ValueDecoder"]

# Topics seen are cached with their route (see BoundedCache).
_TOPIC_CACHE_LIMIT = 100_000


class Decoder(Protocol):
    """Turns one message of its format into readings, or raises ``PayloadError``."""

    def decode(self, message: RawMessage, fields: dict[str, str]) -> list[Reading]:
        """The readings of ``message``; ``fields`` are what its topic named."""


@dataclass(frozen=True, slots=True)
class DecoderContext:
    """What a decoder may need besides the message: a way out, a place for state, metrics,
    and the settings of the formats that have some."""

    outbound: Outbound
    state_dir: Path
    metrics: PipelineMetrics
    prefix: str = "ingestd"  # outbound topics, e.g. {prefix}/devices/{device_id}/state
    rebirth_cooldown_seconds: float = 5.0  # Sparkplug: at most one rebirth request per node


class JsonDecoder:
    """``{"value": ..., "ts": ...}`` objects, or arrays of them."""

    def __init__(self, _context: DecoderContext) -> None:
        pass

    def decode(self, message: RawMessage, fields: dict[str, str]) -> list[Reading]:
        return decode_json(message.payload, fields, message.received_at)


class ValueDecoder:
    """A bare number; the topic names the reading and the receive time stamps it."""

    def __init__(self, _context: DecoderContext) -> None:
        pass

    def decode(self, message: RawMessage, fields: dict[str, str]) -> list[Reading]:
        return decode_value(message.payload, fields, message.received_at)


@dataclass(frozen=True, slots=True)
class Route:
    """One source: its MQTT filter, its topic template and its decoder."""

    topic_filter: str
    template: TopicTemplate
    decoder: Decoder
    format: str = ""  # the name the decoder was chosen by


class Router:
    """Finds the route a topic belongs to, first match wins, and the topic's named fields."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = list(routes)
        self._cache: BoundedCache[str, tuple[Route, dict[str, str]] | None] = BoundedCache(
            _TOPIC_CACHE_LIMIT
        )

    def route(self, topic: str) -> tuple[Route, dict[str, str]] | None:
        """The route and the topic's fields, or None for a topic no source takes."""
        try:
            return self._cache[topic]
        except KeyError:
            pass
        found = None
        for route in self.routes:
            if topic_matches(route.topic_filter, topic):
                fields = route.template.match(topic)
                if fields is not None:
                    found = (route, fields)
                    break
        return self._cache.put(topic, found)
