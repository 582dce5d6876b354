"""Alerts and maintenance tasks in SQL written once, for both writers.

The logic is a *plan*: a generator that yields ``(sql, parameters)`` steps and is sent
back each step's rows, so the same code runs on asyncpg (``run_async``, inside the write
transaction) and on sqlite3 (``run``, on the writer's thread). The SQL is the subset both
speak: ``$n`` parameters (SQLite reads them as ``?n``), ``ON CONFLICT DO NOTHING``,
``RETURNING``, ``CURRENT_TIMESTAMP``, CASE instead of ``greatest``; a parameter whose type
PostgreSQL cannot infer from a column is spelled ``CAST(... AS TEXT)``.

Idempotence comes from the schema (migration 0004): an alert's natural key
``(device_id, sensor_id, kind, ts)``, at most one open alert per series and kind, and at
most one task not closed per subject and kind (partial unique indexes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Generator, Sequence
from datetime import datetime
from typing import Any, TypeAlias, TypeVar

from db.rows import (
    ALERT_CLOSED,
    ALERT_OPEN,
    TASK_PRIORITIES,
    TASK_STATUSES,
    AlertChange,
    AlertOutcome,
    TaskRow,
)
from db.writer import OpenAlert, RowRejected, StorageError

__all__ = ["AlertStore", "Plan", "Row", "TaskQueries", "run", "run_async"]

T = TypeVar("T")
Row: TypeAlias = Sequence[Any]
Step: TypeAlias = tuple[str, tuple[object, ...]]
# Yields a statement and its parameters, is sent that statement's rows, returns a result.
Plan: TypeAlias = Generator[Step, Sequence[Row], T]

_TASK = ", ".join(TaskRow._fields)
_TASK_TIMES = frozenset(
    ("opened_at", "last_alert_at", "updated_at", "acknowledged_at", "closed_at")
)
_PRIORITY_RANK = (
    "CASE priority "
    + " ".join(f"WHEN '{name}' THEN {rank}" for rank, name in enumerate(TASK_PRIORITIES))
    + " END"
)

_INSERT_ALERT = (
    "INSERT INTO anomaly_alerts (ts, device_id, sensor_id, kind, value, score, detail,"
    " correlation_id, unit, site, area, line, asset, sensor_type) VALUES"
    " ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
    " ON CONFLICT DO NOTHING RETURNING id"
)
# An alert joins the task not closed of its subject and kind: one more alert, the latest
# reading's time, the higher of the two priorities.
_ATTACH = (
    "UPDATE maintenance_tasks SET alert_count = alert_count + 1,"
    " last_alert_at = CASE WHEN last_alert_at < $3 THEN $3 ELSE last_alert_at END,"
    f" priority = CASE WHEN {_PRIORITY_RANK} < $4 THEN CAST($5 AS TEXT) ELSE priority END,"
    " updated_at = CURRENT_TIMESTAMP"
    f" WHERE subject = $1 AND kind = $2 AND status <> 'closed' RETURNING {_TASK}"
)
# ON CONFLICT: another transaction opened the task first (PostgreSQL); attach to it then.
_OPEN_TASK = (
    "INSERT INTO maintenance_tasks (subject, kind, device_id, sensor_id, status, priority,"
    " description, opened_at, last_alert_at, site, area, line, asset) VALUES"
    " ($1, $2, $3, $4, 'open', $5, $6, $7, $7, $8, $9, $10, $11)"
    f" ON CONFLICT DO NOTHING RETURNING {_TASK}"
)
_LINK = "UPDATE anomaly_alerts SET task_id = $2 WHERE id = $1"
# Only an alert opened at or before the closing: a closing applied again (a replay) must not
# close the episode that opened after it.
_CLOSE_ALERT = (
    "UPDATE anomaly_alerts SET closed_at = $4, updated_at = CURRENT_TIMESTAMP"
    " WHERE device_id = $1 AND sensor_id = $2 AND kind = $3 AND closed_at IS NULL"
    " AND ts <= $4 RETURNING id, ts, task_id"
)
_AUTO_CLOSE_TASK = (
    "UPDATE maintenance_tasks SET status = 'closed', closed_at = CURRENT_TIMESTAMP,"
    " updated_at = CURRENT_TIMESTAMP WHERE id = $1 AND status <> 'closed' AND NOT EXISTS"
    " (SELECT 1 FROM anomaly_alerts WHERE task_id = $1 AND closed_at IS NULL)"
    f" RETURNING {_TASK}"
)
# By hand: a task moves forward only (open -> acknowledged -> closed), never back.
_SET_STATUS = {
    "acknowledged": (
        "UPDATE maintenance_tasks SET status = 'acknowledged',"
        " acknowledged_at = CURRENT_TIMESTAMP, updated_at = CURRENT_TIMESTAMP"
        f" WHERE id = $1 AND status = 'open' RETURNING {_TASK}"
    ),
    "closed": (
        "UPDATE maintenance_tasks SET status = 'closed', closed_at = CURRENT_TIMESTAMP,"
        f" updated_at = CURRENT_TIMESTAMP WHERE id = $1 AND status <> 'closed' RETURNING {_TASK}"
    ),
}
_TASK_BY_ID = f"SELECT {_TASK} FROM maintenance_tasks WHERE id = $1"
_TASKS = f"SELECT {_TASK} FROM maintenance_tasks ORDER BY id DESC LIMIT $1"
_TASKS_IN = f"SELECT {_TASK} FROM maintenance_tasks WHERE status = $2 ORDER BY id DESC LIMIT $1"
_TASK_COUNTS = "SELECT status, priority, count(*) FROM maintenance_tasks GROUP BY status, priority"
_OPEN_ALERTS = (
    "SELECT device_id, sensor_id, kind, ts, sensor_type FROM anomaly_alerts"
    " WHERE closed_at IS NULL ORDER BY id"
)


class AlertStore:
    """The plans of the alert and task operations, for a database whose stored timestamps
    ``to_time`` turns into aware datetimes (the one thing the two drivers read differently)."""

    def __init__(self, to_time: Callable[[Any], datetime]) -> None:
        self._to_time = to_time

    def apply(self, changes: Sequence[AlertChange]) -> Plan[list[AlertOutcome]]:
        """Apply changes in order; an outcome for each one that changed something."""
        outcomes: list[AlertOutcome] = []
        for change in changes:
            if change.state == ALERT_OPEN:
                outcome = yield from self._open(change)
            elif change.state == ALERT_CLOSED:
                outcome = yield from self._close(change)
            else:
                raise RowRejected(f"unknown alert state {change.state!r}")
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    def _open(self, change: AlertChange) -> Plan[AlertOutcome | None]:
        # No row: this alert is stored already, or another of its series and kind is open.
        rows = yield _INSERT_ALERT, (
            change.ts, change.device_id, change.sensor_id, change.kind, change.value,
            change.score, change.detail, change.correlation_id, change.unit, change.site,
            change.area, change.line, change.asset, change.sensor_type,
        )  # fmt: skip
        if not rows:
            return None
        alert_id = int(rows[0][0])
        task, task_change = yield from self._feed_task(change)
        yield _LINK, (alert_id, task.id)
        return AlertOutcome(change, alert_id, change.ts, task, task_change)

    def _feed_task(self, change: AlertChange) -> Plan[tuple[TaskRow, str]]:
        if change.priority not in TASK_PRIORITIES:
            raise RowRejected(f"unknown task priority {change.priority!r}")
        rank = TASK_PRIORITIES.index(change.priority)
        for _ in range(2):  # a second round only after losing a race to open the task
            rows = yield _ATTACH, (change.subject, change.kind, change.ts, rank, change.priority)
            if rows:
                return self._task(rows[0]), "attached"
            rows = yield _OPEN_TASK, (
                change.subject, change.kind, change.device_id, change.sensor_id,
                change.priority, change.task_description, change.ts, change.site,
                change.area, change.line, change.asset,
            )  # fmt: skip
            if rows:
                return self._task(rows[0]), "opened"
        raise StorageError(f"the task of {change.subject}/{change.kind} changed under this write")

    def _close(self, change: AlertChange) -> Plan[AlertOutcome | None]:
        rows = yield _CLOSE_ALERT, (change.device_id, change.sensor_id, change.kind, change.ts)
        if not rows:
            return None  # nothing open: closed already, or never opened
        alert_id, opened, task_id = rows[0]
        outcome = AlertOutcome(change, int(alert_id), self._to_time(opened), None, None)
        if change.auto_close_task and task_id is not None:
            # Only once none of the task's alerts is open any more (this one is closed now).
            rows = yield _AUTO_CLOSE_TASK, (task_id,)
            if rows:
                return outcome._replace(task=self._task(rows[0]), task_change="closed")
        return outcome

    def set_task_status(self, task_id: int, status: str) -> Plan[TaskRow | None]:
        """Acknowledge or close a task; unchanged when it has that status or a later one.
        Raises ``ValueError`` at once for a status that is not one of ``TASK_STATUSES``."""
        if status not in TASK_STATUSES:
            raise ValueError(f"unknown task status {status!r}; one of {', '.join(TASK_STATUSES)}")
        return self._set_task_status(task_id, status)

    def _set_task_status(self, task_id: int, status: str) -> Plan[TaskRow | None]:
        if status in _SET_STATUS:
            rows = yield _SET_STATUS[status], (task_id,)
            if rows:
                return self._task(rows[0])
        rows = yield _TASK_BY_ID, (task_id,)
        return self._task(rows[0]) if rows else None

    def task(self, task_id: int) -> Plan[TaskRow | None]:
        """One task by id, or None."""
        rows = yield _TASK_BY_ID, (task_id,)
        return self._task(rows[0]) if rows else None

    def tasks(self, status: str | None, limit: int) -> Plan[list[TaskRow]]:
        """Tasks newest first, only those in ``status`` when given."""
        if status is None:
            rows = yield _TASKS, (limit,)
        else:
            rows = yield _TASKS_IN, (limit, status)
        return [self._task(row) for row in rows]

    def task_counts(self) -> Plan[dict[tuple[str, str], int]]:
        """Tasks by ``(status, priority)``."""
        rows = yield _TASK_COUNTS, ()
        return {(status, priority): int(n) for status, priority, n in rows}

    def open_alerts(self) -> Plan[list[OpenAlert]]:
        """Every alert open now, oldest first."""
        rows = yield _OPEN_ALERTS, ()
        return [OpenAlert(d, s, k, self._to_time(ts), t) for d, s, k, ts, t in rows]

    def _task(self, row: Row) -> TaskRow:
        return TaskRow._make(
            self._to_time(value) if name in _TASK_TIMES and value is not None else value
            for name, value in zip(TaskRow._fields, row, strict=True)
        )


def run(plan: Plan[T], fetch: Callable[[str, tuple[object, ...]], Sequence[Row]]) -> T:
    """Carry out a plan with a blocking ``fetch(sql, parameters) -> rows``."""
    try:
        step = next(plan)
        while True:
            step = plan.send(fetch(*step))
    except StopIteration as done:
        result: T = done.value
        return result


async def run_async(
    plan: Plan[T], fetch: Callable[[str, tuple[object, ...]], Awaitable[Sequence[Row]]]
) -> T:
    """Carry out a plan with an asynchronous ``fetch(sql, parameters) -> rows``."""
    try:
        step = next(plan)
        while True:
            step = plan.send(await fetch(*step))
    except StopIteration as done:
        result: T = done.value
        return result


class TaskQueries(ABC):
    """The alert and task reads and the hand-made task changes, the same for every writer:
    each a plan of :class:`AlertStore` run by the writer's own ``_run`` (its connection,
    timeout and error kinds)."""

    _alerts: AlertStore

    @abstractmethod
    async def _run(self, plan: Plan[T], what: str) -> T:
        """Run one plan outside a batch; StorageError (or RowRejected) when it fails."""

    async def open_alerts(self) -> list[OpenAlert]:
        """Every alert open now, oldest first."""
        return await self._run(self._alerts.open_alerts(), "cannot read open alerts: ")

    async def tasks(self, status: str | None = None, limit: int = 100) -> list[TaskRow]:
        """Maintenance tasks, newest first; only those in ``status`` when given."""
        return await self._run(self._alerts.tasks(status, limit), "cannot read tasks: ")

    async def task(self, task_id: int) -> TaskRow | None:
        """One maintenance task by id, or None."""
        return await self._run(self._alerts.task(task_id), "cannot read the task: ")

    async def set_task_status(self, task_id: int, status: str) -> TaskRow | None:
        """Acknowledge or close a task; unchanged when it has that status or a later one."""
        plan = self._alerts.set_task_status(task_id, status)  # ValueError: an unknown status
        return await self._run(plan, "cannot change the task: ")

    async def task_counts(self) -> dict[tuple[str, str], int]:
        """Tasks by ``(status, priority)``."""
        return await self._run(self._alerts.task_counts(), "cannot count tasks: ")
