"""ValidationAgent: routes and decoders turn raw messages into readings or rejections."""

from __future__ import annotations

import asyncio

import pytest

from agents.budget import InflightBudget
from agents.bus import Bus
from agents.events import RawMessage, RejectedMessage, ValidatedMessage
from agents.metrics import PipelineMetrics
from agents.reasons import INTERNAL_ERROR, PAYLOAD_TOO_LARGE, STALE_RETAINED, UNKNOWN_TOPIC
from agents.validation import ValidationAgent
from daemon.config import SourceConfig
from edge.readings import BAD_TYPE, MALFORMED_JSON, MISSING_VALUE, TOPIC_MISMATCH, Reading
from tests.unit.fakes import NOW, drain, give_the_loop_turns, raw, routes

SOURCES = (
    SourceConfig(),
    SourceConfig(topic="values/+/+", format="value", template="values/{device_id}/{sensor_id}"),
)


def validation(bus: Bus, metrics: PipelineMetrics, max_payload_bytes: int = 64) -> ValidationAgent:
    return ValidationAgent(
        bus, metrics, bus.inbox("validation", 100, RawMessage), routes(*SOURCES), max_payload_bytes
    )


async def test_validate_good_json_message(bus: Bus, metrics: PipelineMetrics) -> None:
    message = raw(0, "sensors/press-01/temp", b'{"value": 21.5, "unit": "degC"}')
    result = validation(bus, metrics).validate(message)
    assert isinstance(result, ValidatedMessage)
    assert result.message is message
    assert result.readings == [
        Reading(device_id="press-01", sensor_id="temp", ts=NOW, value=21.5, unit="degC")
    ]


async def test_validate_good_value_message(bus: Bus, metrics: PipelineMetrics) -> None:
    result = validation(bus, metrics).validate(raw(0, "values/d2/rpm", b"1450"))
    assert isinstance(result, ValidatedMessage)
    assert [(r.device_id, r.sensor_id, r.value) for r in result.readings] == [("d2", "rpm", 1450.0)]


@pytest.mark.parametrize("topic", ["other/d1/s1", "sensors/d1", "sensors/d1/s1/x", "sensors//s1"])
async def test_validate_unknown_topic(bus: Bus, metrics: PipelineMetrics, topic: str) -> None:
    result = validation(bus, metrics).validate(raw(0, topic))
    assert isinstance(result, RejectedMessage)
    assert result.reason == UNKNOWN_TOPIC
    assert result.device_id is None
    assert topic in result.error


async def test_validate_payload_too_large(bus: Bus, metrics: PipelineMetrics) -> None:
    agent = validation(bus, metrics, max_payload_bytes=32)
    at_limit = b'{"value": 1' + b" " * 20 + b"}"
    assert len(at_limit) == 32
    assert isinstance(agent.validate(raw(0, payload=at_limit)), ValidatedMessage)
    result = agent.validate(raw(1, payload=at_limit + b" "))
    assert isinstance(result, RejectedMessage)
    assert result.reason == PAYLOAD_TOO_LARGE
    assert result.device_id == "d1"
    assert "33" in result.error


async def test_validate_oversized_garbage_is_too_large_not_malformed(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    result = validation(bus, metrics, max_payload_bytes=16).validate(raw(0, payload=b"\xff" * 100))
    assert isinstance(result, RejectedMessage)
    assert result.reason == PAYLOAD_TOO_LARGE


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b"{", MALFORMED_JSON), (b'{"value": "x"}', BAD_TYPE),
     (b'{"value": 1, "device_id": "zz"}', TOPIC_MISMATCH)],
)  # fmt: skip
async def test_validate_bad_payload_keeps_device(
    bus: Bus, metrics: PipelineMetrics, payload: bytes, reason: str
) -> None:
    result = validation(bus, metrics).validate(raw(0, payload=payload))
    assert isinstance(result, RejectedMessage)
    assert (result.reason, result.device_id) == (reason, "d1")


async def test_validate_retained_message_needs_its_own_ts(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    agent = validation(bus, metrics)
    stale = agent.validate(raw(0, retain=True))
    assert isinstance(stale, RejectedMessage)
    assert (stale.reason, stale.device_id) == (STALE_RETAINED, "d1")
    stamped = raw(1, payload=b'{"value": 1, "ts": "2026-11-27T07:00:00Z"}', retain=True)
    assert isinstance(agent.validate(stamped), ValidatedMessage)
    assert isinstance(agent.validate(raw(2)), ValidatedMessage)  # not retained: receipt time


async def test_validation_agent_publishes_results_in_order(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    agent = validation(bus, metrics)
    out = bus.inbox("out", 10, ValidatedMessage, RejectedMessage)
    await agent.handle([raw(0), raw(1, "nowhere"), raw(2, payload=b"[]")])
    results = drain(out)
    assert [type(r) for r in results] == [ValidatedMessage, RejectedMessage, RejectedMessage]
    assert [r.message.seq for r in results] == [0, 1, 2]
    assert results[2].reason == MISSING_VALUE


async def test_validation_recover_rejects_held_messages_as_internal_error(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    agent = validation(bus, metrics)
    out = bus.inbox("out", 10, ValidatedMessage, RejectedMessage)
    await agent.recover([raw(0), raw(1)])
    results = drain(out)
    assert [(type(r), r.reason, r.message.seq) for r in results] == [
        (RejectedMessage, INTERNAL_ERROR, 0), (RejectedMessage, INTERNAL_ERROR, 1),
    ]  # fmt: skip


async def test_validation_reconfigure_applies_from_the_next_message(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    agent = validation(bus, metrics, max_payload_bytes=64)
    assert isinstance(agent.validate(raw(0, "values/d2/rpm", b"1450")), ValidatedMessage)
    agent.reconfigure(routes(SourceConfig()), 16)  # values/+/+ is gone, the limit is lower
    unknown = agent.validate(raw(1, "values/d2/rpm", b"1450"))
    assert isinstance(unknown, RejectedMessage)
    assert unknown.reason == UNKNOWN_TOPIC
    too_large = agent.validate(raw(2, payload=b'{"value": 12345.5}'))  # 18 bytes
    assert isinstance(too_large, RejectedMessage)
    assert too_large.reason == PAYLOAD_TOO_LARGE


# ------------------------------------------------------------------------ the in-flight budget


def array(count: int) -> bytes:
    """A JSON array of ``count`` readings of one sensor, each with its own ts."""
    items = ",".join(f'{{"value": {i}, "ts": "2026-11-27T07:00:{i:02d}Z"}}' for i in range(count))
    return f"[{items}]".encode()


async def test_validation_charges_the_budget_with_the_decoded_readings(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    budget = InflightBudget(1 << 30, 1000)
    messages = [raw(0, payload=array(3)), raw(1, "nowhere"), raw(2), raw(3, payload=b"{")]
    for message in messages:
        budget.admit(message.seq, len(message.payload))
    agent = ValidationAgent(
        bus, metrics, bus.inbox("validation", 100, RawMessage), routes(*SOURCES), 1024, budget
    )
    out = bus.inbox("out", 10, ValidatedMessage, RejectedMessage)
    await agent.handle(messages)
    assert [type(r) for r in drain(out)] == [
        ValidatedMessage, RejectedMessage, ValidatedMessage, RejectedMessage,
    ]  # fmt: skip
    assert budget.readings == 3 + 1  # a rejection carries no readings
    budget.release([0])
    assert budget.readings == 1  # message 0 was charged its three
    budget.release([1, 3])
    assert budget.readings == 1
    budget.release([2])
    assert (budget.bytes, budget.readings) == (0, 0)


async def test_validation_waits_for_room_in_the_readings_budget(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    budget = InflightBudget(1 << 30, 4)
    first, second = raw(0, payload=array(3)), raw(1, payload=array(2))
    for message in (first, second):
        budget.admit(message.seq, len(message.payload))
    agent = ValidationAgent(
        bus, metrics, bus.inbox("validation", 100, RawMessage), routes(*SOURCES), 1024, budget
    )
    out = bus.inbox("out", 10, ValidatedMessage, RejectedMessage)
    handling = asyncio.create_task(agent.handle([first, second]))
    try:
        await give_the_loop_turns()
        assert not handling.done()  # 3 + 2 readings > 4: the second waits, unpublished
        assert [r.message.seq for r in drain(out)] == [0]
        budget.release([0])  # the first message's events are out
        await asyncio.wait_for(handling, 5)
        assert [r.message.seq for r in drain(out)] == [1]
        assert budget.readings == 2
    finally:
        handling.cancel()


async def test_validation_without_a_budget_never_waits(bus: Bus, metrics: PipelineMetrics) -> None:
    agent = validation(bus, metrics, max_payload_bytes=4096)
    out = bus.inbox("out", 10, ValidatedMessage, RejectedMessage)
    async with asyncio.timeout(5):
        await agent.handle([raw(seq, payload=array(50)) for seq in range(3)])
    assert [len(r.readings) for r in drain(out)] == [50, 50, 50]
