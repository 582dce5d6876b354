"""AckTracker: in-order release, epochs, QoS 0, the window and its resume threshold."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from daemon.acks import AckTracker
from daemon.metrics import IntakeMetrics, WindowCollector


class FakeAcks:
    """Records the (mid, qos) of every ack the tracker releases."""

    def __init__(self, result: bool = True) -> None:
        self.sent: list[tuple[int, int]] = []
        self.result = result

    def __call__(self, mid: int, qos: int) -> bool:
        self.sent.append((mid, qos))
        return self.result

    @property
    def mids(self) -> list[int]:
        return [mid for mid, _ in self.sent]


class Room:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> IntakeMetrics:
    return IntakeMetrics(registry)


def sample(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name)
    assert value is not None, name
    return value


def make(
    metrics: IntakeMetrics, window: int = 100, result: bool = True
) -> tuple[AckTracker, FakeAcks, Room]:
    acks, room = FakeAcks(result), Room()
    return AckTracker(window, acks, metrics, on_room=room), acks, room


def test_sequence_numbers_count_up_from_zero(metrics: IntakeMetrics) -> None:
    tracker, _, _ = make(metrics)
    assert [tracker.track(mid, 1) for mid in (7, 3, 9)] == [0, 1, 2]
    assert tracker.pending == 3


def test_in_order_settle_acks_each(metrics: IntakeMetrics, registry: CollectorRegistry) -> None:
    tracker, acks, _ = make(metrics)
    seqs = [tracker.track(mid, 1) for mid in (11, 12, 13)]
    for seq in seqs:
        tracker.settle([seq])
    assert acks.sent == [(11, 1), (12, 1), (13, 1)]
    assert tracker.pending == 0
    assert sample(registry, "ingestd_acks_sent_total") == 3


def test_out_of_order_settle_releases_acks_in_receive_order(metrics: IntakeMetrics) -> None:
    tracker, acks, _ = make(metrics)
    seqs = [tracker.track(mid, 1) for mid in (101, 102, 103, 104)]
    tracker.settle([seqs[3]])
    tracker.settle([seqs[1]])
    assert acks.sent == []  # nothing before the first message is settled
    assert tracker.pending == 4
    tracker.settle([seqs[0]])
    assert acks.mids == [101, 102]  # 103 is still open, so 104 waits
    assert tracker.pending == 2
    tracker.settle([seqs[2]])
    assert acks.mids == [101, 102, 103, 104]
    assert tracker.pending == 0


def test_settle_in_one_call_reversed(metrics: IntakeMetrics) -> None:
    tracker, acks, _ = make(metrics)
    seqs = [tracker.track(mid, 1) for mid in range(1, 6)]
    tracker.settle(reversed(seqs))
    assert acks.mids == [1, 2, 3, 4, 5]


@given(
    st.permutations(list(range(12))), st.lists(st.sampled_from([0, 1]), min_size=12, max_size=12)
)
@settings(max_examples=200, deadline=None, database=None)
def test_any_settle_order_acks_exactly_the_settled_prefix(order: list[int], qos: list[int]) -> None:
    tracker, acks, _ = make(IntakeMetrics(CollectorRegistry()))
    seqs = [tracker.track(1000 + i, qos[i]) for i in range(12)]
    settled: set[int] = set()
    for seq in order:
        tracker.settle([seqs[seq]])
        settled.add(seq)
        prefix = 0
        while prefix in settled:
            prefix += 1
        # Exactly the QoS>0 messages of the settled prefix are acked, in receive order.
        assert acks.mids == [1000 + i for i in range(prefix) if qos[i]]
        assert tracker.pending == 12 - prefix


def test_qos0_is_tracked_never_acked_and_does_not_block(
    metrics: IntakeMetrics, registry: CollectorRegistry
) -> None:
    tracker, acks, _ = make(metrics)
    a = tracker.track(1, 1)
    b = tracker.track(0, 0)
    c = tracker.track(2, 1)
    assert tracker.pending == 3
    tracker.settle([a, c])
    assert acks.mids == [1]  # the QoS 0 message in between holds back the later ack
    tracker.settle([b])
    assert acks.sent == [(1, 1), (2, 1)]
    assert tracker.pending == 0
    assert sample(registry, "ingestd_acks_discarded_total") == 0


def test_qos0_counts_against_the_window(metrics: IntakeMetrics) -> None:
    tracker, _, _ = make(metrics, window=2)
    tracker.track(0, 0)
    assert not tracker.full
    tracker.track(0, 0)
    assert tracker.full


def test_qos2_ack_carries_its_qos(metrics: IntakeMetrics) -> None:
    tracker, acks, _ = make(metrics)
    tracker.settle([tracker.track(5, 2)])
    assert acks.sent == [(5, 2)]


def test_epoch_change_discards_old_acks_and_counts_them(
    metrics: IntakeMetrics, registry: CollectorRegistry
) -> None:
    tracker, acks, _ = make(metrics)
    assert tracker.new_epoch() == 1
    old = [tracker.track(mid, 1) for mid in (1, 2, 3)]
    old_qos0 = tracker.track(0, 0)
    assert tracker.new_epoch() == 2
    new = [tracker.track(mid, 1) for mid in (1, 2)]  # packet ids reused on the new connection
    tracker.settle(new)
    assert acks.sent == []  # still behind the old epoch's unsettled messages
    tracker.settle([*old, old_qos0])
    assert acks.sent == [(1, 1), (2, 1)]  # only the new connection's messages
    assert sample(registry, "ingestd_acks_discarded_total") == 3
    assert sample(registry, "ingestd_acks_sent_total") == 2
    assert tracker.pending == 0


def test_failed_send_counts_as_discarded(
    metrics: IntakeMetrics, registry: CollectorRegistry
) -> None:
    tracker, acks, _ = make(metrics, result=False)
    tracker.settle([tracker.track(9, 1)])
    assert acks.sent == [(9, 1)]
    assert sample(registry, "ingestd_acks_discarded_total") == 1
    assert sample(registry, "ingestd_acks_sent_total") == 0
    assert tracker.pending == 0


def test_settle_of_unknown_or_old_seqs_is_ignored(metrics: IntakeMetrics) -> None:
    tracker, acks, _ = make(metrics)
    first = tracker.track(1, 1)
    tracker.settle([first])
    second = tracker.track(2, 1)
    tracker.settle([first, -1, 99, second + 1])  # already released, negative, never issued
    assert acks.mids == [1]
    assert tracker.pending == 1
    tracker.settle([second, second])  # twice in one call
    assert acks.mids == [1, 2]
    tracker.settle([second])  # again after release
    assert acks.mids == [1, 2]
    # A seq issued later still maps to the right entry after the base moved.
    third = tracker.track(3, 1)
    assert third == 2
    tracker.settle([third])
    assert acks.mids == [1, 2, 3]


def test_settle_of_a_future_seq_does_not_settle_it_in_advance(metrics: IntakeMetrics) -> None:
    tracker, acks, _ = make(metrics)
    tracker.settle([0])  # nothing tracked yet
    tracker.track(1, 1)
    assert acks.sent == []
    assert tracker.pending == 1


def test_full_at_window(metrics: IntakeMetrics) -> None:
    tracker, _, _ = make(metrics, window=3)
    seqs = []
    for mid in range(3):
        assert not tracker.full
        seqs.append(tracker.track(mid + 1, 1))
    assert tracker.full
    tracker.settle([seqs[0]])
    assert not tracker.full


def test_window_collector_reports_inflight_and_window(
    metrics: IntakeMetrics, registry: CollectorRegistry
) -> None:
    tracker, _, _ = make(metrics, window=7)
    registry.register(WindowCollector([tracker]))
    assert sample(registry, "ingestd_inflight_messages") == 0
    tracker.track(1, 1)
    seq = tracker.track(2, 1)
    assert sample(registry, "ingestd_inflight_messages") == 2
    assert sample(registry, "ingestd_inflight_window") == 7
    tracker.resize(9)
    tracker.settle([0, seq])  # read at scrape time: no stale value
    assert sample(registry, "ingestd_inflight_messages") == 0
    assert sample(registry, "ingestd_inflight_window") == 9


def test_on_room_after_dropping_below_resume_threshold(metrics: IntakeMetrics) -> None:
    tracker, _, room = make(metrics, window=20)  # resume below 18 (window - window // 10)
    seqs = [tracker.track(mid, 1) for mid in range(20)]
    assert tracker.full
    tracker.settle([seqs[0]])  # 19 left: still above the threshold
    assert room.calls == 0
    tracker.settle([seqs[1]])  # 18 left
    assert room.calls == 0
    tracker.settle([seqs[2]])  # 17 left: below
    assert room.calls == 1
    tracker.settle(seqs[3:])
    assert room.calls == 1  # once per crossing, not once per settle
    assert tracker.pending == 0


def test_on_room_not_called_while_far_from_full(metrics: IntakeMetrics) -> None:
    tracker, _, room = make(metrics, window=100)
    for _ in range(50):
        tracker.settle([tracker.track(1, 1)])
    assert room.calls == 0


def test_on_room_again_after_filling_again(metrics: IntakeMetrics) -> None:
    tracker, _, room = make(metrics, window=10)  # resume below 9
    for round_ in range(1, 4):
        seqs = [tracker.track(mid, 1) for mid in range(10)]
        assert tracker.full
        tracker.settle(seqs)
        assert room.calls == round_


def test_on_room_not_called_when_the_front_stays_unsettled(metrics: IntakeMetrics) -> None:
    tracker, _, room = make(metrics, window=10)
    seqs = [tracker.track(mid, 1) for mid in range(10)]
    tracker.settle(seqs[1:])  # the first is still open: nothing leaves the window
    assert tracker.full
    assert room.calls == 0
    tracker.settle(seqs[:1])
    assert room.calls == 1


def test_on_room_with_window_of_one(metrics: IntakeMetrics) -> None:
    tracker, acks, room = make(metrics, window=1)
    seq = tracker.track(1, 1)
    assert tracker.full
    tracker.settle([seq])
    assert acks.mids == [1]
    assert room.calls == 1


async def test_wait_drained(metrics: IntakeMetrics) -> None:
    tracker, _, _ = make(metrics)
    await asyncio.wait_for(tracker.wait_drained(), 1)  # nothing tracked: returns at once
    a, b = tracker.track(1, 1), tracker.track(2, 0)
    waiter = asyncio.create_task(tracker.wait_drained())
    await asyncio.sleep(0)
    tracker.settle([b])
    await asyncio.sleep(0)
    assert not waiter.done()
    tracker.settle([a])
    await asyncio.wait_for(waiter, 1)
    tracker.track(3, 1)
    blocked = asyncio.create_task(tracker.wait_drained())
    await asyncio.sleep(0)
    assert not blocked.done()
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked


operations = st.lists(
    st.one_of(
        st.tuples(st.just("track"), st.sampled_from([0, 1, 2])),
        st.tuples(st.just("settle"), st.integers(min_value=-2, max_value=40)),
        st.tuples(st.just("epoch"), st.just(0)),
    ),
    max_size=60,
)


@given(operations)
@settings(max_examples=300, deadline=None, database=None)
def test_random_operations_keep_the_ack_invariants(ops: list[tuple[str, int]]) -> None:
    """Acks go out once each, in receive order, only for the current connection's messages."""
    registry = CollectorRegistry()
    metrics = IntakeMetrics(registry)
    sent: list[int] = []  # seqs whose ack was sent (the mid is the seq here)

    def send(mid: int, _qos: int) -> bool:
        sent.append(mid)
        return True

    tracker = AckTracker(1_000, send, metrics)
    epoch_of: dict[int, int] = {}
    qos_of: dict[int, int] = {}
    settled: set[int] = set()
    for op, arg in ops:
        if op == "track":
            seq = tracker.track(len(epoch_of), arg)
            epoch_of[seq], qos_of[seq] = tracker.epoch, arg
        elif op == "epoch":
            tracker.new_epoch()
        else:
            before = list(sent)
            tracker.settle([arg])
            if arg in epoch_of:
                settled.add(arg)
            acked = sent[len(before) :]
            # Whatever was acked in this call belongs to the current connection.
            assert all(epoch_of[seq] == tracker.epoch for seq in acked)
        prefix = 0
        while prefix in settled:
            prefix += 1
        assert tracker.pending == len(epoch_of) - prefix
    assert sent == sorted(set(sent))  # strictly increasing: in order, never twice
    assert all(seq in settled and qos_of[seq] for seq in sent)
    discarded = registry.get_sample_value("ingestd_acks_discarded_total")
    released = len(epoch_of) - tracker.pending
    # Every released QoS>0 message was either acked or discarded, never both.
    assert discarded is not None
    assert discarded + len(sent) == sum(1 for seq in range(released) if qos_of[seq])
