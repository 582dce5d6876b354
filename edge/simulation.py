"""The terms of a simulator run: what it is asked to do, what it sends, what came of it.

``SimulatorOptions`` (validated on construction, broker URL included), one ``Message``,
the ``SimulationReport`` of acknowledged messages, and ``SimulatorError``. The other
simulator modules (payloads, publishing, simulator) build on these.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, get_args
from urllib.parse import unquote, urlsplit

import orjson

from edge.errors import IngestdError

__all__ = [
    "Message",
    "PayloadFormat",
    "SimulationReport",
    "SimulatorError",
    "SimulatorOptions",
    "broker_address",
]

PayloadFormat = Literal["json", "value", "sparkplug"]


class SimulatorError(IngestdError):
    """The broker could not be reached, refused us, or dropped us mid-run."""

    def __init__(self, message: str, report: SimulationReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(slots=True)
class SimulatorOptions:
    """What to publish, where and how fast."""

    url: str = "mqtt://127.0.0.1:1883"
    devices: int = 5
    rate: float = 100.0  # messages/s across all devices; 0 = as fast as the broker acks
    count: int | None = None  # stop after this many messages
    duration: float | None = None  # stop after this many seconds
    bad_ratio: float = 0.0
    format: PayloadFormat = "json"
    topic_prefix: str = "sensors"
    qos: int = 1
    seed: int | None = None
    device_prefix: str = "dev"
    client_id: str | None = None
    batch: int = 1  # readings per JSON message, sent as an array when > 1
    connect_timeout: float = 5.0  # seconds to keep retrying the first connection
    # --format sparkplug: one edge node spBv1.0/{group}/.../{edge_node} with `devices`
    # devices of `metrics` metrics each; its first NBIRTH carries bdSeq `bdseq`.
    group: str = "plant"
    edge_node: str = "edge1"
    metrics: int = 4
    bdseq: int = 0

    def __post_init__(self) -> None:
        problems = [
            text
            for bad, text in (
                (self.devices < 1, "devices must be at least 1"),
                (not math.isfinite(self.rate) or self.rate < 0, "rate must be >= 0"),
                (self.count is not None and self.count < 0, "count must be >= 0"),
                (self.duration is not None and not self.duration >= 0, "duration must be >= 0"),
                (not 0.0 <= self.bad_ratio <= 1.0, "bad_ratio must be within 0..1"),
                (
                    self.format not in get_args(PayloadFormat),
                    "format must be json, value or sparkplug",
                ),
                (self.qos not in (0, 1, 2), "qos must be 0, 1 or 2"),
                (self.batch < 1, "batch must be at least 1"),
                (self.batch > 1 and self.format != "json", "batch needs the json format"),
                (
                    not self.topic_prefix or "+" in self.topic_prefix or "#" in self.topic_prefix,
                    "topic_prefix must be a non-empty topic without wildcards",
                ),
                (not self.connect_timeout >= 0, "connect_timeout must be >= 0"),
                (not _is_topic_level(self.group), "group must be one topic level"),
                (not _is_topic_level(self.edge_node), "edge_node must be one topic level"),
                (self.metrics < 1, "metrics must be at least 1"),
                (not 0 <= self.bdseq <= 255, "bdseq must be within 0..255"),
            )
            if bad
        ]
        if problems:
            raise ValueError("; ".join(problems))
        broker_address(self.url)


def _is_topic_level(text: str) -> bool:
    return bool(text) and not any(char in text for char in "/+#")


def broker_address(url: str) -> tuple[str, int, bool, str | None, str | None]:
    """(host, port, tls, username, password) of an ``mqtt://`` or ``mqtts://`` URL."""
    parts = urlsplit(url)
    if parts.scheme not in {"mqtt", "mqtts"} or not parts.hostname:
        raise ValueError(f"broker URL {url!r} must look like mqtt://host:port or mqtts://host:port")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError(f"broker URL {url!r} has a bad port") from None
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return parts.hostname, port, tls, username, password


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT message to publish."""

    topic: str
    payload: bytes
    readings: int  # good readings it carries; 0 when bad
    reason: str | None = None  # the reason the daemon must reject it with; None when good
    qos: int | None = None  # None: the run's qos (Sparkplug sets its own, per the spec)


@dataclass(slots=True)
class SimulationReport:
    """What the broker accepted: only acknowledged messages are counted."""

    published: int = 0
    good: int = 0
    readings: int = 0  # readings in good messages (= good unless batch > 1)
    bad: int = 0
    bad_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    rate: float = 0.0  # achieved messages/s

    def to_json(self) -> str:
        """The report as one line of JSON."""
        data = dataclasses.asdict(self)
        data["seconds"] = round(self.seconds, 3)
        data["rate"] = round(self.rate, 1)
        return orjson.dumps(data).decode()

    def count(self, message: Message) -> None:
        """Account for one acknowledged message."""
        self.published += 1
        if message.reason is None:
            self.good += 1
            self.readings += message.readings
        else:
            self.bad += 1
            self.bad_by_reason[message.reason] = self.bad_by_reason.get(message.reason, 0) + 1

    def snapshot(self, seconds: float) -> SimulationReport:
        """A copy timed at ``seconds`` since the start, safe to hand to a callback."""
        rate = self.published / seconds if seconds > 0 else 0.0
        return dataclasses.replace(
            self, bad_by_reason=dict(self.bad_by_reason), seconds=seconds, rate=rate
        )
