"""Storage: the database and the spool behind it, as one object with one state."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agents.events import RejectedMessage
from agents.metrics import PipelineMetrics
from agents.persistence import rejection_row
from agents.storage import NotDurableError, Storage
from db.spool import Spool
from db.writer import ERROR_KINDS, RowRejected, StorageError, WriteResult
from edge.errors import IngestdError
from edge.readings import BAD_TYPE
from tests.unit.fakes import FakeWriter, raw, row, sample

REJECTION = rejection_row(RejectedMessage(raw(9), BAD_TYPE, "value must be a number", "d1"), 64)


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    spool = Spool(tmp_path / "spool.db", max_bytes=1 << 20)
    await spool.open()
    yield spool
    await spool.close()


def up(metrics: PipelineMetrics) -> float | None:
    return sample(metrics, "ingestd_database_up")


def errors(metrics: PipelineMetrics, kind: str) -> float | None:
    return sample(metrics, "ingestd_database_errors_total", {"kind": kind})


def test_every_database_error_kind_series_starts_at_zero(metrics: PipelineMetrics) -> None:
    assert set(ERROR_KINDS) == {"unreachable", "timeout", "failed"}
    for kind in ERROR_KINDS:
        assert errors(metrics, kind) == 0
    assert sample(metrics, "ingestd_database_outages_total") == 0
    assert up(metrics) == 0
    assert sample(metrics, "ingestd_spool_full") == 0


async def test_start_marks_the_database_up_when_it_answers(metrics: PipelineMetrics) -> None:
    writer = FakeWriter()
    storage = Storage(writer, None, metrics)
    await storage.start()
    assert writer.started
    assert storage.database_up
    assert up(metrics) == 1
    assert storage.not_ready_reason() is None


async def test_start_with_the_database_away_is_not_an_error(metrics: PipelineMetrics) -> None:
    writer = FakeWriter()
    writer.up = False
    storage = Storage(writer, None, metrics)
    await storage.start()
    assert not storage.database_up
    assert storage.not_ready_reason() == "database unavailable"


async def test_start_opens_the_spool_with_its_backlog(
    tmp_path: Path, metrics: PipelineMetrics
) -> None:
    path = tmp_path / "spool.db"
    earlier = Spool(path, 1 << 20)
    await earlier.open()
    await earlier.put([row(second=1)], [])
    await earlier.close()
    spool = Spool(path, 1 << 20)
    storage = Storage(FakeWriter(), spool, metrics)
    await storage.start()
    try:
        assert spool.stats.batches == 1
    finally:
        await storage.close(grace_seconds=1)


async def test_close_closes_the_writer(metrics: PipelineMetrics) -> None:
    writer = FakeWriter()
    storage = Storage(writer, None, metrics)
    await storage.start()
    await storage.close(grace_seconds=1)
    assert writer.closed


async def test_store_commits_while_the_database_is_up(metrics: PipelineMetrics) -> None:
    writer = FakeWriter()
    storage = Storage(writer, None, metrics)
    result = await storage.store([row(second=1), row(second=2)], [REJECTION])
    assert result == WriteResult([True, True], 1)
    assert writer.calls == [([row(second=1), row(second=2)], [REJECTION])]
    assert writer.replays == [False]
    assert storage.database_up  # a success is proof enough
    assert sample(metrics, "ingestd_batch_size_readings_sum") == 2
    assert sample(metrics, "ingestd_write_duration_seconds_count") == 1


async def test_store_without_a_spool_is_not_durable_while_the_database_is_away(
    metrics: PipelineMetrics,
) -> None:
    writer = FakeWriter()
    storage = Storage(writer, None, metrics)
    storage.mark_up()
    writer.up = False
    for _ in range(2):
        with pytest.raises(NotDurableError, match="connection refused") as info:
            await storage.store([row()], [])
        assert isinstance(info.value, IngestdError)
    assert len(writer.calls) == 2  # no spool: every batch tries the database itself
    assert not storage.database_up
    assert up(metrics) == 0
    assert errors(metrics, "unreachable") == 2
    assert sample(metrics, "ingestd_database_outages_total") == 1  # one outage, two errors
    assert storage.not_ready_reason() == "database unavailable"


async def test_store_spools_when_the_write_fails(metrics: PipelineMetrics, spool: Spool) -> None:
    writer = FakeWriter()
    storage = Storage(writer, spool, metrics)
    storage.mark_up()
    writer.script = [StorageError("statement timeout", "timeout")]
    assert await storage.store([row(second=1)], [REJECTION]) is None  # None: spooled
    assert not storage.database_up
    assert errors(metrics, "timeout") == 1
    assert storage.spooled.is_set()  # the drainer is woken
    assert (spool.stats.batches, spool.stats.readings, spool.stats.rejections) == (1, 1, 1)
    batch = await spool.oldest()
    assert batch is not None
    assert batch.readings == [row(second=1)]
    assert batch.rejections == [REJECTION]
    assert storage.not_ready_reason() is None  # spooling is durable: still ready


async def test_store_goes_straight_to_the_spool_while_the_database_is_down(
    metrics: PipelineMetrics, spool: Spool
) -> None:
    writer = FakeWriter()
    storage = Storage(writer, spool, metrics)
    assert not storage.database_up
    assert await storage.store([row()], []) is None
    assert writer.calls == []  # only the drainer finds out when it is back
    assert spool.stats.batches == 1


async def test_store_lets_refused_rows_through_without_an_outage(
    metrics: PipelineMetrics, spool: Spool
) -> None:
    writer = FakeWriter()
    writer.refuse = lambda r: r.value == 666
    storage = Storage(writer, spool, metrics)
    storage.mark_up()
    with pytest.raises(RowRejected):  # the data, not the database: spooling cannot help
        await storage.store([row(value=666)], [])
    assert storage.database_up
    assert spool.stats.batches == 0
    assert errors(metrics, "failed") == 0


async def test_a_full_spool_is_not_durable_until_there_is_room(
    tmp_path: Path, metrics: PipelineMetrics
) -> None:
    spool = Spool(tmp_path / "spool.db", max_bytes=1)
    writer = FakeWriter()
    writer.up = False
    storage = Storage(writer, spool, metrics)
    await storage.start()
    try:
        with pytest.raises(NotDurableError):
            await storage.store([row()], [])
        assert storage.spool_full
        assert sample(metrics, "ingestd_spool_full") == 1
        assert storage.not_ready_reason() == "database unavailable and the spool is full"
        writer.up = True
        storage.mark_up()  # as the drainer does once the database answers
        assert await storage.store([row()], []) == WriteResult([True], 0)
        assert not storage.spool_full  # nothing is withheld any more
        assert sample(metrics, "ingestd_spool_full") == 0
        assert storage.not_ready_reason() is None
    finally:
        await storage.close(grace_seconds=1)


async def test_mark_down_counts_other_errors_as_failed(metrics: PipelineMetrics) -> None:
    storage = Storage(FakeWriter(), None, metrics)
    storage.mark_up()
    storage.mark_down(OSError("network unreachable"))
    assert not storage.database_up
    assert errors(metrics, "failed") == 1
    assert sample(metrics, "ingestd_database_outages_total") == 1
