"""Bus, inboxes and the agents: validation, enrichment (registry), persistence, publisher."""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from agents.bus import Bus, Inbox
from agents.enrichment import EnrichmentAgent
from agents.events import (
    EnrichedMessage,
    RawMessage,
    ReadingsStored,
    RejectedMessage,
    RejectionsStored,
    ValidatedMessage,
)
from agents.persistence import PersistenceAgent
from agents.publisher import Publisher, topic_segment
from agents.registry import DeviceInfo, DeviceRegistry, RegistryError, load_registry_file
from agents.validation import ValidationAgent
from daemon.acks import AckTracker
from daemon.config import SourceConfig
from daemon.metrics import Metrics
from db.writer import RowRejected, StorageError, WriteResult
from edge import codecs
from edge.codecs import Reading

NOW = datetime(2026, 11, 27, 7, 30, 0, 123456, tzinfo=UTC)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def bus(metrics: Metrics) -> Bus:
    return Bus(metrics)


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


def raw(
    seq: int, topic: str = "sensors/d1/s1", payload: bytes = b'{"value": 1}', *, dup: bool = False
) -> RawMessage:
    return RawMessage(seq, topic, payload, 1, NOW, time.monotonic(), f"corr-{seq}", dup)


def reading(
    device: str = "d1", sensor: str = "s1", value: float = 1.0, second: int = 0, **extra: Any
) -> Reading:
    ts = NOW.replace(second=second)
    return Reading(device_id=device, sensor_id=sensor, ts=ts, value=value, **extra)


def enriched(seq: int, *readings: Reading) -> EnrichedMessage:
    return EnrichedMessage(raw(seq), list(readings) or [reading(second=seq % 60)])


async def drain(inbox: Inbox[Any]) -> list[Any]:
    items = []
    while not inbox.empty():
        items.append(inbox.get_nowait())
    return items


# ------------------------------------------------------------------------------------ bus


@dataclass
class Ping:
    n: int


@dataclass
class Pong:
    n: int


class SubPing(Ping):
    pass


async def test_bus_routes_by_exact_type(bus: Bus) -> None:
    pings = bus.inbox("pings", 10, Ping)
    both = bus.inbox("both", 10, Ping, Pong)
    await bus.publish(Ping(1))
    await bus.publish(Pong(2))
    await bus.publish(SubPing(3))  # a subclass is a different type: nobody subscribed
    await bus.publish("unrouted")
    assert await drain(pings) == [Ping(1)]
    assert await drain(both) == [Ping(1), Pong(2)]
    assert bus.pending() == 0


async def test_bus_delivers_the_same_event_to_every_subscriber(bus: Bus) -> None:
    first, second = bus.inbox("a", 1, Ping), bus.inbox("b", 1, Ping)
    event = Ping(1)
    await bus.publish(event)
    assert first.get_nowait() is event
    assert second.get_nowait() is event


async def test_bus_publish_waits_for_room_and_counts_the_wait(bus: Bus, metrics: Metrics) -> None:
    inbox = bus.inbox("slow", 2, Ping)
    await bus.publish(Ping(1))
    await bus.publish(Ping(2))
    assert (
        sample(metrics, "ingestd_queue_full_waits_total", {"inbox": "slow"}) is None
    )  # no wait yet
    blocked = asyncio.create_task(bus.publish(Ping(3)))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not blocked.done()
    assert inbox.qsize() == 2
    assert sample(metrics, "ingestd_queue_full_waits_total", {"inbox": "slow"}) == 1
    assert inbox.get_nowait() == Ping(1)
    await asyncio.wait_for(blocked, 1)
    assert await drain(inbox) == [Ping(2), Ping(3)]
    assert sample(metrics, "ingestd_queue_full_waits_total", {"inbox": "slow"}) == 1


async def test_bus_publish_nowait_raises_when_full(bus: Bus) -> None:
    bus.inbox("tiny", 1, Ping)
    bus.publish_nowait(Ping(1))
    with pytest.raises(asyncio.QueueFull):
        bus.publish_nowait(Ping(2))


async def test_bus_has_room_and_pending(bus: Bus) -> None:
    bus.inbox("a", 3, Ping)
    bus.inbox("b", 2, Ping)
    assert bus.has_room(Ping, 2)
    assert not bus.has_room(Ping, 3)  # the smallest inbox decides
    assert bus.has_room(Pong, 1000)  # no subscribers: always room
    await bus.publish(Ping(1))
    assert bus.pending() == 2
    assert bus.has_room(Ping, 1)
    assert not bus.has_room(Ping, 2)


async def test_bus_reports_queue_depth_and_capacity(bus: Bus, metrics: Metrics) -> None:
    bus.inbox("watched", 5, Ping)
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
    waiter = asyncio.create_task(inbox.get_batch(10))
    await asyncio.sleep(0)
    assert not waiter.done()  # waits for the first event
    inbox.put_nowait(5)
    assert await asyncio.wait_for(waiter, 1) == [5]


# ------------------------------------------------------------------------------ validation


SOURCES = (
    SourceConfig(),
    SourceConfig(topic="values/+/+", format="value", template="values/{device_id}/{sensor_id}"),
)


def validation(bus: Bus, metrics: Metrics, max_payload_bytes: int = 64) -> ValidationAgent:
    return ValidationAgent(
        bus, metrics, bus.inbox("validation", 100, RawMessage), SOURCES, max_payload_bytes
    )


async def test_validate_good_json_message(bus: Bus, metrics: Metrics) -> None:
    message = raw(0, "sensors/press-01/temp", b'{"value": 21.5, "unit": "degC"}')
    result = validation(bus, metrics).validate(message)
    assert isinstance(result, ValidatedMessage)
    assert result.message is message
    assert result.readings == [
        Reading(device_id="press-01", sensor_id="temp", ts=NOW, value=21.5, unit="degC")
    ]


async def test_validate_good_value_message(bus: Bus, metrics: Metrics) -> None:
    result = validation(bus, metrics).validate(raw(0, "values/d2/rpm", b"1450"))
    assert isinstance(result, ValidatedMessage)
    assert [(r.device_id, r.sensor_id, r.value) for r in result.readings] == [("d2", "rpm", 1450.0)]


@pytest.mark.parametrize("topic", ["other/d1/s1", "sensors/d1", "sensors/d1/s1/x", "sensors//s1"])
async def test_validate_unknown_topic(bus: Bus, metrics: Metrics, topic: str) -> None:
    result = validation(bus, metrics).validate(raw(0, topic))
    assert isinstance(result, RejectedMessage)
    assert result.reason == codecs.UNKNOWN_TOPIC
    assert result.device_id is None
    assert topic in result.error


async def test_validate_payload_too_large(bus: Bus, metrics: Metrics) -> None:
    agent = validation(bus, metrics, max_payload_bytes=32)
    at_limit = b'{"value": 1' + b" " * 20 + b"}"
    assert len(at_limit) == 32
    assert isinstance(agent.validate(raw(0, payload=at_limit)), ValidatedMessage)
    result = agent.validate(raw(1, payload=at_limit + b" "))
    assert isinstance(result, RejectedMessage)
    assert result.reason == codecs.PAYLOAD_TOO_LARGE
    assert result.device_id == "d1"
    assert "33" in result.error


async def test_validate_oversized_garbage_is_too_large_not_malformed(
    bus: Bus, metrics: Metrics
) -> None:
    result = validation(bus, metrics, max_payload_bytes=16).validate(raw(0, payload=b"\xff" * 100))
    assert isinstance(result, RejectedMessage)
    assert result.reason == codecs.PAYLOAD_TOO_LARGE


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b"{", codecs.MALFORMED_JSON), (b'{"value": "x"}', codecs.BAD_TYPE),
     (b'{"value": 1, "device_id": "zz"}', codecs.TOPIC_MISMATCH)],
)  # fmt: skip
async def test_validate_bad_payload_keeps_device(
    bus: Bus, metrics: Metrics, payload: bytes, reason: str
) -> None:
    result = validation(bus, metrics).validate(raw(0, payload=payload))
    assert isinstance(result, RejectedMessage)
    assert (result.reason, result.device_id) == (reason, "d1")


async def test_validation_agent_publishes_results_in_order(bus: Bus, metrics: Metrics) -> None:
    agent = validation(bus, metrics)
    out = bus.inbox("out", 10, ValidatedMessage, RejectedMessage)
    await agent.handle([raw(0), raw(1, "nowhere"), raw(2, payload=b"[]")])
    results = await drain(out)
    assert [type(r) for r in results] == [ValidatedMessage, RejectedMessage, RejectedMessage]
    assert [r.message.seq for r in results] == [0, 1, 2]
    assert results[2].reason == codecs.MISSING_VALUE


async def test_validation_recover_rejects_held_messages_as_internal_error(
    bus: Bus, metrics: Metrics
) -> None:
    agent = validation(bus, metrics)
    out = bus.inbox("out", 10, ValidatedMessage, RejectedMessage)
    await agent.recover([raw(0), raw(1)])
    results = await drain(out)
    assert [(type(r), r.reason, r.message.seq) for r in results] == [
        (RejectedMessage, codecs.INTERNAL_ERROR, 0), (RejectedMessage, codecs.INTERNAL_ERROR, 1),
    ]  # fmt: skip


# ------------------------------------------------------------------------------ registry


REGISTRY_ROWS = [
    {"device_id": "d1", "sensor_id": "*", "site": "berlin", "area": "hall-2", "line": "L1",
     "asset": "press-01", "unit": "degC", "min_value": 0, "max_value": 100},
    {"device_id": "d1", "sensor_id": "temp", "sensor_type": "pt100", "max_value": 80},
    {"device_id": "d1", "sensor_id": "pressure", "unit": "bar", "min_value": "1.5"},
    {"device_id": "d2", "sensor_id": "rpm", "sensor_type": "encoder", "unit": "1/min"},
]  # fmt: skip


def test_registry_merges_device_defaults_under_sensor_rows() -> None:
    registry = DeviceRegistry(REGISTRY_ROWS)
    assert len(registry) == 2
    assert registry.lookup("d1", "temp") == DeviceInfo(
        site="berlin", area="hall-2", line="L1", asset="press-01", sensor_type="pt100",
        unit="degC", min_value=0.0, max_value=80.0,
    )  # fmt: skip
    assert registry.lookup("d1", "pressure") == DeviceInfo(
        site="berlin", area="hall-2", line="L1", asset="press-01", unit="bar",
        min_value=1.5, max_value=100.0,
    )  # fmt: skip
    # A sensor with no row of its own gets the device defaults.
    assert registry.lookup("d1", "other") == DeviceInfo(
        site="berlin", area="hall-2", line="L1", asset="press-01", unit="degC",
        min_value=0.0, max_value=100.0,
    )  # fmt: skip
    # A sensor row without device defaults stands alone.
    assert registry.lookup("d2", "rpm") == DeviceInfo(sensor_type="encoder", unit="1/min")
    assert registry.lookup("d2", "other") is None
    assert registry.lookup("nope", "temp") is None


def test_registry_later_rows_override_and_invalidate_the_cache() -> None:
    registry = DeviceRegistry([{"device_id": "d1", "site": "a"}])
    assert registry.lookup("d1", "x") == DeviceInfo(site="a")
    registry.add([{"device_id": "d1", "sensor_id": "", "site": "b"}])  # "" means "*"
    assert registry.lookup("d1", "x") == DeviceInfo(site="b")


def test_registry_ignores_updated_at_and_empty_values() -> None:
    registry = DeviceRegistry(
        [{"device_id": "d1", "sensor_id": "s", "updated_at": NOW, "site": "", "min_value": None}]
    )
    assert registry.lookup("d1", "s") == DeviceInfo()


@pytest.mark.parametrize(
    ("row", "message"),
    [({"device_id": "d1", "colour": "red"}, "unknown registry fields ['colour']"),
     ({"device_id": "d1", "min_value": "low"}, "min_value must be a number"),
     ({"device_id": "d1", "max_value": "nan"}, "max_value must be finite"),
     ({"device_id": "d1", "max_value": float("inf")}, "max_value must be finite")],
)  # fmt: skip
def test_registry_row_errors(row: dict[str, Any], message: str) -> None:
    with pytest.raises(RegistryError, match=re.escape(message)):
        DeviceRegistry([row])


def test_load_registry_toml(tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    path.write_text(
        """
[[devices]]
device_id = "d1"
site = "berlin"
min = -10
max = 100.5

[devices.sensors.temp]
sensor_type = "pt100"
max = 80

[devices.sensors.vib]
unit = "mm/s"

[[devices]]
device_id = "d2"
line = "L2"
""",
        encoding="utf-8",
    )
    rows = load_registry_file(path)
    assert rows == [
        {
            "device_id": "d1",
            "sensor_id": "*",
            "site": "berlin",
            "min_value": -10,
            "max_value": 100.5,
        },
        {"device_id": "d1", "sensor_id": "temp", "sensor_type": "pt100", "max_value": 80},
        {"device_id": "d1", "sensor_id": "vib", "unit": "mm/s"},
        {"device_id": "d2", "sensor_id": "*", "line": "L2"},
    ]
    registry = DeviceRegistry(rows)
    assert registry.lookup("d1", "temp") == DeviceInfo(
        site="berlin", sensor_type="pt100", min_value=-10.0, max_value=80.0
    )
    assert registry.lookup("d2", "any") == DeviceInfo(line="L2")


def test_load_registry_csv(tmp_path: Path) -> None:
    path = tmp_path / "devices.CSV"  # the suffix is case-insensitive
    path.write_text(
        "device_id,sensor_id,site,unit,min_value,max_value\n"
        "d1,*,berlin,degC,0,100\n"
        "d1,temp,,,,80\n"
        "d3,,munich,,,\n",
        encoding="utf-8",
    )
    rows = load_registry_file(path)
    assert len(rows) == 3
    registry = DeviceRegistry(rows)
    assert registry.lookup("d1", "temp") == DeviceInfo(
        site="berlin", unit="degC", min_value=0.0, max_value=80.0
    )
    assert registry.lookup("d3", "x") == DeviceInfo(site="munich")


def test_load_registry_empty_toml(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("", encoding="utf-8")
    assert load_registry_file(path) == []


@pytest.mark.parametrize(
    ("name", "content"),
    [("bad.toml", b"[[devices]\ndevice_id = "),
     ("nodevice.toml", b'[[devices]]\nsite = "x"\n'),
     ("latin1.toml", b'[[devices]]\ndevice_id = "caf\xe9"\n'),
     ("latin1.csv", b"device_id\ncaf\xe9\n")],
)  # fmt: skip
def test_load_registry_errors_name_the_file(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RegistryError, match=re.escape(name)):
        load_registry_file(path)


def test_load_registry_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"missing\.toml"):
        load_registry_file(tmp_path / "missing.toml")


def test_csv_with_unknown_column_fails_when_added(tmp_path: Path) -> None:
    path = tmp_path / "devices.csv"
    path.write_text("device_id,sensor_id,colour\nd1,s1,red\n", encoding="utf-8")
    with pytest.raises(RegistryError, match="colour"):
        DeviceRegistry(load_registry_file(path))


@pytest.mark.parametrize(
    ("name", "content"),
    [("list.toml", '[[devices]]\ndevice_id = "d1"\nsensors = ["temp"]\n'),
     ("scalar.toml", '[[devices]]\ndevice_id = "d1"\n[devices.sensors]\ntemp = 5\n'),
     ("number.toml", "devices = 5\n"),
     ("extra.csv", "device_id,sensor_id,colour\nd1,s1,red,extra\n"),
     ("nodevice.csv", "device,site\nd1,berlin\n")],
)  # fmt: skip
def test_structurally_wrong_registry_files_raise_registry_error(
    tmp_path: Path, name: str, content: str
) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RegistryError):
        DeviceRegistry(load_registry_file(path))


def test_csv_with_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfdevice_id,sensor_id,site\r\nd1,*,berlin\r\n")
    registry = DeviceRegistry(load_registry_file(path))
    assert registry.lookup("d1", "temp") == DeviceInfo(site="berlin")


# ------------------------------------------------------------------------------ enrichment


async def enrich(bus: Bus, metrics: Metrics, *readings: Reading) -> list[Reading]:
    agent = EnrichmentAgent(
        bus, metrics, bus.inbox("enrichment", 10, ValidatedMessage), DeviceRegistry(REGISTRY_ROWS)
    )
    out = bus.inbox("persistence", 10, EnrichedMessage, RejectedMessage)
    message = raw(0)
    await agent.handle([ValidatedMessage(message, list(readings))])
    (result,) = await drain(out)
    assert type(result) is EnrichedMessage
    assert result.message is message
    return result.readings


async def test_enrichment_fills_registry_metadata(bus: Bus, metrics: Metrics) -> None:
    (r,) = await enrich(bus, metrics, reading("d1", "temp", 50.0))
    assert (r.site, r.area, r.line, r.asset, r.sensor_type, r.unit, r.quality) == (
        "berlin", "hall-2", "L1", "press-01", "pt100", "degC", "good",
    )  # fmt: skip


async def test_enrichment_out_of_range_uses_the_sensor_override(bus: Bus, metrics: Metrics) -> None:
    readings = await enrich(
        bus, metrics,
        reading("d1", "temp", 80.0), reading("d1", "temp", 80.5),  # sensor max 80
        reading("d1", "other", 90.0), reading("d1", "other", 100.5),  # device max 100
        reading("d1", "other", -0.1), reading("d1", "pressure", 1.0),  # min 0, sensor min 1.5
    )  # fmt: skip
    assert [r.quality for r in readings] == [
        "good", "out_of_range", "good", "out_of_range", "out_of_range", "out_of_range",
    ]  # fmt: skip


async def test_enrichment_payload_values_win_over_registry(bus: Bus, metrics: Metrics) -> None:
    (r,) = await enrich(bus, metrics, reading("d1", "temp", 20.0, unit="degF", site="topic-site"))
    assert r.unit == "degF"
    assert r.site == "topic-site"
    assert r.area == "hall-2"


async def test_enrichment_device_quality_kept_unless_out_of_range(
    bus: Bus, metrics: Metrics
) -> None:
    in_range, out_of_range = await enrich(
        bus, metrics,
        reading("d1", "temp", 20.0, quality="uncertain"),
        reading("d1", "temp", 99.0, quality="good"),
    )  # fmt: skip
    assert in_range.quality == "uncertain"
    assert out_of_range.quality == "out_of_range"


async def test_enrichment_unknown_device_gets_good_quality_only(bus: Bus, metrics: Metrics) -> None:
    (r,) = await enrich(bus, metrics, reading("unknown", "x", 1e9))
    assert r.quality == "good"
    assert (r.site, r.unit, r.sensor_type) == (None, None, None)


async def test_enrichment_recover_rejects_as_internal_error(bus: Bus, metrics: Metrics) -> None:
    agent = EnrichmentAgent(
        bus, metrics, bus.inbox("enrichment", 10, ValidatedMessage), DeviceRegistry()
    )
    out = bus.inbox("persistence", 10, EnrichedMessage, RejectedMessage)
    await agent.recover([ValidatedMessage(raw(4), [reading()])])
    (result,) = await drain(out)
    assert (type(result), result.reason, result.message.seq) == (
        RejectedMessage,
        codecs.INTERNAL_ERROR,
        4,
    )


# ------------------------------------------------------------------------------ persistence


class FakeWriter:
    """A storage backend that behaves like the unique key: a (device, sensor, ts) is new once."""

    def __init__(self, log: list[str] | None = None) -> None:
        self.keys: set[tuple[str, str, datetime]] = set()
        self.calls: list[tuple[list[Reading], list[RejectedMessage]]] = []
        self.rejections: list[RejectedMessage] = []
        self.script: list[BaseException | None] = []  # one entry consumed per write
        self.refuse: Callable[[Reading], bool] = lambda _: False
        self.log = log if log is not None else []
        self.on_write: Callable[[], None] = lambda: None

    async def start(self) -> None:
        pass

    async def write(
        self, readings: list[tuple[Reading, RawMessage]], rejections: list[RejectedMessage]
    ) -> WriteResult:
        self.calls.append(([r for r, _ in readings], list(rejections)))
        self.on_write()
        self.log.append("write " + ",".join(str(m.seq) for _, m in readings))
        if self.script:
            step = self.script.pop(0)
            if step is not None:
                raise step
        if any(self.refuse(r) for r, _ in readings):
            raise RowRejected("DataError: value out of range")
        new = []
        for r, _ in readings:
            key = (r.device_id, r.sensor_id, r.ts)
            new.append(key not in self.keys)
            self.keys.add(key)
        self.rejections.extend(rejections)
        return WriteResult(new, len(rejections))

    async def close(self) -> None:
        pass


class Settled:
    def __init__(self, log: list[str]) -> None:
        self.seqs: list[int] = []
        self.log = log
        self.changed = asyncio.Event()

    def __call__(self, seqs: list[int]) -> None:
        self.seqs.extend(seqs)
        self.log.append("settle " + ",".join(map(str, seqs)))
        self.changed.set()


@dataclass
class Persistence:
    agent: PersistenceAgent
    writer: FakeWriter
    settled: Settled
    out: Inbox[Any]
    log: list[str]


@pytest.fixture
def persistence(bus: Bus, metrics: Metrics) -> Persistence:
    log: list[str] = []
    writer, settled = FakeWriter(log), Settled(log)
    inbox = bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage)
    out = bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
    agent = PersistenceAgent(bus, metrics, inbox, writer, settled, 50, retry_max_seconds=0.01)
    return Persistence(agent, writer, settled, out, log)


async def test_persistence_writes_one_batch_then_settles(
    persistence: Persistence, metrics: Metrics
) -> None:
    p = persistence
    rejected = RejectedMessage(raw(2), codecs.BAD_TYPE, "value must be a number", "d1")
    batch = [
        enriched(0, reading(second=1), reading(second=2)),
        enriched(1, reading(second=3)),
        rejected,
        enriched(3, reading(second=4)),
    ]
    await p.agent.handle(batch)
    assert len(p.writer.calls) == 1
    readings, rejections = p.writer.calls[0]
    assert [r.ts.second for r in readings] == [1, 2, 3, 4]
    assert rejections == [rejected]
    assert p.log == ["write 0,0,1,3", "settle 0,1,2,3"]  # settled after the write, receive order
    assert metrics.stored == 4
    assert metrics.duplicates == 0
    assert sample(metrics, "ingestd_messages_rejected_total", {"reason": "bad_type"}) == 1
    assert sample(metrics, "ingestd_batch_size_readings_count") == 1
    assert sample(metrics, "ingestd_batch_size_readings_sum") == 4
    assert sample(metrics, "ingestd_end_to_end_latency_seconds_count") == 4
    stored, failed = await drain(p.out)
    assert type(stored) is ReadingsStored
    assert [(r.ts.second, m.seq) for r, m in stored.readings] == [(1, 0), (2, 0), (3, 1), (4, 3)]
    assert type(failed) is RejectionsStored
    assert failed.rejections == [rejected]


async def test_persistence_counts_duplicates_from_write_result(
    persistence: Persistence, metrics: Metrics
) -> None:
    p = persistence
    await p.agent.handle([enriched(0, reading(second=1))])
    # Second batch: a redelivery of the same reading, a new one, and a twin within the batch.
    await p.agent.handle(
        [
            enriched(1, reading(second=1)),
            enriched(2, reading(second=2)),
            enriched(3, reading(second=2)),
        ]
    )
    assert metrics.stored == 2
    assert metrics.duplicates == 2
    assert sample(metrics, "ingestd_readings_stored_total") == 2
    assert sample(metrics, "ingestd_readings_duplicate_total") == 2
    first, second = await drain(p.out)
    assert [m.seq for _, m in first.readings] == [0]
    assert [m.seq for _, m in second.readings] == [2]  # only the new row is announced
    assert p.settled.seqs == [0, 1, 2, 3]


async def test_persistence_all_duplicates_publish_nothing_but_settle(
    persistence: Persistence, metrics: Metrics
) -> None:
    p = persistence
    p.writer.keys.add(("d1", "s1", NOW.replace(second=5)))
    await p.agent.handle([enriched(7, reading(second=5))])
    assert p.settled.seqs == [7]
    assert await drain(p.out) == []
    assert (metrics.stored, metrics.duplicates) == (0, 1)


async def test_persistence_retries_storage_errors_then_succeeds(
    persistence: Persistence, metrics: Metrics
) -> None:
    p = persistence
    p.agent.database_up = True
    metrics.database_up.set(1)
    gauge_at_write: list[float | None] = []
    p.writer.on_write = lambda: gauge_at_write.append(sample(metrics, "ingestd_database_up"))
    p.writer.script = [StorageError("connection refused"), StorageError("connection refused"), None]
    await p.agent.handle([enriched(0)])
    assert len(p.writer.calls) == 3
    assert gauge_at_write == [1, 0, 0]  # down while retrying ...
    assert sample(metrics, "ingestd_database_up") == 1  # ... and up again after the success
    assert p.agent.database_up
    assert sample(metrics, "ingestd_database_errors_total", {"kind": "StorageError"}) == 2
    assert p.log[-1] == "settle 0"
    assert sum(entry.startswith("settle") for entry in p.log) == 1  # never settled before success
    assert metrics.stored == 1


async def test_persistence_first_success_marks_database_up(
    persistence: Persistence, metrics: Metrics
) -> None:
    p = persistence
    assert not p.agent.database_up
    await p.agent.handle([enriched(0)])
    assert p.agent.database_up
    assert sample(metrics, "ingestd_database_up") == 1


async def test_persistence_isolates_rows_the_database_refuses(
    persistence: Persistence, metrics: Metrics
) -> None:
    p = persistence
    p.writer.refuse = lambda r: r.value == 666
    batch = [
        enriched(0, reading(value=1, second=1)),
        enriched(1, reading(value=666, second=2), reading(value=2, second=3)),
        RejectedMessage(raw(2), codecs.BAD_TYPE, "bad"),
        enriched(3, reading(value=3, second=4)),
    ]
    await p.agent.handle(batch)
    assert p.settled.seqs == [0, 1, 2, 3]
    assert metrics.stored == 2
    reasons = [r.reason for r in p.writer.rejections]
    assert reasons == [codecs.STORAGE_REJECTED, codecs.BAD_TYPE]  # in batch order
    poisoned = p.writer.rejections[0]
    assert poisoned.message.seq == 1
    assert poisoned.device_id == "d1"
    assert "value out of range" in poisoned.error
    assert sample(metrics, "ingestd_messages_rejected_total", {"reason": "storage_rejected"}) == 1
    published = await drain(p.out)
    failed = [r for e in published if type(e) is RejectionsStored for r in e.rejections]
    assert [r.reason for r in failed] == [codecs.STORAGE_REJECTED, codecs.BAD_TYPE]
    stored = [m.seq for e in published if type(e) is ReadingsStored for _, m in e.readings]
    assert stored == [0, 3]


async def test_persistence_recovers_held_batch_after_a_crash(
    persistence: Persistence, metrics: Metrics
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
        while p.settled.seqs != [0, 1]:
            p.settled.changed.clear()
            await asyncio.wait_for(p.settled.changed.wait(), 5)
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
    bus: Bus, metrics: Metrics
) -> None:
    log: list[str] = []
    writer, settled = FakeWriter(log), Settled(log)
    inbox = bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage)
    bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
    agent = PersistenceAgent(bus, metrics, inbox, writer, settled, 2)
    for seq in range(5):
        inbox.put_nowait(enriched(seq))
    task = asyncio.create_task(agent.run())
    try:
        while settled.seqs != [0, 1, 2, 3, 4]:
            settled.changed.clear()
            await asyncio.wait_for(settled.changed.wait(), 5)
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


# ------------------------------------------------------------------------------ publisher


class FakeSend:
    def __init__(self, result: bool = True) -> None:
        self.sent: list[tuple[str, dict[str, Any], int]] = []
        self.result = result

    def __call__(self, topic: str, payload: bytes, qos: int) -> bool:
        self.sent.append((topic, orjson.loads(payload), qos))
        return self.result


def publisher(
    bus: Bus, metrics: Metrics, send: FakeSend, *, prefix: str = "ingestd", processed: bool = True
) -> Publisher:
    inbox = bus.inbox("publisher", 10, ReadingsStored, RejectionsStored)
    return Publisher(
        bus, metrics, inbox, send, prefix=prefix, processed=processed, processed_qos=0,
        failed_qos=1, max_payload_bytes=8,
    )  # fmt: skip


async def test_publisher_processed_event(bus: Bus, metrics: Metrics) -> None:
    send = FakeSend()
    r = reading("press-01", "temp", 21.5, unit="degC", quality="good", seq=9, site="berlin",
                sensor_type="pt100")  # fmt: skip
    r.ts = datetime(2026, 11, 27, 7, 30, 0, 123456, tzinfo=UTC)
    message = raw(3)
    await publisher(bus, metrics, send).handle([ReadingsStored([(r, message)])])
    ((topic, body, qos),) = send.sent
    assert topic == "ingestd/processed/press-01/temp"
    assert qos == 0
    assert body["ts"] == "2026-11-27T07:30:00.123456Z"
    assert body["received_at"] == "2026-11-27T07:30:00.123456Z"
    assert body["event_id"]
    assert body["correlation_id"] == "corr-3"
    assert {k: body[k] for k in ("device_id", "sensor_id", "value", "unit", "quality", "seq")} == {
        "device_id": "press-01", "sensor_id": "temp", "value": 21.5, "unit": "degC",
        "quality": "good", "seq": 9,
    }  # fmt: skip
    assert (body["site"], body["sensor_type"], body["area"]) == ("berlin", "pt100", None)
    assert sample(metrics, "ingestd_events_published_total", {"kind": "processed"}) == 1


async def test_publisher_event_ids_are_unique(bus: Bus, metrics: Metrics) -> None:
    send = FakeSend()
    agent = publisher(bus, metrics, send)
    event = ReadingsStored([(reading(second=n), raw(n)) for n in range(5)])
    await agent.handle([event, RejectionsStored([RejectedMessage(raw(9), "bad_type", "x")])])
    ids = [body["event_id"] for _, body, _ in send.sent]
    assert len(ids) == 6
    assert len(set(ids)) == 6


async def test_publisher_failed_event(bus: Bus, metrics: Metrics) -> None:
    send = FakeSend()
    message = raw(5, "sensors/d1/s1", b"0123456789abcdef")
    rejection = RejectedMessage(message, codecs.MALFORMED_JSON, "malformed JSON: x", "d1")
    await publisher(bus, metrics, send).handle([RejectionsStored([rejection])])
    ((topic, body, qos),) = send.sent
    assert topic == "ingestd/failed/d1"
    assert qos == 1
    assert body["reason"] == "malformed_json"
    assert body["error"] == "malformed JSON: x"
    assert body["topic"] == "sensors/d1/s1"
    assert body["correlation_id"] == "corr-5"
    assert body["device_id"] == "d1"
    assert base64.b64decode(body["payload"]) == b"01234567"  # the stored, truncated copy
    assert body["payload_size"] == 16
    assert body["received_at"] == "2026-11-27T07:30:00.123456Z"
    assert sample(metrics, "ingestd_events_published_total", {"kind": "failed"}) == 1


async def test_publisher_failed_without_device_goes_to_unknown(bus: Bus, metrics: Metrics) -> None:
    send = FakeSend()
    rejection = RejectedMessage(raw(0, "nowhere", b"\xff\x00"), codecs.UNKNOWN_TOPIC, "no source")
    await publisher(bus, metrics, send, prefix="site7/ingest").handle(
        [RejectionsStored([rejection])]
    )
    ((topic, body, _),) = send.sent
    assert topic == "site7/ingest/failed/_unknown"
    assert body["device_id"] is None
    assert base64.b64decode(body["payload"]) == b"\xff\x00"


async def test_publisher_counts_dropped_events(bus: Bus, metrics: Metrics) -> None:
    send = FakeSend(result=False)
    agent = publisher(bus, metrics, send)
    await agent.handle(
        [
            ReadingsStored([(reading(second=1), raw(1)), (reading(second=2), raw(2))]),
            RejectionsStored([RejectedMessage(raw(3), "bad_type", "x", "d1")]),
        ]
    )
    assert len(send.sent) == 3
    assert sample(metrics, "ingestd_events_dropped_total", {"kind": "processed"}) == 2
    assert sample(metrics, "ingestd_events_dropped_total", {"kind": "failed"}) == 1
    assert sample(metrics, "ingestd_events_published_total", {"kind": "processed"}) is None


async def test_publisher_processed_disabled_still_publishes_failures(
    bus: Bus, metrics: Metrics
) -> None:
    send = FakeSend()
    await publisher(bus, metrics, send, processed=False).handle(
        [
            ReadingsStored([(reading(), raw(0))]),
            RejectionsStored([RejectedMessage(raw(1), "x", "y")]),
        ]
    )
    assert [topic for topic, _, _ in send.sent] == ["ingestd/failed/_unknown"]


async def test_publisher_sanitises_topic_segments(bus: Bus, metrics: Metrics) -> None:
    send = FakeSend()
    await publisher(bus, metrics, send).handle(
        [
            ReadingsStored([(reading("a/b+c#d", "x/#"), raw(0))]),
            RejectionsStored([RejectedMessage(raw(1), "x", "y", "dev/+/#")]),
        ]
    )
    assert [topic for topic, _, _ in send.sent] == [
        "ingestd/processed/a_b_c_d/x__", "ingestd/failed/dev____",
    ]  # fmt: skip
    assert send.sent[0][1]["device_id"] == "a/b+c#d"  # the body keeps the real id


@pytest.mark.parametrize(
    ("text", "segment"),
    [(None, "_unknown"), ("", "_unknown"), ("ok-1", "ok-1"), ("a\x00b", "a_b"), ("+", "_")],
)
def test_topic_segment(text: str | None, segment: str) -> None:
    assert topic_segment(text) == segment


# ------------------------------------------------------------------------------ pipeline


async def test_pipeline_from_raw_message_to_published_events(bus: Bus, metrics: Metrics) -> None:
    """The four agents wired on one bus, as the supervisor does, with fake storage and send."""
    log: list[str] = []
    writer, settled, send = FakeWriter(log), Settled(log), FakeSend()
    raw_inbox = bus.inbox("validation", 100, RawMessage)
    enrich_inbox = bus.inbox("enrichment", 100, ValidatedMessage)
    store_inbox = bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage)
    publish_inbox = bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
    published = asyncio.Event()

    def record(topic: str, payload: bytes, qos: int) -> bool:
        send(topic, payload, qos)
        if len(send.sent) == 3:
            published.set()
        return True

    agents = [
        ValidationAgent(bus, metrics, raw_inbox, SOURCES, 1024),
        EnrichmentAgent(bus, metrics, enrich_inbox, DeviceRegistry(REGISTRY_ROWS)),
        PersistenceAgent(bus, metrics, store_inbox, writer, settled, 100),
        Publisher(bus, metrics, publish_inbox, record, prefix="ingestd", processed=True,
                  processed_qos=0, failed_qos=1, max_payload_bytes=1024),
    ]  # fmt: skip
    for message in (
        raw(0, "sensors/d1/temp", b'{"value": 95}'),
        raw(1, "values/d2/rpm", b"1450"),
        raw(2, "sensors/d1/temp", b'{"value": "hot"}'),
    ):
        raw_inbox.put_nowait(message)
    tasks = [asyncio.create_task(agent.run()) for agent in agents]
    try:
        await asyncio.wait_for(published.wait(), 5)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert sorted(settled.seqs) == [0, 1, 2]
    topics = sorted(topic for topic, _, _ in send.sent)
    assert topics == ["ingestd/failed/d1", "ingestd/processed/d1/temp", "ingestd/processed/d2/rpm"]
    by_topic = {topic: body for topic, body, _ in send.sent}
    assert by_topic["ingestd/processed/d1/temp"]["quality"] == "out_of_range"
    assert by_topic["ingestd/processed/d1/temp"]["site"] == "berlin"
    assert by_topic["ingestd/processed/d2/rpm"]["sensor_type"] == "encoder"
    assert by_topic["ingestd/failed/d1"]["reason"] == "bad_type"
    assert metrics.stored == 2


class GatedWriter(FakeWriter):
    """A writer whose writes wait until the test opens their gate (one gate per write)."""

    def __init__(self, log: list[str]) -> None:
        super().__init__(log)
        self.gates: list[asyncio.Event] = []
        self.started = asyncio.Event()
        self.open = False  # when True, writes no longer wait

    async def write(
        self, readings: list[tuple[Reading, RawMessage]], rejections: list[RejectedMessage]
    ) -> WriteResult:
        gate = asyncio.Event()
        if self.open:
            gate.set()
        self.gates.append(gate)
        self.started.set()
        await gate.wait()
        return await super().write(readings, rejections)

    async def wait_writes(self, count: int) -> None:
        while len(self.gates) < count:
            self.started.clear()
            await asyncio.wait_for(self.started.wait(), 5)


async def until(condition: Callable[[], bool], changed: asyncio.Event) -> None:
    """Wait (at most 5 s) until ``condition`` holds, re-checking whenever ``changed`` is set."""
    async with asyncio.timeout(5):
        while not condition():
            changed.clear()
            await changed.wait()


async def put_when_taken(agent: PersistenceAgent, writer: GatedWriter, item: Any) -> None:
    """Put one item and wait until its write started (so each item is a batch of its own)."""
    count = len(writer.gates)
    agent.inbox.put_nowait(item)
    await writer.wait_writes(count + 1)


@pytest.mark.timeout(10)
async def test_persistence_writes_several_batches_at_once_and_acks_in_receive_order(
    bus: Bus, metrics: Metrics
) -> None:
    log: list[str] = []
    writer = GatedWriter(log)
    acked: list[int] = []
    ack_sent = asyncio.Event()

    def send_ack(mid: int, _qos: int) -> bool:
        acked.append(mid)
        ack_sent.set()
        return True

    tracker = AckTracker(100, send_ack, metrics)
    inbox = bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage)
    bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
    agent = PersistenceAgent(bus, metrics, inbox, writer, tracker.settle, 50, batches_in_flight=3)
    for mid in (101, 102, 103, 104):
        tracker.track(mid, 1)  # seqs 0..3
    task = asyncio.create_task(agent.run())
    try:
        for seq in range(3):
            await put_when_taken(agent, writer, enriched(seq, reading(second=seq)))
        inbox.put_nowait(enriched(3, reading(second=3)))
        for _ in range(20):  # give the agent every chance to take it (it must not)
            await asyncio.sleep(0)
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
async def test_persistence_crash_in_one_write_recovers_every_batch_in_flight(
    bus: Bus, metrics: Metrics
) -> None:
    log: list[str] = []
    writer = GatedWriter(log)
    settled = Settled(log)
    inbox = bus.inbox("persistence", 100, EnrichedMessage, RejectedMessage)
    bus.inbox("publisher", 100, ReadingsStored, RejectionsStored)
    agent = PersistenceAgent(bus, metrics, inbox, writer, settled, 50, batches_in_flight=3)
    rejected = RejectedMessage(raw(2), codecs.BAD_TYPE, "value must be a number", "d1")
    task = asyncio.create_task(agent.run())
    await put_when_taken(agent, writer, enriched(0, reading(second=0)))
    await put_when_taken(agent, writer, enriched(1, reading(second=1)))
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
    assert [r.message.dup for r in recovered] == [True]
    assert not agent.has_work()


async def test_persistence_records_when_each_device_was_last_seen(
    persistence: Persistence, metrics: Metrics
) -> None:
    before = time.time()
    await persistence.agent.handle([enriched(0, reading(second=1))])
    seen = sample(metrics, "ingestd_device_last_seen_timestamp_seconds", {"device_id": "d1"})
    assert seen is not None
    assert before <= seen <= time.time()


def test_last_seen_tracks_a_bounded_number_of_devices(
    metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("daemon.metrics.MAX_TRACKED_DEVICES", 3)
    metrics.seen({"a", "b", "c"}, 10.0)
    metrics.seen({"a", "d"}, 20.0)  # a known device is updated, a fourth is only counted
    assert metrics.last_seen == {"a": 20.0, "b": 10.0, "c": 10.0}
    assert sample(metrics, "ingestd_devices_untracked_total") == 1
