"""agents.budget: payload bytes and decoded readings in flight, against their budgets."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from agents.budget import InflightBudget
from daemon.metrics import BudgetCollector
from tests.unit.fakes import give_the_loop_turns

UNLIMITED = 1 << 40


async def test_admit_charge_and_release_account_per_message() -> None:
    budget = InflightBudget(UNLIMITED, UNLIMITED)
    budget.admit(0, 100)
    budget.admit(1, 50)
    assert (budget.bytes, budget.readings) == (150, 0)  # bytes from receipt on
    await budget.charge(0, 3)
    await budget.charge(1, 1)
    assert (budget.bytes, budget.readings) == (150, 4)  # readings once decoded
    budget.release([0])
    assert (budget.bytes, budget.readings) == (50, 1)  # exactly message 0's share
    budget.release([1])
    assert (budget.bytes, budget.readings) == (0, 0)


async def test_a_message_charged_twice_carries_both_charges() -> None:
    budget = InflightBudget(UNLIMITED, UNLIMITED)
    budget.admit(0, 10)
    await budget.charge(0, 2)
    await budget.charge(0, 3)
    assert budget.readings == 5
    budget.release([0])
    assert (budget.bytes, budget.readings) == (0, 0)


async def test_release_twice_counts_once() -> None:
    budget = InflightBudget(UNLIMITED, UNLIMITED)
    for seq in (0, 1):
        budget.admit(seq, 100)
        await budget.charge(seq, 5)
    budget.release([0])
    budget.release([0])  # e.g. a message replayed after a crash
    budget.release([0, 0])
    assert (budget.bytes, budget.readings) == (100, 5)  # message 1 still counts, nothing negative
    budget.release([1, 1])
    assert (budget.bytes, budget.readings) == (0, 0)


def test_releasing_an_unknown_message_changes_nothing() -> None:
    budget = InflightBudget(UNLIMITED, UNLIMITED)
    budget.admit(0, 7)
    budget.release([42])
    assert (budget.bytes, budget.readings) == (7, 0)


def test_full_keeps_room_for_one_largest_payload() -> None:
    budget = InflightBudget(1000, UNLIMITED, largest_payload=200)
    assert not budget.full
    budget.admit(0, 799)
    assert not budget.full  # 799 + 200 < 1000: one more payload of any size still fits
    budget.admit(1, 1)
    assert budget.full  # 800 + 200 = 1000: the next payload might not
    budget.release([1])
    assert not budget.full


def test_full_without_a_reserve_at_the_budget_itself() -> None:
    budget = InflightBudget(1000, UNLIMITED)
    budget.admit(0, 999)
    assert not budget.full
    budget.admit(1, 1)
    assert budget.full


def test_an_empty_budget_is_never_full_even_if_the_reserve_exceeds_it() -> None:
    # A largest payload above the budget must not pause reads for good: with nothing in
    # flight there is room, and the one message passes alone.
    budget = InflightBudget(100, UNLIMITED, largest_payload=500)
    assert not budget.full
    budget.admit(0, 400)  # a single message larger than the budget
    assert budget.bytes == 400
    assert budget.full
    budget.release([0])
    assert not budget.full


async def test_full_when_the_readings_reach_their_budget() -> None:
    budget = InflightBudget(UNLIMITED, 10)
    budget.admit(0, 1)
    await budget.charge(0, 9)
    assert not budget.full
    budget.admit(1, 1)
    await budget.charge(1, 1)
    assert budget.readings == 10
    assert budget.full
    budget.release([1])
    assert not budget.full


async def test_charge_waits_while_over_the_readings_budget_until_release() -> None:
    budget = InflightBudget(UNLIMITED, 10)
    for seq in (0, 1, 2):
        budget.admit(seq, 1)
    await budget.charge(0, 2)
    await budget.charge(1, 6)
    waiting = asyncio.create_task(budget.charge(2, 5))  # 8 + 5 > 10
    try:
        await give_the_loop_turns()
        assert not waiting.done()
        assert budget.readings == 8  # not charged while waiting
        budget.release([0])  # 6 + 5 > 10 still: it keeps waiting
        await give_the_loop_turns()
        assert not waiting.done()
        assert budget.readings == 6
        budget.release([1])  # now it fits
        await asyncio.wait_for(waiting, 5)
        assert budget.readings == 5
    finally:
        waiting.cancel()


async def test_charge_up_to_exactly_the_budget_does_not_wait() -> None:
    budget = InflightBudget(UNLIMITED, 10)
    budget.admit(0, 1)
    budget.admit(1, 1)
    await budget.charge(0, 4)
    async with asyncio.timeout(5):
        await budget.charge(1, 6)  # 4 + 6 = 10: at the budget, not over it
    assert budget.readings == 10


async def test_a_message_larger_than_the_readings_budget_passes_alone() -> None:
    budget = InflightBudget(UNLIMITED, 10)
    budget.admit(0, 1)
    budget.admit(1, 1)
    async with asyncio.timeout(5):
        await budget.charge(0, 50)  # nothing else charged: it must not wait (no deadlock)
    assert budget.readings == 50
    assert budget.full
    after = asyncio.create_task(budget.charge(1, 1))  # but nothing joins it
    try:
        await give_the_loop_turns()
        assert not after.done()
        budget.release([0])
        await asyncio.wait_for(after, 5)
        assert budget.readings == 1
    finally:
        after.cancel()


async def test_several_waiting_charges_pass_as_room_allows() -> None:
    budget = InflightBudget(UNLIMITED, 10)
    for seq in range(4):
        budget.admit(seq, 1)
    await budget.charge(0, 10)
    first = asyncio.create_task(budget.charge(1, 6))
    second = asyncio.create_task(budget.charge(2, 6))
    try:
        await give_the_loop_turns()
        budget.release([0])  # room for one of them, not both
        await give_the_loop_turns()
        assert [first.done(), second.done()].count(True) == 1
        assert budget.readings == 6
        budget.release([1 if first.done() else 2])
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert budget.readings == 6
    finally:
        first.cancel()
        second.cancel()


async def test_on_room_fires_on_the_full_to_not_full_transition_only() -> None:
    calls: list[tuple[int, int]] = []
    budget = InflightBudget(1000, 10, on_room=lambda: calls.append((budget.bytes, budget.readings)))
    budget.admit(0, 600)
    budget.admit(1, 300)
    budget.admit(2, 100)
    assert budget.full
    budget.release([2])  # 900 bytes: not full any more
    assert calls == [(900, 0)]  # called after the release was counted
    budget.release([1])  # was not full: no call
    budget.release([99])
    assert calls == [(900, 0)]
    budget.admit(3, 500)  # full again
    assert budget.full
    budget.release([0])  # the release that ends the full state: one more call
    assert len(calls) == 2
    budget.release([3])
    assert len(calls) == 2


async def test_on_room_not_called_while_still_full() -> None:
    calls: list[int] = []
    budget = InflightBudget(UNLIMITED, 10, on_room=lambda: calls.append(budget.readings))
    for seq in (0, 1):
        budget.admit(seq, 1)
    await budget.charge(0, 20)  # alone over the budget
    budget.release([1])  # a message not yet decoded (its bytes only)  # still 20 readings: full
    assert calls == []
    budget.release([0])
    assert calls == [0]


def test_resize_applies_to_full_from_now_on() -> None:
    budget = InflightBudget(1000, 10)
    budget.admit(0, 600)
    assert not budget.full
    budget.resize(500, 10)
    assert budget.full
    budget.resize(2000, 10, largest_payload=1400)
    assert budget.full  # 600 + 1400 >= 2000
    budget.resize(2000, 10, largest_payload=1000)
    assert not budget.full


async def test_the_gauges_follow_the_budget() -> None:
    registry = CollectorRegistry()
    budget = InflightBudget(4096, 100)
    registry.register(BudgetCollector(budget))

    def gauges() -> tuple[float | None, ...]:
        return tuple(
            registry.get_sample_value(name)
            for name in (
                "ingestd_inflight_bytes",
                "ingestd_inflight_bytes_budget",
                "ingestd_inflight_readings",
                "ingestd_inflight_readings_budget",
            )
        )

    assert gauges() == (0, 4096, 0, 100)
    budget.admit(0, 300)
    await budget.charge(0, 7)
    assert gauges() == (300, 4096, 7, 100)
    budget.release([0])
    budget.resize(8192, 50)
    assert gauges() == (0, 8192, 0, 50)


async def test_charging_a_message_that_was_never_admitted_counts_nothing() -> None:
    # A message released already (its connection failed) may still reach validation.
    budget = InflightBudget(UNLIMITED, 10)
    await budget.charge(5, 3)
    assert budget.readings == 0
    budget.release([5])
    assert (budget.bytes, budget.readings) == (0, 0)
