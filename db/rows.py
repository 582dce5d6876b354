"""The rows storage takes: a stored reading and a dead letter, by column name.

Writers, the spool and the drainer all speak these; agents build them from events.
NamedTuples: named for readers, plain tuples for the drivers (and cheap to build, once
per reading on the hot path).
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

__all__ = [
    "ALERT_CLOSED",
    "ALERT_OPEN",
    "READING_COLUMNS",
    "REJECTION_COLUMNS",
    "TASK_PRIORITIES",
    "TASK_STATUSES",
    "AlertChange",
    "AlertOutcome",
    "ReadingRow",
    "RejectionRow",
    "TaskRow",
]


class ReadingRow(NamedTuple):
    """One row of ``sensor_readings``."""

    device_id: str
    sensor_id: str
    ts: datetime
    value: float | None  # NULL exactly when value_text is set
    unit: str | None
    quality: str | None
    seq: int | None
    site: str | None
    area: str | None
    line: str | None
    asset: str | None
    sensor_type: str | None
    received_at: datetime
    correlation_id: str
    value_text: str | None = None  # non-numeric values (Sparkplug strings, arrays, DataSets)


class RejectionRow(NamedTuple):
    """One row of ``rejected_messages``, and whether it may be stored already."""

    received_at: datetime
    topic: str
    payload: bytes  # the first ``ingest.max_payload_bytes`` of it
    payload_sha256: str
    payload_size: int
    reason: str
    error: str
    device_id: str | None
    correlation_id: str
    # A redelivery (MQTT DUP) or a replay from the spool: stored only if not there yet.
    redelivered: bool = False

    def values(self) -> tuple[object, ...]:
        """The column values, in ``REJECTION_COLUMNS`` order."""
        return self[: len(REJECTION_COLUMNS)]


READING_COLUMNS = ReadingRow._fields
REJECTION_COLUMNS = RejectionRow._fields[:-1]


class AlertChange(NamedTuple):
    """An alert opening or closing, as the AnomalyAgent decided it; writers apply it
    idempotently (an alert's natural key is ``(device_id, sensor_id, kind, ts)``), and at
    most one alert per ``(device_id, sensor_id, kind)`` is open at a time.

    An opening carries the task it feeds when no task is open for ``(subject, kind)``
    (``priority`` and ``task_description``, chosen by the MaintenanceAgent); a closing closes
    whichever alert of its ``(device_id, sensor_id, kind)`` is open, and ``ts`` is then the
    time of the reading at which the series had been normal for ``anomaly.clear_seconds``.
    """

    state: str  # ALERT_OPEN | ALERT_CLOSED
    device_id: str
    sensor_id: str
    kind: str  # out_of_range | flatline | anomaly
    ts: datetime  # a reading's ts, never the wall clock
    value: float | None  # that reading's value
    score: float  # 0-1: 1 for limits and frozen values, the detector's score otherwise
    detail: str  # what was seen, in words
    correlation_id: str | None
    unit: str | None = None
    site: str | None = None
    area: str | None = None
    line: str | None = None
    asset: str | None = None
    sensor_type: str | None = None
    priority: str = "medium"  # of the task an opening creates or raises: low | medium | high
    task_description: str = ""
    # A closing: also close the task this alert fed when none of its alerts is open any more.
    auto_close_task: bool = False

    @property
    def subject(self) -> str:
        """What a maintenance task is about: the asset when the registry names one."""
        return self.asset or self.device_id


ALERT_OPEN = "open"
ALERT_CLOSED = "closed"
TASK_STATUSES = ("open", "acknowledged", "closed")
TASK_PRIORITIES = ("low", "medium", "high")  # in rising order


class TaskRow(NamedTuple):
    """One row of ``maintenance_tasks``, as it is after a change."""

    id: int
    subject: str  # the asset, or the device when the registry names no asset
    kind: str
    device_id: str
    sensor_id: str | None  # the sensor of the alert that opened the task
    status: str  # TASK_STATUSES
    priority: str  # TASK_PRIORITIES
    description: str
    alert_count: int
    opened_at: datetime  # ts of the reading that opened its first alert
    last_alert_at: datetime  # ts of the reading that opened its latest alert
    updated_at: datetime  # wall clock of the last change
    acknowledged_at: datetime | None
    closed_at: datetime | None
    site: str | None
    area: str | None
    line: str | None
    asset: str | None


class AlertOutcome(NamedTuple):
    """What applying one AlertChange did; writers return one only for changes they applied
    (a replayed or repeated change, or a closing with nothing open, returns none)."""

    change: AlertChange
    alert_id: int
    opened_ts: datetime  # the alert's ts: for a closing, when the alert it closed opened
    task: TaskRow | None  # the task after this change, when the change touched one
    task_change: str | None  # "opened" | "attached" | "closed" (auto-close), with ``task``
