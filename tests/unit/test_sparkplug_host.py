"""agents.sparkplug: the Sparkplug B host (births, seq, rebirth requests, deaths, the birth
cache on disk and its gauges), one decoder at a time, with messages as an edge node sends them.

The host's outbound messages are recorded as bytes here: its rebirth requests are protobuf,
which the JSON-decoding ``FakeOutbound`` of ``tests.unit.fakes`` cannot hold.
"""

from __future__ import annotations

import math
import sqlite3
import tempfile
import types
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from agents.decoding import DecoderContext
from agents.events import RawMessage
from agents.metrics import PipelineMetrics
from agents.sparkplug import host as host_module
from agents.sparkplug.births import Birth, BirthCache
from agents.sparkplug.host import SparkplugHost
from edge import sparkplug as sp
from edge.readings import PartialPayloadError, PayloadError, Reading, format_ts
from edge.sparkplug import (
    DATATYPES,
    DataSetSpec,
    Payload,
    TemplateSpec,
    encode_metric,
    encode_payload,
)
from tests.unit.fakes import NOW, raw, sample

T = DATATYPES
GROUP, NODE = "plant", "edge1"
NODE_ID = f"{GROUP}/{NODE}"
BORN = datetime(2026, 11, 27, 7, 29, 0, 250000, tzinfo=UTC)  # the births' payload timestamp
MS = (BORN - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
LATER = MS + 60_000  # data metrics' timestamp
NCMD = f"spBv1.0/{GROUP}/NCMD/{NODE}"
PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
AUTO = object()  # the next seq of the node


def at(ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


def device_id(device: str) -> str:
    return f"{NODE_ID}/{device}"


class Outbox:
    """The Outbound port: records every publish as (topic, payload bytes, qos, retain)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, int, bool]] = []

    def publish(self, topic: str, payload: bytes, qos: int, *, retain: bool = False) -> bool:
        self.sent.append((topic, payload, qos, retain))
        return True

    def commands(self) -> list[tuple[str, Payload, int, bool]]:
        """The NCMDs sent, their payloads decoded."""
        return [
            (topic, Payload.FromString(body), qos, retain)
            for topic, body, qos, retain in self.sent
            if "/NCMD/" in topic
        ]

    def states(self) -> list[tuple[str, dict[str, Any], int, bool]]:
        """The device state messages sent, their JSON decoded."""
        return [
            (topic, orjson.loads(body), qos, retain)
            for topic, body, qos, retain in self.sent
            if "/devices/" in topic and topic.endswith("/state")
        ]

    def clear(self) -> None:
        self.sent.clear()


def metric(
    name: str | None, datatype: str, value: object, *, alias: int | None = None, **extra: Any
) -> Payload.Metric:
    """A metric as an edge node writes it (timestamped at LATER unless told)."""
    extra.setdefault("timestamp_ms", LATER)
    return encode_metric(name=name, alias=alias, datatype=T[datatype], value=value, **extra)


def by_alias(alias: int, **value: Any) -> Payload.Metric:
    """A data metric as sent with aliases: no name, no datatype (the birth has those)."""
    return Payload.Metric(alias=alias, timestamp=LATER, **value)


def node_metrics(bdseq: int | None = 0) -> list[Payload.Metric]:
    born = {"timestamp_ms": MS}
    bd = [metric("bdSeq", "UInt64", bdseq, **born)] if bdseq is not None else []
    return [
        *bd,
        metric(sp.REBIRTH_METRIC, "Boolean", False, alias=1, **born),
        metric("temp", "Double", 21.5, alias=2, **born),
        metric("mode", "String", "auto", alias=3, **born),
        metric("count", "Int16", -3, alias=4, **born),
    ]


def device_metrics() -> list[Payload.Metric]:
    born = {"timestamp_ms": MS}
    return [
        metric("pressure", "Float", 12.3, alias=10, **born),
        metric("running", "Boolean", True, alias=11, **born),
        metric("raw", "UInt32", 4294967293, alias=12, **born),
    ]


class Node:
    """An edge node: sends its messages to the host, with the seq the spec gives them."""

    def __init__(self, host: SparkplugHost, node: str = NODE, bdseq: int = 0) -> None:
        self.host = host
        self.node = node
        self.bdseq = bdseq
        self.next_seq = 0
        self.count = 0

    def topic(self, verb: str, device: str | None = None) -> str:
        return f"spBv1.0/{GROUP}/{verb}/{self.node}" + (f"/{device}" if device else "")

    def message(self, verb: str, body: bytes, device: str | None = None) -> RawMessage:
        self.count += 1
        return raw(self.count, self.topic(verb, device), body)

    def send(
        self,
        verb: str,
        metrics: Sequence[Payload.Metric] = (),
        device: str | None = None,
        *,
        seq: object = AUTO,
        timestamp_ms: int = MS,
    ) -> list[Reading]:
        if seq is AUTO:
            seq = None if verb == "NDEATH" else self.next_seq
        if isinstance(seq, int):
            self.next_seq = (seq + 1) % 256
        body = encode_payload(metrics, seq=seq, timestamp_ms=timestamp_ms)  # type: ignore[arg-type]
        return self.host.decode(self.message(verb, body, device), {})

    def nbirth(self, metrics: Sequence[Payload.Metric] | None = None, **kw: Any) -> list[Reading]:
        kw.setdefault("seq", 0)
        return self.send("NBIRTH", node_metrics(self.bdseq) if metrics is None else metrics, **kw)

    def dbirth(self, device: str, metrics: Sequence[Payload.Metric] | None = None) -> list[Reading]:
        return self.send("DBIRTH", device_metrics() if metrics is None else metrics, device)

    def ndata(self, *metrics: Payload.Metric, **kw: Any) -> list[Reading]:
        return self.send("NDATA", metrics or [by_alias(2, double_value=22.0)], **kw)

    def ddata(self, device: str, *metrics: Payload.Metric, **kw: Any) -> list[Reading]:
        return self.send("DDATA", metrics or [by_alias(10, float_value=1.5)], device, **kw)

    def ndeath(self, bdseq: int | None = None) -> list[Reading]:
        number = self.bdseq if bdseq is None else bdseq
        return self.send("NDEATH", [metric("bdSeq", "UInt64", number, timestamp_ms=None)])

    def ddeath(self, device: str) -> list[Reading]:
        return self.send("DDEATH", [], device)


HostFactory = Callable[..., SparkplugHost]


@pytest.fixture
def outbox() -> Outbox:
    return Outbox()


@pytest.fixture
def make_host(tmp_path: Path, metrics: PipelineMetrics, outbox: Outbox) -> Iterator[HostFactory]:
    """Hosts on the test's state dir, closed at the end."""
    made: list[SparkplugHost] = []

    def make(
        cooldown: float = 5.0, registry_metrics: PipelineMetrics | None = None
    ) -> SparkplugHost:
        context = DecoderContext(
            outbound=outbox,
            state_dir=tmp_path,
            metrics=registry_metrics or metrics,
            rebirth_cooldown_seconds=cooldown,
        )
        made.append(SparkplugHost(context))
        return made[-1]

    yield make
    for host in made:
        host.close()


@pytest.fixture
def host(make_host: HostFactory) -> SparkplugHost:
    return make_host()


@pytest.fixture
def node(host: SparkplugHost) -> Node:
    return Node(host)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The host's monotonic clock, set by the test (``clock[0]``)."""
    now = [1000.0]
    fake = types.SimpleNamespace(monotonic=lambda: now[0], time=NOW.timestamp)
    monkeypatch.setattr(host_module, "time", fake)
    return now


def rejected(call: Callable[[], object], reason: str) -> PayloadError:
    with pytest.raises(PayloadError) as caught:
        call()
    assert caught.value.reason == reason
    return caught.value


def seq_errors(metrics: PipelineMetrics) -> float | None:
    return sample(metrics, "ingestd_sparkplug_seq_errors_total")


def rebirths(metrics: PipelineMetrics) -> float | None:
    return sample(metrics, "ingestd_sparkplug_rebirth_requests_total")


def gauges(metrics: PipelineMetrics) -> dict[str, float | None]:
    return {
        f"{kind}_{state}": sample(metrics, f"ingestd_sparkplug_{kind}", {"state": state})
        for kind in ("edge_nodes", "devices")
        for state in ("online", "offline")
    }


def assert_one_rebirth_request(outbox: Outbox, topic: str = NCMD) -> None:
    commands = outbox.commands()
    assert len(commands) == 1
    sent_to, payload, qos, retain = commands[0]
    assert (sent_to, qos, retain) == (topic, 0, False)
    assert payload.HasField("timestamp")
    assert payload.timestamp > 0
    assert not payload.HasField("seq")
    assert len(payload.metrics) == 1
    (command,) = payload.metrics
    assert command.name == "Node Control/Rebirth"
    assert command.datatype == T["Boolean"]
    assert command.WhichOneof("value") == "boolean_value"
    assert command.boolean_value is True


# --- births ------------------------------------------------------------------------------------


def test_nbirth_gives_one_reading_per_metric(node: Node) -> None:
    readings = node.nbirth()

    def good(sensor: str, value: float | None, text: str | None = None) -> Reading:
        return Reading(NODE_ID, sensor, BORN, value, quality="good", seq=0, value_text=text)

    assert readings == [
        good("bdSeq", 0.0),
        good("Node Control/Rebirth", 0.0),
        good("temp", 21.5),
        good("mode", None, "auto"),
        good("count", -3.0),
    ]


def test_dbirth_gives_one_reading_per_metric_of_the_device(node: Node) -> None:
    node.nbirth()
    readings = node.dbirth("dev1")
    assert readings == [
        Reading(device_id("dev1"), "pressure", BORN, 12.3, quality="good", seq=1),
        Reading(device_id("dev1"), "running", BORN, 1.0, quality="good", seq=1),
        Reading(device_id("dev1"), "raw", BORN, 4294967293.0, quality="good", seq=1),
    ]


def test_birth_readings_take_quality_and_time_from_each_metric(node: Node) -> None:
    readings = node.nbirth(
        [
            metric("bdSeq", "UInt64", 0),
            metric("bad", "Double", 1.0, quality=0),
            metric("stale", "Double", 2.0, quality=500),
            metric("odd", "Double", 3.0, quality=7),
            metric("good", "Double", 4.0, quality=192),
            metric("untimed", "Double", 5.0, timestamp_ms=None),
            metric("when", "DateTime", MS),
            metric("array", "Int64Array", [1, -2, 3]),
        ]
    )
    by_sensor = {r.sensor_id: r for r in readings}
    assert {name: r.quality for name, r in by_sensor.items()} == {
        "bdSeq": "good", "bad": "bad", "stale": "stale", "odd": "uncertain", "good": "good",
        "untimed": "good", "when": "good", "array": "good",
    }  # fmt: skip
    assert by_sensor["bad"].ts == at(LATER)
    assert by_sensor["untimed"].ts == BORN  # no metric timestamp: the payload's
    assert (by_sensor["when"].value, by_sensor["when"].value_text) == (None, format_ts(BORN))
    assert (by_sensor["array"].value, by_sensor["array"].value_text) == (None, "[1,-2,3]")


def test_a_metric_without_any_timestamp_is_stamped_at_receipt(node: Node) -> None:
    node.nbirth()
    body = Payload(seq=1, metrics=[by_alias(2, double_value=1.0)])
    body.metrics[0].ClearField("timestamp")
    (reading,) = node.host.decode(raw(50, node.topic("NDATA"), body.SerializeToString()), {})
    assert reading.ts == NOW


def test_a_birth_is_announced_online_retained_at_its_payload_time(
    node: Node, outbox: Outbox
) -> None:
    node.nbirth()
    node.dbirth("dev1")
    assert outbox.states() == [
        (f"ingestd/devices/{NODE_ID}/state",
         {"online": True, "ts": format_ts(BORN), "cause": "NBIRTH"}, 1, True),
        (f"ingestd/devices/{device_id('dev1')}/state",
         {"online": True, "ts": format_ts(BORN), "cause": "DBIRTH"}, 1, True),
    ]  # fmt: skip
    assert outbox.commands() == []


def test_the_state_prefix_is_the_contexts(tmp_path: Path, metrics: PipelineMetrics) -> None:
    outbox = Outbox()
    context = DecoderContext(outbox, tmp_path, metrics, prefix="site9")
    host = SparkplugHost(context)
    try:
        Node(host).nbirth()
    finally:
        host.close()
    assert [topic for topic, *_ in outbox.states()] == [f"site9/devices/{NODE_ID}/state"]


def test_nbirth_without_bdseq_is_rejected(node: Node, outbox: Outbox) -> None:
    rejected(lambda: node.nbirth(node_metrics(bdseq=None)), sp.SPARKPLUG_NO_BDSEQ)
    assert outbox.states() == []


def test_a_bdseq_of_a_type_that_cannot_hold_it_is_no_bdseq(node: Node) -> None:
    metrics = [metric("bdSeq", "String", "0"), *node_metrics(bdseq=None)]
    rejected(lambda: node.nbirth(metrics), sp.SPARKPLUG_NO_BDSEQ)


def test_dbirth_of_an_unknown_node_is_stored_and_asks_the_node_for_a_rebirth(
    node: Node, outbox: Outbox, metrics: PipelineMetrics
) -> None:
    readings = node.dbirth("dev1")
    assert [r.sensor_id for r in readings] == ["pressure", "running", "raw"]
    assert_one_rebirth_request(outbox)
    assert rebirths(metrics) == 1


# --- data --------------------------------------------------------------------------------------


def test_node_data_by_alias_decodes_by_the_birth(node: Node) -> None:
    node.nbirth()
    readings = node.ndata(
        by_alias(2, double_value=22.25),
        by_alias(3, string_value="manual"),
        by_alias(4, int_value=0xFFFF_FFFD),  # Int16 -3, sign-extended: the birth's datatype
        by_alias(1, boolean_value=True),
    )
    assert readings == [
        Reading(NODE_ID, "temp", at(LATER), 22.25, quality="good", seq=1),
        Reading(NODE_ID, "mode", at(LATER), None, quality="good", seq=1, value_text="manual"),
        Reading(NODE_ID, "count", at(LATER), -3.0, quality="good", seq=1),
        Reading(NODE_ID, "Node Control/Rebirth", at(LATER), 1.0, quality="good", seq=1),
    ]


def test_device_data_by_alias_decodes_by_the_devices_birth(node: Node) -> None:
    node.nbirth()
    node.dbirth("dev1")
    readings = node.ddata(
        "dev1",
        by_alias(12, int_value=0xFFFF_FFFD),  # UInt32 in this birth: not a negative number
        by_alias(10, float_value=12.3),
        by_alias(11, boolean_value=False),
    )
    assert readings == [
        Reading(device_id("dev1"), "raw", at(LATER), 4294967293.0, quality="good", seq=2),
        Reading(device_id("dev1"), "pressure", at(LATER), 12.3, quality="good", seq=2),
        Reading(device_id("dev1"), "running", at(LATER), 0.0, quality="good", seq=2),
    ]


def test_the_same_alias_means_what_each_birth_says(node: Node) -> None:
    node.nbirth()
    node.dbirth("dev1", [metric("a", "Int8", -1, alias=7)])
    node.dbirth("dev2", [metric("b", "UInt8", 255, alias=7)])
    (first,) = node.ddata("dev1", by_alias(7, int_value=255))
    (second,) = node.ddata("dev2", by_alias(7, int_value=255))
    assert (first.device_id, first.sensor_id, first.value) == (device_id("dev1"), "a", -1.0)
    assert (second.device_id, second.sensor_id, second.value) == (device_id("dev2"), "b", 255.0)


def test_a_new_birth_replaces_the_aliases(node: Node) -> None:
    node.nbirth()
    node.nbirth([metric("bdSeq", "UInt64", 0), metric("other", "Int32", 5, alias=2)])
    (reading,) = node.ndata(by_alias(2, int_value=6))
    assert (reading.sensor_id, reading.value) == ("other", 6.0)
    rejected(lambda: node.ndata(by_alias(3, string_value="x")), sp.SPARKPLUG_UNKNOWN_ALIAS)


def test_data_by_name_decodes_without_aliases(node: Node) -> None:
    node.nbirth()
    (reading,) = node.ndata(metric("temp", "Double", 7.5))
    assert (reading.sensor_id, reading.value, reading.seq) == ("temp", 7.5, 1)


def test_unknown_alias_is_rejected_whole_and_asks_for_a_rebirth(
    node: Node, outbox: Outbox, metrics: PipelineMetrics
) -> None:
    node.nbirth()
    outbox.clear()
    error = rejected(
        lambda: node.ndata(by_alias(2, double_value=1.0), by_alias(99, double_value=2.0)),
        sp.SPARKPLUG_UNKNOWN_ALIAS,
    )
    assert not isinstance(error, PartialPayloadError)
    assert "99" in error.message
    assert_one_rebirth_request(outbox)
    assert rebirths(metrics) == 1
    assert seq_errors(metrics) == 0


def test_unknown_alias_of_a_device(node: Node, outbox: Outbox) -> None:
    node.nbirth()
    node.dbirth("dev1")
    outbox.clear()
    rejected(lambda: node.ddata("dev1", by_alias(2, double_value=1.0)), sp.SPARKPLUG_UNKNOWN_ALIAS)
    assert_one_rebirth_request(outbox)  # to the edge node: devices are reborn by their node


@pytest.mark.parametrize(
    ("send", "node_born"),
    [
        (lambda node: node.ndata(), False),
        (lambda node: node.ddata("dev1"), False),
        (lambda node: node.ddata("dev1"), True),  # the node was born, this device never was
    ],
    ids=["NDATA", "DDATA", "DDATA-of-an-unborn-device"],
)
def test_data_before_a_birth_is_rejected_and_asks_for_a_rebirth(
    node: Node,
    outbox: Outbox,
    metrics: PipelineMetrics,
    send: Callable[[Node], object],
    node_born: bool,
) -> None:
    if node_born:
        node.nbirth()
        outbox.clear()
    rejected(lambda: send(node), sp.SPARKPLUG_NO_BIRTH)
    assert_one_rebirth_request(outbox)
    assert rebirths(metrics) == 1
    assert outbox.states() == []


# --- rebirth cooldown -------------------------------------------------------------------------


def test_a_second_trigger_inside_the_cooldown_sends_nothing(
    node: Node, outbox: Outbox, metrics: PipelineMetrics, clock: list[float]
) -> None:
    rejected(node.ndata, sp.SPARKPLUG_NO_BIRTH)
    clock[0] += 4.9
    rejected(node.ndata, sp.SPARKPLUG_NO_BIRTH)
    assert len(outbox.commands()) == 1
    assert rebirths(metrics) == 1
    clock[0] += 0.2  # 5.1 s after the first
    rejected(node.ndata, sp.SPARKPLUG_NO_BIRTH)
    assert len(outbox.commands()) == 2
    assert rebirths(metrics) == 2


def test_the_cooldown_is_per_node(host: SparkplugHost, outbox: Outbox, clock: list[float]) -> None:
    rejected(Node(host, "edge1").ndata, sp.SPARKPLUG_NO_BIRTH)
    rejected(Node(host, "edge2").ndata, sp.SPARKPLUG_NO_BIRTH)
    assert [topic for topic, *_ in outbox.commands()] == [
        f"spBv1.0/{GROUP}/NCMD/edge1",
        f"spBv1.0/{GROUP}/NCMD/edge2",
    ]


def test_a_zero_cooldown_asks_every_time(
    make_host: HostFactory, outbox: Outbox, clock: list[float]
) -> None:
    node = Node(make_host(cooldown=0))
    for _ in range(3):
        rejected(node.ndata, sp.SPARKPLUG_NO_BIRTH)
    assert len(outbox.commands()) == 3


def test_one_message_with_two_triggers_sends_one_request(
    node: Node, outbox: Outbox, metrics: PipelineMetrics
) -> None:
    node.nbirth()
    outbox.clear()
    rejected(lambda: node.ndata(by_alias(99, int_value=1), seq=7), sp.SPARKPLUG_UNKNOWN_ALIAS)
    assert seq_errors(metrics) == 1
    assert_one_rebirth_request(outbox)


# --- seq ---------------------------------------------------------------------------------------


def test_seq_follows_across_node_and_device_messages(
    node: Node, outbox: Outbox, metrics: PipelineMetrics
) -> None:
    node.nbirth()
    node.dbirth("dev1")
    node.ddata("dev1")
    node.ndata()
    node.dbirth("dev2")
    node.ddeath("dev2")
    node.ndata()
    assert seq_errors(metrics) == 0
    assert outbox.commands() == []


def test_the_nbirths_seq_is_the_base(node: Node, metrics: PipelineMetrics) -> None:
    node.nbirth(seq=17)
    (reading,) = node.ndata()
    assert reading.seq == 18
    assert seq_errors(metrics) == 0


def test_seq_wraps_from_255_to_0_without_an_error(
    node: Node, outbox: Outbox, metrics: PipelineMetrics
) -> None:
    node.nbirth(seq=253)
    seqs = [node.ndata()[0].seq for _ in range(4)]
    assert seqs == [254, 255, 0, 1]
    assert seq_errors(metrics) == 0
    assert outbox.commands() == []


def test_a_whole_cycle_of_seq_is_in_order(node: Node, metrics: PipelineMetrics) -> None:
    node.nbirth()
    for _ in range(600):
        node.ndata()
    assert seq_errors(metrics) == 0


@pytest.mark.parametrize(
    ("seq", "what"), [(5, "a gap"), (2, "a repeat"), (None, "no seq"), (300, "beyond 255")]
)
def test_a_seq_out_of_order_counts_and_asks_for_a_rebirth_but_keeps_the_readings(
    node: Node, outbox: Outbox, metrics: PipelineMetrics, seq: int | None, what: str
) -> None:
    node.nbirth()
    node.ndata()
    node.ndata()  # seq 2
    outbox.clear()
    readings = node.ndata(seq=seq)
    assert [(r.sensor_id, r.value, r.seq) for r in readings] == [("temp", 22.0, seq)], what
    assert seq_errors(metrics) == 1
    assert_one_rebirth_request(outbox)


def test_a_seq_beyond_a_bigint_is_an_error_and_not_stored(
    node: Node, metrics: PipelineMetrics
) -> None:
    node.nbirth()
    (reading,) = node.ndata(seq=2**64 - 1)
    assert reading.seq is None
    assert seq_errors(metrics) == 1
    (reading,) = node.ndata(seq=2**63 - 1)
    assert reading.seq == 2**63 - 1


def test_after_a_gap_the_next_seq_follows_the_new_one(node: Node, metrics: PipelineMetrics) -> None:
    node.nbirth()
    node.ndata(seq=9)
    node.ndata()  # 10
    node.ndata()  # 11
    assert seq_errors(metrics) == 1


def test_a_device_message_out_of_order_counts_for_its_node(
    node: Node, outbox: Outbox, metrics: PipelineMetrics
) -> None:
    node.nbirth()
    node.dbirth("dev1")
    outbox.clear()
    (reading,) = node.ddata("dev1", seq=40)
    assert reading.seq == 40
    assert seq_errors(metrics) == 1
    assert_one_rebirth_request(outbox)


def test_each_node_has_its_own_seq(host: SparkplugHost, metrics: PipelineMetrics) -> None:
    one, two = Node(host, "edge1"), Node(host, "edge2")
    one.nbirth()
    two.nbirth()
    one.ndata()
    two.ndata()
    one.ndata()
    assert seq_errors(metrics) == 0


def test_a_rebirth_resets_the_base(node: Node, metrics: PipelineMetrics) -> None:
    node.nbirth()
    node.ndata()
    node.ndata()
    node.nbirth()  # seq 0 again: no error
    node.ndata()  # 1
    assert seq_errors(metrics) == 0


# --- deaths, states and gauges -----------------------------------------------------------------


def test_ndeath_of_the_current_session_takes_the_node_and_its_devices_offline(
    node: Node, outbox: Outbox, metrics: PipelineMetrics
) -> None:
    node.bdseq = 4
    node.nbirth()
    node.dbirth("dev1")
    node.dbirth("dev2")
    assert gauges(metrics) == {
        "edge_nodes_online": 1, "edge_nodes_offline": 0, "devices_online": 2, "devices_offline": 0,
    }  # fmt: skip
    outbox.clear()
    assert node.ndeath() == []
    offline = {"online": False, "ts": format_ts(NOW), "cause": "NDEATH"}
    assert outbox.states() == [
        (f"ingestd/devices/{NODE_ID}/state", offline, 1, True),
        (f"ingestd/devices/{device_id('dev1')}/state", offline, 1, True),
        (f"ingestd/devices/{device_id('dev2')}/state", offline, 1, True),
    ]
    assert gauges(metrics) == {
        "edge_nodes_online": 0, "edge_nodes_offline": 1, "devices_online": 0, "devices_offline": 2,
    }  # fmt: skip
    assert sample(metrics, "ingestd_sparkplug_stale_deaths_total") == 0
    assert outbox.commands() == []


def test_a_repeated_ndeath_announces_nothing_more(node: Node, outbox: Outbox) -> None:
    node.nbirth()
    node.ndeath()
    outbox.clear()
    node.ndeath()
    assert outbox.sent == []


@pytest.mark.parametrize(
    ("birth_bdseq", "death"),
    [(3, 2), (3, 4), (3, None)],
    ids=["an-older-session", "a-newer-session", "no-bdseq"],
)
def test_a_stale_ndeath_changes_nothing(
    node: Node, outbox: Outbox, metrics: PipelineMetrics, birth_bdseq: int, death: int | None
) -> None:
    node.bdseq = birth_bdseq
    node.nbirth()
    node.dbirth("dev1")
    before = gauges(metrics)
    outbox.clear()
    metrics_of_death = [] if death is None else [metric("bdSeq", "UInt64", death)]
    assert node.send("NDEATH", metrics_of_death) == []
    assert outbox.sent == []
    assert gauges(metrics) == before
    assert sample(metrics, "ingestd_sparkplug_stale_deaths_total") == 1
    (reading,) = node.ndata()  # still online, still in order
    assert reading.seq == 2
    assert seq_errors(metrics) == 0


def test_an_ndeath_of_an_unknown_node_is_stale(node: Node, metrics: PipelineMetrics) -> None:
    node.ndeath()
    assert sample(metrics, "ingestd_sparkplug_stale_deaths_total") == 1
    assert gauges(metrics)["edge_nodes_offline"] == 0


def test_ddeath_takes_one_device_offline(
    node: Node, outbox: Outbox, metrics: PipelineMetrics
) -> None:
    node.nbirth()
    node.dbirth("dev1")
    node.dbirth("dev2")
    outbox.clear()
    assert node.ddeath("dev1") == []
    assert outbox.states() == [
        (f"ingestd/devices/{device_id('dev1')}/state",
         {"online": False, "ts": format_ts(NOW), "cause": "DDEATH"}, 1, True),
    ]  # fmt: skip
    assert gauges(metrics) == {
        "edge_nodes_online": 1, "edge_nodes_offline": 0, "devices_online": 1, "devices_offline": 1,
    }  # fmt: skip


def test_ddeath_of_an_unknown_device_announces_nothing(node: Node, outbox: Outbox) -> None:
    node.nbirth()
    outbox.clear()
    node.ddeath("ghost")
    assert outbox.sent == []


def test_a_rebirth_brings_a_dead_node_back(node: Node, metrics: PipelineMetrics) -> None:
    node.nbirth()
    node.dbirth("dev1")
    node.ndeath()
    node.bdseq = 1
    node.nbirth()
    assert gauges(metrics) == {
        "edge_nodes_online": 1, "edge_nodes_offline": 0, "devices_online": 0, "devices_offline": 1,
    }  # fmt: skip
    node.dbirth("dev1")
    assert gauges(metrics)["devices_online"] == 1
    node.ndeath(bdseq=0)  # the first session's will, late
    assert gauges(metrics)["edge_nodes_online"] == 1
    assert sample(metrics, "ingestd_sparkplug_stale_deaths_total") == 1


def test_data_from_an_offline_device_brings_it_back(
    node: Node, outbox: Outbox, metrics: PipelineMetrics
) -> None:
    node.nbirth()
    node.dbirth("dev1")
    node.ddeath("dev1")
    outbox.clear()
    (reading,) = node.ddata("dev1")
    assert reading.device_id == device_id("dev1")
    assert outbox.states() == [
        (f"ingestd/devices/{device_id('dev1')}/state",
         {"online": True, "ts": format_ts(NOW), "cause": "DBIRTH"}, 1, True),
    ]  # fmt: skip
    assert gauges(metrics)["devices_online"] == 1


def test_gauges_count_every_node(host: SparkplugHost, metrics: PipelineMetrics) -> None:
    assert gauges(metrics) == {
        "edge_nodes_online": 0, "edge_nodes_offline": 0, "devices_online": 0, "devices_offline": 0,
    }  # fmt: skip
    nodes = [Node(host, f"edge{i}") for i in range(3)]
    for each in nodes:
        each.nbirth()
        each.dbirth("a")
    nodes[0].ndeath()
    assert gauges(metrics) == {
        "edge_nodes_online": 2, "edge_nodes_offline": 1, "devices_online": 2, "devices_offline": 1,
    }  # fmt: skip


# --- skipped and bad metrics -------------------------------------------------------------------


def skipped(metrics: PipelineMetrics) -> dict[str, float | None]:
    return {
        reason: sample(metrics, "ingestd_sparkplug_metrics_skipped_total", {"reason": reason})
        for reason in (*sp.SKIP_REASONS, "definition")
    }


def test_skipped_metrics_are_counted_by_reason_and_not_stored(
    node: Node, metrics: PipelineMetrics
) -> None:
    definition = TemplateSpec(None, metrics=[metric("speed", "Double", 0.0)], is_definition=True)
    readings = node.nbirth(
        [
            metric("bdSeq", "UInt64", 0),
            metric("blob", "Bytes", b"\x00\x01", alias=20),
            metric("doc", "File", b"%PDF", alias=21),
            metric("gone", "Double", None, alias=22, is_null=True),
            metric("temp", "Double", 21.5, alias=2),
            metric("Motor", "Template", definition),
        ]
    )
    readings += node.ndata(
        by_alias(20, bytes_value=b"\x02"),
        by_alias(22, is_null=True),
        Payload.Metric(alias=2, timestamp=LATER, double_value=3.0, is_transient=True),
        by_alias(2, double_value=4.0),
    )
    assert [(r.sensor_id, r.value) for r in readings] == [
        ("bdSeq", 0.0), ("temp", 21.5), ("temp", 4.0),
    ]  # fmt: skip
    assert skipped(metrics) == {"bytes": 2, "file": 1, "null": 2, "transient": 1, "definition": 1}


def test_a_template_instance_reads_its_definition_from_the_nbirth(node: Node) -> None:
    definition = TemplateSpec(
        None,
        metrics=[metric("speed", "Double", 0.0), metric("on", "Boolean", False)],
        parameters=[("limit", "Int32", 0)],
        is_definition=True,
    )
    node.nbirth([metric("bdSeq", "UInt64", 0), metric("Motor", "Template", definition)])
    instance = Payload.Metric(name="motor1", datatype=T["Template"], timestamp=LATER)
    instance.template_value.template_ref = "Motor"
    instance.template_value.metrics.add(name="speed", double_value=1.5)  # no datatype: the def's
    instance.template_value.metrics.add(name="on", boolean_value=True)
    instance.template_value.parameters.add(name="limit", int_value=10)
    node.dbirth("dev1", [instance])
    (reading,) = node.ddata("dev1", instance)
    assert reading.value is None
    assert orjson.loads(reading.value_text or "") == {
        "template_ref": "Motor",
        "version": None,
        "metrics": {"speed": 1.5, "on": True},
        "parameters": {"limit": 10},
    }


def test_a_bad_metric_among_good_ones_keeps_the_good_ones(
    node: Node, metrics: PipelineMetrics
) -> None:
    node.nbirth()
    with pytest.raises(PartialPayloadError) as caught:
        node.ndata(
            by_alias(2, double_value=1.0),
            by_alias(3, double_value=2.0),  # a String carrying a double
            by_alias(2, double_value=math.nan),
            by_alias(4, int_value=0x1_0000),  # out of range for Int16
            by_alias(2, double_value=3.0),
        )
    error = caught.value
    assert error.reason == sp.SPARKPLUG_BAD_METRIC
    assert [(r.sensor_id, r.value, r.seq) for r in error.readings] == [
        ("temp", 1.0, 1), ("temp", 3.0, 1),
    ]  # fmt: skip
    assert "alias 3" in error.message
    assert "alias 4" in error.message
    assert seq_errors(metrics) == 0


def test_a_data_metric_without_name_or_alias_is_a_bad_metric_not_alias_0(
    node: Node, outbox: Outbox
) -> None:
    node.nbirth([metric("bdSeq", "UInt64", 0), metric("first", "Int32", 1, alias=0)])
    outbox.clear()
    (reading,) = node.ndata(by_alias(0, int_value=2))
    assert (reading.sensor_id, reading.value) == ("first", 2.0)
    with pytest.raises(PartialPayloadError) as caught:
        node.ndata(Payload.Metric(timestamp=LATER, int_value=3), by_alias(0, int_value=4))
    assert caught.value.reason == sp.SPARKPLUG_BAD_METRIC
    assert "without name or alias" in caught.value.message
    assert [(r.sensor_id, r.value) for r in caught.value.readings] == [("first", 4.0)]
    assert outbox.commands() == []  # a rebirth would not name it either


def test_a_bad_metric_in_a_birth_still_makes_the_birth(node: Node) -> None:
    with pytest.raises(PartialPayloadError) as caught:
        node.nbirth(
            [
                metric("bdSeq", "UInt64", 0),
                metric("far", "Double", 1.0, alias=5, timestamp_ms=2**62),
            ]
        )
    assert [r.sensor_id for r in caught.value.readings] == ["bdSeq"]
    (reading,) = node.ndata(by_alias(5, double_value=2.0))
    assert (reading.sensor_id, reading.value) == ("far", 2.0)


def test_a_string_of_a_text_type_is_value_text(node: Node) -> None:
    node.nbirth(
        [
            metric("bdSeq", "UInt64", 0),
            metric("t", "Text", "long", alias=30),
            metric("u", "UUID", "8c1b3e5e-0000-4000-8000-000000000000", alias=31),
            metric("ds", "DataSet", DataSetSpec(["a"], ["Int32"], [[1], [2]]), alias=32),
        ]
    )
    readings = node.ndata(
        by_alias(30, string_value="text"), by_alias(32, dataset_value=Payload.DataSet())
    )
    assert [(r.sensor_id, r.value, r.value_text) for r in readings] == [
        ("t", None, "text"),
        ("ds", None, '{"columns":[],"types":[],"rows":[]}'),
    ]


# --- what is not data --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "body"),
    [
        ("spBv1.0/STATE/ingestd", b'{"online": true, "timestamp": 1}'),
        ("spBv1.0/STATE/other-host", b"not even JSON"),
        (
            NCMD,
            encode_payload([metric(sp.REBIRTH_METRIC, "Boolean", True)], seq=None, timestamp_ms=MS),
        ),
        (f"spBv1.0/{GROUP}/DCMD/{NODE}/dev1", b"\xff\xff garbage"),
    ],
    ids=["own-STATE", "other-STATE", "NCMD", "DCMD"],
)
def test_states_and_commands_are_not_readings(
    host: SparkplugHost, outbox: Outbox, metrics: PipelineMetrics, topic: str, body: bytes
) -> None:
    assert host.decode(raw(1, topic, body), {}) == []
    assert outbox.sent == []
    assert seq_errors(metrics) == 0


@pytest.mark.parametrize(
    "topic",
    [
        "spBv1.0/plant/NDATA",
        "spBv1.0/plant/NDATA/edge1/dev1",
        "spBv1.0/plant/DDATA/edge1",
        "spBv1.0/plant/NOPE/edge1",
        "spBv1.0//NDATA/edge1",
        "spBv1.0/STATE/",
        "spAv1.0/plant/NDATA/edge1",
    ],
)
def test_a_topic_that_is_not_sparkplug_is_a_bad_topic(host: SparkplugHost, topic: str) -> None:
    rejected(lambda: host.decode(raw(1, topic, b""), {}), sp.SPARKPLUG_BAD_TOPIC)


@pytest.mark.parametrize("verb", ["NBIRTH", "NDATA", "NDEATH"])
def test_a_payload_that_is_not_protobuf_is_malformed(
    host: SparkplugHost, outbox: Outbox, verb: str
) -> None:
    topic = f"spBv1.0/{GROUP}/{verb}/{NODE}"
    rejected(lambda: host.decode(raw(1, topic, b"\x0a\xff"), {}), sp.SPARKPLUG_MALFORMED)
    assert outbox.sent == []


# --- the birth cache across restarts -----------------------------------------------------------


def test_after_a_restart_data_by_alias_decodes_without_a_new_birth(
    make_host: HostFactory, outbox: Outbox, tmp_path: Path
) -> None:
    before = Node(make_host())
    before.nbirth()
    before.dbirth("dev1")
    before.ndata()
    before.host.close()

    registry = PipelineMetrics(CollectorRegistry())
    after = Node(make_host(registry_metrics=registry))
    after.next_seq = 9  # messages were lost while ingestd was down: not a gap
    outbox.clear()
    (node_reading,) = after.ndata(by_alias(4, int_value=0xFFFF_FFFF))
    (device_reading,) = after.ddata("dev1", by_alias(12, int_value=7))
    assert (node_reading.device_id, node_reading.sensor_id, node_reading.value) == (
        NODE_ID, "count", -1.0,
    )  # fmt: skip
    assert (device_reading.device_id, device_reading.sensor_id) == (device_id("dev1"), "raw")
    assert (node_reading.seq, device_reading.seq) == (9, 10)
    assert seq_errors(registry) == 0
    assert outbox.sent == []
    assert gauges(registry) == {
        "edge_nodes_online": 1, "edge_nodes_offline": 0, "devices_online": 1, "devices_offline": 0,
    }  # fmt: skip


def test_after_a_restart_the_bdseq_and_online_flags_are_remembered(
    make_host: HostFactory, outbox: Outbox
) -> None:
    before = Node(make_host())
    before.bdseq = 6
    before.nbirth()
    before.dbirth("dev1")
    before.dbirth("dev2")
    before.ddeath("dev2")
    before.host.close()

    registry = PipelineMetrics(CollectorRegistry())
    after = Node(make_host(registry_metrics=registry), bdseq=6)
    assert gauges(registry) == {
        "edge_nodes_online": 1, "edge_nodes_offline": 0, "devices_online": 1, "devices_offline": 1,
    }  # fmt: skip
    after.ndeath(bdseq=5)
    assert sample(registry, "ingestd_sparkplug_stale_deaths_total") == 1
    outbox.clear()
    after.ndeath()
    assert sorted(topic for topic, *_ in outbox.states()) == [
        f"ingestd/devices/{device_id('dev1')}/state",
        f"ingestd/devices/{NODE_ID}/state",
    ]
    assert gauges(registry)["edge_nodes_offline"] == 1


def test_after_a_restart_a_template_instance_still_reads_its_definition(
    make_host: HostFactory,
) -> None:
    definition = TemplateSpec(None, metrics=[metric("speed", "Double", 0.0)], is_definition=True)
    before = Node(make_host())
    before.nbirth(
        [metric("bdSeq", "UInt64", 0), metric("Motor", "Template", definition),
         metric("motor1", "Template", TemplateSpec("Motor"), alias=40)]
    )  # fmt: skip
    before.host.close()
    after = Node(make_host())
    instance = by_alias(40)
    instance.template_value.template_ref = "Motor"
    instance.template_value.metrics.add(name="speed", double_value=2.5)
    (reading,) = after.ndata(instance)
    assert orjson.loads(reading.value_text or "")["metrics"] == {"speed": 2.5}


def put_rows(path: Path, rows: dict[str, bytes | str | int]) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS births (key TEXT PRIMARY KEY, body BLOB NOT NULL)")
        conn.executemany("INSERT OR REPLACE INTO births VALUES (?, ?)", rows.items())
    conn.close()


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b"[]",
        b"1",
        12345,
        b'{"online": true}',
        b'{"bdseq": 0, "online": true, "metrics": "abc"}',
        b'{"bdseq": 0, "online": true, "metrics": [["temp", 2]]}',
        b'{"bdseq": 0, "online": true, "metrics": [[2, 2, 10]]}',
        b'{"bdseq": 0, "online": true, "metrics": [["temp", "2", 10]]}',
        b'{"bdseq": 0, "online": true, "metrics": [["temp", 2, "Double"]]}',
        b'{"bdseq": "0", "online": true, "metrics": [["temp", 2, 10]]}',
        b'{"bdseq": 0, "online": true, "metrics": [["temp", 2, 10]], "templates": {"T": "zz"}}',
    ],
)
def test_a_corrupt_row_in_the_cache_is_ignored(
    make_host: HostFactory, outbox: Outbox, metrics: PipelineMetrics, tmp_path: Path,
    body: bytes | int,
) -> None:  # fmt: skip
    good = Birth(bdseq=0, online=True)
    good.add("temp", 2, T["Double"])
    put_rows(tmp_path / "sparkplug.db", {"plant/good": good.encode(), NODE_ID: body})
    host = make_host()
    assert gauges(metrics)["edge_nodes_online"] == 1  # the good row only
    (reading,) = Node(host, "good").ndata()
    assert (reading.device_id, reading.sensor_id, reading.value) == ("plant/good", "temp", 22.0)
    rejected(Node(host).ndata, sp.SPARKPLUG_NO_BIRTH)
    assert_one_rebirth_request(outbox)


def test_a_cache_file_that_is_not_a_database_starts_empty(
    make_host: HostFactory, outbox: Outbox, tmp_path: Path
) -> None:
    (tmp_path / "sparkplug.db").write_bytes(b"this is not an SQLite file at all" * 200)
    node = Node(make_host())
    assert (tmp_path / "sparkplug.db.corrupt").exists()  # set aside, not lost
    rejected(node.ndata, sp.SPARKPLUG_NO_BIRTH)
    assert_one_rebirth_request(outbox)
    node.nbirth()  # and it works again, on disk too
    node.host.close()
    (reading,) = Node(make_host()).ndata(seq=1)
    assert reading.sensor_id == "temp"


def test_the_cache_survives_its_own_round_trip(tmp_path: Path) -> None:
    birth = Birth(bdseq=255, online=True)
    birth.add("a", None, T["String"])
    birth.add("b", 2**64 - 1, T["UInt64"])
    cache = BirthCache(tmp_path / "c.db")
    cache.open()
    cache.put("g/n", birth)
    cache.put("g/n/d", Birth(online=False))
    cache.close()
    again = BirthCache(tmp_path / "c.db")
    again.open()
    try:
        restored = again.get("g/n")
        assert restored is not None
        assert (restored.bdseq, restored.online) == (255, True)
        assert restored.by_name == birth.by_name
        assert restored.by_alias == birth.by_alias
        assert again.devices_of("g/n") == ["g/n/d"]
        assert again.count(devices=False, online=True) == 1
        assert again.count(devices=True, online=False) == 1
        assert len(again) == 2
    finally:
        again.close()


# --- properties: any bytes, any topic ----------------------------------------------------------

VERBS = ["NBIRTH", "NDATA", "DBIRTH", "DDATA", "NDEATH", "DDEATH"]


def sparkplug_topic(verb: str) -> str:
    device = "/dev1" if verb.startswith("D") else ""
    return f"spBv1.0/{GROUP}/{verb}/{NODE}{device}"


def check_readings(readings: object) -> None:
    """What the pipeline downstream relies on: a list of well-formed readings."""
    assert isinstance(readings, list)
    for reading in readings:
        assert isinstance(reading, Reading)
        assert isinstance(reading.device_id, str)
        assert isinstance(reading.sensor_id, str)
        assert reading.ts.tzinfo is not None
        assert (reading.value is None) != (reading.value_text is None)
        assert reading.value is None or math.isfinite(reading.value)
        assert reading.quality in {"good", "bad", "stale", "uncertain"}
        assert reading.seq is None or 0 <= reading.seq < 2**63  # a BIGINT column


def decode_safely(host: SparkplugHost, message: RawMessage) -> None:
    error: PayloadError | None = None
    try:
        readings = host.decode(message, {})
    except PayloadError as exc:  # PartialPayloadError included; anything else fails the test
        error = exc
        readings = exc.readings if isinstance(exc, PartialPayloadError) else []
    if isinstance(error, PartialPayloadError):
        assert error.reason == sp.SPARKPLUG_BAD_METRIC
    elif error is not None:
        assert error.reason in sp.SPARKPLUG_REASONS
    check_readings(readings)


@pytest.fixture
def fuzz_host(make_host: HostFactory) -> SparkplugHost:
    """One host for every example: state left by one example meets the next."""
    return make_host(cooldown=0)


@PROPERTY_SETTINGS
@given(verb=st.sampled_from(VERBS), body=st.binary(max_size=200))
def test_any_bytes_on_a_sparkplug_topic_decode_or_are_a_payload_error(
    fuzz_host: SparkplugHost, verb: str, body: bytes
) -> None:
    decode_safely(fuzz_host, raw(1, sparkplug_topic(verb), body))


topic_levels = st.one_of(
    st.sampled_from([*VERBS, "NCMD", "DCMD", "STATE", GROUP, NODE, "dev1", "", "+", "#"]),
    st.text(max_size=8),
)


@PROPERTY_SETTINGS
@given(
    levels=st.lists(topic_levels, max_size=6),
    body=st.one_of(st.binary(max_size=60), st.just(b"")),
)
def test_any_topic_under_the_namespace_decodes_or_is_a_payload_error(
    fuzz_host: SparkplugHost, levels: list[str], body: bytes
) -> None:
    decode_safely(fuzz_host, raw(1, "/".join(["spBv1.0", *levels]), body))


values = st.one_of(
    st.none(),
    st.builds(lambda v: {"int_value": v}, st.integers(0, 2**32 - 1)),
    st.builds(lambda v: {"long_value": v}, st.integers(0, 2**64 - 1)),
    st.builds(lambda v: {"float_value": v}, st.floats(width=32)),
    st.builds(lambda v: {"double_value": v}, st.floats()),
    st.builds(lambda v: {"boolean_value": v}, st.booleans()),
    st.builds(lambda v: {"string_value": v}, st.text(max_size=10)),
    st.builds(lambda v: {"bytes_value": v}, st.binary(max_size=12)),
)


@st.composite
def metrics_strategy(draw: st.DrawFn) -> Payload.Metric:
    made = Payload.Metric()
    name = draw(
        st.one_of(st.none(), st.sampled_from(["bdSeq", "temp", "m", ""]), st.text(max_size=6))
    )
    if name is not None:
        made.name = name
    alias = draw(st.one_of(st.none(), st.integers(0, 5), st.integers(0, 2**64 - 1)))
    if alias is not None:
        made.alias = alias
    datatype = draw(st.one_of(st.none(), st.integers(0, 35), st.integers(0, 2**32 - 1)))
    if datatype is not None:
        made.datatype = datatype
    timestamp = draw(st.one_of(st.none(), st.just(LATER), st.integers(0, 2**64 - 1)))
    if timestamp is not None:
        made.timestamp = timestamp
    made.is_null = draw(st.booleans())
    made.is_transient = draw(st.booleans())
    value = draw(values)
    if value is not None:
        for key, item in value.items():
            setattr(made, key, item)
    if draw(st.booleans()):
        made.properties.keys.append("Quality")
        made.properties.values.add(type=3, int_value=draw(st.sampled_from([0, 192, 500, 1])))
    if draw(st.integers(0, 9)) == 0:
        made.template_value.is_definition = draw(st.booleans())
        if draw(st.booleans()):
            made.template_value.template_ref = draw(st.text(max_size=4))
        made.template_value.metrics.add(
            name=draw(st.text(max_size=3)), datatype=draw(st.integers(0, 40))
        )
    if draw(st.integers(0, 9)) == 0:
        made.dataset_value.columns.append("c")
        made.dataset_value.types.append(draw(st.integers(0, 40)))
        made.dataset_value.rows.add().elements.add(int_value=draw(st.integers(0, 2**32 - 1)))
    return made


@st.composite
def messages(draw: st.DrawFn) -> RawMessage:
    verb = draw(st.sampled_from(VERBS))
    payload = Payload(metrics=draw(st.lists(metrics_strategy(), max_size=5)))
    seq = draw(st.one_of(st.none(), st.integers(0, 256), st.integers(0, 2**64 - 1)))
    if seq is not None:
        payload.seq = seq
    timestamp = draw(st.one_of(st.none(), st.just(MS), st.integers(0, 2**64 - 1)))
    if timestamp is not None:
        payload.timestamp = timestamp
    return raw(1, sparkplug_topic(verb), payload.SerializeToString())


# A state dir per example, on tmpfs where there is one (the cache syncs every birth).
FAST_DIR = "/dev/shm" if Path("/dev/shm").is_dir() else None


@settings(PROPERTY_SETTINGS, max_examples=200)
@given(sent=st.lists(messages(), min_size=1, max_size=8))
def test_any_sequence_of_well_formed_payloads_decodes_or_is_a_payload_error(
    metrics: PipelineMetrics, sent: list[RawMessage]
) -> None:
    with tempfile.TemporaryDirectory(dir=FAST_DIR) as state_dir:
        context = DecoderContext(Outbox(), Path(state_dir), metrics, rebirth_cooldown_seconds=0)
        host = SparkplugHost(context)
        try:
            for message in sent:
                decode_safely(host, message)
        finally:
            host.close()
        again = SparkplugHost(context)  # whatever was cached reads back
        try:
            for message in sent:
                decode_safely(again, message)
        finally:
            again.close()
