"""SQLite writer for the embedded default: WAL, ``INSERT OR IGNORE``, one transaction per batch.

sqlite3 blocks, so every call runs on one dedicated thread (a SQLite connection must not
be shared across threads). ``synchronous=FULL``: a batch acknowledged to the broker
survives a power cut, not only a process kill.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from db.alerts import AlertStore, Plan, Row, TaskQueries, run
from db.rows import (
    READING_COLUMNS,
    REJECTION_COLUMNS,
    AlertChange,
    ReadingRow,
    RejectionRow,
)
from db.thread import DedicatedThread
from db.writer import RowRejected, StorageError, WriteResult

__all__ = ["SqliteWriter", "sqlite_ts"]

T = TypeVar("T")

_INSERT_READING = (
    f"INSERT OR IGNORE INTO sensor_readings ({', '.join(READING_COLUMNS)}) "
    f"VALUES ({', '.join(':' + name for name in READING_COLUMNS)})"
)
_INSERT_REJECTION = (
    f"INSERT INTO rejected_messages ({', '.join(REJECTION_COLUMNS)}) "
    f"VALUES ({', '.join(':' + name for name in REJECTION_COLUMNS)})"
)
_REPLAYED_EXISTS = "SELECT 1 FROM rejected_messages WHERE correlation_id = :correlation_id LIMIT 1"
_REJECTION_EXISTS = (
    "SELECT 1 FROM rejected_messages WHERE topic = :topic AND payload_sha256 = :payload_sha256"
    " LIMIT 1"
)


def sqlite_ts(ts: datetime) -> str:
    """The text form SQLAlchemy's DateTime uses on SQLite (UTC), so the ORM reads our rows."""
    return ts.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def _aware(stored: str) -> datetime:
    """A stored timestamp (sqlite_ts, or CURRENT_TIMESTAMP's seconds) as an aware datetime."""
    return datetime.fromisoformat(stored).replace(tzinfo=UTC)


@cache
def _numbered(sql: str) -> str:
    """db.alerts' ``$n`` parameters as SQLite's ``?n``."""
    return re.sub(r"\$(\d+)", r"?\1", sql)


def _fetcher(conn: sqlite3.Connection) -> Callable[[str, tuple[object, ...]], list[Row]]:
    def fetch(sql: str, parameters: tuple[object, ...]) -> list[Row]:
        values = tuple(sqlite_ts(v) if isinstance(v, datetime) else v for v in parameters)
        return conn.execute(_numbered(sql), values).fetchall()

    return fetch


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextmanager
def _storage_errors(what: str = "") -> Iterator[None]:
    """sqlite3's errors as the writer's: refused data, or a database that failed."""
    try:
        yield
    except (
        sqlite3.IntegrityError,
        sqlite3.DataError,
        sqlite3.InterfaceError,
        UnicodeError,
    ) as exc:
        raise RowRejected(f"{what}{type(exc).__name__}: {exc}") from exc
    except sqlite3.Error as exc:
        raise StorageError(f"{what}{type(exc).__name__}: {exc}") from exc


class SqliteWriter(TaskQueries):
    """Writes batches of readings and rejections to a local SQLite file."""

    def __init__(self, path: Path, *, busy_timeout: float = 15.0) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._thread = DedicatedThread("ingestd-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._alerts = AlertStore(_aware)

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
        self,
        readings: Sequence[ReadingRow],
        rejections: Sequence[RejectionRow],
        *,
        replay: bool = False,
        alerts: Sequence[AlertChange] = (),
    ) -> WriteResult:
        """Store rows and apply alert changes in one transaction; a redelivered or replayed
        dead letter only once."""
        # Named parameters, with times in the text form SQLAlchemy reads back.
        reading_rows = [
            {**row._asdict(), "ts": sqlite_ts(row.ts), "received_at": sqlite_ts(row.received_at)}
            for row in readings
        ]
        rejection_rows = [
            ({**row._asdict(), "received_at": sqlite_ts(row.received_at)}, row.redelivered, replay)
            for row in rejections
        ]
        result: WriteResult = await self._thread.call(
            self._write, reading_rows, rejection_rows, alerts
        )
        return result

    async def ping(self) -> None:
        await self._thread.call(self._ping)

    def _ping(self) -> None:
        try:
            self._open().execute("SELECT 1")
        except sqlite3.Error as exc:
            raise StorageError(f"{type(exc).__name__}: {exc}", "unreachable") from exc

    def _write(
        self,
        reading_rows: list[dict[str, Any]],
        rejection_rows: list[tuple[dict[str, Any], bool, bool]],
        alerts: Sequence[AlertChange],
    ) -> WriteResult:
        conn = self._open()
        with _storage_errors(), _transaction(conn):
            new = [conn.execute(_INSERT_READING, row).rowcount == 1 for row in reading_rows]
            stored = _insert_rejections(conn, rejection_rows)
            outcomes = run(self._alerts.apply(alerts), _fetcher(conn))
        return WriteResult(new, stored, outcomes)

    async def _run(self, plan: Plan[T], what: str) -> T:
        """One plan outside a batch: each of its statements commits by itself (autocommit),
        so a read takes no write lock."""

        def run_plan() -> T:
            conn = self._open()
            with _storage_errors(what):
                return run(plan, _fetcher(conn))

        result: T = await self._thread.call(run_plan)
        return result

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


def _insert_rejections(
    conn: sqlite3.Connection, rows: list[tuple[dict[str, Any], bool, bool]]
) -> int:
    stored = 0
    for row, redelivered, replayed in rows:
        # A DUP is recognised by topic and payload; a replay, by correlation id.
        if redelivered and conn.execute(_REJECTION_EXISTS, row).fetchone():
            continue
        if replayed and conn.execute(_REPLAYED_EXISTS, row).fetchone():
            continue
        conn.execute(_INSERT_REJECTION, row)
        stored += 1
    return stored
