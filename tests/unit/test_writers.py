"""SqliteWriter and PostgresWriter on real databases: idempotent batches, dead letters, outages."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from harness.servers import Postgres

from agents.events import RawMessage, RejectedMessage
from agents.registry import DeviceInfo, DeviceRegistry
from db.postgres import PostgresWriter
from db.schema import SchemaError, ensure_current, head_revision, scripts_head, upgrade
from db.sqlite import SqliteWriter
from db.writer import RowRejected, StorageError, WriteResult
from edge import codecs
from edge.codecs import Reading

T0 = datetime(2026, 11, 27, 7, 30, 0, 123456, tzinfo=UTC)
MAX_PAYLOAD = 16


def message(
    seq: int, topic: str = "sensors/d1/s1", payload: bytes = b"{}", *, dup: bool = False
) -> RawMessage:
    return RawMessage(
        seq, topic, payload, 1, T0 + timedelta(seconds=seq), time.monotonic(), f"corr-{seq}", dup
    )


def reading(sensor: str = "s1", seconds: float = 0, value: float = 1.0, **extra: Any) -> Reading:
    return Reading(
        device_id="d1", sensor_id=sensor, ts=T0 + timedelta(seconds=seconds), value=value, **extra
    )


def rejection(seq: int, payload: bytes = b"not json at all, and long", *, dup: bool = False,
              topic: str = "sensors/d1/s1") -> RejectedMessage:  # fmt: skip
    return RejectedMessage(
        message(seq, topic, payload, dup=dup), codecs.MALFORMED_JSON, "malformed JSON: x", "d1"
    )


@dataclass
class Backend:
    """A migrated database, a started writer on it, and a way to read rows back."""

    name: str
    url: str
    writer: SqliteWriter | PostgresWriter
    query: Callable[[str], Awaitable[list[dict[str, Any]]]]
    execute: Callable[[str], Awaitable[None]]

    def ts(self, value: Any) -> datetime:
        """A stored timestamp as an aware datetime (SQLite keeps UTC text)."""
        if isinstance(value, str):
            return datetime.fromisoformat(value).replace(tzinfo=UTC)
        assert isinstance(value, datetime)
        return value


async def sqlite_backend(path: Path) -> Backend:
    url = f"sqlite:///{path}"
    await asyncio.to_thread(upgrade, url)
    writer = SqliteWriter(path, max_payload_bytes=MAX_PAYLOAD)
    await writer.start()

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

    return Backend("sqlite", url, writer, query, execute)


async def postgres_backend(url: str) -> Backend:
    await asyncio.to_thread(upgrade, url)
    writer = PostgresWriter(
        url, max_payload_bytes=MAX_PAYLOAD, command_timeout=10, connect_timeout=5
    )
    await writer.start()

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

    return Backend("postgres", url, writer, query, execute)


@pytest_asyncio.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        made = await sqlite_backend(tmp_path / "state" / "ingestd.db")
    else:
        made = await postgres_backend(request.getfixturevalue("pg_url"))
    try:
        yield made
    finally:
        await made.writer.close()


async def write(
    backend: Backend,
    readings: list[tuple[Reading, RawMessage]],
    rejections: list[RejectedMessage] = (),  # type: ignore[assignment]
) -> WriteResult:
    return await backend.writer.write(readings, list(rejections))


# ------------------------------------------------------------------------------ readings


async def test_batch_of_readings_is_stored(backend: Backend) -> None:
    m0, m1 = message(0), message(1)
    full = reading("temp", 0, 21.5, unit="degC", quality="good", seq=7, site="berlin", area="hall",
                   line="L1", asset="press", sensor_type="pt100")  # fmt: skip
    result = await write(
        backend, [(full, m0), (reading("vib", 0, -0.25), m0), (reading("temp", 1, 22.0), m1)]
    )
    assert result == WriteResult([True, True, True], 0)
    rows = await backend.query("SELECT * FROM sensor_readings ORDER BY sensor_id, ts")
    assert [(r["sensor_id"], r["value"]) for r in rows] == [
        ("temp", 21.5),
        ("temp", 22.0),
        ("vib", -0.25),
    ]
    first = rows[0]
    assert backend.ts(first["ts"]) == T0
    assert backend.ts(first["received_at"]) == m0.received_at
    assert {k: first[k] for k in ("device_id", "unit", "quality", "seq", "site", "area", "line",
                                  "asset", "sensor_type", "correlation_id")} == {
        "device_id": "d1", "unit": "degC", "quality": "good", "seq": 7, "site": "berlin",
        "area": "hall", "line": "L1", "asset": "press", "sensor_type": "pt100",
        "correlation_id": "corr-0",
    }  # fmt: skip
    assert rows[2]["unit"] is None


async def test_non_utc_timestamps_are_the_same_instant(backend: Backend) -> None:
    local = (T0 + timedelta(seconds=5)).astimezone(datetime.now().astimezone().tzinfo)
    plus_two = T0.astimezone(__import__("datetime").timezone(timedelta(hours=2)))
    result = await write(backend, [(reading(seconds=0), message(0))])
    assert result.new == [True]
    # The same instant written with another offset is the same key.
    again = Reading(device_id="d1", sensor_id="s1", ts=plus_two, value=2.0)
    other = Reading(device_id="d1", sensor_id="s1", ts=local, value=3.0)
    assert (await write(backend, [(again, message(1)), (other, message(1))])).new == [False, True]


async def test_already_stored_readings_are_flagged_not_new(backend: Backend) -> None:
    await write(backend, [(reading(seconds=0), message(0)), (reading(seconds=1), message(0))])
    result = await write(
        backend, [(reading(seconds=1, value=99), message(1)), (reading(seconds=2), message(1))]
    )
    assert result.new == [False, True]
    rows = await backend.query("SELECT ts, value FROM sensor_readings ORDER BY ts")
    assert [r["value"] for r in rows] == [1.0, 1.0, 1.0]  # the first write wins, never updated


async def test_duplicates_within_one_batch(backend: Backend) -> None:
    batch = [
        (reading(seconds=0, value=1), message(0)),
        (reading(seconds=0, value=2), message(1)),  # same key as the first
        (reading(seconds=1), message(1)),
        (reading(seconds=0, value=3), message(2)),
    ]
    assert (await write(backend, batch)).new == [True, False, True, False]
    assert len(await backend.query("SELECT * FROM sensor_readings")) == 2


async def test_empty_batch(backend: Backend) -> None:
    assert await write(backend, []) == WriteResult([], 0)


async def test_a_large_batch(backend: Backend) -> None:
    batch = [(reading(f"s{n % 7}", n), message(n)) for n in range(2000)]
    result = await write(backend, batch)
    assert result.new == [True] * 2000
    assert (await write(backend, batch[::3])).new == [False] * len(batch[::3])
    (count,) = await backend.query("SELECT count(*) AS n FROM sensor_readings")
    assert count["n"] == 2000


# ------------------------------------------------------------------------------ rejections


async def test_rejections_are_stored_with_digest_and_size(backend: Backend) -> None:
    payload = b"x" * 40
    rejected = rejection(3, payload)
    result = await write(backend, [(reading(), message(2))], [rejected])
    assert result == WriteResult([True], 1)
    (row,) = await backend.query("SELECT * FROM rejected_messages")
    assert bytes(row["payload"]) == payload[:MAX_PAYLOAD]  # the stored copy is truncated
    assert row["payload_sha256"] == hashlib.sha256(payload).hexdigest()  # of the whole payload
    assert row["payload_size"] == 40
    assert (row["topic"], row["reason"], row["error"], row["device_id"], row["correlation_id"]) == (
        "sensors/d1/s1", "malformed_json", "malformed JSON: x", "d1", "corr-3",
    )  # fmt: skip
    assert backend.ts(row["received_at"]) == rejected.message.received_at


async def test_rejection_with_binary_payload_and_no_device(backend: Backend) -> None:
    binary = bytes(range(256))
    rejected = RejectedMessage(message(0, "x/y", binary), codecs.UNKNOWN_TOPIC, "no source")
    assert (await write(backend, [], [rejected])).rejections_stored == 1
    (row,) = await backend.query("SELECT payload, device_id FROM rejected_messages")
    assert bytes(row["payload"]) == binary[:MAX_PAYLOAD]
    assert row["device_id"] is None


async def test_dup_rejection_already_stored_is_not_stored_twice(backend: Backend) -> None:
    assert (await write(backend, [], [rejection(0)])).rejections_stored == 1
    # The broker redelivers (DUP): the dead letter exists already.
    assert (await write(backend, [], [rejection(1, dup=True)])).rejections_stored == 0
    # The device sends the same bad payload again (no DUP): that is a new event.
    assert (await write(backend, [], [rejection(2)])).rejections_stored == 1
    rows = await backend.query("SELECT correlation_id FROM rejected_messages ORDER BY id")
    assert [r["correlation_id"] for r in rows] == ["corr-0", "corr-2"]


async def test_dup_rejection_not_yet_stored_is_stored(backend: Backend) -> None:
    await write(backend, [], [rejection(0, b"other payload")])
    result = await write(
        backend, [], [rejection(1, dup=True), rejection(2, dup=True, topic="sensors/d2/s1")]
    )
    assert result.rejections_stored == 2
    # Same payload on another topic, or another payload on the same topic, is not a duplicate.
    assert len(await backend.query("SELECT id FROM rejected_messages")) == 3


async def test_dup_and_fresh_copy_in_one_batch_store_once(backend: Backend) -> None:
    result = await write(backend, [], [rejection(0), rejection(0, dup=True)])
    assert result.rejections_stored == 1
    assert len(await backend.query("SELECT id FROM rejected_messages")) == 1


# ------------------------------------------------------------------------------ devices, schema


async def test_load_devices_feeds_the_registry(backend: Backend) -> None:
    assert await backend.writer.load_devices() == []
    await backend.execute(
        "INSERT INTO devices (device_id, sensor_id, site, unit, min_value, max_value) VALUES "
        "('d1', '*', 'berlin', 'degC', 0, 100), ('d1', 'temp', NULL, NULL, NULL, 80)"
    )
    await backend.execute("INSERT INTO devices (device_id, line) VALUES ('d2', 'L2')")
    rows = sorted(
        await backend.writer.load_devices(), key=lambda r: (r["device_id"], r["sensor_id"])
    )
    assert [(r["device_id"], r["sensor_id"], r["site"], r["max_value"]) for r in rows] == [
        ("d1", "*", "berlin", 100.0), ("d1", "temp", None, 80.0), ("d2", "*", None, None),
    ]  # fmt: skip
    assert all(r["updated_at"] is not None for r in rows)
    registry = DeviceRegistry(rows)
    assert registry.lookup("d1", "temp") == DeviceInfo(
        site="berlin", unit="degC", min_value=0.0, max_value=80.0
    )
    assert registry.lookup("d2", "x") == DeviceInfo(line="L2")


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


# ------------------------------------------------------------------------------ failures


async def test_unencodable_text_is_row_rejected(backend: Backend) -> None:
    with pytest.raises(RowRejected):
        await write(backend, [(reading(unit="\ud800"), message(0))])


async def test_sqlite_unmigrated_file_is_a_storage_error(tmp_path: Path) -> None:
    writer = SqliteWriter(tmp_path / "empty.db", max_payload_bytes=MAX_PAYLOAD)
    try:
        with pytest.raises(StorageError, match="no such table") as info:
            await writer.write([(reading(), message(0))], [])
        assert not isinstance(info.value, RowRejected)
    finally:
        await writer.close()


async def test_sqlite_locked_database_is_a_storage_error_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    await asyncio.to_thread(upgrade, f"sqlite:///{path}")
    writer = SqliteWriter(path, max_payload_bytes=MAX_PAYLOAD, busy_timeout=0.05)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        await writer.start()
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StorageError, match="locked") as info:
            await writer.write([(reading(), message(0))], [])
        assert not isinstance(info.value, RowRejected)
        blocker.execute("ROLLBACK")
        assert (await writer.write([(reading(), message(0))], [])).new == [True]
    finally:
        blocker.close()
        await writer.close()


async def test_sqlite_failed_batch_leaves_nothing_behind(tmp_path: Path) -> None:
    backend = await sqlite_backend(tmp_path / "atomic.db")
    try:
        await backend.execute(
            "CREATE TRIGGER no_bad BEFORE INSERT ON sensor_readings WHEN NEW.value = 666 "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        batch = [(reading(seconds=0), message(0)), (reading(seconds=1, value=666), message(1))]
        with pytest.raises(RowRejected):
            await write(backend, batch, [rejection(2)])
        assert await backend.query("SELECT * FROM sensor_readings") == []
        assert await backend.query("SELECT * FROM rejected_messages") == []
        assert (await write(backend, batch[:1])).new == [True]
    finally:
        await backend.writer.close()


async def test_postgres_failed_batch_is_row_rejected_and_atomic(pg_url: str) -> None:
    backend = await postgres_backend(pg_url)
    try:
        await backend.execute(
            "ALTER TABLE sensor_readings ADD CONSTRAINT no_bad CHECK (value <> 666)"
        )
        batch = [(reading(seconds=0), message(0)), (reading(seconds=1, value=666), message(1))]
        with pytest.raises(RowRejected):
            await write(backend, batch, [rejection(2)])
        assert await backend.query("SELECT * FROM sensor_readings") == []
        assert await backend.query("SELECT * FROM rejected_messages") == []
        # The pool is still usable: a data error does not drop the connection.
        assert (await write(backend, batch[:1], [rejection(3)])).new == [True]
    finally:
        await backend.writer.close()


async def test_postgres_stopped_server_is_a_storage_error_not_a_hang(tmp_path: Path) -> None:
    server = Postgres(tmp_path / "pg")
    await asyncio.to_thread(server.start)
    try:
        url = await asyncio.to_thread(server.create_database, "ingest")
        await asyncio.to_thread(upgrade, url)
        writer = PostgresWriter(
            url, max_payload_bytes=MAX_PAYLOAD, command_timeout=3, connect_timeout=2
        )
        try:
            assert (await writer.write([(reading(seconds=0), message(0))], [])).new == [True]
            await asyncio.to_thread(server.stop)
            for attempt in range(2):  # the broken pool, then a fresh connect that is refused
                started = time.monotonic()
                with pytest.raises(StorageError) as info:
                    await writer.write([(reading(seconds=1), message(1))], [])
                assert not isinstance(info.value, RowRejected), attempt
                assert time.monotonic() - started < 4, attempt
            fresh = PostgresWriter(url, max_payload_bytes=MAX_PAYLOAD, connect_timeout=2)
            with pytest.raises(StorageError, match="cannot connect"):
                await fresh.start()
            await asyncio.to_thread(server.start)
            # Back up: the writer reconnects by itself.
            assert (await writer.write([(reading(seconds=1), message(1))], [])).new == [True]
        finally:
            await writer.close()
    finally:
        await asyncio.to_thread(server.stop)


async def test_postgres_silent_server_times_out_on_connect() -> None:
    release = asyncio.Event()
    handlers: list[asyncio.Task[None]] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        await release.wait()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    writer = PostgresWriter(
        f"postgresql://postgres@127.0.0.1:{port}/x", max_payload_bytes=MAX_PAYLOAD,
        connect_timeout=0.5, command_timeout=0.5,
    )  # fmt: skip
    try:
        started = time.monotonic()
        with pytest.raises(StorageError):
            await writer.write([(reading(), message(0))], [])
        assert time.monotonic() - started < 2.5
    finally:
        await writer.close()
        release.set()
        server.close()
        await server.wait_closed()
        await asyncio.gather(*handlers, return_exceptions=True)


class FreezableProxy:
    """A TCP proxy in front of PostgreSQL that can stop forwarding: a half-open connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._tasks.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        writer.close()

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_postgres_half_open_connection_fails_the_batch_within_the_timeout(
    pg_url: str,
) -> None:
    await asyncio.to_thread(upgrade, pg_url)
    port = int(pg_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    proxy = FreezableProxy(port)
    proxy_port = await proxy.start()
    url = pg_url.replace(f":{port}/", f":{proxy_port}/")
    writer = PostgresWriter(
        url, max_payload_bytes=MAX_PAYLOAD, command_timeout=1, connect_timeout=1
    )
    try:
        assert (await writer.write([(reading(seconds=0), message(0))], [])).new == [True]
        proxy.flowing.clear()  # packets vanish: neither side notices
        started = time.monotonic()
        with pytest.raises(StorageError) as info:
            await writer.write([(reading(seconds=1), message(1))], [])
        assert not isinstance(info.value, RowRejected)
        assert time.monotonic() - started < 3
        proxy.flowing.set()
        # The next write starts over on fresh connections and succeeds. The frozen statement
        # may still reach the server once packets flow again (an in-doubt commit, as with
        # any commit whose answer is lost): the retry then finds the row already stored,
        # and either way it is stored exactly once.
        assert (await writer.write([(reading(seconds=1), message(1))], [])).new in ([True], [False])
        conn = await asyncpg.connect(pg_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM sensor_readings") == 2
        finally:
            await conn.close()
    finally:
        await writer.close()
        await proxy.close()
