"""Publisher: DataProcessed, DataProcessingFailed, AnomalyDetected and MaintenanceTask
events on MQTT, after the commit.

Events are notifications; the stored row or rejection is the record. Publishing never
blocks the pipeline: while the broker is away, events that cannot be queued are
counted as dropped.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, assert_never

import orjson

from agents.alert_events import alert_event, task_event
from agents.base import Agent
from agents.bus import Bus, Inbox
from agents.cache import BoundedCache
from agents.events import AlertsStored, ReadingsStored, RejectionsStored
from agents.metrics import PipelineMetrics
from agents.outbound import Outbound
from db.rows import ReadingRow
from edge.readings import format_ts
from edge.topics import topic_segment

__all__ = ["EventSettings", "Publisher", "topic_segment"]

_TOPIC_CACHE_SIZE = 100_000


@dataclass(frozen=True, slots=True)
class EventSettings:
    """What goes out, where and how (the ``[publish]`` config, and the payload limit)."""

    prefix: str = "ingestd"
    processed: bool = True
    processed_qos: int = 0
    failed_qos: int = 1
    alerts_qos: int = 1
    max_payload_bytes: int = 64 * 1024


class Publisher(Agent):
    """Turns committed readings and rejections into outbound MQTT events."""

    name = "publisher"

    def __init__(
        self,
        bus: Bus,
        metrics: PipelineMetrics,
        inbox: Inbox[Any],
        outbound: Outbound,
        settings: EventSettings,
        release: Callable[[Iterable[int]], None] = lambda _done: None,
    ) -> None:
        super().__init__(bus, metrics, inbox)
        self._send = outbound.publish
        self._release = release  # the in-flight budget of messages whose events are out
        self._event_prefix = os.urandom(4).hex() + "-e"
        self._event_seq = 0
        self._published = metrics.events_published
        self._dropped = metrics.events_dropped
        self._processed_topics: BoundedCache[tuple[str, str], str] = BoundedCache(_TOPIC_CACHE_SIZE)
        self.reconfigure(settings)

    def reconfigure(self, settings: EventSettings) -> None:
        """New outbound settings, applied from the next event on (SIGHUP)."""
        self._prefix = settings.prefix
        self._processed = settings.processed
        self._processed_qos = settings.processed_qos
        self._failed_qos = settings.failed_qos
        self._alerts_qos = settings.alerts_qos
        self._max_payload_bytes = settings.max_payload_bytes
        self._processed_topics.clear()

    def _event_id(self) -> str:
        self._event_seq += 1
        return f"{self._event_prefix}{self._event_seq:x}"

    async def handle(self, batch: list[ReadingsStored | RejectionsStored | AlertsStored]) -> None:
        for event in batch:
            match event:
                case ReadingsStored():
                    if self._processed:
                        self._publish_processed(event)
                    self._release(event.done)
                case RejectionsStored():
                    self._publish_failed(event)
                case AlertsStored():
                    self._publish_alerts(event)
                case _:
                    assert_never(event)

    def _publish_processed(self, event: ReadingsStored) -> None:
        sent = 0
        qos, send = self._processed_qos, self._send
        for row in event.rows:
            body = {
                "event_id": self._event_id(),
                "correlation_id": row.correlation_id,
                "device_id": row.device_id,
                "sensor_id": row.sensor_id,
                "ts": format_ts(row.ts),
                "value": row.value,
                "value_text": row.value_text,
                "unit": row.unit,
                "quality": row.quality,
                "seq": row.seq,
                "site": row.site,
                "area": row.area,
                "line": row.line,
                "asset": row.asset,
                "sensor_type": row.sensor_type,
                "received_at": format_ts(row.received_at),
            }
            sent += send(self._processed_topic(row), orjson.dumps(body), qos)
        self._count("processed", sent, len(event.rows))

    def _processed_topic(self, row: ReadingRow) -> str:
        # Built once per sensor (a bounded cache: a flood of new ids must not grow it).
        key = (row.device_id, row.sensor_id)
        topic = self._processed_topics.get(key)
        if topic is None:
            topic = self._processed_topics.put(
                key,
                f"{self._prefix}/processed/{topic_segment(row.device_id)}/"
                f"{topic_segment(row.sensor_id)}",
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

    def _publish_alerts(self, event: AlertsStored) -> None:
        """One AnomalyDetected event per alert change, one MaintenanceTask event per task
        change it made (both QoS 1 by default: alerts are what people act on)."""
        alerts = tasks = task_changes = 0
        for outcome in event.outcomes:
            alerts += self._send(*alert_event(outcome, self._prefix), self._alerts_qos)
            if outcome.task is not None and outcome.task_change is not None:
                task_changes += 1
                topic, body = task_event(outcome.task, outcome.task_change, self._prefix)
                tasks += self._send(topic, body, self._alerts_qos)
        self._count("alert", alerts, len(event.outcomes))
        self._count("maintenance", tasks, task_changes)

    def _count(self, kind: str, sent: int, total: int) -> None:
        if sent:
            self._published.labels(kind).inc(sent)
        if total - sent:
            self._dropped.labels(kind).inc(total - sent)
