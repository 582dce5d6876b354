"""db.sqlite: SqliteWriter on a real SQLite file (the embedded default)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from db.schema import upgrade
from db.sqlite import SqliteWriter, sqlite_ts
from db.writer import RowRejected, StorageError
from tests.unit.writer_contract import Db, WriterContract, reading, rejection


def sqlite_db(path: Path, writer: SqliteWriter) -> Db:
    async def query(sql: str) -> list[dict[str, Any]]:
        def run() -> list[dict[str, Any]]:
            with contextlib.closing(sqlite3.connect(path)) as conn:
                conn.row_factory = sqlite3.Row
                return [dict(row) for row in conn.execute(sql).fetchall()]

        return await asyncio.to_thread(run)

    async def execute(sql: str) -> None:
        def run() -> None:
            with contextlib.closing(sqlite3.connect(path)) as conn, conn:
                conn.execute(sql)

        await asyncio.to_thread(run)

    return Db(f"sqlite:///{path}", writer, query, execute)


async def migrated(path: Path) -> Path:
    await asyncio.to_thread(upgrade, f"sqlite:///{path}")
    return path


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Db]:
    path = await migrated(tmp_path / "state" / "ingestd.db")
    writer = SqliteWriter(path)
    await writer.start()
    try:
        yield sqlite_db(path, writer)
    finally:
        await writer.close()


class TestSqliteWriter(WriterContract):
    """The Writer contract on SQLite."""


def test_sqlite_ts_is_the_text_sqlalchemy_reads() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert sqlite_ts(datetime(2026, 11, 27, 9, 30, tzinfo=plus_two)) == "2026-11-27 07:30:00.000000"
    assert sqlite_ts(datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)) == "2026-01-02 03:04:05.000006"


async def test_unmigrated_file_is_a_storage_error(tmp_path: Path) -> None:
    writer = SqliteWriter(tmp_path / "empty.db")
    try:
        with pytest.raises(StorageError, match="no such table") as info:
            await writer.write([reading()], [])
        assert not isinstance(info.value, RowRejected)
    finally:
        await writer.close()


@pytest.mark.parametrize("name", ["missing/x.db", "garbage.db"])
async def test_ping_fails_when_the_file_cannot_be_opened(tmp_path: Path, name: str) -> None:
    (tmp_path / "garbage.db").write_bytes(b"not a database" * 500)
    writer = SqliteWriter(tmp_path / name)
    try:
        with pytest.raises(StorageError, match="cannot open"):
            await writer.ping()
    finally:
        await writer.close()


async def test_locked_database_is_a_storage_error_then_recovers(tmp_path: Path) -> None:
    path = await migrated(tmp_path / "locked.db")
    writer = SqliteWriter(path, busy_timeout=0.05)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        await writer.start()
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StorageError, match="locked") as info:
            await writer.write([reading()], [])
        assert not isinstance(info.value, RowRejected)
        blocker.execute("ROLLBACK")
        assert (await writer.write([reading()], [])).new == [True]
    finally:
        blocker.close()
        await writer.close()


async def test_failed_batch_leaves_nothing_behind(db: Db) -> None:
    await db.execute(
        "CREATE TRIGGER no_bad BEFORE INSERT ON sensor_readings WHEN NEW.value = 666 "
        "BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    batch = [reading(seconds=0), reading(seconds=1, value=666, msg=1)]
    with pytest.raises(RowRejected):
        await db.write(batch, [rejection(2)])
    assert await db.query("SELECT * FROM sensor_readings") == []
    assert await db.query("SELECT * FROM rejected_messages") == []
    assert (await db.write(batch[:1])).new == [True]
