"""db.spool: the store-and-forward spool; and Storage, PersistenceAgent and SpoolDrainer on it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from agents.bus import Bus
from agents.drainer import SpoolDrainer
from agents.events import (
    EnrichedMessage,
    RawMessage,
    ReadingsStored,
    RejectedMessage,
    RejectionsStored,
)
from agents.metrics import PipelineMetrics
from agents.persistence import PersistenceAgent
from agents.storage import Storage
from db.rows import ALERT_CLOSED, ALERT_OPEN, AlertChange, ReadingRow, RejectionRow
from db.spool import Spool, SpoolFull, read_stats
from tests.harness.servers import wait_until_async
from tests.unit.fakes import FakeWriter

NOW = datetime(2026, 11, 27, 7, 30, 0, 123456, tzinfo=UTC)


def row(i: int) -> ReadingRow:
    ts = NOW + timedelta(microseconds=i)
    return ReadingRow(
        "dev", "temp", ts, float(i), "degC", "good", i, None, "a", None, None, None, NOW, f"c{i}"
    )


def rejection(i: int, *, redelivered: bool = False) -> RejectionRow:
    return RejectionRow(
        NOW, "sensors/dev/temp", b"\xff bad", "ab" * 32, 5, "not_utf8", "bad", "dev", f"r{i}",
        redelivered,
    )  # fmt: skip


def change(i: int, state: str = ALERT_OPEN, **fields: Any) -> AlertChange:
    return AlertChange(
        state, "dev", "temp", "flatline", NOW + timedelta(microseconds=i), float(i), 1.0,
        "frozen", f"c{i}", **fields,
    )  # fmt: skip


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    spool = Spool(tmp_path / "spool.db", max_bytes=4096)
    await spool.open()
    yield spool
    await spool.close()


async def test_batches_come_back_oldest_first_and_intact(spool: Spool) -> None:
    await spool.put([row(1), row(2)], [rejection(1, redelivered=True)])
    await spool.put([row(3)], [])
    await spool.put([row(4)], [])
    assert (spool.stats.readings, spool.stats.rejections, spool.stats.batches) == (4, 1, 3)
    first = await spool.oldest(max_readings=3)  # small batches are replayed together
    assert first is not None
    assert first.readings == [row(1), row(2), row(3)]
    assert first.rejections == [rejection(1, redelivered=True)]
    assert all(type(r) is ReadingRow for r in first.readings)
    assert type(first.rejections[0]) is RejectionRow
    assert first.rejections[0].redelivered is True
    await spool.delete(first.ids)
    second = await spool.oldest(max_readings=3)
    assert second is not None
    assert second.readings == [row(4)]
    assert second.rejections == []
    await spool.delete(second.ids)
    assert await spool.oldest() is None
    assert (spool.stats.readings, spool.stats.bytes, spool.stats.oldest_created_at) == (0, 0, None)


async def test_rows_keep_every_column_through_the_spool(spool: Spool) -> None:
    offset = datetime(2026, 11, 27, 9, 30, tzinfo=UTC)
    full = ReadingRow(
        "d\u00e9v", "s/1", offset, -0.1, None, None, -(2**63), "berlin", "hall", "L1", "press",
        "pt100", NOW + timedelta(days=1, microseconds=7), "corr",
    )  # fmt: skip
    binary = RejectionRow(
        NOW, "x/y", bytes(range(256)), "cd" * 32, 256, "bad_type", "e\u00e9", None, "j1"
    )
    await spool.put([full], [binary])
    batch = await spool.oldest()
    assert batch is not None
    assert batch.readings == [full]
    assert batch.rejections == [binary]
    assert batch.rejections[0].redelivered is False
    assert batch.readings[0].ts.tzinfo is UTC


async def test_the_on_disk_encoding_of_earlier_versions_still_reads(tmp_path: Path) -> None:
    """A spool left behind by the release before the row NamedTuples replays unchanged."""
    path = tmp_path / "spool.db"
    first = Spool(path, 1 << 20)
    await first.open()  # creates the schema
    await first.close()
    ts_us = 1_795_000_000_123_456
    body = orjson.dumps({
        "r": [["dev", "temp", ts_us, 1.5, "degC", "good", 7, None, "a", None, None, None,
               ts_us, "c1"]],
        "j": [[ts_us, "sensors/dev/temp", base64.b64encode(b"\xff").decode(), "ab" * 32, 1,
               "not_utf8", "bad", "dev", "r1", True]],
    })  # fmt: skip
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "INSERT INTO batches (created_at, readings, rejections, bytes, body)"
            " VALUES (?, 1, 1, ?, ?)",
            (time.time(), len(body), body),
        )
    again = Spool(path, 1 << 20)
    await again.open()
    try:
        batch = await again.oldest()
        assert batch is not None
        at = datetime(2026, 11, 18, 11, 6, 40, 123456, tzinfo=UTC)
        assert at - datetime(1970, 1, 1, tzinfo=UTC) == timedelta(microseconds=ts_us)
        assert batch.readings == [
            ReadingRow("dev", "temp", at, 1.5, "degC", "good", 7, None, "a", None, None, None,
                       at, "c1"),
        ]  # fmt: skip
        assert batch.rejections == [
            RejectionRow(at, "sensors/dev/temp", b"\xff", "ab" * 32, 1, "not_utf8", "bad", "dev",
                         "r1", redelivered=True),
        ]  # fmt: skip
        assert batch.alerts == []  # spooled before alert changes were: none
    finally:
        await again.close()


async def test_alert_changes_come_back_intact_and_in_order(spool: Spool) -> None:
    everything = change(
        2, ALERT_CLOSED, unit="degC", site="berlin", area="hall", line="L1", asset="press",
        sensor_type="pt100", priority="high", task_description="press frozen",
        auto_close_task=True,
    )  # fmt: skip
    offset = change(3)._replace(
        ts=datetime(2026, 11, 27, 9, 30, tzinfo=timezone(timedelta(hours=2))), value=None
    )
    await spool.put([row(1)], [], [change(1), everything])
    await spool.put([], [], [offset])  # alert changes alone
    batch = await spool.oldest()
    assert batch is not None
    assert batch.readings == [row(1)]
    assert batch.alerts == [change(1), everything, offset]
    assert all(type(c) is AlertChange for c in batch.alerts)
    assert batch.alerts[2].ts.tzinfo is UTC
    assert batch.alerts[1].auto_close_task is True
    await spool.delete(batch.ids)
    assert await spool.oldest() is None
    assert (spool.stats.batches, spool.stats.bytes) == (0, 0)


async def test_a_batch_of_alert_changes_alone_is_kept_and_replayed(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    first = Spool(path, 1 << 20)
    await first.open()
    await first.put([], [], [change(1)])
    assert (first.stats.batches, first.stats.readings, first.stats.rejections) == (1, 0, 0)
    await first.close()
    again = Spool(path, 1 << 20)
    await again.open()
    try:
        batch = await again.oldest()
        assert batch is not None
        assert (batch.readings, batch.rejections, batch.alerts) == ([], [], [change(1)])
    finally:
        await again.close()


async def test_readings_only_bodies_are_written_as_before(spool: Spool) -> None:
    """No "a" key without alert changes: the release before them reads such a spool too."""
    await spool.put([row(1)], [rejection(1)])
    with contextlib.closing(sqlite3.connect(spool.path)) as conn:
        (body,) = conn.execute("SELECT body FROM batches").fetchone()
    assert set(orjson.loads(body)) == {"r", "j"}


async def test_a_batch_without_readings_weighs_one(spool: Spool) -> None:
    await spool.put([row(0), row(1), row(2)], [])
    await spool.put([], [], [change(1)])
    await spool.put([], [rejection(1)])
    await spool.put([row(3)], [])
    taken = []
    for _ in range(2):
        batch = await spool.oldest(max_readings=4)
        assert batch is not None
        taken.append((len(batch.readings), len(batch.rejections), len(batch.alerts)))
        await spool.delete(batch.ids)
    # 3 readings + the alert changes (1) | the dead letter (1) + 1 reading
    assert taken == [(3, 0, 1), (1, 1, 0)]
    assert await spool.oldest() is None


async def test_a_full_spool_refuses_and_keeps_what_it_has(spool: Spool) -> None:
    async def fill() -> None:
        for i in range(1000):
            await spool.put([row(i)], [])

    with pytest.raises(SpoolFull):
        await fill()
    kept = spool.stats.readings
    assert 0 < kept < 1000
    assert spool.stats.bytes <= spool.max_bytes


async def test_puts_at_once_cannot_overshoot_the_bound_together(spool: Spool) -> None:
    """Several batches in flight spool at the same time: the bound still holds."""
    results = await asyncio.gather(
        *(spool.put([row(i * 10 + j) for j in range(10)], []) for i in range(20)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, SpoolFull)]
    assert refused  # 20 batches of 10 readings do not fit in 4 KiB
    assert len(refused) + spool.stats.batches == 20
    assert spool.stats.bytes <= spool.max_bytes


async def test_the_spool_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    first = Spool(path, 1 << 20)
    await first.open()
    await first.put([row(1)], [rejection(1)])
    await first.close()
    assert read_stats(path).readings == 1  # what `ingestd spool stats` prints
    again = Spool(path, 1 << 20)
    await again.open()
    assert again.stats.readings == 1
    assert again.stats.oldest_age(time.time() + 5) >= 5
    batch = await again.oldest()
    assert batch is not None
    assert batch.readings == [row(1)]
    assert batch.rejections == [rejection(1)]
    await again.close()


def test_read_stats_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_stats(tmp_path / "none.db").batches == 0


async def test_a_corrupt_file_is_moved_aside_and_a_new_one_started(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(b"this is not sqlite" * 500)
    spool = Spool(path, 1 << 20)
    await spool.open()
    assert spool.corrupt_files == 1
    assert len(await asyncio.to_thread(sorted, tmp_path.glob("spool.db.corrupt-*"))) == 1  # noqa: ASYNC240
    await spool.put([row(1)], [])
    assert spool.stats.readings == 1
    await spool.close()


async def test_an_unreadable_record_is_quarantined_not_blocking(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path, 1 << 20)
    await spool.open()
    await spool.put([row(1)], [])
    await spool.put([row(2)], [])
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE batches SET body = x'00ff' WHERE id = (SELECT min(id) FROM batches)")
    batch = await spool.oldest()
    assert batch is not None
    assert batch.readings == [row(2)]
    assert spool.corrupt_files == 1
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 1
    await spool.close()


async def test_oldest_merges_batches_up_to_the_bound(spool: Spool) -> None:
    sizes = [2, 2, 3, 1, 1]
    start = 0
    for size in sizes:
        await spool.put([row(start + i) for i in range(size)], [])
        start += size
    taken = []
    for bound in (4, 4, 4):  # 2+2 | 3+1 | 1
        batch = await spool.oldest(max_readings=bound)
        assert batch is not None
        assert len(batch.readings) <= bound
        taken.append([r.value for r in batch.readings])
        await spool.delete(batch.ids)
    assert taken == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]  # oldest first, none skipped or split
    assert await spool.oldest(max_readings=4) is None


async def test_oldest_returns_one_batch_even_if_it_alone_is_larger(spool: Spool) -> None:
    await spool.put([row(i) for i in range(10)], [])
    await spool.put([row(10)], [])
    first = await spool.oldest(max_readings=3)
    assert first is not None
    assert len(first.ids) == 1  # never split, never stuck
    assert [r.value for r in first.readings] == [float(i) for i in range(10)]
    await spool.delete(first.ids)
    second = await spool.oldest(max_readings=3)
    assert second is not None
    assert [r.value for r in second.readings] == [10.0]


async def test_oldest_reads_no_body_beyond_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path, 1 << 20)
    await spool.open()
    try:
        for i in range(3):
            await spool.put([row(i)], [])
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute(
                "UPDATE batches SET body = x'00ff' WHERE id = (SELECT max(id) FROM batches)"
            )
        batch = await spool.oldest(max_readings=2)
        assert batch is not None
        assert batch.readings == [row(0), row(1)]
        assert spool.corrupt_files == 0  # the corrupt third body was not read
        await spool.delete(batch.ids)
        assert await spool.oldest(max_readings=2) is None  # now it is read: quarantined
        assert spool.corrupt_files == 1
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 1
    finally:
        await spool.close()


# ------------------------------------------------------------------ the spool in the pipeline


def message(seq: int) -> RawMessage:
    return RawMessage(seq, "sensors/dev/temp", b"{}", 1, NOW, time.monotonic(), f"c{seq}")


def enriched(seq: int) -> EnrichedMessage:
    return EnrichedMessage(message(seq), [row(seq)])


class Pipeline:
    """A PersistenceAgent and a SpoolDrainer sharing one Storage over a spool."""

    def __init__(self, tmp_path: Path, max_bytes: int) -> None:
        self.metrics = PipelineMetrics(CollectorRegistry())
        self.bus = Bus(self.metrics)
        self.inbox = self.bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage)
        self.events = self.bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
        self.spool = Spool(tmp_path / "spool.db", max_bytes)
        self.writer = FakeWriter()
        self.writer.up = False
        self.storage = Storage(self.writer, self.spool, self.metrics)
        self.settled: list[int] = []
        self.agent = PersistenceAgent(
            self.bus, self.metrics, self.inbox, self.storage, self.settled.extend, 100,
            retry_max_seconds=0.05,
        )  # fmt: skip
        self.drainer = SpoolDrainer(
            self.spool, self.storage, self.bus, self.metrics, retry_max_seconds=0.05
        )

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


@pytest.fixture
async def pipeline(tmp_path: Path) -> AsyncIterator[Pipeline]:
    made = Pipeline(tmp_path, 1 << 20)
    await made.storage.start()  # the database is down: not an error at start
    try:
        yield made
    finally:
        await made.storage.close(grace_seconds=1)


async def test_an_outage_spools_and_acks_then_the_drainer_replays(pipeline: Pipeline) -> None:
    p = pipeline
    assert not p.storage.database_up
    assert p.storage.not_ready_reason() is None  # spooling: still ready
    await p.agent.handle([enriched(0), enriched(1), RejectedMessage(message(2), "bad_type", "no")])
    assert p.settled == [0, 1, 2]  # durable in the spool: acknowledged
    assert p.spool.stats.readings == 2
    assert p.spool.stats.rejections == 1
    assert p.sample("ingestd_database_up") == 0
    failed = p.events.get_nowait()
    assert isinstance(failed, RejectionsStored)  # the dead letter is durable: announced now
    done = p.events.get_nowait()
    # Spooled readings are announced when replayed, not before; the messages are done.
    assert done == ReadingsStored([], done=(0, 1, 2))
    assert p.events.empty()

    task = asyncio.create_task(p.drainer.run())
    try:
        p.writer.up = True
        await wait_until_async(lambda: p.spool.stats.batches == 0, 10)
        assert p.storage.database_up
        assert len(p.writer.keys) == 2
        assert [r.correlation_id for r in p.writer.rejections] == ["c2"]
        assert True in p.writer.replays  # replayed with replay=True: may be stored already
        assert p.metrics.stored == 2
        assert p.sample("ingestd_spool_replayed_total") == 2
        stored = p.events.get_nowait()
        assert isinstance(stored, ReadingsStored)
        assert stored.rows == [row(0), row(1)]
        assert stored.done == ()  # a replay settles no message: their acks went out earlier

        await p.agent.handle([enriched(3)])  # the database is back: written directly
        assert p.settled[-1] == 3
        assert p.spool.stats.batches == 0
        assert (NOW + timedelta(microseconds=3)) in {key[2] for key in p.writer.keys}
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_full_spool_withholds_acks_until_there_is_room(tmp_path: Path) -> None:
    p = Pipeline(tmp_path, 600)
    await p.storage.start()
    try:
        for seq in range(50):  # fill the spool while the database is away
            if p.spool.stats.bytes > 400:
                break
            await p.agent.handle([enriched(seq)])
        blocked = asyncio.create_task(p.agent.handle([enriched(100 + i) for i in range(20)]))
        await wait_until_async(lambda: p.storage.spool_full, 5)
        assert p.sample("ingestd_spool_full") == 1
        assert p.storage.not_ready_reason() == "database unavailable and the spool is full"
        assert 100 not in p.settled
        p.writer.up = True
        p.storage.mark_up()  # as the drainer does once the database answers
        async with asyncio.timeout(5):
            await blocked
        assert p.settled[-20:] == [100 + i for i in range(20)]
        assert not p.storage.spool_full
        assert p.sample("ingestd_spool_full") == 0
    finally:
        await p.storage.close(grace_seconds=1)
