"""db.schema: migrations reach the recorded head, and an outdated schema is told apart."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import asyncpg
import pytest
from alembic import command

from db.schema import (
    SchemaError,
    _alembic_config,
    ensure_current,
    head_revision,
    scripts_head,
    upgrade,
)


def test_the_recorded_head_is_the_newest_migration() -> None:
    # migrations.HEAD spares `ingestd run` importing Alembic: it must move with every migration.
    assert head_revision() == scripts_head()


async def test_ensure_current_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    with pytest.raises(SchemaError, match="ingestd migrate") as info:
        await ensure_current(url)
    assert "no ingestd schema" in str(info.value)
    await asyncio.to_thread(upgrade, url)
    await ensure_current(url)
    await asyncio.to_thread(upgrade, url)  # idempotent
    await ensure_current(url)


async def test_ensure_current_postgres(pg_url: str) -> None:
    with pytest.raises(SchemaError, match="ingestd migrate") as info:
        await ensure_current(pg_url)
    assert head_revision() in str(info.value)
    await asyncio.to_thread(upgrade, pg_url)
    await ensure_current(pg_url)


async def test_ensure_current_refuses_an_older_revision(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    await asyncio.to_thread(upgrade, url)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE alembic_version SET version_num = '0000'")
    with pytest.raises(SchemaError, match=r"revision 0000.*ingestd migrate"):
        await ensure_current(url)


# --- migration 0003 (sensor_readings.value_text): an upgrade from 0002 keeps the data -----------

_INSERT = (
    "INSERT INTO sensor_readings (device_id, sensor_id, ts, value, {extra}received_at,"
    " correlation_id) VALUES ('dev-1', '{sensor}', '2026-11-27 07:00:00+00:00', {value},"
    " {text}'2026-11-27 07:00:01+00:00', 'c-{sensor}')"
)


def _insert(sensor: str, value: str, text: str | None = None) -> str:
    if text is None:
        return _INSERT.format(extra="", sensor=sensor, value=value, text="")
    return _INSERT.format(extra="value_text, ", sensor=sensor, value=value, text=f"{text}, ")


class _Db:
    """One database, SQLite or PostgreSQL, with plain SQL for the test."""

    def __init__(self, url: str, path: Path | None = None) -> None:
        self.url = url
        self.path = path

    def execute(self, sql: str) -> list[tuple[object, ...]]:
        if self.path is not None:
            with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
                return [tuple(row) for row in conn.execute(sql).fetchall()]

        async def run() -> list[tuple[object, ...]]:
            conn = await asyncpg.connect(self.url)
            try:
                return [tuple(row) for row in await conn.fetch(sql)]
            finally:
                await conn.close()

        return asyncio.run(run())

    def refuses(self, sql: str) -> str:
        """Run ``sql`` expecting the database to refuse it; the error's text."""
        errors = (sqlite3.IntegrityError,) if self.path is not None else (asyncpg.PostgresError,)
        with pytest.raises(errors) as info:
            self.execute(sql)
        return str(info.value)


@pytest.fixture(params=["sqlite", "postgres"])
def db_at_0002(request: pytest.FixtureRequest, tmp_path: Path) -> _Db:
    """A database migrated to revision 0002 (before value_text) holding one reading."""
    if request.param == "sqlite":
        path = tmp_path / "old.db"
        db = _Db(f"sqlite:///{path}", path)
    else:
        db = _Db(request.getfixturevalue("pg_url"))
    command.upgrade(_alembic_config(db.url), "0002")
    assert db.execute("SELECT version_num FROM alembic_version") == [("0002",)]
    db.execute(_insert("temp", "21.5"))
    return db


def test_upgrade_from_0002_keeps_rows_and_adds_value_text(db_at_0002: _Db) -> None:
    db = db_at_0002
    upgrade(db.url)
    assert db.execute("SELECT version_num FROM alembic_version") == [(head_revision(),)]
    assert db.execute(
        "SELECT sensor_id, value, value_text, correlation_id FROM sensor_readings"
    ) == [("temp", 21.5, None, "c-temp")]
    db.execute(_insert("label", "NULL", "'running'"))  # a text reading: value NULL
    assert db.execute(
        "SELECT sensor_id, value, value_text FROM sensor_readings ORDER BY sensor_id"
    ) == [("label", None, "running"), ("temp", 21.5, None)]
    # The table kept its key and its ts index (SQLite rebuilt it to drop NOT NULL).
    db.refuses(_insert("temp", "1.0"))  # same (device_id, sensor_id, ts)
    if db.path is not None:
        indexes = {row[1] for row in db.execute("PRAGMA index_list('sensor_readings')")}
    else:
        indexes = {
            row[0]
            for row in db.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'sensor_readings'"
            )
        }
    assert "ix_sensor_readings_ts" in indexes


@pytest.mark.parametrize(
    ("value", "text"), [("1.0", "'both'"), ("NULL", "NULL")], ids=["both", "neither"]
)
def test_value_or_text_check_refuses_both_and_neither(
    db_at_0002: _Db, value: str, text: str
) -> None:
    db = db_at_0002
    upgrade(db.url)
    error = db.refuses(_insert("bad", value, text))
    assert "ck_sensor_readings_value_or_text" in error, error
    assert db.execute("SELECT count(*) FROM sensor_readings") == [(1,)]
