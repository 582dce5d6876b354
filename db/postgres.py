"""PostgreSQL/TimescaleDB writer: one ``INSERT … ON CONFLICT DO NOTHING`` statement per batch.

The batch travels as one JSON document that the server unpacks with
``json_populate_recordset``: a single round trip per batch (COPY into a staging table
took five: BEGIN, COPY and its data, INSERT … SELECT, COMMIT), which is what keeps a
database 50 ms away from capping throughput, and orjson encodes it in less client CPU
than asyncpg's COPY encoder. One statement is one transaction, so a batch is either
wholly durable or not at all; batches with rejections add their statements in an
explicit transaction, as do alert changes (db.alerts). The conflict clause makes
redeliveries and replays harmless.
Every call runs under a timeout: a half-open connection must fail the batch, not hang
the pipeline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import orjson

from db.alerts import AlertStore, Plan, Row, TaskQueries, run_async
from db.rows import (
    READING_COLUMNS,
    REJECTION_COLUMNS,
    AlertChange,
    ReadingRow,
    RejectionRow,
)
from db.writer import ErrorKind, RowRejected, StorageError, WriteResult

__all__ = ["PG_ERRORS", "PostgresWriter"]

T = TypeVar("T")

_COLS = ", ".join(READING_COLUMNS)
_INSERT_READINGS = (
    f"INSERT INTO sensor_readings ({_COLS}) SELECT {_COLS} "
    "FROM json_populate_recordset(NULL::sensor_readings, $1::json) "
    "ON CONFLICT DO NOTHING RETURNING device_id, sensor_id, ts"
)
_REJ_COLS = ", ".join(REJECTION_COLUMNS)
_REJ_TYPES = ("timestamptz", "text", "bytea", "text", "int", "text", "text", "text", "text")
_REJ_PARAMS = ", ".join(f"${i}::{t}" for i, t in enumerate(_REJ_TYPES, start=1))
# A redelivered (DUP) rejection that is already stored is not stored again.
_INSERT_DUP_REJECTION = (
    f"INSERT INTO rejected_messages ({_REJ_COLS}) SELECT {_REJ_PARAMS} WHERE NOT EXISTS "
    "(SELECT 1 FROM rejected_messages WHERE topic = $2::text AND payload_sha256 = $4::text)"
)
# A replayed spool batch may have been committed before (a crash between the commit and
# the spool delete): its dead letters are recognised by their correlation id.
_INSERT_REPLAYED_REJECTION = (
    f"INSERT INTO rejected_messages ({_REJ_COLS}) SELECT {_REJ_PARAMS} WHERE NOT EXISTS "
    "(SELECT 1 FROM rejected_messages WHERE correlation_id = $9::text)"
)
# Errors about the data itself (SQLSTATE classes 22 and 23): retrying the same rows is futile.
# Text the driver cannot encode is the same kind of problem.
_DATA_ERRORS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    UnicodeError,
    orjson.JSONEncodeError,
)
# The database is away, failing or slow: retry later.
PG_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def _aware(value: datetime) -> datetime:
    return value  # asyncpg reads timestamptz as an aware datetime already


def _failure(exc: BaseException, what: str = "") -> StorageError:
    kind: ErrorKind = "failed"
    if isinstance(exc, TimeoutError):
        kind = "timeout"
    elif isinstance(exc, OSError | asyncpg.InterfaceError | asyncpg.PostgresConnectionError):
        kind = "unreachable"  # PostgresConnectionError: SQLSTATE class 08, the link is gone
    return StorageError(f"{what}{type(exc).__name__}: {exc}", kind)


class PostgresWriter(TaskQueries):
    """Writes batches of readings and rejections to PostgreSQL."""

    def __init__(
        self,
        url: str,
        *,
        command_timeout: float = 15.0,
        connect_timeout: float = 10.0,
        pool_size: int = 2,
    ) -> None:
        self._url = url
        self._command_timeout = command_timeout
        self._connect_timeout = connect_timeout
        self._pool_size = pool_size
        self._pool: Any = None
        self._alerts = AlertStore(_aware)

    async def start(self) -> None:
        """Open the pool; a failure here is retried by the caller like any write failure."""
        if self._pool is not None:
            return
        pool = asyncpg.create_pool(
            self._url,
            min_size=0,  # no background reconnects (and tracebacks) during an outage
            max_size=self._pool_size,
            timeout=self._connect_timeout,
            command_timeout=self._command_timeout,
            reset=_keep_session,
        )
        try:
            async with asyncio.timeout(self._connect_timeout + 1):
                await pool
                async with pool.acquire() as conn:  # proves the database answers
                    await conn.fetchval("SELECT 1")
        except PG_ERRORS as exc:
            pool.terminate()
            raise _failure(exc, "cannot connect to PostgreSQL: ") from exc
        self._pool = pool

    async def write(
        self,
        readings: Sequence[ReadingRow],
        rejections: Sequence[RejectionRow],
        *,
        replay: bool = False,
        alerts: Sequence[AlertChange] = (),
    ) -> WriteResult:
        """Store rows and apply alert changes in one transaction; ``new`` tells which readings
        were not stored yet.

        ``replay``: the rows come from the spool and may be stored already.
        """
        await self.start()
        try:
            async with asyncio.timeout(self._command_timeout):
                return await self._write(readings, rejections, replay, alerts)
        except _DATA_ERRORS as exc:
            raise RowRejected(f"{type(exc).__name__}: {exc}") from exc
        except PG_ERRORS as exc:
            # The connection may be half-open: drop the pool so the next try starts clean.
            await self._reset()
            raise _failure(exc) from exc

    async def _write(
        self,
        readings: Sequence[ReadingRow],
        rejections: Sequence[RejectionRow],
        replay: bool,
        alerts: Sequence[AlertChange],
    ) -> WriteResult:
        async with self._pool.acquire() as conn:
            if not rejections and not alerts:  # the common case: one statement, one round trip
                return WriteResult(await _insert_readings(conn, readings), 0)
            async with conn.transaction():
                new = await _insert_readings(conn, readings) if readings else []
                stored = await _insert_rejections(conn, rejections, replay)
                outcomes = await run_async(self._alerts.apply(alerts), _fetcher(conn))
        return WriteResult(new, stored, outcomes)

    async def _run(self, plan: Plan[T], what: str) -> T:
        """One plan outside a batch, under the same timeout and error kinds as a write."""
        await self.start()
        try:
            async with asyncio.timeout(self._command_timeout), self._pool.acquire() as conn:
                return await run_async(plan, _fetcher(conn))
        except _DATA_ERRORS as exc:
            raise RowRejected(f"{what}{type(exc).__name__}: {exc}") from exc
        except PG_ERRORS as exc:
            await self._reset()
            raise _failure(exc, what) from exc

    async def ping(self) -> None:
        """Raise StorageError unless the database answers a trivial query in time."""
        await self.start()
        try:
            async with asyncio.timeout(self._command_timeout), self._pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
        except PG_ERRORS as exc:
            await self._reset()
            raise _failure(exc) from exc

    async def load_devices(self) -> list[dict[str, Any]]:
        """Registry rows of the ``devices`` table."""
        await self.start()
        try:
            async with asyncio.timeout(self._command_timeout), self._pool.acquire() as conn:
                rows = await conn.fetch("SELECT * FROM devices")
        except PG_ERRORS as exc:
            raise _failure(exc, "cannot read devices: ") from exc
        return [dict(row) for row in rows]

    async def _reset(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()

    async def close(self, grace_seconds: float = 5.0) -> None:
        """Close gracefully within ``grace_seconds``, else drop the connections."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                async with asyncio.timeout(grace_seconds):
                    await pool.close()
            except PG_ERRORS:
                pool.terminate()


def _fetcher(conn: Any) -> Callable[[str, tuple[object, ...]], Awaitable[Sequence[Row]]]:
    def fetch(sql: str, parameters: tuple[object, ...]) -> Awaitable[Sequence[Row]]:
        rows: Awaitable[Sequence[Row]] = conn.fetch(sql, *parameters)
        return rows

    return fetch


async def _keep_session(_conn: Any) -> None:
    # asyncpg's default reset on every release (advisory unlocks, CLOSE ALL, UNLISTEN, RESET
    # ALL) costs a round trip per batch; ingestd changes no session state, and an open
    # transaction is still rolled back by asyncpg before this is called.
    return


async def _insert_readings(conn: Any, rows: Sequence[ReadingRow]) -> list[bool]:
    """Insert what is not stored yet; True for each row that became a new row."""
    document = orjson.dumps(
        [row._asdict() for row in rows],
        option=orjson.OPT_NAIVE_UTC,  # as asyncpg treats a naive timestamptz value
    )
    inserted = {tuple(r) for r in await conn.fetch(_INSERT_READINGS, document.decode())}
    new: list[bool] = []
    for row in rows:
        key = (row.device_id, row.sensor_id, row.ts)
        if key in inserted:
            inserted.discard(key)  # a second copy within the batch is a duplicate
            new.append(True)
        else:
            new.append(False)
    return new


async def _insert_rejections(conn: Any, rows: Sequence[RejectionRow], replay: bool) -> int:
    """Store dead letters; redelivered and replayed ones only if not stored yet."""
    fresh = [row.values() for row in rows if not (row.redelivered or replay)]
    if fresh:
        await conn.copy_records_to_table(
            "rejected_messages", records=fresh, columns=REJECTION_COLUMNS
        )
    stored = len(fresh)
    for row in rows:
        if row.redelivered or replay:
            # A DUP is recognised by topic and payload; a replayed batch, by correlation id.
            guarded = _INSERT_DUP_REJECTION if row.redelivered else _INSERT_REPLAYED_REJECTION
            status = await conn.execute(guarded, *row.values())
            stored += int(status.rsplit(" ", 1)[-1])
    return stored
