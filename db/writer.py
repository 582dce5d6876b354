"""What every storage backend offers: idempotent batch writes, a ping, the devices table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, NamedTuple, Protocol

from db.rows import AlertChange, AlertOutcome, ReadingRow, RejectionRow, TaskRow
from edge.errors import IngestdError

__all__ = ["ErrorKind", "OpenAlert", "RowRejected", "StorageError", "WriteResult", "Writer"]

# Why a database call failed, as the ingestd_database_errors_total{kind} label says it: a
# fixed set, so every series exists from the first scrape.
ErrorKind = Literal["unreachable", "timeout", "failed"]
ERROR_KINDS: tuple[ErrorKind, ...] = ("unreachable", "timeout", "failed")


class StorageError(IngestdError):
    """The database could not take a batch (unreachable, failing, timed out): retry later."""

    def __init__(self, message: str, kind: ErrorKind = "failed") -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind


class RowRejected(StorageError):
    """The database refused the data itself: retrying the same rows cannot succeed."""


@dataclass(slots=True)
class WriteResult:
    """Which readings of a batch were new rows, how many rejections were stored, and what
    the batch's alert changes did (only the changes applied now)."""

    new: list[bool]
    rejections_stored: int
    alerts: list[AlertOutcome] = field(default_factory=list)


class OpenAlert(NamedTuple):
    """An alert still open in the database: the AnomalyAgent resumes it after a restart."""

    device_id: str
    sensor_id: str
    kind: str
    ts: datetime
    sensor_type: str | None = None  # the series' rules are its sensor type's


class Writer(Protocol):
    """A storage backend: one idempotent transaction per batch."""

    async def start(self) -> None:
        """Connect; raises ``StorageError`` while the database is away."""

    async def write(
        self,
        readings: Sequence[ReadingRow],
        rejections: Sequence[RejectionRow],
        *,
        replay: bool = False,
        alerts: Sequence[AlertChange] = (),
    ) -> WriteResult:
        """Store rows in one transaction. ``replay``: they may be stored already.

        ``alerts`` are applied in order in the same transaction: an opening inserts its
        alert (unless that alert, or another of its series and kind, is open or stored)
        and attaches it to the open task of its subject and kind, or opens one; a closing
        closes the open alert of its series and kind (and, with ``auto_close_task``, the
        task it fed once none of that task's alerts is open). Applied twice, nothing changes twice.
        """

    async def open_alerts(self) -> list[OpenAlert]:
        """Every alert that is open now."""

    async def tasks(self, status: str | None = None, limit: int = 100) -> list[TaskRow]:
        """Maintenance tasks, newest first; only those in ``status`` when given."""

    async def task(self, task_id: int) -> TaskRow | None:
        """One maintenance task by id, or None."""

    async def set_task_status(self, task_id: int, status: str) -> TaskRow | None:
        """Acknowledge or close a task by hand; the task as it is now (unchanged when it
        already had that status or a later one), or None when there is no such task."""

    async def task_counts(self) -> dict[tuple[str, str], int]:
        """Tasks by ``(status, priority)``."""

    async def ping(self) -> None:
        """Raise ``StorageError`` unless the database answers now."""

    async def load_devices(self) -> list[dict[str, Any]]:
        """Rows of the ``devices`` table (the registry's second source)."""

    async def close(self, grace_seconds: float = 5.0) -> None:
        """Close within ``grace_seconds``, then drop what is left."""
