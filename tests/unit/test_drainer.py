"""SpoolDrainer: replays the spool into the database once it answers, oldest batch first."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from agents.bus import Bus, Inbox
from agents.drainer import SpoolDrainer
from agents.events import ReadingsStored, RejectedMessage, RejectionsStored
from agents.metrics import PipelineMetrics
from agents.persistence import rejection_row
from agents.reasons import STORAGE_REJECTED
from agents.storage import Storage
from db.rows import RejectionRow
from db.spool import Spool
from edge.readings import BAD_TYPE
from tests.harness.servers import wait_until_async
from tests.unit.fakes import FakeWriter, drain, raw, row, sample


@dataclass
class Drainer:
    drainer: SpoolDrainer
    storage: Storage
    spool: Spool
    writer: FakeWriter
    events: Inbox[Any]

    def running(self) -> asyncio.Task[None]:
        return asyncio.create_task(self.drainer.run())


@pytest.fixture
async def d(tmp_path: Path, bus: Bus, metrics: PipelineMetrics) -> AsyncIterator[Drainer]:
    spool = Spool(tmp_path / "spool.db", max_bytes=1 << 20)
    writer = FakeWriter()
    storage = Storage(writer, spool, metrics)
    await spool.open()
    events = bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
    drainer = SpoolDrainer(spool, storage, bus, metrics, retry_max_seconds=0.05)
    yield Drainer(drainer, storage, spool, writer, events)
    await spool.close()


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def rejection(seq: int) -> RejectionRow:
    return rejection_row(RejectedMessage(raw(seq), BAD_TYPE, "value must be a number", "d1"), 64)


async def test_drainer_replays_oldest_first_once_the_database_answers(
    d: Drainer, metrics: PipelineMetrics
) -> None:
    d.writer.up = False
    first = [row(second=1, message=raw(1)), row(second=2, message=raw(1))]
    second = [row(second=3, message=raw(2))]
    assert await d.storage.store(first, [rejection(0)]) is None  # the database is away: spooled
    assert await d.storage.store(second, []) is None
    d.writer.keys.add(("d1", "s1", first[1].ts))  # committed before a crash: a duplicate now
    task = d.running()
    try:
        # While the database is away every replay attempt fails and is counted; nothing is lost.
        await wait_until_async(
            lambda: (
                (sample(metrics, "ingestd_database_errors_total", {"kind": "unreachable"}) or 0)
                >= 2
            ),
            5,
        )
        assert d.spool.stats.batches == 2
        d.writer.up = True
        await wait_until_async(lambda: d.spool.stats.batches == 0, 5)
    finally:
        await stop(task)
    # The two batches replay merged, in one transaction, oldest first.
    assert d.writer.calls[-1] == (first + second, [rejection(0)])
    assert all(d.writer.replays)  # spooled rows may be stored already
    assert d.storage.database_up
    assert sample(metrics, "ingestd_database_up") == 1
    assert (metrics.stored, metrics.duplicates) == (2, 1)
    assert sample(metrics, "ingestd_spool_replayed_total") == 3
    (announced,) = drain(d.events)
    assert announced == ReadingsStored([first[0], second[0]])  # new rows only
    assert d.spool.stats.readings == 0


async def test_drainer_pings_an_away_database_until_it_answers(
    d: Drainer, metrics: PipelineMetrics
) -> None:
    d.writer.up = False
    task = d.running()
    try:
        await wait_until_async(lambda: d.writer.pings >= 2, 5)
        assert not d.storage.database_up
        d.writer.up = True
        await wait_until_async(lambda: d.storage.database_up, 5)
    finally:
        await stop(task)
    assert sample(metrics, "ingestd_database_up") == 1
    assert d.writer.calls == []  # nothing to replay: pinged only
    assert not d.drainer.has_work()


async def test_a_batch_spooled_in_an_outage_wakes_the_idle_drainer(
    d: Drainer, metrics: PipelineMetrics
) -> None:
    d.storage.mark_up()
    d.storage.spooled.set()
    task = d.running()
    try:
        # Idle: it found the spool empty, cleared the wake-up event and waits on it.
        await wait_until_async(lambda: not d.storage.spooled.is_set(), 5)
        d.writer.up = False
        stored = row(second=7, message=raw(7))
        assert await d.storage.store([stored], []) is None  # the write failed: spooled
        assert d.storage.spooled.is_set()
        d.writer.up = True
        await wait_until_async(lambda: d.spool.stats.batches == 0, 5)
        event = await asyncio.wait_for(d.events.get(), 5)
    finally:
        await stop(task)
    assert event == ReadingsStored([stored])
    assert d.storage.database_up
    assert metrics.stored == 1


async def test_a_refused_spooled_reading_becomes_a_dead_letter_holding_it(
    d: Drainer, metrics: PipelineMetrics
) -> None:
    d.writer.up = False
    good, bad = row(value=1, second=1, message=raw(1)), row(value=666, second=2, message=raw(2))
    assert await d.storage.store([good, bad], [rejection(3)]) is None
    d.writer.up = True
    d.writer.refuse = lambda r: r.value == 666
    task = d.running()
    try:
        await wait_until_async(lambda: d.spool.stats.batches == 0, 5)
    finally:
        await stop(task)
    assert metrics.stored == 1
    assert [e.rows for e in drain(d.events)] == [[good]]
    dead, replayed = d.writer.rejections
    assert replayed == rejection(3)
    assert (dead.reason, dead.topic, dead.device_id, dead.correlation_id) == (
        STORAGE_REJECTED, "spool/d1/s1", "d1", "corr-2",
    )  # fmt: skip
    assert "value out of range" in dead.error
    assert orjson.loads(dead.payload)[3] == 666  # the refused reading, as JSON
    assert dead.payload_sha256 == hashlib.sha256(dead.payload).hexdigest()
    assert dead.payload_size == len(dead.payload)
    assert sample(metrics, "ingestd_messages_rejected_total", {"reason": STORAGE_REJECTED}) == 1


async def test_drainer_has_work_only_with_a_backlog_and_the_database_up(d: Drainer) -> None:
    later = time.monotonic() + 1000
    assert not d.drainer.stalled(later, 1.0)
    d.writer.up = False
    await d.storage.store([row()], [])
    assert not d.drainer.has_work()  # a backlog it cannot replay yet is not a stall
    d.storage.mark_up()
    assert d.drainer.has_work()
    assert d.drainer.stalled(later, 1.0)
    assert not d.drainer.stalled(time.monotonic(), 1000.0)


async def test_drainer_replays_at_most_batch_size_readings_per_transaction(
    d: Drainer, metrics: PipelineMetrics
) -> None:
    d.drainer.batch_size = 3
    d.writer.up = False
    spooled = [[row(second=i * 10 + j, message=raw(i)) for j in range(n)] for i, n in
               enumerate([1, 2, 1, 1, 5, 1])]  # fmt: skip
    for readings in spooled:
        assert await d.storage.store(readings, []) is None
    d.writer.up = True
    task = d.running()
    try:
        await wait_until_async(lambda: d.spool.stats.batches == 0, 5)
    finally:
        await stop(task)
    # Merged up to the bound; the batch of 5 (spooled by an earlier release) goes alone.
    assert [len(readings) for readings, _ in d.writer.calls] == [3, 2, 5, 1]
    assert [r for readings, _ in d.writer.calls for r in readings] == [
        r for s in spooled for r in s
    ]
    assert metrics.stored == 11
