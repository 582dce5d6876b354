"""db.schema: migrations reach the recorded head, and an outdated schema is told apart."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest

from db.schema import SchemaError, ensure_current, head_revision, scripts_head, upgrade


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
