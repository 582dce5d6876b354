"""Storage: the rows it takes, the PostgreSQL and SQLite writers behind one protocol, the
local store-and-forward spool, and the schema (SQLAlchemy models, Alembic)."""

from db.backends import Backend, WriterOptions, backend_for
from db.rows import (
    ALERT_CLOSED,
    ALERT_OPEN,
    READING_COLUMNS,
    REJECTION_COLUMNS,
    TASK_PRIORITIES,
    TASK_STATUSES,
    AlertChange,
    AlertOutcome,
    ReadingRow,
    RejectionRow,
    TaskRow,
)
from db.spool import Spool, SpooledBatch, SpoolError, SpoolFull, SpoolStats, read_stats
from db.writer import ERROR_KINDS, OpenAlert, RowRejected, StorageError, Writer, WriteResult

__all__ = [
    "ALERT_CLOSED",
    "ALERT_OPEN",
    "ERROR_KINDS",
    "READING_COLUMNS",
    "REJECTION_COLUMNS",
    "TASK_PRIORITIES",
    "TASK_STATUSES",
    "AlertChange",
    "AlertOutcome",
    "Backend",
    "OpenAlert",
    "ReadingRow",
    "RejectionRow",
    "RowRejected",
    "Spool",
    "SpoolError",
    "SpoolFull",
    "SpoolStats",
    "SpooledBatch",
    "StorageError",
    "TaskRow",
    "WriteResult",
    "Writer",
    "WriterOptions",
    "backend_for",
    "read_stats",
]
