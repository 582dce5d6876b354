"""db.postgres: PostgresWriter on a real PostgreSQL, and on links that break (TcpProxy)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from db.postgres import PostgresWriter
from db.schema import upgrade
from db.writer import RowRejected, StorageError
from tests.harness.proxy import TcpProxy
from tests.harness.servers import Postgres, free_port
from tests.unit.writer_contract import Db, WriterContract, opening, reading, rejection


def postgres_db(url: str, writer: PostgresWriter) -> Db:
    async def query(sql: str) -> list[dict[str, Any]]:
        conn = await asyncpg.connect(url)
        try:
            return [dict(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    return Db(url, writer, query, execute)


@pytest.fixture
async def migrated_url(pg_url: str) -> str:
    await asyncio.to_thread(upgrade, pg_url)
    return pg_url


@pytest.fixture
async def db(migrated_url: str) -> AsyncIterator[Db]:
    writer = PostgresWriter(migrated_url, command_timeout=10, connect_timeout=5)
    await writer.start()
    try:
        yield postgres_db(migrated_url, writer)
    finally:
        await writer.close()


class TestPostgresWriter(WriterContract):
    """The Writer contract on PostgreSQL."""


async def count(url: str, table: str = "sensor_readings") -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


# ------------------------------------------------------------------------------ replays


async def test_replayed_rejections_are_recognised_by_correlation_id(db: Db) -> None:
    # A spooled batch committed just before a crash is replayed: its dead letters are not
    # stored again, though they are not redeliveries.
    assert (await db.writer.write([], [rejection(0)], replay=True)).rejections_stored == 1
    assert (await db.writer.write([], [rejection(0)], replay=True)).rejections_stored == 0
    # Without the replay flag, the same row is a new event.
    assert (await db.writer.write([], [rejection(0)])).rejections_stored == 1
    # Another message with the same payload is replayed for the first time: stored.
    assert (await db.writer.write([], [rejection(1)], replay=True)).rejections_stored == 1
    rows = await db.query("SELECT correlation_id FROM rejected_messages ORDER BY id")
    assert [r["correlation_id"] for r in rows] == ["corr-0", "corr-0", "corr-1"]


# ------------------------------------------------------------------------------ alerts


async def test_openings_racing_for_one_task_all_attach_to_it(migrated_url: str) -> None:
    """Concurrent transactions that each find no task for a subject and kind: one opens it,
    the others lose the insert (partial unique index) and attach to it instead."""
    writer = PostgresWriter(migrated_url, command_timeout=10, pool_size=8)
    try:
        results = await asyncio.gather(
            *(writer.write([], [], alerts=[opening(f"s{n}", n)]) for n in range(8))
        )
    finally:
        await writer.close()
    changes = sorted(outcome.task_change or "" for r in results for outcome in r.alerts)
    assert changes == ["attached"] * 7 + ["opened"]
    conn = await asyncpg.connect(migrated_url)
    try:
        rows = await conn.fetch("SELECT id, alert_count FROM maintenance_tasks")
        assert [r["alert_count"] for r in rows] == [8]
        linked = await conn.fetchval(
            "SELECT count(*) FROM anomaly_alerts WHERE task_id = $1", rows[0]["id"]
        )
        assert linked == 8
    finally:
        await conn.close()


# ------------------------------------------------------------------------------ refusals


async def test_failed_batch_is_row_rejected_and_atomic(db: Db) -> None:
    await db.execute("ALTER TABLE sensor_readings ADD CONSTRAINT no_bad CHECK (value <> 666)")
    batch = [reading(seconds=0), reading(seconds=1, value=666, msg=1)]
    with pytest.raises(RowRejected):
        await db.write(batch, [rejection(2)])
    assert await db.query("SELECT * FROM sensor_readings") == []
    assert await db.query("SELECT * FROM rejected_messages") == []
    # The pool is still usable: a data error does not drop the connection.
    assert (await db.write(batch[:1], [rejection(3)])).new == [True]


# ------------------------------------------------------------------------------ broken links


@pytest.fixture
def proxy(postgres_server: Postgres) -> Iterator[TcpProxy]:
    with TcpProxy(postgres_server.port) as made:
        yield made


def through(proxy: TcpProxy, url: str) -> str:
    return proxy.url_for(url.rsplit("/", 1)[1])


async def test_nothing_listening_is_unreachable() -> None:
    writer = PostgresWriter(
        f"postgresql://postgres@127.0.0.1:{free_port()}/x", connect_timeout=2, command_timeout=2
    )
    with pytest.raises(StorageError, match="cannot connect") as info:
        await writer.start()
    assert info.value.kind == "unreachable"
    with pytest.raises(StorageError) as info:
        await writer.ping()
    assert info.value.kind == "unreachable"
    await writer.close()


async def test_a_dropped_link_is_unreachable_then_the_writer_reconnects(
    migrated_url: str, proxy: TcpProxy
) -> None:
    writer = PostgresWriter(through(proxy, migrated_url), command_timeout=2, connect_timeout=2)
    try:
        assert (await writer.write([reading(seconds=0)], [])).new == [True]
        proxy.drop()  # every connection reset, new ones too
        for attempt in ("open connection", "fresh connect"):
            with pytest.raises(StorageError) as info:
                await writer.write([reading(seconds=1)], [])
            assert not isinstance(info.value, RowRejected), attempt
            assert info.value.kind == "unreachable", (attempt, str(info.value))
        with pytest.raises(StorageError) as info:
            await writer.load_devices()
        assert info.value.kind == "unreachable"
        assert proxy.reset + proxy.refused >= 2, proxy
        proxy.heal()
        assert (await writer.write([reading(seconds=1)], [])).new == [True]
        await writer.ping()
    finally:
        await writer.close()
    assert await count(migrated_url) == 2


async def test_a_half_open_link_times_out_then_the_writer_reconnects(
    migrated_url: str, proxy: TcpProxy
) -> None:
    writer = PostgresWriter(through(proxy, migrated_url), command_timeout=1, connect_timeout=1)
    try:
        assert (await writer.write([reading(seconds=0)], [])).new == [True]
        proxy.blackhole()  # bytes vanish both ways: neither side notices
        started = time.monotonic()
        with pytest.raises(StorageError) as info:
            await writer.write([reading(seconds=1)], [])
        assert info.value.kind == "timeout"
        # asyncpg waits for the query's cancel request on release (through the same dead
        # link): about twice the command timeout, bounded all the same.
        assert time.monotonic() - started < 3
        started = time.monotonic()
        with pytest.raises(StorageError, match="cannot connect") as info:
            await writer.write([reading(seconds=1)], [])  # a new connection, into the hole
        assert info.value.kind == "timeout"
        assert time.monotonic() - started < 3
        assert proxy.blackholed >= 2, proxy
        proxy.heal()
        # The lost statement never reached the server: the retry stores the row, once.
        assert (await writer.write([reading(seconds=1)], [])).new == [True]
    finally:
        await writer.close()
    assert await count(migrated_url) == 2


async def test_a_stopped_server_is_unreachable_not_a_hang(tmp_path: Path) -> None:
    server = Postgres(tmp_path / "pg")
    await asyncio.to_thread(server.start)
    try:
        url = await asyncio.to_thread(server.create_database, "ingest")
        await asyncio.to_thread(upgrade, url)
        writer = PostgresWriter(url, command_timeout=3, connect_timeout=2)
        try:
            assert (await writer.write([reading(seconds=0)], [])).new == [True]
            await asyncio.to_thread(server.stop)
            for attempt in ("broken pool", "refused connect"):
                started = time.monotonic()
                with pytest.raises(StorageError) as info:
                    await writer.write([reading(seconds=1)], [])
                assert info.value.kind == "unreachable", (attempt, str(info.value))
                assert time.monotonic() - started < 4, attempt
            fresh = PostgresWriter(url, connect_timeout=2)
            with pytest.raises(StorageError, match="cannot connect"):
                await fresh.start()
            await asyncio.to_thread(server.start)
            # Back up: the writer reconnects by itself.
            assert (await writer.write([reading(seconds=1)], [])).new == [True]
        finally:
            await writer.close()
    finally:
        await asyncio.to_thread(server.stop)
