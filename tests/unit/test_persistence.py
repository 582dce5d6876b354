"""PersistenceAgent: one durable transaction per batch, then settle (ack) and announce."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from agents.bus import Bus, Inbox
from agents.events import EnrichedMessage, ReadingsStored, RejectedMessage, RejectionsStored
from agents.metrics import PipelineMetrics
from agents.persistence import PersistenceAgent, rejection_row
from agents.reasons import REASONS, STORAGE_REJECTED
from agents.storage import Storage
from daemon.acks import AckTracker
from daemon.metrics import IntakeMetrics
from db.rows import AlertChange, ReadingRow, RejectionRow
from db.writer import RowRejected, StorageError, WriteResult
from edge.readings import BAD_TYPE, MALFORMED_JSON
from tests.unit.fakes import (
    NOW,
    FakeWriter,
    Settled,
    drain,
    enriched,
    give_the_loop_turns,
    raw,
    row,
    sample,
    until,
)

MAX_PAYLOAD = 64


@dataclass
class Persistence:
    agent: PersistenceAgent
    writer: FakeWriter
    storage: Storage
    settled: Settled
    out: Inbox[Any]
    log: list[str]


@pytest.fixture
def persistence(bus: Bus, metrics: PipelineMetrics) -> Persistence:
    log: list[str] = []
    writer, settled = FakeWriter(log), Settled(log)
    storage = Storage(writer, None, metrics)
    inbox = bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage)
    out = bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
    agent = PersistenceAgent(
        bus, metrics, inbox, storage, settled, 50,
        max_payload_bytes=MAX_PAYLOAD, retry_max_seconds=0.01,
    )  # fmt: skip
    return Persistence(agent, writer, storage, settled, out, log)


def test_every_rejection_reason_series_starts_at_zero(metrics: PipelineMetrics) -> None:
    for reason in REASONS:
        assert sample(metrics, "ingestd_messages_rejected_total", {"reason": reason}) == 0
    assert sample(metrics, "ingestd_readings_stored_total") == 0
    assert sample(metrics, "ingestd_readings_duplicate_total") == 0
    assert sample(metrics, "ingestd_messages_unstorable_total") == 0


async def test_persistence_writes_one_batch_then_settles(
    persistence: Persistence, metrics: PipelineMetrics
) -> None:
    p = persistence
    rejected = RejectedMessage(raw(2), BAD_TYPE, "value must be a number", "d1")
    batch = [
        enriched(0, row(second=1), row(second=2)),
        enriched(1, row(second=3)),
        rejected,
        enriched(3, row(second=4)),
    ]
    await p.agent.handle(batch)
    assert len(p.writer.calls) == 1
    readings, rejections = p.writer.calls[0]
    assert [r.ts.second for r in readings] == [1, 2, 3, 4]
    assert rejections == [rejection_row(rejected, MAX_PAYLOAD)]
    assert p.log == ["write 0,0,1,3", "settle 0,1,2,3"]  # settled after the write, receive order
    assert metrics.stored == 4
    assert metrics.duplicates == 0
    assert sample(metrics, "ingestd_messages_rejected_total", {"reason": "bad_type"}) == 1
    assert sample(metrics, "ingestd_batch_size_readings_count") == 1
    assert sample(metrics, "ingestd_batch_size_readings_sum") == 4
    assert sample(metrics, "ingestd_end_to_end_latency_seconds_count") == 4
    failed, stored = drain(p.out)  # the rejections first, then the batch's last event
    assert type(failed) is RejectionsStored
    assert failed.rejections == [rejected]
    assert type(stored) is ReadingsStored
    assert [(r.ts.second, r.correlation_id) for r in stored.rows] == [
        (1, "corr-0"), (2, "corr-0"), (3, "corr-1"), (4, "corr-3"),
    ]  # fmt: skip
    assert stored.done == (0, 1, 2, 3)  # every message of the batch, the rejection too


async def test_persistence_counts_duplicates_from_write_result(
    persistence: Persistence, metrics: PipelineMetrics
) -> None:
    p = persistence
    await p.agent.handle([enriched(0, row(second=1))])
    # Second batch: a redelivery of the same reading, a new one, and a twin within the batch.
    await p.agent.handle(
        [enriched(1, row(second=1)), enriched(2, row(second=2)), enriched(3, row(second=2))]
    )
    assert metrics.stored == 2
    assert metrics.duplicates == 2
    assert sample(metrics, "ingestd_readings_stored_total") == 2
    assert sample(metrics, "ingestd_readings_duplicate_total") == 2
    first, second = drain(p.out)
    assert [r.correlation_id for r in first.rows] == ["corr-0"]
    assert [r.correlation_id for r in second.rows] == ["corr-2"]  # only the new row announced
    assert p.settled.seqs == [0, 1, 2, 3]


async def test_persistence_all_duplicates_announce_no_rows_but_settle(
    persistence: Persistence, metrics: PipelineMetrics
) -> None:
    p = persistence
    p.writer.keys.add(("d1", "s1", NOW.replace(second=5)))
    await p.agent.handle([enriched(7, row(second=5))])
    assert p.settled.seqs == [7]
    # No row to announce, but the message is done: its budget is released on this event.
    assert drain(p.out) == [ReadingsStored([], done=(7,))]
    assert (metrics.stored, metrics.duplicates) == (0, 1)


async def test_persistence_retries_storage_errors_then_succeeds(
    persistence: Persistence, metrics: PipelineMetrics
) -> None:
    p = persistence
    p.storage.mark_up()
    gauge_at_write: list[float | None] = []
    p.writer.on_write = lambda: gauge_at_write.append(sample(metrics, "ingestd_database_up"))
    p.writer.script = [StorageError("connection refused"), StorageError("connection refused"), None]
    await p.agent.handle([enriched(0)])
    assert len(p.writer.calls) == 3
    assert gauge_at_write == [1, 0, 0]  # down while retrying ...
    assert sample(metrics, "ingestd_database_up") == 1  # ... and up again after the success
    assert p.storage.database_up
    assert sample(metrics, "ingestd_database_errors_total", {"kind": "failed"}) == 2
    assert sample(metrics, "ingestd_database_outages_total") == 1  # one outage, two errors
    assert p.log[-1] == "settle 0"
    assert sum(entry.startswith("settle") for entry in p.log) == 1  # never settled before success
    assert metrics.stored == 1


async def test_persistence_first_success_marks_database_up(
    persistence: Persistence, metrics: PipelineMetrics
) -> None:
    p = persistence
    assert not p.storage.database_up
    await p.agent.handle([enriched(0)])
    assert p.storage.database_up
    assert sample(metrics, "ingestd_database_up") == 1


async def test_persistence_isolates_rows_the_database_refuses(
    persistence: Persistence, metrics: PipelineMetrics
) -> None:
    p = persistence
    p.writer.refuse = lambda r: r.value == 666
    batch = [
        enriched(0, row(value=1, second=1)),
        enriched(1, row(value=666, second=2), row(value=2, second=3)),
        RejectedMessage(raw(2), BAD_TYPE, "bad"),
        enriched(3, row(value=3, second=4)),
    ]
    await p.agent.handle(batch)
    assert p.settled.seqs == [0, 1, 2, 3]
    assert metrics.stored == 2
    reasons = [r.reason for r in p.writer.rejections]
    assert reasons == [STORAGE_REJECTED, BAD_TYPE]  # in batch order
    poisoned = p.writer.rejections[0]
    assert poisoned.correlation_id == "corr-1"
    assert poisoned.device_id == "d1"
    assert "value out of range" in poisoned.error
    assert sample(metrics, "ingestd_messages_rejected_total", {"reason": "storage_rejected"}) == 1
    published = drain(p.out)
    failed = [r for e in published if type(e) is RejectionsStored for r in e.rejections]
    assert [r.reason for r in failed] == [STORAGE_REJECTED, BAD_TYPE]
    assert failed[0].message.seq == 1
    stored = [r.correlation_id for e in published if type(e) is ReadingsStored for r in e.rows]
    assert stored == ["corr-0", "corr-3"]


async def test_persistence_does_not_treat_an_unknown_event_as_a_rejection(
    persistence: Persistence, metrics: PipelineMetrics
) -> None:
    p = persistence
    with pytest.raises(AssertionError):  # the exhaustive match: a wiring mistake is a crash
        await p.agent.handle([enriched(0), raw(1)])  # type: ignore[list-item]
    assert p.writer.calls == []
    assert p.settled.seqs == []
    assert sum(
        sample(metrics, "ingestd_messages_rejected_total", {"reason": reason}) or 0
        for reason in REASONS
    ) == 0  # fmt: skip


async def test_persistence_recovers_held_batch_after_a_crash(
    persistence: Persistence, metrics: PipelineMetrics
) -> None:
    p = persistence
    p.writer.script = [RuntimeError("boom")]
    for item in (enriched(0), enriched(1)):
        p.agent.inbox.put_nowait(item)
    with pytest.raises(RuntimeError, match="boom"):
        await p.agent.run()
    assert p.settled.seqs == []
    assert p.agent.has_work()  # the crashed batch is held for the next start
    task = asyncio.create_task(p.agent.run())
    try:
        await until(lambda: p.settled.seqs == [0, 1], p.settled.changed)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert metrics.stored == 2
    assert [len(readings) for readings, _ in p.writer.calls] == [2, 1, 1]  # recovered one by one
    assert not p.agent.has_work()


async def test_persistence_keeps_held_messages_when_recover_crashes(
    persistence: Persistence,
) -> None:
    p = persistence
    p.writer.script = [RuntimeError("boom"), RuntimeError("boom again")]
    p.agent.inbox.put_nowait(enriched(0))
    with pytest.raises(RuntimeError, match="boom"):
        await p.agent.run()
    with pytest.raises(RuntimeError, match="boom again"):
        await p.agent.run()  # crashes inside recover
    assert p.settled.seqs == []
    assert p.agent.has_work()


async def test_persistence_run_batches_what_waits_up_to_batch_size(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    log: list[str] = []
    writer, settled = FakeWriter(log), Settled(log)
    inbox = bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage)
    bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
    agent = PersistenceAgent(bus, metrics, inbox, Storage(writer, None, metrics), settled, 2)
    for seq in range(5):
        inbox.put_nowait(enriched(seq))
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: settled.seqs == [0, 1, 2, 3, 4], settled.changed)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [len(readings) for readings, _ in writer.calls] == [2, 2, 1]
    assert log == ["write 0,1", "settle 0,1", "write 2,3", "settle 2,3", "write 4", "settle 4"]


async def test_agent_stalled_only_with_work(persistence: Persistence) -> None:
    agent = persistence.agent
    later = time.monotonic() + 1000
    assert not agent.stalled(later, 1.0)
    agent.inbox.put_nowait(enriched(0))
    assert agent.stalled(later, 1.0)
    assert not agent.stalled(time.monotonic(), 1000.0)


# ------------------------------------------------------------------------------ dead letters


def test_rejection_row_keeps_a_truncated_copy_and_the_whole_payloads_digest() -> None:
    payload = b"0123456789abcdef"
    rejected = RejectedMessage(
        raw(5, "sensors/d1/s1", payload), MALFORMED_JSON, "malformed JSON: x", "d1"
    )
    dead = rejection_row(rejected, 8)
    assert dead == RejectionRow(
        received_at=NOW,
        topic="sensors/d1/s1",
        payload=b"01234567",
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_size=16,
        reason=MALFORMED_JSON,
        error="malformed JSON: x",
        device_id="d1",
        correlation_id="corr-5",
        redelivered=False,
    )
    assert rejection_row(rejected._replace(message=raw(5, dup=True)), 8).redelivered


# ------------------------------------------------------------------ several batches in flight


class GatedWriter(FakeWriter):
    """A writer whose writes wait until the test opens their gate (one gate per write)."""

    def __init__(self, log: list[str]) -> None:
        super().__init__(log)
        self.gates: list[asyncio.Event] = []
        self.started_write = asyncio.Event()
        self.open = False  # when True, writes no longer wait

    async def write(
        self,
        readings: Sequence[ReadingRow],
        rejections: Sequence[RejectionRow],
        *,
        replay: bool = False,
        alerts: Sequence[AlertChange] = (),
    ) -> WriteResult:
        gate = asyncio.Event()
        if self.open:
            gate.set()
        self.gates.append(gate)
        self.started_write.set()
        await gate.wait()
        return await super().write(readings, rejections, replay=replay, alerts=alerts)

    async def wait_writes(self, count: int) -> None:
        await until(lambda: len(self.gates) >= count, self.started_write)


async def put_when_taken(agent: PersistenceAgent, writer: GatedWriter, item: Any) -> None:
    """Put one item and wait until its write started (so each item is a batch of its own)."""
    count = len(writer.gates)
    agent.inbox.put_nowait(item)
    await writer.wait_writes(count + 1)


@pytest.mark.timeout(10)
async def test_persistence_writes_several_batches_at_once_and_acks_in_receive_order(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    writer = GatedWriter([])
    acked: list[int] = []
    ack_sent = asyncio.Event()

    def send_ack(mid: int, _qos: int) -> bool:
        acked.append(mid)
        ack_sent.set()
        return True

    tracker = AckTracker(100, send_ack, IntakeMetrics(metrics.registry))
    inbox = bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage)
    bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
    agent = PersistenceAgent(
        bus, metrics, inbox, Storage(writer, None, metrics), tracker.settle, 50,
        batches_in_flight=3,
    )  # fmt: skip
    for mid in (101, 102, 103, 104):
        tracker.track(mid, 1)  # seqs 0..3
    task = asyncio.create_task(agent.run())
    try:
        for seq in range(3):
            await put_when_taken(agent, writer, enriched(seq, row(second=seq)))
        inbox.put_nowait(enriched(3, row(second=3)))
        await give_the_loop_turns()  # every chance to take it (it must not)
        assert len(writer.gates) == 3  # three writes in flight, no fourth slot
        assert inbox.qsize() == 1
        assert agent.has_work()

        writer.gates[2].set()  # the newest batch commits first: its ack must wait
        writer.gates[1].set()
        await writer.wait_writes(4)  # a slot freed: the waiting batch is taken
        assert acked == []
        writer.gates[0].set()  # the oldest commits: all three acks leave, in order
        await until(lambda: len(acked) >= 3, ack_sent)
        assert acked == [101, 102, 103]
        writer.gates[3].set()
        await until(lambda: len(acked) >= 4, ack_sent)
        assert acked == [101, 102, 103, 104]
        assert metrics.stored == 4
        assert not agent.has_work()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.timeout(10)
async def test_batches_committed_out_of_order_are_announced_in_receive_order(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    """Downstream (the anomaly detectors) sees each series in the order it was received."""
    writer = GatedWriter([])
    inbox = bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage)
    announced = bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
    settled = Settled()
    agent = PersistenceAgent(
        bus, metrics, inbox, Storage(writer, None, metrics), settled, 50, batches_in_flight=3
    )
    task = asyncio.create_task(agent.run())
    try:
        for seq in range(3):
            await put_when_taken(agent, writer, enriched(seq, row(second=seq)))
        writer.gates[2].set()
        writer.gates[1].set()
        await until(lambda: sorted(settled.seqs) == [1, 2], settled.changed)
        await give_the_loop_turns()  # every chance to announce early (it must not)
        assert announced.empty()
        writer.gates[0].set()
        await until(lambda: len(settled.seqs) == 3, settled.changed)
        await give_the_loop_turns()  # the announcements follow the settle
        assert [event.done for event in drain(announced)] == [(0,), (1,), (2,)]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.timeout(10)
async def test_a_crash_before_its_turn_still_announces_a_committed_batch(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    """A later batch committed and waits for its turn when the earlier one crashes: its
    events (and with them the release of its in-flight budget) come out after the restart."""
    writer = GatedWriter([])
    inbox = bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage)
    announced = bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
    settled = Settled()
    agent = PersistenceAgent(
        bus, metrics, inbox, Storage(writer, None, metrics), settled, 50, batches_in_flight=2
    )
    task = asyncio.create_task(agent.run())
    await put_when_taken(agent, writer, enriched(0, row(second=0)))
    await put_when_taken(agent, writer, enriched(1, row(second=1)))
    writer.gates[1].set()
    await until(lambda: settled.seqs == [1], settled.changed)
    writer.script = [RuntimeError("boom")]
    writer.gates[0].set()
    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.wait_for(task, 5)
    assert announced.empty()

    writer.open = True
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: 0 in settled.seqs, settled.changed)  # the crashed batch, recovered
        await give_the_loop_turns()
        done = sorted(seq for event in drain(announced) for seq in event.done)
        assert done == [0, 1]
        assert not agent.has_work()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.timeout(10)
async def test_persistence_crash_in_one_write_recovers_every_batch_in_flight(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    log: list[str] = []
    writer = GatedWriter(log)
    settled = Settled(log)
    inbox = bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage)
    bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
    agent = PersistenceAgent(
        bus, metrics, inbox, Storage(writer, None, metrics), settled, 50, batches_in_flight=3
    )
    rejected = RejectedMessage(raw(2), BAD_TYPE, "value must be a number", "d1")
    task = asyncio.create_task(agent.run())
    await put_when_taken(agent, writer, enriched(0, row(second=0)))
    await put_when_taken(agent, writer, enriched(1, row(second=1)))
    await put_when_taken(agent, writer, rejected)
    writer.script = [RuntimeError("boom")]
    writer.gates[1].set()  # the second write crashes; the other two are cancelled
    with pytest.raises(RuntimeError, match="boom"):  # the write's own error, not a group
        await asyncio.wait_for(task, 5)
    assert settled.seqs == []
    assert agent.has_work()

    writer.open = True
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: sorted(settled.seqs) == [0, 1, 2], settled.changed)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert metrics.stored == 2
    # The rejection was in flight and may have been stored already: it is recovered as a
    # redelivery, so the writer's DUP guard stores it at most once.
    recovered = writer.calls[-1][1]
    assert [r.redelivered for r in recovered] == [True]
    assert not agent.has_work()


# ------------------------------------------------------------------------------ last seen


async def test_persistence_records_when_each_device_was_last_seen(
    persistence: Persistence, metrics: PipelineMetrics
) -> None:
    before = time.time()
    await persistence.agent.handle([enriched(0, row(second=1))])
    seen = sample(metrics, "ingestd_device_last_seen_timestamp_seconds", {"device_id": "d1"})
    assert seen is not None
    assert before <= seen <= time.time()


def test_last_seen_tracks_a_bounded_number_of_devices(
    metrics: PipelineMetrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agents.metrics.MAX_TRACKED_DEVICES", 3)
    metrics.seen({"a", "b", "c"}, 10.0)
    metrics.seen({"a", "d"}, 20.0)  # a known device is updated, a fourth is only counted
    assert metrics.last_seen == {"a": 20.0, "b": 10.0, "c": 10.0}
    assert sample(metrics, "ingestd_devices_untracked_total") == 1


# ---------------------------------------------------------------- batches bounded in readings


def carrying(seq: int, readings: int) -> EnrichedMessage:
    """Message ``seq`` with ``readings`` rows, each of its own sensor (all new keys)."""
    return enriched(seq, *(row(f"d{seq}", f"s{i}", float(i)) for i in range(readings)))


def processed(events: list[Any]) -> tuple[list[str], list[int]]:
    """The rows announced (as "corr-seq/sensor") and the seqs marked done, over ``events``."""
    rows = [
        f"{r.correlation_id}/{r.sensor_id}" for e in events if type(e) is ReadingsStored
        for r in e.rows
    ]  # fmt: skip
    done = [seq for e in events if type(e) is ReadingsStored for seq in e.done]
    return rows, done


async def run_until_settled(agent: PersistenceAgent, settled: Settled, count: int) -> None:
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: len(settled.seqs) >= count, settled.changed)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_run_never_writes_more_than_batch_size_readings(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    writer, settled = FakeWriter(), Settled()
    inbox = bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage)
    out = bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
    agent = PersistenceAgent(bus, metrics, inbox, Storage(writer, None, metrics), settled, 5)
    sizes = [1, 3, 2, 12, 1, 4, 5, 1, 6, 2, 2, 1]
    items: list[EnrichedMessage | RejectedMessage] = [
        carrying(seq, n) for seq, n in enumerate(sizes)
    ]
    items.insert(3, RejectedMessage(raw(100), BAD_TYPE, "bad", "d1"))  # counts as one
    items.insert(9, RejectedMessage(raw(101), BAD_TYPE, "bad", "d1"))
    for item in items:
        inbox.put_nowait(item)
    await run_until_settled(agent, settled, len(items))

    assert settled.seqs == [item.message.seq for item in items]  # each once, receive order
    assert all(len(readings) <= 5 for readings, _ in writer.calls)
    assert all(len(readings) + len(rejections) <= 5 for readings, rejections in writer.calls)
    assert [len(readings) for readings, _ in writer.calls if len(readings) == 5]  # filled up
    written = [r for readings, _ in writer.calls for r in readings]
    assert len(written) == sum(sizes) == len(set(written))  # every reading written once
    assert len(writer.rejections) == 2
    assert metrics.stored == sum(sizes)
    assert sample(metrics, "ingestd_batch_size_readings_count") == len(writer.calls)
    assert sample(metrics, "ingestd_batch_size_readings_sum") == sum(sizes)
    assert sample(metrics, "ingestd_batch_size_readings_bucket", {"le": "5.0"}) == len(
        writer.calls
    )  # no write observed above batch_size
    rows, done = processed(drain(out))
    assert len(rows) == sum(sizes) == len(set(rows))
    assert sorted(done) == sorted(item.message.seq for item in items)


async def test_a_message_larger_than_batch_size_is_written_in_parts_then_settled(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    log: list[str] = []
    writer, settled = FakeWriter(log), Settled(log)
    inbox = bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage)
    out = bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
    agent = PersistenceAgent(bus, metrics, inbox, Storage(writer, None, metrics), settled, 2)
    rejected = RejectedMessage(raw(1), BAD_TYPE, "bad", "d1")
    await agent.handle([carrying(0, 5), rejected])
    # One transaction per part; the rejection goes with the first; the ack after the last.
    assert log == ["write 0,0", "write 0,0", "write 0", "settle 0,1"]
    assert [(len(r), len(j)) for r, j in writer.calls] == [(2, 1), (2, 0), (1, 0)]
    assert [r.sensor_id for readings, _ in writer.calls for r in readings] == [
        f"s{i}" for i in range(5)
    ]  # in order, each once
    assert sample(metrics, "ingestd_batch_size_readings_count") == 3
    assert sample(metrics, "ingestd_batch_size_readings_sum") == 5
    assert sample(metrics, "ingestd_end_to_end_latency_seconds_count") == 2  # per message
    assert metrics.stored == 5
    failed, stored = drain(out)  # announced once, when the whole message is stored
    assert failed == RejectionsStored([rejected])
    assert [r.sensor_id for r in stored.rows] == [f"s{i}" for i in range(5)]
    assert stored.done == (0, 1)


async def test_a_large_message_forms_a_batch_of_its_own(bus: Bus, metrics: PipelineMetrics) -> None:
    log: list[str] = []
    writer, settled = FakeWriter(log), Settled(log)
    inbox = bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage)
    bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
    agent = PersistenceAgent(bus, metrics, inbox, Storage(writer, None, metrics), settled, 3)
    for item in (carrying(0, 1), carrying(1, 7), carrying(2, 1), carrying(3, 1)):
        inbox.put_nowait(item)
    await run_until_settled(agent, settled, 4)
    assert log == [
        "write 0", "settle 0",  # message 1 does not fit: carried to the next batch
        "write 1,1,1", "write 1,1,1", "write 1", "settle 1",
        "write 2,3", "settle 2,3",
    ]  # fmt: skip
    assert not agent.has_work()


async def test_a_parted_message_holds_back_the_acks_received_after_it(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    writer = GatedWriter([])
    acked: list[int] = []
    ack_sent = asyncio.Event()

    def send_ack(mid: int, _qos: int) -> bool:
        acked.append(mid)
        ack_sent.set()
        return True

    tracker = AckTracker(100, send_ack, IntakeMetrics(metrics.registry))
    inbox = bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage)
    bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
    agent = PersistenceAgent(
        bus, metrics, inbox, Storage(writer, None, metrics), tracker.settle, 2,
        batches_in_flight=2,
    )  # fmt: skip
    tracker.track(101, 1)  # seq 0: four readings, two parts
    tracker.track(102, 1)  # seq 1: one reading
    task = asyncio.create_task(agent.run())
    try:
        await put_when_taken(agent, writer, carrying(0, 4))
        await put_when_taken(agent, writer, carrying(1, 1))
        writer.gates[1].set()  # the later message commits first
        writer.gates[0].set()  # the first part of the earlier one
        await writer.wait_writes(3)  # its second part is being written
        await give_the_loop_turns()
        assert acked == []  # neither ack before the earlier message's last part
        assert tracker.pending == 2
        writer.gates[2].set()
        await until(lambda: len(acked) >= 2, ack_sent)
        assert acked == [101, 102]
        assert metrics.stored == 5
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_done_lists_every_message_once_whatever_its_fate(
    persistence: Persistence, metrics: PipelineMetrics
) -> None:
    p = persistence
    p.agent.batch_size = 3
    p.writer.refuse = lambda r: r.value == 666  # refused as data: isolated, a dead letter
    p.writer.keys.add(("d4", "s0", NOW))  # stored before: a duplicate, no row to announce
    batch = [
        carrying(0, 2),
        RejectedMessage(raw(1), BAD_TYPE, "bad", "d1"),
        enriched(2, row("d2", "s0", 666.0), row("d2", "s1")),
        carrying(3, 4),  # parts of 3 and 1
        carrying(4, 1),
    ]
    await p.agent.handle(batch)
    assert sorted(p.settled.seqs) == [0, 1, 2, 3, 4]
    events = drain(p.out)
    rows, done = processed(events)
    assert sorted(done) == [0, 1, 2, 3, 4]  # every message exactly once
    assert len(rows) == len(set(rows)) == 2 + 4  # message 2 is a dead letter, 4 a duplicate
    failed = [r.message.seq for e in events if type(e) is RejectionsStored for r in e.rejections]
    assert sorted(failed) == [1, 2]


async def test_an_unstorable_message_is_settled_and_done_once(
    persistence: Persistence, metrics: PipelineMetrics
) -> None:
    p = persistence
    refused = RowRejected("invalid byte sequence")
    p.writer.script = [refused, refused, refused, refused]  # batch, alone, dead letter, ASCII
    await p.agent.handle([enriched(4)])
    assert p.settled.seqs == [4]
    assert sample(metrics, "ingestd_messages_unstorable_total") == 1
    assert drain(p.out) == [ReadingsStored([], done=(4,))]


@pytest.mark.timeout(10)
async def test_a_crash_between_the_parts_of_a_message_loses_and_doubles_nothing(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    writer = FakeWriter()
    acked: list[int] = []
    settled = Settled()

    def send_ack(mid: int, _qos: int) -> bool:
        acked.append(mid)
        return True

    tracker = AckTracker(100, send_ack, IntakeMetrics(metrics.registry))

    def settle(seqs: list[int]) -> None:
        settled(seqs)
        tracker.settle(seqs)

    inbox = bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage)
    out = bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
    agent = PersistenceAgent(bus, metrics, inbox, Storage(writer, None, metrics), settle, 2)
    for mid in (101, 102, 103):
        tracker.track(mid, 1)
    for item in (carrying(0, 1), carrying(1, 5), carrying(2, 1)):
        inbox.put_nowait(item)
    # Message 0 commits; message 1's first part commits, its second part crashes the agent.
    writer.script = [None, None, RuntimeError("boom")]
    with pytest.raises(RuntimeError, match="boom"):
        await agent.run()
    assert acked == [101]
    assert settled.seqs == [0]
    assert len(writer.keys) == 1 + 2  # the first part is committed
    assert agent.has_work()

    await run_until_settled(agent, settled, 3)  # restarted: recovers message 1 first
    assert settled.seqs == [0, 1, 2]  # each once
    assert acked == [101, 102, 103]  # each once, in receive order
    assert tracker.pending == 0
    assert len(writer.keys) == 1 + 5 + 1  # every reading stored, once by its key
    # The part committed before the crash comes back as duplicates on recovery, as a whole
    # batch committed before a crash would.
    assert (metrics.stored, metrics.duplicates) == (5, 2)
    recovered = [len(readings) for readings, _ in writer.calls[3:]]
    assert recovered == [2, 2, 1, 1]  # message 1 again, in parts, then message 2
    assert all(len(readings) <= 2 for readings, _ in writer.calls)
    rows, done = processed(drain(out))
    assert sorted(done) == [0, 1, 2]
    assert len(rows) == len(set(rows))  # no row announced twice
    assert not agent.has_work()
