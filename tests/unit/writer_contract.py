"""What every Writer promises, as tests: test_sqlite.py and test_postgres.py run them on a real
database each (subclass ``WriterContract`` and provide a ``db`` fixture)."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from db.postgres import PostgresWriter
from db.rows import ReadingRow, RejectionRow
from db.sqlite import SqliteWriter
from db.writer import RowRejected, WriteResult

T0 = datetime(2026, 11, 27, 7, 30, 0, 123456, tzinfo=UTC)


def reading(
    sensor: str = "s1", seconds: float = 0, value: float = 1.0, *, msg: int = 0, **columns: Any
) -> ReadingRow:
    """A row of ``d1``/``sensor`` at T0 + ``seconds``, received with message ``msg``."""
    values: dict[str, Any] = dict.fromkeys(
        ("unit", "quality", "seq", "site", "area", "line", "asset", "sensor_type")
    )
    values.update(columns)
    return ReadingRow(
        device_id="d1",
        sensor_id=sensor,
        ts=T0 + timedelta(seconds=seconds),
        value=value,
        received_at=T0 + timedelta(seconds=msg),
        correlation_id=f"corr-{msg}",
        **values,
    )


def rejection(
    msg: int,
    payload: bytes = b"not json at all, and long",
    *,
    redelivered: bool = False,
    topic: str = "sensors/d1/s1",
    device_id: str | None = "d1",
) -> RejectionRow:
    """The dead letter of message ``msg`` (whole payload kept: truncation is not the writer's)."""
    return RejectionRow(
        received_at=T0 + timedelta(seconds=msg),
        topic=topic,
        payload=payload,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_size=len(payload),
        reason="malformed_json",
        error="malformed JSON: x",
        device_id=device_id,
        correlation_id=f"corr-{msg}",
        redelivered=redelivered,
    )


@dataclass
class Db:
    """A migrated database, a started writer on it, and a way to read rows back."""

    url: str
    writer: SqliteWriter | PostgresWriter
    query: Callable[[str], Awaitable[list[dict[str, Any]]]]
    execute: Callable[[str], Awaitable[None]]

    @staticmethod
    def ts(value: Any) -> datetime:
        """A stored timestamp as an aware datetime (SQLite keeps UTC text)."""
        if isinstance(value, str):
            return datetime.fromisoformat(value).replace(tzinfo=UTC)
        assert isinstance(value, datetime)
        return value

    async def write(
        self, readings: list[ReadingRow], rejections: list[RejectionRow] | None = None
    ) -> WriteResult:
        return await self.writer.write(readings, rejections or [])


class WriterContract:
    """Idempotent batches, dead letters, redeliveries, the devices table."""

    # -------------------------------------------------------------------------- readings

    async def test_batch_of_readings_is_stored(self, db: Db) -> None:
        full = reading("temp", 0, 21.5, unit="degC", quality="good", seq=7, site="berlin",
                       area="hall", line="L1", asset="press", sensor_type="pt100")  # fmt: skip
        result = await db.write([full, reading("vib", 0, -0.25), reading("temp", 1, 22.0, msg=1)])
        assert result == WriteResult([True, True, True], 0)
        rows = await db.query("SELECT * FROM sensor_readings ORDER BY sensor_id, ts")
        assert [(r["sensor_id"], r["value"]) for r in rows] == [
            ("temp", 21.5), ("temp", 22.0), ("vib", -0.25),
        ]  # fmt: skip
        first = rows[0]
        assert db.ts(first["ts"]) == T0
        assert db.ts(first["received_at"]) == full.received_at
        columns = ("device_id", "unit", "quality", "seq", "site", "area", "line", "asset",
                   "sensor_type", "correlation_id")  # fmt: skip
        assert {k: first[k] for k in columns} == {k: getattr(full, k) for k in columns}
        assert rows[2]["unit"] is None
        assert rows[1]["correlation_id"] == "corr-1"

    async def test_non_utc_timestamps_are_the_same_instant(self, db: Db) -> None:
        assert (await db.write([reading(seconds=0)])).new == [True]
        # The same instant written with another offset is the same key.
        plus_two = reading(value=2.0, msg=1)._replace(
            ts=T0.astimezone(timezone(timedelta(hours=2)))
        )
        other = reading(value=3.0, msg=1)._replace(
            ts=(T0 + timedelta(seconds=5)).astimezone(timezone(timedelta(hours=-7)))
        )
        assert (await db.write([plus_two, other])).new == [False, True]
        rows = await db.query("SELECT ts, value FROM sensor_readings ORDER BY ts")
        assert [(db.ts(r["ts"]), r["value"]) for r in rows] == [
            (T0, 1.0), (T0 + timedelta(seconds=5), 3.0),
        ]  # fmt: skip

    async def test_already_stored_readings_are_flagged_not_new(self, db: Db) -> None:
        await db.write([reading(seconds=0), reading(seconds=1)])
        result = await db.write([reading(seconds=1, value=99, msg=1), reading(seconds=2, msg=1)])
        assert result.new == [False, True]
        rows = await db.query("SELECT ts, value FROM sensor_readings ORDER BY ts")
        assert [r["value"] for r in rows] == [1.0, 1.0, 1.0]  # the first write wins, never updated

    async def test_duplicates_within_one_batch(self, db: Db) -> None:
        batch = [
            reading(seconds=0, value=1),
            reading(seconds=0, value=2, msg=1),  # same key as the first
            reading(seconds=1, msg=1),
            reading(seconds=0, value=3, msg=2),
        ]
        assert (await db.write(batch)).new == [True, False, True, False]
        rows = await db.query("SELECT value FROM sensor_readings ORDER BY ts")
        assert [r["value"] for r in rows] == [1.0, 1.0]

    async def test_empty_batch(self, db: Db) -> None:
        assert await db.write([]) == WriteResult([], 0)

    async def test_a_large_batch(self, db: Db) -> None:
        batch = [reading(f"s{n % 7}", n, msg=n) for n in range(2000)]
        assert (await db.write(batch)).new == [True] * 2000
        assert (await db.write(batch[::3])).new == [False] * len(batch[::3])
        (count,) = await db.query("SELECT count(*) AS n FROM sensor_readings")
        assert count["n"] == 2000

    async def test_a_replayed_batch_is_stored_once(self, db: Db) -> None:
        batch = [reading(seconds=0), reading(seconds=1)]
        assert (await db.writer.write(batch, [], replay=True)).new == [True, True]
        assert (await db.writer.write(batch, [], replay=True)).new == [False, False]
        assert len(await db.query("SELECT ts FROM sensor_readings")) == 2

    # -------------------------------------------------------------------------- rejections

    async def test_rejections_are_stored_as_given(self, db: Db) -> None:
        whole = b"x" * 40
        # As the persistence agent builds it: a truncated copy, the whole payload's digest.
        kept = rejection(3)._replace(
            payload=whole[:16],
            payload_sha256=hashlib.sha256(whole).hexdigest(),
            payload_size=len(whole),
        )
        assert await db.write([reading(msg=2)], [kept]) == WriteResult([True], 1)
        (row,) = await db.query("SELECT * FROM rejected_messages")
        assert bytes(row["payload"]) == whole[:16]
        assert row["payload_sha256"] == hashlib.sha256(whole).hexdigest()
        assert row["payload_size"] == 40
        columns = ("topic", "reason", "error", "device_id", "correlation_id")
        assert [row[k] for k in columns] == [
            "sensors/d1/s1", "malformed_json", "malformed JSON: x", "d1", "corr-3",
        ]  # fmt: skip
        assert db.ts(row["received_at"]) == kept.received_at

    async def test_rejection_with_binary_payload_and_no_device(self, db: Db) -> None:
        binary = bytes(range(256))
        rejected = rejection(0, binary, topic="x/y", device_id=None)
        assert (await db.write([], [rejected])).rejections_stored == 1
        (row,) = await db.query("SELECT payload, device_id FROM rejected_messages")
        assert bytes(row["payload"]) == binary
        assert row["device_id"] is None

    async def test_redelivered_rejection_already_stored_is_not_stored_twice(self, db: Db) -> None:
        assert (await db.write([], [rejection(0)])).rejections_stored == 1
        # The broker redelivers (DUP): the dead letter exists already.
        assert (await db.write([], [rejection(1, redelivered=True)])).rejections_stored == 0
        # The device sends the same bad payload again (no DUP): that is a new event.
        assert (await db.write([], [rejection(2)])).rejections_stored == 1
        rows = await db.query("SELECT correlation_id FROM rejected_messages ORDER BY id")
        assert [r["correlation_id"] for r in rows] == ["corr-0", "corr-2"]

    async def test_redelivered_rejection_not_yet_stored_is_stored(self, db: Db) -> None:
        await db.write([], [rejection(0, b"other payload")])
        result = await db.write(
            [],
            [rejection(1, redelivered=True), rejection(2, redelivered=True, topic="sensors/d2/s1")],
        )
        assert result.rejections_stored == 2
        # Same payload on another topic, or another payload on the same topic, is not a duplicate.
        assert len(await db.query("SELECT id FROM rejected_messages")) == 3

    async def test_redelivery_and_fresh_copy_in_one_batch_store_once(self, db: Db) -> None:
        result = await db.write([], [rejection(0), rejection(0, redelivered=True)])
        assert result.rejections_stored == 1
        assert len(await db.query("SELECT id FROM rejected_messages")) == 1

    # -------------------------------------------------------------------------- devices, ping

    async def test_load_devices(self, db: Db) -> None:
        assert await db.writer.load_devices() == []
        await db.execute(
            "INSERT INTO devices (device_id, sensor_id, site, unit, min_value, max_value) VALUES "
            "('d1', '*', 'berlin', 'degC', 0, 100), ('d1', 'temp', NULL, NULL, NULL, 80)"
        )
        await db.execute("INSERT INTO devices (device_id, line) VALUES ('d2', 'L2')")
        rows = sorted(
            await db.writer.load_devices(), key=lambda r: (r["device_id"], r["sensor_id"])
        )
        columns = ("device_id", "sensor_id", "site", "line", "max_value")
        assert [tuple(r[k] for k in columns) for r in rows] == [
            ("d1", "*", "berlin", None, 100.0), ("d1", "temp", None, None, 80.0),
            ("d2", "*", None, "L2", None),
        ]  # fmt: skip
        assert all(r["updated_at"] is not None for r in rows)

    async def test_ping_answers_while_the_database_is_there(self, db: Db) -> None:
        await db.writer.ping()

    # -------------------------------------------------------------------------- refusals

    async def test_unencodable_text_is_row_rejected(self, db: Db) -> None:
        with pytest.raises(RowRejected):
            await db.write([reading(unit="\ud800")])
        assert await db.query("SELECT * FROM sensor_readings") == []
        assert (await db.write([reading()])).new == [True]  # the writer is still usable
