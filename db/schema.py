"""Schema management: apply Alembic migrations, and tell an outdated schema from a current one.

Alembic and SQLAlchemy are imported only where they are used: checking a PostgreSQL
schema at start-up needs neither, and importing them costs more than a second of start-up
on a small edge host.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

import migrations
from edge.errors import IngestdError

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig


class SchemaError(IngestdError):
    """The database schema is missing or older than this version of ingestd."""


def async_url(url: str) -> str:
    """The SQLAlchemy async-driver URL for a ``postgresql://`` or ``sqlite:///`` URL."""
    for prefix, driver in (
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
        ("sqlite:///", "sqlite+aiosqlite:///"),
    ):
        if url.startswith(prefix):
            return driver + url.removeprefix(prefix)
    return url


def _alembic_config(url: str) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig  # noqa: PLC0415

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    # '%' is ConfigParser interpolation syntax; percent-encoded passwords contain it.
    cfg.set_main_option("sqlalchemy.url", async_url(url).replace("%", "%%"))
    return cfg


def head_revision() -> str:
    return migrations.HEAD


def scripts_head() -> str | None:
    """The head revision as Alembic reads it from the migration scripts."""
    from alembic.script import ScriptDirectory  # noqa: PLC0415

    return ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head()


def upgrade(url: str) -> None:
    """Apply every migration (blocking; runs its own event loop, so call it off-loop)."""
    from alembic import command  # noqa: PLC0415

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(_alembic_config(url), "head")


async def current_revision(url: str, timeout_seconds: float = 10.0) -> str | None:
    """The revision the database is at, or None when it was never migrated."""
    if url.startswith(("postgresql://", "postgres://")):
        return await _postgres_revision(url, timeout_seconds)
    from alembic.runtime.migration import MigrationContext  # noqa: PLC0415
    from sqlalchemy.ext.asyncio import create_async_engine  # noqa: PLC0415

    def read(connection: Any) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    engine = create_async_engine(async_url(url))
    try:
        async with asyncio.timeout(timeout_seconds), engine.connect() as connection:
            return await connection.run_sync(read)
    finally:
        await engine.dispose()


async def _postgres_revision(url: str, timeout_seconds: float) -> str | None:
    # One plain connection and one query: SQLAlchemy's dialect set-up costs a dozen round
    # trips, which a database across a WAN turns into a second of start-up.
    async with asyncio.timeout(timeout_seconds):
        conn = await asyncpg.connect(url, timeout=timeout_seconds)
        try:
            rows = await conn.fetch("SELECT version_num FROM alembic_version")
        except asyncpg.UndefinedTableError:
            return None
        finally:
            await conn.close()
    if len(rows) > 1:
        raise SchemaError(f"alembic_version holds {len(rows)} revisions; expected one")
    return str(rows[0][0]) if rows else None


async def ensure_current(url: str, timeout_seconds: float = 10.0) -> None:
    """Raise ``SchemaError`` naming ``ingestd migrate`` unless the schema is at head."""
    current = await current_revision(url, timeout_seconds)
    head = head_revision()
    if current != head:
        state = "has no ingestd schema" if current is None else f"is at revision {current}"
        raise SchemaError(
            f"the database {state}, this ingestd needs revision {head}: run `ingestd migrate`"
        )
