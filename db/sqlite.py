"""SQLite writer for the embedded default: WAL, ``INSERT OR IGNORE``, one transaction per batch.

sqlite3 blocks, so every call runs on one dedicated thread (a SQLite connection must not
be shared across threads). ``synchronous=FULL``: a batch acknowledged to the broker
survives a power cut, not only a process kill.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agents.events import RawMessage, RejectedMessage
from db.thread import DedicatedThread
from db.writer import (
    READING_COLUMNS,
    REJECTION_COLUMNS,
    RowRejected,
    StorageError,
    WriteResult,
    reading_row,
    rejection_row,
)
from edge.codecs import Reading

_INSERT_READING = (
    f"INSERT OR IGNORE INTO sensor_readings ({', '.join(READING_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(READING_COLUMNS))})"
)
_INSERT_REJECTION = (
    f"INSERT INTO rejected_messages ({', '.join(REJECTION_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(REJECTION_COLUMNS))})"
)
_REJECTION_EXISTS = "SELECT 1 FROM rejected_messages WHERE topic = ? AND payload_sha256 = ? LIMIT 1"


def sqlite_ts(ts: datetime) -> str:
    """The text form SQLAlchemy's DateTime uses on SQLite (UTC), so the ORM reads our rows."""
    return ts.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


class SqliteWriter:
    """Writes batches of readings and rejections to a local SQLite file."""

    def __init__(self, path: Path, *, max_payload_bytes: int, busy_timeout: float = 15.0) -> None:
        self._path = path
        self.max_payload_bytes = max_payload_bytes
        self._busy_timeout = busy_timeout
        self._thread = DedicatedThread("ingestd-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def start(self) -> None:
        await self._thread.call(self._open)

    def _open(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                conn = sqlite3.connect(
                    self._path,
                    timeout=self._busy_timeout,
                    isolation_level=None,
                    check_same_thread=False,
                )
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                raise StorageError(f"cannot open {self._path}: {exc}") from exc
            self._conn = conn
        return self._conn

    async def write(
        self, readings: list[tuple[Reading, RawMessage]], rejections: list[RejectedMessage]
    ) -> WriteResult:
        reading_rows = [_sqlite_reading(reading, message) for reading, message in readings]
        rejection_rows = [
            (_sqlite_rejection(r, self.max_payload_bytes), r.message.dup) for r in rejections
        ]
        result: WriteResult = await self._thread.call(self._write, reading_rows, rejection_rows)
        return result

    def _write(
        self,
        reading_rows: list[tuple[Any, ...]],
        rejection_rows: list[tuple[tuple[Any, ...], bool]],
    ) -> WriteResult:
        conn = self._open()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                new = [conn.execute(_INSERT_READING, row).rowcount == 1 for row in reading_rows]
                stored = 0
                for row, dup in rejection_rows:
                    if dup and conn.execute(_REJECTION_EXISTS, (row[1], row[3])).fetchone():
                        continue
                    conn.execute(_INSERT_REJECTION, row)
                    stored += 1
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except (
            sqlite3.IntegrityError,
            sqlite3.DataError,
            sqlite3.InterfaceError,
            UnicodeError,
        ) as exc:
            raise RowRejected(f"{type(exc).__name__}: {exc}") from exc
        except sqlite3.Error as exc:
            raise StorageError(f"{type(exc).__name__}: {exc}") from exc
        return WriteResult(new, stored)

    async def load_devices(self) -> list[dict[str, Any]]:
        def load() -> list[dict[str, Any]]:
            conn = self._open()
            try:
                cursor = conn.execute("SELECT * FROM devices")
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read devices: {exc}") from exc
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

        rows: list[dict[str, Any]] = await self._thread.call(load)
        return rows

    async def close(self, grace_seconds: float = 5.0) -> None:
        if self._conn is not None:
            # A write waiting on a lock would hold the thread for the busy timeout: end it.
            self._conn.interrupt()

        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._thread.call(close)
        self._thread.close()


def _sqlite_reading(reading: Reading, message: RawMessage) -> tuple[Any, ...]:
    row = list(reading_row(reading, message))
    row[2] = sqlite_ts(reading.ts)
    row[12] = sqlite_ts(message.received_at)
    return tuple(row)


def _sqlite_rejection(rejection: RejectedMessage, max_payload_bytes: int) -> tuple[Any, ...]:
    row = list(rejection_row(rejection, max_payload_bytes))
    row[0] = sqlite_ts(rejection.message.received_at)
    return tuple(row)
