"""The AnomalyDetected and MaintenanceTask events: topics and JSON bodies.

Event ids are derived from what the event is about (an alert's natural key and state, a
task's id and change), so a consumer can recognise the same event if it ever comes twice.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

import orjson

from db.rows import ALERT_CLOSED, AlertOutcome, TaskRow
from edge.readings import format_ts
from edge.topics import topic_segment

__all__ = ["alert_event", "task_event"]


def _event_id(*parts: object) -> str:
    text = "\x00".join(str(part) for part in parts)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _ts(ts: datetime | None) -> str | None:
    return None if ts is None else format_ts(ts)


def _natural_key(outcome: AlertOutcome) -> tuple[object, ...]:
    change = outcome.change
    return (change.device_id, change.sensor_id, change.kind, outcome.opened_ts)


def alert_event(outcome: AlertOutcome, prefix: str) -> tuple[str, bytes]:
    """``{prefix}/alerts/{device_id}/{sensor_id}`` and its AnomalyDetectedEvent."""
    change = outcome.change
    body = {
        "event_id": _event_id("alert", *_natural_key(outcome), change.state),
        "correlation_id": change.correlation_id,
        "alert_id": outcome.alert_id,
        "ts": format_ts(outcome.opened_ts),
        "closed_at": format_ts(change.ts) if change.state == ALERT_CLOSED else None,
        "device_id": change.device_id,
        "sensor_id": change.sensor_id,
        "value": change.value,
        "kind": change.kind,
        "score": change.score,
        "state": change.state,
        "detail": change.detail,
        "unit": change.unit,
        "site": change.site,
        "area": change.area,
        "line": change.line,
        "asset": change.asset,
        "sensor_type": change.sensor_type,
        "task_id": outcome.task.id if outcome.task else None,
    }
    topic = f"{prefix}/alerts/{topic_segment(change.device_id)}/{topic_segment(change.sensor_id)}"
    return topic, orjson.dumps(body)


def task_event(task: TaskRow, change: str, prefix: str) -> tuple[str, bytes]:
    """``{prefix}/maintenance/{device_id}`` and its MaintenanceTaskEvent; ``change`` is what
    happened: opened, attached (another alert), acknowledged or closed."""
    body = {
        "event_id": _event_id("task", task.id, change, task.alert_count, task.status),
        "change": change,
        "task_id": task.id,
        "subject": task.subject,
        "kind": task.kind,
        "device_id": task.device_id,
        "sensor_id": task.sensor_id,
        "status": task.status,
        "priority": task.priority,
        "description": task.description,
        "alert_count": task.alert_count,
        "opened_at": format_ts(task.opened_at),
        "last_alert_at": format_ts(task.last_alert_at),
        "updated_at": format_ts(task.updated_at),
        "acknowledged_at": _ts(task.acknowledged_at),
        "closed_at": _ts(task.closed_at),
        "site": task.site,
        "area": task.area,
        "line": task.line,
        "asset": task.asset,
    }
    return f"{prefix}/maintenance/{topic_segment(task.device_id)}", orjson.dumps(body)
