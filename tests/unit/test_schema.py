"""db.schema: migrations reach the recorded head, and an outdated schema is told apart."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from pathlib import Path

import asyncpg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from db.models import Base
from db.schema import (
    SchemaError,
    _alembic_config,
    async_url,
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
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> _Db:
    """A database with nothing in it yet, SQLite or PostgreSQL."""
    if request.param == "sqlite":
        path = tmp_path / "old.db"
        return _Db(f"sqlite:///{path}", path)
    return _Db(request.getfixturevalue("pg_url"))


@pytest.fixture
def db_at_0002(empty_db: _Db) -> _Db:
    """A database migrated to revision 0002 (before value_text) holding one reading."""
    db = empty_db
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


# --- the models are what the migrations make ----------------------------------------------------


def test_the_models_match_the_migrated_schema(empty_db: _Db) -> None:
    """db.models and migrations/ describe one schema: a migration that forgets the model (or
    the reverse) shows up here as a difference Alembic would autogenerate."""
    upgrade(empty_db.url)

    def differences(connection: Connection) -> list[object]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))

    async def compare() -> list[object]:
        engine = create_async_engine(async_url(empty_db.url))
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(differences)
        finally:
            await engine.dispose()

    assert asyncio.run(compare()) == []


# --- migration 0004 (alerts and tasks reshaped) -------------------------------------------------

_ALERT = (
    "INSERT INTO anomaly_alerts (ts, device_id, sensor_id, kind, score, detail, closed_at)"
    " VALUES ('2026-12-01 07:00:0{second}+00:00', 'dev-1', 'temp', 'flatline', 1, 'x', {closed})"
)
_TASK = (
    "INSERT INTO maintenance_tasks (subject, kind, device_id, status, priority, description,"
    " opened_at, last_alert_at) VALUES ('press', 'flatline', 'dev-1', '{status}', '{priority}',"
    " 'd', '2026-12-01 07:00:00+00:00', '2026-12-01 07:00:00+00:00')"
)


def _alert(second: int, closed: str = "NULL") -> str:
    return _ALERT.format(second=second, closed=closed)


def _task(status: str = "open", priority: str = "high") -> str:
    return _TASK.format(status=status, priority=priority)


def test_0004_keeps_one_open_alert_per_series_and_one_open_task_per_subject(
    empty_db: _Db,
) -> None:
    db = empty_db
    command.upgrade(_alembic_config(db.url), "0003")
    upgrade(db.url)
    assert db.execute("SELECT version_num FROM alembic_version") == [("0004",)]
    db.execute(_alert(0, "'2026-12-01 07:00:05+00:00'"))  # a closed episode
    db.execute(_alert(6))  # the open one
    # A second open alert of the series (SQLite names the columns, PostgreSQL the index).
    assert re.search(r"ux_anomaly_alerts_open|\.kind$", db.refuses(_alert(7)))
    assert "ts" in db.refuses(_alert(6, "'2026-12-01 07:00:08+00:00'"))  # the natural key
    db.execute(_task("closed"))
    db.execute(_task("acknowledged"))
    assert re.search(r"ux_maintenance_tasks_open|\.kind$", db.refuses(_task("open")))
    assert "ck_maintenance_tasks_status" in db.refuses(_task("done"))
    assert "ck_maintenance_tasks_priority" in db.refuses(_task("closed", "urgent"))
    assert db.execute("SELECT alert_count FROM maintenance_tasks") == [(1,), (1,)]


def test_0004_downgrades_to_the_0001_shapes_and_back(empty_db: _Db) -> None:
    db = empty_db
    upgrade(db.url)
    db.execute(_task())
    command.downgrade(_alembic_config(db.url), "0003")
    assert db.execute("SELECT version_num FROM alembic_version") == [("0003",)]
    db.execute(
        "INSERT INTO maintenance_tasks (device_id, alert_id, status, priority, description)"
        " VALUES ('dev-1', 7, 'open', 'normal', 'd')"
    )
    db.execute(
        "INSERT INTO anomaly_alerts (ts, device_id, sensor_id, value, kind)"
        " VALUES ('2026-12-01 07:00:00+00:00', 'dev-1', 'temp', 1.5, 'spike')"
    )
    upgrade(db.url)
    assert db.execute("SELECT count(*) FROM maintenance_tasks") == [(0,)]
    db.execute(_alert(0))
