"""Publisher: DataProcessed and DataProcessingFailed events on MQTT, after the commit.

Events are notifications; the stored row or rejection is the record. Publishing never
blocks the pipeline: while the broker is away, events that cannot be queued are
counted as dropped.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from typing import Any

import orjson

from agents.base import Agent
from agents.bus import Bus, Inbox
from agents.events import ReadingsStored, RejectionsStored
from daemon.metrics import Metrics
from edge.codecs import Reading, format_ts

Send = Callable[[str, bytes, int], bool]
_TOPIC_CACHE_SIZE = 100_000
_TOPIC_UNSAFE = str.maketrans({"/": "_", "+": "_", "#": "_", "\x00": "_"})


def topic_segment(text: str | None) -> str:
    """A value safe as one topic level (no separators or wildcards)."""
    return text.translate(_TOPIC_UNSAFE) if text else "_unknown"


class Publisher(Agent):
    """Turns committed readings and rejections into outbound MQTT events."""

    name = "publisher"

    def __init__(
        self,
        bus: Bus,
        metrics: Metrics,
        inbox: Inbox[Any],
        send: Send,
        *,
        prefix: str,
        processed: bool,
        processed_qos: int,
        failed_qos: int,
        max_payload_bytes: int,
    ) -> None:
        super().__init__(bus, metrics, inbox)
        self._send = send
        self._event_prefix = os.urandom(4).hex() + "-e"
        self._event_seq = 0
        self._published = metrics.events_published
        self._dropped = metrics.events_dropped
        self._processed_topics: dict[tuple[str, str], str] = {}
        self.reconfigure(
            prefix=prefix, processed=processed, processed_qos=processed_qos,
            failed_qos=failed_qos, max_payload_bytes=max_payload_bytes,
        )  # fmt: skip

    def reconfigure(
        self,
        *,
        prefix: str,
        processed: bool,
        processed_qos: int,
        failed_qos: int,
        max_payload_bytes: int,
    ) -> None:
        """New outbound settings, applied from the next event on (SIGHUP)."""
        self._prefix = prefix
        self._processed = processed
        self._processed_qos = processed_qos
        self._failed_qos = failed_qos
        self._max_payload_bytes = max_payload_bytes
        self._processed_topics.clear()

    def _event_id(self) -> str:
        self._event_seq += 1
        return f"{self._event_prefix}{self._event_seq:x}"

    async def handle(self, batch: list[ReadingsStored | RejectionsStored]) -> None:
        for event in batch:
            if type(event) is ReadingsStored:
                if self._processed:
                    self._publish_processed(event)
            else:
                self._publish_failed(event)  # type: ignore[arg-type]

    def _publish_processed(self, event: ReadingsStored) -> None:
        sent = 0
        qos, send = self._processed_qos, self._send
        for reading, message in event.readings:
            body = {
                "event_id": self._event_id(),
                "correlation_id": message.correlation_id,
                "device_id": reading.device_id,
                "sensor_id": reading.sensor_id,
                "ts": format_ts(reading.ts),
                "value": reading.value,
                "unit": reading.unit,
                "quality": reading.quality,
                "seq": reading.seq,
                "site": reading.site,
                "area": reading.area,
                "line": reading.line,
                "asset": reading.asset,
                "sensor_type": reading.sensor_type,
                "received_at": format_ts(message.received_at),
            }
            sent += send(self._processed_topic(reading), orjson.dumps(body), qos)
        self._count("processed", sent, len(event.readings))

    def _processed_topic(self, reading: Reading) -> str:
        # Built once per sensor: a plant has a bounded set of them, but a flood of new ids
        # must not grow this without bound.
        key = (reading.device_id, reading.sensor_id)
        topic = self._processed_topics.get(key)
        if topic is None:
            if len(self._processed_topics) >= _TOPIC_CACHE_SIZE:
                self._processed_topics.clear()
            topic = self._processed_topics[key] = (
                f"{self._prefix}/processed/{topic_segment(reading.device_id)}/"
                f"{topic_segment(reading.sensor_id)}"
            )
        return topic

    def _publish_failed(self, event: RejectionsStored) -> None:
        sent = 0
        for rejection in event.rejections:
            message = rejection.message
            body = {
                "event_id": self._event_id(),
                "correlation_id": message.correlation_id,
                "reason": rejection.reason,
                "error": rejection.error,
                "topic": message.topic,
                "device_id": rejection.device_id,
                # The same truncated copy rejected_messages keeps.
                "payload": base64.b64encode(message.payload[: self._max_payload_bytes]).decode(),
                "payload_size": len(message.payload),
                "received_at": format_ts(message.received_at),
            }
            topic = f"{self._prefix}/failed/{topic_segment(rejection.device_id)}"
            sent += self._send(topic, orjson.dumps(body), self._failed_qos)
        self._count("failed", sent, len(event.rejections))

    def _count(self, kind: str, sent: int, total: int) -> None:
        if sent:
            self._published.labels(kind).inc(sent)
        if total - sent:
            self._dropped.labels(kind).inc(total - sent)
