"""Storage: the rows it takes, the PostgreSQL and SQLite writers behind one protocol, the
local store-and-forward spool, and the schema (SQLAlchemy models, Alembic)."""

from db.backends import Backend, WriterOptions, backend_for
from db.rows import READING_COLUMNS, REJECTION_COLUMNS, ReadingRow, RejectionRow
from db.spool import Spool, SpooledBatch, SpoolError, SpoolFull, SpoolStats, read_stats
from db.writer import ERROR_KINDS, RowRejected, StorageError, Writer, WriteResult

__all__ = [
    "ERROR_KINDS",
    "READING_COLUMNS",
    "REJECTION_COLUMNS",
    "Backend",
    "ReadingRow",
    "RejectionRow",
    "RowRejected",
    "Spool",
    "SpoolError",
    "SpoolFull",
    "SpoolStats",
    "SpooledBatch",
    "StorageError",
    "WriteResult",
    "Writer",
    "WriterOptions",
    "backend_for",
    "read_stats",
]
