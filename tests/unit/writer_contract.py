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
from db.rows import ALERT_CLOSED, ALERT_OPEN, AlertChange, ReadingRow, RejectionRow
from db.sqlite import SqliteWriter
from db.writer import OpenAlert, RowRejected, WriteResult

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


def opening(
    sensor: str = "s1",
    seconds: float = 0,
    kind: str = "flatline",
    *,
    priority: str = "medium",
    asset: str | None = "press",
    device: str = "d1",
) -> AlertChange:
    """An alert of ``device``/``sensor`` opening at T0 + ``seconds``, on ``asset``."""
    return AlertChange(
        ALERT_OPEN, device, sensor, kind, T0 + timedelta(seconds=seconds), 4.5, 1.0,
        f"{sensor} frozen at 4.5", f"corr-{sensor}-{seconds}", unit="bar", site="berlin",
        area="hall", line="L1", asset=asset, sensor_type="pressure", priority=priority,
        task_description=f"{kind} on {asset or device}",
    )  # fmt: skip


def closing(
    sensor: str = "s1",
    seconds: float = 600,
    kind: str = "flatline",
    *,
    auto_close_task: bool = False,
    asset: str | None = "press",
) -> AlertChange:
    """The closing of the open alert of ``d1``/``sensor`` at T0 + ``seconds``."""
    opened = opening(sensor, seconds, kind, asset=asset)
    return opened._replace(
        state=ALERT_CLOSED, value=1.0, score=0.0, detail="normal again",
        auto_close_task=auto_close_task,
    )  # fmt: skip


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

    async def alerts(self, *changes: AlertChange, replay: bool = False) -> WriteResult:
        """Apply alert changes alone, as the AnomalyAgent writes them."""
        return await self.writer.write([], [], replay=replay, alerts=changes)


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

    # -------------------------------------------------------------------------- alerts, tasks

    async def test_an_opening_stores_the_alert_and_opens_a_task(self, db: Db) -> None:
        change = opening()
        result = await db.alerts(change)
        assert (result.new, result.rejections_stored) == ([], 0)
        (outcome,) = result.alerts
        assert (outcome.change, outcome.opened_ts, outcome.task_change) == (change, T0, "opened")
        task = outcome.task
        assert task is not None
        assert task._replace(id=0, updated_at=T0) == (
            0, "press", "flatline", "d1", "s1", "open", "medium", "flatline on press", 1, T0, T0,
            T0, None, None, "berlin", "hall", "L1", "press",
        )  # fmt: skip
        assert task.updated_at.tzinfo is not None
        assert await db.writer.task(task.id) == task
        assert await db.writer.task(task.id + 1000) is None
        (row,) = await db.query("SELECT * FROM anomaly_alerts")
        assert (row["id"], row["task_id"], db.ts(row["ts"]), row["closed_at"]) == (
            outcome.alert_id, task.id, T0, None,
        )  # fmt: skip
        columns = ("device_id", "sensor_id", "kind", "value", "score", "detail", "correlation_id",
                   "unit", "site", "area", "line", "asset", "sensor_type")  # fmt: skip
        assert {k: row[k] for k in columns} == {k: getattr(change, k) for k in columns}
        assert await db.writer.open_alerts() == [OpenAlert("d1", "s1", "flatline", T0, "pressure")]

    async def test_a_second_opening_while_one_is_open_changes_nothing(self, db: Db) -> None:
        await db.alerts(opening(seconds=0))
        assert (await db.alerts(opening(seconds=10, priority="high"))).alerts == []
        assert len(await db.query("SELECT id FROM anomaly_alerts")) == 1
        (task,) = await db.writer.tasks()
        assert (task.alert_count, task.priority) == (1, "medium")

    async def test_another_series_of_the_subject_attaches_to_its_task(self, db: Db) -> None:
        (first,) = (await db.alerts(opening("s1", 0, priority="low"))).alerts
        (second,) = (await db.alerts(opening("s2", 5, priority="high"))).alerts
        assert first.task is not None
        assert second.task_change == "attached"
        assert second.task is not None
        assert second.task.id == first.task.id
        assert (second.task.alert_count, second.task.priority) == (2, "high")
        assert (second.task.opened_at, second.task.last_alert_at) == (T0, T0 + timedelta(seconds=5))
        # A lower priority never lowers it; an older reading never moves last_alert_at back.
        (third,) = (await db.alerts(opening("s3", -5, priority="medium"))).alerts
        assert third.task is not None
        assert (third.task.alert_count, third.task.priority) == (3, "high")
        assert third.task.last_alert_at == T0 + timedelta(seconds=5)
        # Another kind, or another subject, is another task.
        (other_kind,) = (await db.alerts(opening("s1", 0, "out_of_range"))).alerts
        (other_asset,) = (await db.alerts(opening("s9", 0, asset="pump"))).alerts
        assert (other_kind.task_change, other_asset.task_change) == ("opened", "opened")
        (no_asset,) = (await db.alerts(opening("s8", 0, asset=None))).alerts
        assert no_asset.task is not None
        assert (no_asset.task.subject, no_asset.task.asset) == ("d1", None)
        rows = await db.query("SELECT task_id FROM anomaly_alerts ORDER BY id")
        assert [r["task_id"] for r in rows][:3] == [first.task.id] * 3

    async def test_a_closing_ends_the_episode_and_a_new_one_may_open(self, db: Db) -> None:
        (opened,) = (await db.alerts(opening(seconds=0))).alerts
        (closed,) = (await db.alerts(closing(seconds=600))).alerts
        assert (closed.alert_id, closed.opened_ts) == (opened.alert_id, T0)
        assert (closed.task, closed.task_change) == (None, None)
        (row,) = await db.query("SELECT closed_at, task_id FROM anomaly_alerts")
        assert db.ts(row["closed_at"]) == T0 + timedelta(seconds=600)
        assert await db.writer.open_alerts() == []
        assert (await db.alerts(closing(seconds=700))).alerts == []  # nothing open any more
        (again,) = (await db.alerts(opening(seconds=900))).alerts
        assert again.alert_id != opened.alert_id
        assert again.task is not None
        # Without auto_close_task the task stayed open: the new episode attaches to it.
        assert (again.task_change, again.task.alert_count) == ("attached", 2)
        assert len(await db.query("SELECT id FROM anomaly_alerts")) == 2

    async def test_a_closing_with_nothing_open_changes_nothing(self, db: Db) -> None:
        assert (await db.alerts(closing())).alerts == []
        await db.alerts(opening(seconds=1000))
        # A closing older than the open alert belongs to an earlier episode.
        assert (await db.alerts(closing(seconds=600))).alerts == []
        assert len(await db.writer.open_alerts()) == 1

    async def test_changes_applied_twice_change_nothing_the_second_time(self, db: Db) -> None:
        changes = [
            opening("s1", 0), opening("s2", 1, priority="high"), closing("s1", 600),
            opening("s1", 900), closing("s2", 950, auto_close_task=True),
        ]  # fmt: skip
        first = await db.alerts(*changes, replay=True)
        assert [o.change for o in first.alerts] == changes
        before = await db.query("SELECT * FROM anomaly_alerts ORDER BY id")
        tasks = await db.writer.tasks()
        for replay in (True, False):
            assert (await db.alerts(*changes, replay=replay)).alerts == []
        assert await db.query("SELECT * FROM anomaly_alerts ORDER BY id") == before
        assert await db.writer.tasks() == tasks
        assert [(t.alert_count, t.status, t.priority) for t in tasks] == [(3, "open", "high")]
        assert await db.writer.open_alerts() == [
            OpenAlert("d1", "s1", "flatline", T0 + timedelta(seconds=900), "pressure")
        ]

    async def test_auto_close_closes_the_task_once_none_of_its_alerts_is_open(self, db: Db) -> None:
        (opened,) = (await db.alerts(opening("s1", 0), opening("s2", 1))).alerts[:1]
        (first,) = (await db.alerts(closing("s1", 600, auto_close_task=True))).alerts
        assert (first.task, first.task_change) == (None, None)  # s2 is still open
        (last,) = (await db.alerts(closing("s2", 700, auto_close_task=True))).alerts
        assert last.task_change == "closed"
        assert last.task is not None
        assert opened.task is not None
        assert (last.task.id, last.task.status, last.task.alert_count) == (
            opened.task.id, "closed", 2,
        )  # fmt: skip
        assert last.task.closed_at is not None
        (fresh,) = (await db.alerts(opening("s1", 900))).alerts
        assert fresh.task is not None
        assert (fresh.task_change, fresh.task.status) == ("opened", "open")
        assert fresh.task.id != opened.task.id
        # A closing whose task was closed by hand leaves the task alone.
        await db.writer.set_task_status(fresh.task.id, "closed")
        (after,) = (await db.alerts(closing("s1", 1600, auto_close_task=True))).alerts
        assert (after.task, after.task_change) == (None, None)

    async def test_set_task_status_moves_forward_only(self, db: Db) -> None:
        (outcome,) = (await db.alerts(opening())).alerts
        assert outcome.task is not None
        task_id = outcome.task.id
        acked = await db.writer.set_task_status(task_id, "acknowledged")
        assert acked is not None
        assert (acked.status, acked.closed_at) == ("acknowledged", None)
        assert acked.acknowledged_at is not None
        assert await db.writer.set_task_status(task_id, "acknowledged") == acked
        assert await db.writer.set_task_status(task_id, "open") == acked  # never back
        # An acknowledged task still takes the alerts of its subject and kind.
        (attached,) = (await db.alerts(opening("s2", 5, priority="high"))).alerts
        assert attached.task is not None
        assert (attached.task.id, attached.task.status) == (task_id, "acknowledged")
        closed = await db.writer.set_task_status(task_id, "closed")
        assert closed is not None
        assert (closed.status, closed.acknowledged_at) == ("closed", acked.acknowledged_at)
        assert closed.closed_at is not None
        for status in ("acknowledged", "open", "closed"):
            assert await db.writer.set_task_status(task_id, status) == closed
        assert await db.writer.set_task_status(task_id + 100, "closed") is None
        with pytest.raises(ValueError, match="unknown task status"):
            await db.writer.set_task_status(task_id, "done")

    async def test_tasks_newest_first_and_counted(self, db: Db) -> None:
        await db.alerts(
            opening("s1", 0), opening("s2", 0, asset="pump", priority="high"),
            opening("s3", 0, "out_of_range", priority="low"),
        )  # fmt: skip
        tasks = await db.writer.tasks()
        assert [(t.subject, t.kind) for t in tasks] == [
            ("press", "out_of_range"), ("pump", "flatline"), ("press", "flatline"),
        ]  # fmt: skip
        assert [t.id for t in tasks] == sorted((t.id for t in tasks), reverse=True)
        await db.writer.set_task_status(tasks[1].id, "closed")
        assert [t.subject for t in await db.writer.tasks("closed")] == ["pump"]
        assert [t.kind for t in await db.writer.tasks("open", limit=1)] == ["out_of_range"]
        assert await db.writer.tasks("acknowledged") == []
        assert await db.writer.task_counts() == {
            ("open", "medium"): 1, ("closed", "high"): 1, ("open", "low"): 1,
        }  # fmt: skip

    async def test_alerts_readings_and_rejections_in_one_transaction(self, db: Db) -> None:
        result = await db.writer.write([reading()], [rejection(1)], alerts=[opening()])
        assert (result.new, result.rejections_stored, len(result.alerts)) == ([True], 1, 1)
        # What one part refuses takes the whole write with it: a reading the database
        # cannot store, or a change it must not apply (after its alert row was inserted).
        for refused in (
            ([reading(seconds=1, unit="\ud800")], opening("s2")),
            ([reading(seconds=1)], opening("s2", priority="urgent")),
        ):
            with pytest.raises(RowRejected):
                await db.writer.write(refused[0], [rejection(2)], alerts=[refused[1]])
        assert len(await db.query("SELECT ts FROM sensor_readings")) == 1
        assert len(await db.query("SELECT id FROM rejected_messages")) == 1
        assert len(await db.query("SELECT id FROM anomaly_alerts")) == 1
        retried = await db.writer.write([reading(seconds=1)], [], alerts=[opening("s2")])
        assert (retried.new, [o.task_change for o in retried.alerts]) == ([True], ["attached"])
