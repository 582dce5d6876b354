"""db.backends: the storage backend a database URL picks, its writer and its schema preparation."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from db.backends import WriterOptions, backend_for
from db.postgres import PostgresWriter
from db.schema import ensure_current, head_revision, upgrade
from db.sqlite import SqliteWriter
from tests.harness.servers import free_port
from tests.unit.writer_contract import reading


@pytest.mark.parametrize(
    ("url", "writer_type", "spooled"),
    [("sqlite:////var/lib/ingestd/ingestd.db", SqliteWriter, False),
     ("postgresql://ingest@db:5432/plant", PostgresWriter, True),
     ("postgres://ingest@db/plant", PostgresWriter, True)],
)  # fmt: skip
def test_backend_for_picks_by_scheme(url: str, writer_type: type, spooled: bool) -> None:
    backend = backend_for(url)
    # A database across a network spools while it is away; the embedded file does not.
    assert backend.spooled is spooled
    assert type(backend.writer(WriterOptions(url))) is writer_type


async def test_the_sqlite_writer_writes_to_the_urls_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ingestd.db"
    options = WriterOptions(f"sqlite:///{path}")
    backend = backend_for(options.url)
    assert await asyncio.to_thread(backend.prepare, options) is None
    writer = backend.writer(options)
    try:
        assert (await writer.write([reading()], [])).new == [True]
    finally:
        await writer.close()
    assert path.is_file()


async def test_the_postgres_writer_writes_to_the_urls_database(pg_url: str) -> None:
    await asyncio.to_thread(upgrade, pg_url)
    writer = backend_for(pg_url).writer(WriterOptions(pg_url, connect_timeout=5))
    try:
        assert (await writer.write([reading()], [])).new == [True]
        assert (await writer.write([reading()], [])).new == [False]
    finally:
        await writer.close()


def test_prepare_on_sqlite_migrates_a_fresh_file(tmp_path: Path) -> None:
    path = tmp_path / "new" / "ingestd.db"  # not even its directory exists yet
    url = f"sqlite:///{path}"
    backend = backend_for(url)
    assert backend.prepare(WriterOptions(url)) is None
    assert path.is_file()
    asyncio.run(ensure_current(url))  # at head now
    assert backend.prepare(WriterOptions(url)) is None  # and again: idempotent


def test_prepare_on_sqlite_reports_a_file_it_cannot_create(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    url = f"sqlite:///{blocker / 'ingestd.db'}"
    problem = backend_for(url).prepare(WriterOptions(url))
    assert problem is not None
    assert problem.startswith(f"cannot prepare the SQLite database {url}")


def test_prepare_on_postgres_only_checks_the_schema(pg_url: str) -> None:
    backend = backend_for(pg_url)
    problem = backend.prepare(WriterOptions(pg_url, connect_timeout=5))
    assert problem is not None
    assert "ingestd migrate" in problem  # a shared database is never migrated by `run`
    assert head_revision() in problem
    upgrade(pg_url)
    assert backend.prepare(WriterOptions(pg_url, connect_timeout=5)) is None


def test_prepare_on_an_unreachable_postgres_starts_anyway(caplog: pytest.LogCaptureFixture) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    with caplog.at_level(logging.ERROR, logger="ingestd"):
        assert backend_for(url).prepare(WriterOptions(url, connect_timeout=2)) is None
    assert "database unreachable at start" in caplog.text
