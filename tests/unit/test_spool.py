"""The store-and-forward spool, the PersistenceAgent's use of it, and the drainer."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from harness.servers import wait_until_async
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
from agents.persistence import PersistenceAgent
from daemon.metrics import Metrics
from db.spool import Spool, SpoolFull, read_stats
from db.writer import Row, StorageError, WriteResult, reading_row
from edge.codecs import Reading

NOW = datetime(2026, 11, 27, 7, 30, 0, 123456, tzinfo=UTC)


def row(i: int) -> Row:
    ts = NOW + timedelta(microseconds=i)
    return (
        "dev",
        "temp",
        ts,
        float(i),
        "degC",
        "good",
        i,
        None,
        "a",
        None,
        None,
        None,
        NOW,
        f"c{i}",
    )


def rejection(i: int, dup: bool = False) -> tuple[Row, bool]:
    return (
        (NOW, "sensors/dev/temp", b"\xff bad", "ab" * 32, 5, "not_utf8", "bad", "dev", f"r{i}"),
        dup,
    )


@pytest.fixture
async def spool(tmp_path: Path) -> Any:
    spool = Spool(tmp_path / "spool.db", max_bytes=4096)
    await spool.open()
    yield spool
    await spool.close()


async def test_batches_come_back_oldest_first_and_intact(spool: Spool) -> None:
    await spool.put([row(1), row(2)], [rejection(1, dup=True)])
    await spool.put([row(3)], [])
    await spool.put([row(4)], [])
    assert (spool.stats.readings, spool.stats.rejections, spool.stats.batches) == (4, 1, 3)
    first = await spool.oldest(max_readings=3)  # small batches are replayed together
    assert first is not None
    assert first.reading_rows == [row(1), row(2), row(3)]
    assert first.rejection_rows == [rejection(1, dup=True)]
    await spool.delete(first.ids)
    second = await spool.oldest(max_readings=3)
    assert second is not None
    assert second.reading_rows == [row(4)]
    await spool.delete(second.ids)
    assert await spool.oldest() is None
    assert (spool.stats.readings, spool.stats.bytes, spool.stats.oldest_created_at) == (0, 0, None)


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
    assert batch.reading_rows == [row(1)]
    await again.close()


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
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE batches SET body = x'00ff' WHERE id = (SELECT min(id) FROM batches)")
    batch = await spool.oldest()
    assert batch is not None
    assert batch.reading_rows == [row(2)]
    assert spool.corrupt_files == 1
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 1
    await spool.close()


# ------------------------------------------------------------------ persistence with a spool


class OutageWriter:
    """A PostgreSQL stand-in that can be switched off; keeps rows by their unique key."""

    def __init__(self) -> None:
        self.up = False
        self.keys: set[tuple[object, ...]] = set()
        self.rejections = 0

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        if not self.up:
            raise StorageError("refused")

    async def write(
        self, readings: list[tuple[Reading, RawMessage]], rejections: list[RejectedMessage]
    ) -> WriteResult:
        return await self.write_rows(
            [reading_row(r, m) for r, m in readings], [((), False)] * len(rejections)
        )

    async def write_rows(
        self,
        reading_rows: list[Row],
        rejection_rows: list[tuple[Row, bool]],
        *,
        replay: bool = False,
    ) -> WriteResult:
        await self.ping()
        new = []
        for r in reading_rows:
            key = (r[0], r[1], r[2])
            new.append(key not in self.keys)
            self.keys.add(key)
        self.rejections += len(rejection_rows)
        return WriteResult(new, len(rejection_rows))


def message(seq: int) -> RawMessage:
    return RawMessage(seq, "sensors/dev/temp", b"{}", 1, NOW, time.monotonic(), f"c{seq}")


def enriched(seq: int) -> EnrichedMessage:
    reading = Reading("dev", "temp", NOW + timedelta(microseconds=seq), float(seq), quality="good")
    return EnrichedMessage(message(seq), [reading])


async def test_an_outage_spools_and_acks_then_the_drainer_replays(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    bus = Bus(metrics)
    inbox = bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage)
    events = bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
    spool = Spool(tmp_path / "spool.db", 1 << 20)
    await spool.open()
    writer = OutageWriter()
    settled: list[int] = []
    agent = PersistenceAgent(bus, metrics, inbox, writer, settled.extend, 100, spool=spool)  # type: ignore[arg-type]
    drainer = SpoolDrainer(spool, writer, agent, bus, metrics, retry_max_seconds=0.05)  # type: ignore[arg-type]

    await agent.handle([enriched(0), enriched(1), RejectedMessage(message(2), "bad_type", "no")])
    assert settled == [0, 1, 2]  # durable in the spool: acknowledged
    assert spool.stats.readings == 2
    assert metrics.registry.get_sample_value("ingestd_database_up") == 0
    failed = events.get_nowait()
    assert isinstance(failed, RejectionsStored)  # the dead letter is durable: announced now

    task = asyncio.create_task(drainer.run())
    writer.up = True
    await wait_until_async(lambda: spool.stats.batches == 0, 10)
    assert agent.database_up
    assert len(writer.keys) == 2
    assert writer.rejections == 1
    assert metrics.stored == 2
    assert metrics.registry.get_sample_value("ingestd_spool_replayed_total") == 2
    stored = events.get_nowait()
    assert isinstance(stored, ReadingsStored)
    assert len(stored.readings) == 2

    await agent.handle([enriched(3)])  # the database is back: written directly
    assert settled[-1] == 3
    assert spool.stats.batches == 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await spool.close()


async def test_a_full_spool_withholds_acks_until_there_is_room(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    bus = Bus(metrics)
    inbox = bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage)
    bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
    spool = Spool(tmp_path / "spool.db", 600)
    await spool.open()
    writer = OutageWriter()
    settled: list[int] = []
    agent = PersistenceAgent(
        bus,
        metrics,
        inbox,
        writer,
        settled.extend,
        100,
        spool=spool,
        retry_max_seconds=0.05,  # type: ignore[arg-type]
    )
    for seq in range(50):  # fill the spool while the database is away
        if spool.stats.bytes > 400:
            break
        await agent.handle([enriched(seq)])
    blocked = asyncio.create_task(agent.handle([enriched(100 + i) for i in range(20)]))
    await wait_until_async(lambda: agent.spool_full, 5)
    assert metrics.registry.get_sample_value("ingestd_spool_full") == 1
    acked_while_full = list(settled)
    assert 100 not in acked_while_full
    writer.up = True
    agent.mark_up()  # as the drainer does once the database answers
    async with asyncio.timeout(5):
        await blocked
    assert settled[-20:] == [100 + i for i in range(20)]
    assert not agent.spool_full
    await spool.close()
