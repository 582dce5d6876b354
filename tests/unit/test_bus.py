"""The bus and its inboxes; and the agents wired on one bus, as the daemon wires them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import NamedTuple

import pytest

from agents.bus import Bus, Inbox, UnroutedEventError
from agents.enrichment import EnrichmentAgent
from agents.events import (
    EnrichedMessage,
    RawMessage,
    ReadingsStored,
    RejectedMessage,
    RejectionsStored,
    ValidatedMessage,
)
from agents.metrics import PipelineMetrics
from agents.persistence import PersistenceAgent
from agents.publisher import EventSettings, Publisher
from agents.registry import DeviceRegistry
from agents.storage import Storage
from agents.validation import ValidationAgent
from daemon.config import SourceConfig
from db.schema import upgrade
from db.sqlite import SqliteWriter
from edge.errors import IngestdError
from tests.harness.servers import wait_until_async
from tests.unit.fakes import FakeOutbound, Settled, drain, raw, routes, sample, until


class Ping(NamedTuple):
    n: int


class Pong(NamedTuple):
    n: int


class SubPing(Ping):
    pass


def waits(metrics: PipelineMetrics, inbox: str) -> float | None:
    return sample(metrics, "ingestd_queue_full_waits_total", {"inbox": inbox})


async def test_bus_routes_by_exact_type(bus: Bus) -> None:
    pings = bus.inbox("pings", 10, Ping)
    both = bus.inbox("both", 10, Ping, Pong)
    await bus.publish(Ping(1))
    await bus.publish(Pong(2))
    with pytest.raises(UnroutedEventError):
        await bus.publish(SubPing(3))  # a subclass is a different type: nobody subscribed
    assert drain(pings) == [Ping(1)]
    assert drain(both) == [Ping(1), Pong(2)]


async def test_bus_publish_of_a_type_nobody_subscribes_to_raises(bus: Bus) -> None:
    pings = bus.inbox("pings", 10, Ping)
    with pytest.raises(UnroutedEventError, match="Pong") as info:
        await bus.publish(Pong(1))
    assert isinstance(info.value, IngestdError)  # the project's one exception root
    with pytest.raises(UnroutedEventError, match="str"):
        await bus.publish("unrouted")
    assert pings.empty()  # a wiring mistake delivers nothing anywhere


async def test_bus_delivers_the_same_event_to_every_subscriber(bus: Bus) -> None:
    first, second = bus.inbox("a", 1, Ping), bus.inbox("b", 1, Ping)
    event = Ping(1)
    await bus.publish(event)
    assert first.get_nowait() is event
    assert second.get_nowait() is event


async def test_bus_publish_waits_for_room_and_counts_the_wait(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    inbox = bus.inbox("slow", 2, Ping)
    await bus.publish(Ping(1))
    await bus.publish(Ping(2))
    assert waits(metrics, "slow") == 0  # the series exists from the start; no wait yet
    blocked = asyncio.create_task(bus.publish(Ping(3)))
    try:
        await wait_until_async(lambda: waits(metrics, "slow") == 1, 5)
        assert not blocked.done()  # counted, then waiting for room
        assert inbox.qsize() == 2
        assert inbox.get_nowait() == Ping(1)
        await asyncio.wait_for(blocked, 5)
    finally:
        blocked.cancel()
    assert drain(inbox) == [Ping(2), Ping(3)]
    assert waits(metrics, "slow") == 1


async def test_bus_a_full_subscriber_holds_back_the_producer(
    bus: Bus, metrics: PipelineMetrics
) -> None:
    roomy, tight = bus.inbox("roomy", 3, Ping), bus.inbox("tight", 2, Ping)
    await bus.publish(Ping(1))
    await bus.publish(Ping(2))
    blocked = asyncio.create_task(bus.publish(Ping(3)))
    try:
        # The smallest inbox decides: the roomy one has its copy, the publisher still waits.
        await wait_until_async(lambda: waits(metrics, "tight") == 1, 5)
        assert not blocked.done()
        assert roomy.qsize() == 3
        assert waits(metrics, "roomy") == 0
        assert tight.get_nowait() == Ping(1)
        await asyncio.wait_for(blocked, 5)
    finally:
        blocked.cancel()
    assert drain(tight) == [Ping(2), Ping(3)]
    assert drain(roomy) == [Ping(1), Ping(2), Ping(3)]


async def test_bus_reports_queue_depth_and_capacity(bus: Bus, metrics: PipelineMetrics) -> None:
    bus.inbox("watched", 5, Ping)
    assert sample(metrics, "ingestd_queue_depth", {"inbox": "watched"}) == 0
    await bus.publish(Ping(1))
    await bus.publish(Ping(2))
    assert sample(metrics, "ingestd_queue_depth", {"inbox": "watched"}) == 2
    assert sample(metrics, "ingestd_queue_capacity", {"inbox": "watched"}) == 5


async def test_inbox_get_batch_takes_what_waits_up_to_the_limit() -> None:
    inbox: Inbox[int] = Inbox("x", 10)
    for n in range(5):
        inbox.put_nowait(n)
    assert await inbox.get_batch(3) == [0, 1, 2]
    assert await inbox.get_batch(10) == [3, 4]
    with pytest.raises(TimeoutError):  # an empty inbox gives no empty batch: it waits
        await asyncio.wait_for(inbox.get_batch(10), 0.05)
    waiter = asyncio.create_task(inbox.get_batch(10))
    inbox.put_nowait(5)
    assert await asyncio.wait_for(waiter, 5) == [5]


# ------------------------------------------------------------------- the agents on one bus


SOURCES = (
    SourceConfig(),
    SourceConfig(topic="values/+/+", format="value", template="values/{device_id}/{sensor_id}"),
)
REGISTRY_ROWS = [
    {"device_id": "d1", "sensor_id": "*", "site": "berlin", "max_value": 80},
    {"device_id": "d2", "sensor_id": "rpm", "sensor_type": "encoder", "unit": "1/min"},
]


async def test_pipeline_from_raw_message_to_published_events(
    bus: Bus, metrics: PipelineMetrics, tmp_path: Path
) -> None:
    """The four agents on one bus, as the daemon wires them, storing in a real SQLite file."""
    path = tmp_path / "ingestd.db"
    await asyncio.to_thread(upgrade, f"sqlite:///{path}")
    storage = Storage(SqliteWriter(path), None, metrics)
    await storage.start()
    settled, outbound = Settled(), FakeOutbound()
    raw_inbox = bus.inbox("validation", 100, RawMessage)
    agents = [
        ValidationAgent(bus, metrics, raw_inbox, routes(*SOURCES), 1024),
        EnrichmentAgent(
            bus, metrics, bus.inbox("enrichment", 100, ValidatedMessage),
            DeviceRegistry(REGISTRY_ROWS),
        ),
        PersistenceAgent(
            bus, metrics, bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage),
            storage, settled, 100,
        ),
        Publisher(
            bus, metrics, bus.inbox("publisher", 100, ReadingsStored, RejectionsStored),
            outbound, EventSettings(),
        ),
    ]  # fmt: skip
    for message in (
        raw(0, "sensors/d1/temp", b'{"value": 95}'),
        raw(1, "values/d2/rpm", b"1450"),
        raw(2, "sensors/d1/temp", b'{"value": "hot"}'),
    ):
        raw_inbox.put_nowait(message)
    tasks = [asyncio.create_task(agent.run()) for agent in agents]
    try:
        await until(lambda: len(outbound.sent) >= 3, outbound.changed)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await storage.close(grace_seconds=1)
    assert sorted(settled.seqs) == [0, 1, 2]
    topics = sorted(topic for topic, _, _ in outbound.sent)
    assert topics == ["ingestd/failed/d1", "ingestd/processed/d1/temp", "ingestd/processed/d2/rpm"]
    by_topic = {topic: body for topic, body, _ in outbound.sent}
    assert by_topic["ingestd/processed/d1/temp"]["quality"] == "out_of_range"
    assert by_topic["ingestd/processed/d1/temp"]["site"] == "berlin"
    assert by_topic["ingestd/processed/d2/rpm"]["sensor_type"] == "encoder"
    assert by_topic["ingestd/failed/d1"]["reason"] == "bad_type"
    assert metrics.stored == 2
    assert sample(metrics, "ingestd_messages_rejected_total", {"reason": "bad_type"}) == 1
