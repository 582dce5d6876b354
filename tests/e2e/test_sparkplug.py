"""End to end, Sparkplug B: real mosquitto and PostgreSQL, ``ingestd run`` as a process, and
an edge node that publishes real protobuf bytes with paho (``edge.sparkplug`` encodes them)
or ``ingestd simulate --format sparkplug``.

Waits are on what the daemon made durable or published (rows, rejections, retained
states), never on message counts: the daemon also receives its own STATE and NCMDs.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge.sparkplug import (
    DATATYPES,
    REBIRTH_METRIC,
    DataSetSpec,
    Payload,
    TemplateSpec,
    decode_payload,
    encode_metric,
    encode_payload,
)
from tests.e2e.queries import query, scalar
from tests.harness.daemon import INGESTD, Collector, Daemon
from tests.harness.servers import Mosquitto, unique_name, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(30)]

SOURCES = json.dumps([{"topic": "spBv1.0/#", "format": "sparkplug", "template": "spBv1.0/#"}])
HOST_ID = "scada-test"
STATE_TOPIC = f"spBv1.0/STATE/{HOST_ID}"
T0 = datetime(2026, 11, 27, 7, 0, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_MS = (datetime(1, 1, 1, tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1)
MAX_MS = (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - EPOCH) // timedelta(
    milliseconds=1
)
DT = DATATYPES


def ms(at: datetime) -> int:
    return (at - EPOCH) // timedelta(milliseconds=1)


def at_ms(value: int) -> datetime:
    return EPOCH + timedelta(milliseconds=value)


def iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ------------------------------------------------------------------------------ helpers


@pytest.fixture
def spb(daemon_factory: Callable[..., Daemon], migrated_pg: str) -> Callable[..., Daemon]:
    """A daemon with one Sparkplug source (spBv1.0/#) on the test's PostgreSQL."""

    def make(**env: str) -> Daemon:
        base = {
            "INGESTD_INGEST__SOURCES": SOURCES,
            "INGESTD_SPARKPLUG__HOST_ID": HOST_ID,
            "INGESTD_PUBLISH__PROCESSED": "false",
        }
        return daemon_factory(migrated_pg, **{**base, **env})

    return make


class Edge:
    """A Sparkplug edge node on its own paho connection, its NDEATH (with bdSeq) as will."""

    def __init__(
        self, port: int, group: str = "plant", node: str = "edge1", bdseq: int = 0
    ) -> None:
        self.group, self.node, self.bdseq = group, node, bdseq
        self.seq = 0
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=unique_name("edge-"),
            protocol=mqtt.MQTTv311,
        )  # fmt: skip
        self.client.will_set(self.topic("NDEATH"), self.death_payload(), qos=1)
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()

    def topic(self, verb: str, device: str | None = None) -> str:
        suffix = f"/{device}" if device else ""
        return f"spBv1.0/{self.group}/{verb}/{self.node}{suffix}"

    def death_payload(self, bdseq: int | None = None) -> bytes:
        value = self.bdseq if bdseq is None else bdseq
        bd = encode_metric(name="bdSeq", datatype=DT["UInt64"], value=value, timestamp_ms=None)
        return encode_payload([bd], seq=None, timestamp_ms=ms(T0))

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        info = self.client.publish(topic, payload, qos)
        info.wait_for_publish(10)
        assert info.is_published(), topic

    def send(
        self,
        verb: str,
        metrics: Sequence[Payload.Metric],
        *,
        device: str | None = None,
        timestamp: datetime = T0,
        seq: int | None = None,
        qos: int = 0,
    ) -> int:
        """Publish with the node's next seq (or ``seq``), return the seq used."""
        used = self.seq if seq is None else seq
        self.seq = (used + 1) % 256
        payload = encode_payload(metrics, seq=used, timestamp_ms=ms(timestamp))
        self.publish(self.topic(verb, device), payload, qos)
        return used

    def nbirth(self, metrics: Sequence[Payload.Metric] = (), timestamp: datetime = T0) -> None:
        node_metrics = [
            encode_metric(name="bdSeq", alias=0, datatype=DT["UInt64"], value=self.bdseq,
                          timestamp_ms=ms(timestamp)),
            encode_metric(name=REBIRTH_METRIC, alias=1, datatype=DT["Boolean"], value=False,
                          timestamp_ms=ms(timestamp)),
            *metrics,
        ]  # fmt: skip
        self.send("NBIRTH", node_metrics, timestamp=timestamp, seq=0)

    def crash(self) -> None:
        """Drop the TCP connection without DISCONNECT: the broker sends the will."""
        self.client.loop_stop()
        sock = self.client.socket()
        assert sock is not None
        sock.close()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def edges(mosquitto: Mosquitto) -> Iterator[Callable[..., Edge]]:
    made: list[Edge] = []

    def make(**kwargs: Any) -> Edge:
        edge = Edge(mosquitto.port, **kwargs)
        made.append(edge)
        return edge

    yield make
    for edge in made:
        with contextlib.suppress(OSError, ValueError):
            edge.close()


@pytest.fixture
def collect(mosquitto: Mosquitto) -> Iterator[Callable[[str], Collector]]:
    made: list[Collector] = []

    def make(topic_filter: str) -> Collector:
        collector = Collector(mosquitto.port, topic_filter)
        made.append(collector)
        return collector

    yield make
    for collector in made:
        collector.close()


def metric(name: str, datatype: str, value: object, at: datetime | None, **kw: Any) -> Any:
    return encode_metric(
        name=name, datatype=DT[datatype], value=value,
        timestamp_ms=None if at is None else ms(at), **kw,
    )  # fmt: skip


def by_alias(alias: int, datatype: str, value: object, at: datetime) -> Any:
    """A DATA metric as edge nodes send them: alias, timestamp and value, no name or type."""
    made = encode_metric(alias=alias, datatype=DT[datatype], value=value, timestamp_ms=ms(at))
    made.ClearField("datatype")
    return made


def rows(url: str, device_id: str) -> dict[str, list[tuple[Any, ...]]]:
    """{sensor_id: [(ts, value, value_text, quality, seq), ...]} of one device, by ts."""
    found: dict[str, list[tuple[Any, ...]]] = {}
    for r in query(
        url,
        "SELECT sensor_id, ts, value, value_text, quality, seq FROM sensor_readings"
        " WHERE device_id = $1 ORDER BY sensor_id, ts",
        device_id,
    ):
        found.setdefault(r[0], []).append(tuple(r[1:]))
    return found


def count_rows(url: str, where: str = "TRUE", *args: Any) -> int:
    return int(scalar(url, f"SELECT count(*) FROM sensor_readings WHERE {where}", *args))


def wait_rows(
    url: str, expected: int, where: str = "TRUE", *args: Any, timeout: float = 15
) -> None:
    wait_until(
        lambda: count_rows(url, where, *args) >= expected, timeout,
        message=lambda: f"{count_rows(url, where, *args)} of {expected} rows ({where})",
    )  # fmt: skip


def rejections(url: str) -> list[tuple[str, str, str]]:
    return [
        (r[0], r[1], r[2])
        for r in query(url, "SELECT topic, reason, error FROM rejected_messages ORDER BY id")
    ]


def retained(port: int, topic_filter: str, expected: int = 1) -> dict[str, Any]:
    """The retained messages under ``topic_filter`` as {topic: JSON}, read by a new client
    (``expected``: how many topics to wait for, at most 5 s)."""
    collector = Collector(port, topic_filter)
    try:
        # Retained messages come as one burst on subscribing: wait for the ones expected.
        deadline = time.monotonic() + 5
        while collector.count() < expected and time.monotonic() < deadline:
            time.sleep(0.02)  # poll until the deadline
        # The last per topic: one published meanwhile (not retained) is the current one.
        return {m.topic: _json(m.payload) for m in collector.messages}
    finally:
        collector.close()


def _json(payload: bytes | bytearray) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return payload.decode()


def state_of(collector: Collector, topic: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in collector.messages if m.topic == topic]


def ncmds(collector: Collector) -> list[tuple[str, Payload, mqtt.MQTTMessage]]:
    return [(m.topic, decode_payload(bytes(m.payload)), m) for m in list(collector.messages)]


def start_host(daemon: Daemon) -> int:
    """Start and wait until the host is subscribed: its STATE birth (published once the
    Sparkplug connection has subscribed) is retained. Returns the birth's timestamp."""
    port = int(daemon.env["INGESTD_MQTT__URL"].rpartition(":")[2])
    started = int(time.time() * 1000)
    daemon.start()

    def born() -> int:
        state = retained(port, STATE_TOPIC).get(STATE_TOPIC)
        if state and state["online"] is True and state["timestamp"] >= started:
            return int(state["timestamp"])
        return 0

    return wait_until(born, 10, message="no STATE birth")


def settle(daemon: Daemon) -> None:
    """Wait until nothing is in flight (what arrived is durable and acknowledged)."""
    wait_until(lambda: daemon.metric("ingestd_inflight_messages") == 0, 10)


# ---------------------------------------------------------------- 1. every datatype


MOTOR_INSTANCE = TemplateSpec(
    template_ref="Motor",
    version="1.0",
    metrics=[encode_metric(name="rpm", datatype=DT["Int32"], value=-5, timestamp_ms=None)],
    parameters=[("serial", "String", "M-1")],
)
# name, datatype, value in DBIRTH, expected (value, value_text), value in DDATA, expected
DATATYPE_CASES: list[tuple[str, str, object, tuple[Any, Any], object, tuple[Any, Any]]] = [
    ("i8", "Int8", -128, (-128.0, None), 127, (127.0, None)),
    ("i16", "Int16", -32768, (-32768.0, None), 32767, (32767.0, None)),
    ("i32", "Int32", -(2**31), (-2147483648.0, None), 2**31 - 1, (2147483647.0, None)),
    ("i64", "Int64", -(2**63), (float(-(2**63)), None), 2**63 - 1, (float(2**63 - 1), None)),
    ("u8", "UInt8", 0, (0.0, None), 255, (255.0, None)),
    ("u16", "UInt16", 0, (0.0, None), 65535, (65535.0, None)),
    ("u32", "UInt32", 0, (0.0, None), 2**32 - 1, (4294967295.0, None)),
    ("u64", "UInt64", 0, (0.0, None), 2**64 - 1, (float(2**64 - 1), None)),
    # Float: the shortest decimal that is the same float32 (a device's 12.3 is 12.3).
    ("f32", "Float", -3.4028234663852886e38, (-3.4028235e38, None), 12.3, (12.3, None)),
    ("f32min", "Float", 1.401298464324817e-45, (1e-45, None), -0.0, (-0.0, None)),
    ("f64", "Double", -1.7976931348623157e308, (-1.7976931348623157e308, None),
     5e-324, (5e-324, None)),
    ("bool", "Boolean", False, (0.0, None), True, (1.0, None)),
    ("str", "String", "", (None, ""), "héllo ✓ 🚀 \"q\" \\ 'x'",
     (None, "héllo ✓ 🚀 \"q\" \\ 'x'")),
    ("text", "Text", "x" * 5000, (None, "x" * 5000), "a\nb\tc", (None, "a\nb\tc")),
    ("uuid", "UUID", "00000000-0000-0000-0000-000000000000",
     (None, "00000000-0000-0000-0000-000000000000"),
     "ffffffff-ffff-ffff-ffff-ffffffffffff", (None, "ffffffff-ffff-ffff-ffff-ffffffffffff")),
    ("dt", "DateTime", MIN_MS, (None, "0001-01-01T00:00:00.000000Z"),
     MAX_MS, (None, "9999-12-31T23:59:59.999000Z")),
    ("dt0", "DateTime", 0, (None, "1970-01-01T00:00:00.000000Z"),
     -1, (None, "1969-12-31T23:59:59.999000Z")),
    ("i8a", "Int8Array", [-128, 0, 127], (None, "[-128,0,127]"), [], (None, "[]")),
    ("i64a", "Int64Array", [-(2**63), 2**63 - 1],
     (None, "[-9223372036854775808,9223372036854775807]"), [0], (None, "[0]")),
    ("u64a", "UInt64Array", [0, 2**64 - 1], (None, "[0,18446744073709551615]"),
     [1], (None, "[1]")),
    ("u16a", "UInt16Array", [65535], (None, "[65535]"), [0, 1], (None, "[0,1]")),
    ("fa", "FloatArray", [1.5, 12.3], (None, "[1.5,12.3]"), [-0.1], (None, "[-0.1]")),
    ("da", "DoubleArray", [5e-324, 1.7976931348623157e308],
     (None, "[5e-324,1.7976931348623157e+308]"), [0.1], (None, "[0.1]")),
    ("ba", "BooleanArray", [True, False, True, True, False, False, False, False, True],
     (None, "[true,false,true,true,false,false,false,false,true]"), [], (None, "[]")),
    ("sa", "StringArray", ["a", "", "ü"], (None, '["a","","ü"]'), ["x"], (None, '["x"]')),
    ("dta", "DateTimeArray", [0, MAX_MS],
     (None, '["1970-01-01T00:00:00.000000Z","9999-12-31T23:59:59.999000Z"]'),
     [MIN_MS], (None, '["0001-01-01T00:00:00.000000Z"]')),
    ("ds", "DataSet",
     DataSetSpec(columns=["n", "s"], types=["Int32", "String"], rows=[[1, "x"], [-1, None]]),
     (None, '{"columns":["n","s"],"types":["Int32","String"],"rows":[[1,"x"],[-1,null]]}'),
     DataSetSpec(columns=["b"], types=["Boolean"], rows=[]),
     (None, '{"columns":["b"],"types":["Boolean"],"rows":[]}')),
    ("tpl", "Template", MOTOR_INSTANCE,
     (None, '{"template_ref":"Motor","version":"1.0","metrics":{"rpm":-5},'
            '"parameters":{"serial":"M-1"}}'),
     MOTOR_INSTANCE,
     (None, '{"template_ref":"Motor","version":"1.0","metrics":{"rpm":-5},'
            '"parameters":{"serial":"M-1"}}')),
]  # fmt: skip
QUALITY_CASES = [("q_good", 192, "good"), ("q_bad", 0, "bad"), ("q_stale", 500, "stale"),
                 ("q_odd", 3, "uncertain"), ("q_none", None, "good")]  # fmt: skip


def test_every_datatype_with_its_boundaries_reaches_postgresql(
    spb: Callable[..., Daemon], edges: Callable[..., Edge], migrated_pg: str
) -> None:
    daemon = spb()
    start_host(daemon)
    edge = edges()
    birth_at, data_at = T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)
    edge.nbirth(timestamp=T0)
    births: list[Any] = []
    for index, (name, datatype, low, _, _, _) in enumerate(DATATYPE_CASES):
        births.append(
            encode_metric(name=name, alias=100 + index, datatype=DT[datatype], value=low,
                          timestamp_ms=ms(birth_at + timedelta(milliseconds=index)))
        )  # fmt: skip
    for index, (name, code, _) in enumerate(QUALITY_CASES):
        births.append(metric(name, "Double", float(index), birth_at, quality=code))
    births.append(metric("no_ts", "Double", 7.0, None))  # falls back to the payload's
    edge.send("DBIRTH", births, device="dev1", timestamp=birth_at)
    data = [
        by_alias(100 + index, datatype, high, data_at + timedelta(milliseconds=index))
        for index, (_, datatype, _, _, high, _) in enumerate(DATATYPE_CASES)
    ]
    # Counted and never stored: bytes, file, null, transient.
    skipped = [
        metric("blob", "Bytes", b"\x00\x01", data_at),
        metric("file", "File", b"%PDF", data_at),
        metric("nothing", "Double", None, data_at, is_null=True),
        metric("fleeting", "Double", 1.0, data_at),
    ]
    skipped[-1].is_transient = True
    edge.send("DDATA", [*data, *skipped], device="dev1", timestamp=data_at)

    expected_rows = len(DATATYPE_CASES) * 2 + len(QUALITY_CASES) + 1
    wait_rows(migrated_pg, expected_rows, "device_id = $1", "plant/edge1/dev1")
    settle(daemon)
    found = rows(migrated_pg, "plant/edge1/dev1")
    for index, (name, _, _, low, _, high) in enumerate(DATATYPE_CASES):
        first = (birth_at + timedelta(milliseconds=index), *low, "good", 1)
        second = (data_at + timedelta(milliseconds=index), *high, "good", 2)
        assert found.pop(name) == [first, second], name
    for index, (name, _, quality) in enumerate(QUALITY_CASES):
        assert found.pop(name) == [(birth_at, float(index), None, quality, 1)], name
    assert found.pop("no_ts") == [(birth_at, 7.0, None, "good", 1)]
    assert found == {}  # nothing skipped was stored
    # value is NULL exactly when value_text is set, in every row.
    assert count_rows(migrated_pg, "(value IS NULL) = (value_text IS NULL)") == 0
    assert rows(migrated_pg, "plant/edge1") == {
        "bdSeq": [(T0, 0.0, None, "good", 0)],
        REBIRTH_METRIC: [(T0, 0.0, None, "good", 0)],
    }
    assert rejections(migrated_pg) == []
    m = daemon.metrics()
    for reason in ("bytes", "file", "null", "transient"):
        assert m[f'ingestd_sparkplug_metrics_skipped_total{{reason="{reason}"}}'] == 1, reason
    assert m["ingestd_sparkplug_seq_errors_total"] == 0
    assert m["ingestd_sparkplug_rebirth_requests_total"] == 0


def test_template_instance_reads_member_types_from_its_definition(
    spb: Callable[..., Daemon], edges: Callable[..., Edge], migrated_pg: str
) -> None:
    """The NBIRTH's Template definition gives the datatypes an instance leaves out."""
    daemon = spb()
    start_host(daemon)
    edge = edges()
    definition = TemplateSpec(
        template_ref=None, is_definition=True, version="1.0",
        metrics=[encode_metric(name="rpm", datatype=DT["Int32"], value=0, timestamp_ms=None)],
        parameters=[("serial", "String", "")],
    )  # fmt: skip
    edge.nbirth([metric("Motor", "Template", definition, T0)])
    member = encode_metric(name="rpm", datatype=DT["Int32"], value=-7, timestamp_ms=None)
    member.ClearField("datatype")  # the definition says Int32
    instance = Payload.Template(template_ref="Motor", metrics=[member])
    parameter = instance.parameters.add(name="serial")  # no type: the definition's String
    parameter.string_value = "M-2"
    made = Payload.Metric(name="motor1", datatype=DT["Template"], timestamp=ms(T0))
    made.template_value.CopyFrom(instance)
    edge.send("DBIRTH", [made], device="dev1")
    wait_until(
        lambda: count_rows(migrated_pg, "sensor_id = 'motor1'") or rejections(migrated_pg), 15
    )
    settle(daemon)
    assert rejections(migrated_pg) == []
    assert daemon.metric('ingestd_sparkplug_metrics_skipped_total{reason="definition"}') == 1
    text = scalar(migrated_pg, "SELECT value_text FROM sensor_readings WHERE sensor_id = 'motor1'")
    assert json.loads(text) == {
        "template_ref": "Motor", "version": None, "metrics": {"rpm": -7},
        "parameters": {"serial": "M-2"},
    }  # fmt: skip


# ---------------------------------------------------------------- 2. aliases, seq, rebirth


def test_alias_only_data_seq_wrap_gaps_and_rebirth_cooldown(
    spb: Callable[..., Daemon], edges: Callable[..., Edge], collect: Callable[[str], Collector],
    migrated_pg: str,
) -> None:  # fmt: skip
    daemon = spb(INGESTD_SPARKPLUG__REBIRTH_COOLDOWN_SECONDS="3")
    start_host(daemon)
    commands = collect("spBv1.0/+/NCMD/#")
    edge = edges()
    edge.nbirth()
    births = [
        encode_metric(name="temp", alias=10, datatype=DT["Double"], value=20.0,
                      timestamp_ms=ms(T0)),
        encode_metric(name="on", alias=11, datatype=DT["Boolean"], value=True,
                      timestamp_ms=ms(T0)),
    ]  # fmt: skip
    edge.send("DBIRTH", births, device="dev1")
    # 300 DDATA by alias only: seq runs 2..255, wraps to 0..45, no error.
    sent = 300
    for i in range(1, sent + 1):
        at = T0 + timedelta(seconds=i)
        edge.send("DDATA", [by_alias(10, "Double", float(i), at), by_alias(11, "Boolean",
                  i % 2 == 0, at)], device="dev1", timestamp=at)  # fmt: skip
    assert edge.seq == (2 + sent) % 256
    wait_rows(migrated_pg, sent, "sensor_id = 'temp' AND ts > $1", T0)
    settle(daemon)
    found = rows(migrated_pg, "plant/edge1/dev1")
    assert [r[1] for r in found["temp"][1:]] == [float(i) for i in range(1, sent + 1)]
    assert [r[1] for r in found["on"][1:]] == [float(i % 2 == 0) for i in range(1, sent + 1)]
    assert [r[4] for r in found["temp"][1:]] == [(1 + i) % 256 for i in range(1, sent + 1)]
    assert daemon.metric("ingestd_sparkplug_seq_errors_total") == 0
    assert commands.count() == 0

    # A gap: counted, a rebirth requested on the node's NCMD topic, the readings stored.
    edge.seq = (edge.seq + 3) % 256
    gap_at = T0 + timedelta(hours=1)
    edge.send("DDATA", [by_alias(10, "Double", -1.0, gap_at)], device="dev1", timestamp=gap_at)
    wait_until(lambda: commands.count() >= 1, 10, message="no NCMD")
    wait_rows(migrated_pg, 1, "ts = $1", gap_at)
    topic, payload, raw = ncmds(commands)[0]
    assert topic == "spBv1.0/plant/NCMD/edge1"
    assert raw.qos == 0
    assert not raw.retain
    assert payload.HasField("timestamp")
    assert abs(payload.timestamp - time.time() * 1000) < 30_000
    assert not payload.HasField("seq")
    assert [(m.name, m.datatype, m.boolean_value) for m in payload.metrics] == [
        (REBIRTH_METRIC, DT["Boolean"], True)
    ]
    m = daemon.metrics()
    assert m["ingestd_sparkplug_seq_errors_total"] == 1
    assert m["ingestd_sparkplug_rebirth_requests_total"] == 1

    # A second gap inside the cooldown: counted, stored, no second NCMD.
    edge.seq = (edge.seq + 5) % 256
    gap2_at = gap_at + timedelta(seconds=1)
    edge.send("DDATA", [by_alias(10, "Double", -2.0, gap2_at)], device="dev1", timestamp=gap2_at)
    wait_rows(migrated_pg, 1, "ts = $1", gap2_at)
    settle(daemon)
    assert daemon.metric("ingestd_sparkplug_seq_errors_total") == 2
    assert daemon.metric("ingestd_sparkplug_rebirth_requests_total") == 1
    # The next one after the cooldown does send one (proves the silence above was the cooldown).
    time.sleep(3.2)  # not a wait for state: the cooldown is wall time, and it must pass
    edge.seq = (edge.seq + 2) % 256
    gap3_at = gap2_at + timedelta(seconds=1)
    edge.send("DDATA", [by_alias(10, "Double", -3.0, gap3_at)], device="dev1", timestamp=gap3_at)
    wait_until(lambda: commands.count() >= 2, 10, message="no NCMD after the cooldown")
    wait_rows(migrated_pg, 1, "ts = $1", gap3_at)
    settle(daemon)
    assert commands.count() == 2
    assert daemon.metric("ingestd_sparkplug_seq_errors_total") == 3
    assert rejections(migrated_pg) == []


# ---------------------------------------------------------------- 3. births and deaths


def test_births_deaths_and_stale_deaths_drive_device_state(
    spb: Callable[..., Daemon], edges: Callable[..., Edge], collect: Callable[[str], Collector],
    mosquitto: Mosquitto, migrated_pg: str,
) -> None:  # fmt: skip
    daemon = spb()
    start_host(daemon)
    states = collect("ingestd/devices/#")
    edge = edges(bdseq=5)
    node_born, dev_born = T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)
    edge.nbirth(timestamp=node_born)
    for device in ("dev1", "dev2"):
        edge.send("DBIRTH", [metric("temp", "Double", 1.0, dev_born)], device=device,
                  timestamp=dev_born)  # fmt: skip
    node_t, dev1_t, dev2_t = (
        "ingestd/devices/plant/edge1/state",
        "ingestd/devices/plant/edge1/dev1/state",
        "ingestd/devices/plant/edge1/dev2/state",
    )
    wait_until(lambda: states.count() >= 3, 10, message=lambda: str(states.topics()))
    assert state_of(states, node_t) == [{"online": True, "ts": iso(node_born), "cause": "NBIRTH"}]
    for topic in (dev1_t, dev2_t):
        assert state_of(states, topic) == [{"online": True, "ts": iso(dev_born), "cause": "DBIRTH"}]
    assert all(m.qos == 1 for m in states.messages)
    m = daemon.metrics()
    assert m['ingestd_sparkplug_edge_nodes{state="online"}'] == 1
    assert m['ingestd_sparkplug_devices{state="online"}'] == 2

    # A stale NDEATH (an older session's bdSeq) changes nothing.
    edge.publish(edge.topic("NDEATH"), edge.death_payload(bdseq=4), qos=1)
    sentinel = T0 + timedelta(minutes=3)
    edge.send("DDATA", [metric("temp", "Double", 2.0, sentinel)], device="dev1",
              timestamp=sentinel)  # fmt: skip
    wait_rows(migrated_pg, 1, "ts = $1", sentinel)
    settle(daemon)
    assert daemon.metric("ingestd_sparkplug_stale_deaths_total") == 1
    assert states.count() == 3
    assert daemon.metric('ingestd_sparkplug_edge_nodes{state="online"}') == 1

    # DDEATH: that device only, ts = the time of receipt.
    before = datetime.now(UTC)
    edge.send("DDEATH", [], device="dev2")
    wait_until(lambda: len(state_of(states, dev2_t)) == 2, 10)
    after = datetime.now(UTC)
    death = state_of(states, dev2_t)[1]
    assert (death["online"], death["cause"]) == (False, "DDEATH")
    died = datetime.fromisoformat(death["ts"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= died <= after + timedelta(seconds=1)

    # The matching NDEATH (the edge node's will): the node and its devices go offline.
    edge.crash()
    wait_until(lambda: len(state_of(states, node_t)) == 2, 10, message="no NDEATH state")
    wait_until(lambda: len(state_of(states, dev1_t)) == 2, 10)
    settle(daemon)
    for topic in (node_t, dev1_t):
        last = state_of(states, topic)[-1]
        assert (last["online"], last["cause"]) == (False, "NDEATH"), topic
    assert len(state_of(states, dev2_t)) == 2  # already offline: no second announcement
    assert {
        topic: (body["online"], body["cause"])
        for topic, body in retained(mosquitto.port, "ingestd/devices/#", 3).items()
    } == {
        node_t: (False, "NDEATH"),
        dev1_t: (False, "NDEATH"),
        dev2_t: (False, "DDEATH"),
    }
    m = daemon.metrics()
    assert m['ingestd_sparkplug_edge_nodes{state="offline"}'] == 1
    assert m['ingestd_sparkplug_edge_nodes{state="online"}'] == 0
    assert m['ingestd_sparkplug_devices{state="offline"}'] == 2
    assert m["ingestd_sparkplug_stale_deaths_total"] == 1
    # A new session's births bring them back, with the birth payload's timestamp.
    again = edges(bdseq=6)
    reborn = T0 + timedelta(minutes=9)
    again.nbirth(timestamp=reborn)
    wait_until(lambda: len(state_of(states, node_t)) == 3, 10)
    assert state_of(states, node_t)[-1] == {"online": True, "ts": iso(reborn), "cause": "NBIRTH"}
    assert rejections(migrated_pg) == []


# ---------------------------------------------------------------- 4. restarts


def test_data_by_alias_decodes_after_a_restart_from_the_durable_birth_cache(
    spb: Callable[..., Daemon], edges: Callable[..., Edge], collect: Callable[[str], Collector],
    migrated_pg: str,
) -> None:  # fmt: skip
    daemon = spb()
    start_host(daemon)
    commands = collect("spBv1.0/+/NCMD/#")
    edge = edges()
    edge.nbirth()
    edge.send("DBIRTH", [encode_metric(name="temp", alias=7, datatype=DT["Double"], value=1.0,
                                       timestamp_ms=ms(T0))], device="dev1")  # fmt: skip
    wait_rows(migrated_pg, 1, "sensor_id = 'temp'")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0
    assert (daemon.workdir / "var" / "sparkplug.db").exists()
    start_host(daemon)
    after = [T0 + timedelta(seconds=i) for i in range(1, 6)]
    for i, at in enumerate(after, start=1):
        edge.send("DDATA", [by_alias(7, "Double", float(i), at)], device="dev1", timestamp=at)
    wait_rows(migrated_pg, 6, "sensor_id = 'temp'")
    settle(daemon)
    assert [r[:3] for r in rows(migrated_pg, "plant/edge1/dev1")["temp"]] == [
        (T0, 1.0, None),
        *[(at, float(i), None) for i, at in enumerate(after, start=1)],
    ]
    assert rejections(migrated_pg) == []
    m = daemon.metrics()
    assert m["ingestd_sparkplug_seq_errors_total"] == 0  # the first message after a restart
    assert m["ingestd_sparkplug_rebirth_requests_total"] == 0
    assert commands.count() == 0


@pytest.mark.timeout(45)
def test_kill_9_mid_stream_of_qos0_ddata_leaves_no_duplicates(
    spb: Callable[..., Daemon], edges: Callable[..., Edge], migrated_pg: str
) -> None:
    daemon = spb()
    start_host(daemon)
    edge = edges()
    edge.nbirth()
    edge.send("DBIRTH", [encode_metric(name=f"s{k}", alias=k, datatype=DT["Int64"], value=0,
                                       timestamp_ms=ms(T0)) for k in range(4)],
              device="dev1")  # fmt: skip
    total = 2500
    done = threading.Event()
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            for i in range(1, total + 1):
                at = T0 + timedelta(milliseconds=i)
                edge.send("DDATA", [by_alias(k, "Int64", i * 10 + k, at) for k in range(4)],
                          device="dev1", timestamp=at)  # fmt: skip
                if i % 20 == 0:
                    time.sleep(0.05)  # about 400 messages a second: over 6 s in all
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    wait_rows(migrated_pg, 800, "ts > $1", T0)
    daemon.kill()
    assert not done.is_set(), "the stream ended before the kill"
    killed_at = count_rows(migrated_pg)
    start_host(daemon)
    assert not done.is_set(), "the stream ended before the restart: nothing to decode after it"
    assert done.wait(30)
    thread.join(5)
    assert not errors, errors
    last = T0 + timedelta(milliseconds=total)
    wait_rows(migrated_pg, 4, "ts = $1", last)
    settle(daemon)
    stored = query(
        migrated_pg, "SELECT sensor_id, ts, value, value_text FROM sensor_readings"
        " WHERE device_id = 'plant/edge1/dev1' AND ts > $1", T0,
    )  # fmt: skip
    keys = [(r[0], r[1]) for r in stored]
    assert len(keys) == len(set(keys))  # no duplicates
    for sensor, ts, value, text in stored:  # and each is what the node published
        i = (ts - T0) // timedelta(milliseconds=1)
        assert (value, text) == (float(i * 10 + int(sensor[1:])), None)
    assert len(stored) > killed_at
    assert rejections(migrated_pg) == []  # aliases decoded from the cache after the kill


# ---------------------------------------------------------------- 5. STATE


def test_state_birth_clean_death_and_will(spb: Callable[..., Daemon], mosquitto: Mosquitto) -> None:
    daemon = spb()
    started = time.time() * 1000
    born = start_host(daemon)  # waits for a retained online STATE with a fresh timestamp
    watch = Collector(mosquitto.port, STATE_TOPIC)
    try:
        wait_until(lambda: watch.count() >= 1, 5)
        first = watch.messages[0]
        assert (first.retain, first.qos) == (True, 1)  # retained, published at QoS 1
        assert json.loads(first.payload) == {"online": True, "timestamp": born}
    finally:
        watch.close()
    assert started - 1000 <= born <= time.time() * 1000

    # A clean stop: offline (with the time of the stop: see the next test).
    assert daemon.stop() == 0
    offline = retained(mosquitto.port, STATE_TOPIC)[STATE_TOPIC]
    assert offline["online"] is False
    assert retained(mosquitto.port, "ingestd/status") == {"ingestd/status": "offline"}

    # kill -9: the broker publishes the will, offline with this connection's birth timestamp.
    born = start_host(daemon)
    assert born >= offline["timestamp"]  # a new birth timestamp per connection
    assert retained(mosquitto.port, "ingestd/status") == {"ingestd/status": "online"}
    daemon.kill()
    wait_until(
        lambda: retained(mosquitto.port, STATE_TOPIC)[STATE_TOPIC]["online"] is False, 10
    )  # fmt: skip
    assert retained(mosquitto.port, STATE_TOPIC)[STATE_TOPIC] == {
        "online": False, "timestamp": born
    }  # fmt: skip
    assert retained(mosquitto.port, "ingestd/status") == {"ingestd/status": "offline"}


def test_clean_stop_publishes_offline_with_the_time_of_the_stop(
    spb: Callable[..., Daemon], edges: Callable[..., Edge], mosquitto: Mosquitto
) -> None:
    daemon = spb()
    born = start_host(daemon)
    edge = edges()
    edge.nbirth()
    stop = threading.Event()

    def traffic() -> None:  # an edge node that keeps publishing while ingestd stops
        i = 0
        while not stop.is_set():
            i += 1
            at = T0 + timedelta(milliseconds=i)
            edge.send("NDATA", [metric("temp", "Double", float(i), at)], timestamp=at)
            stop.wait(0.002)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        # Stop mid-stream: once ingestd is receiving the traffic.
        deadline = time.monotonic() + 10
        while daemon.metric("ingestd_messages_received_total") < 50 and time.monotonic() < deadline:
            time.sleep(0.02)  # poll until the deadline
        assert daemon.metric("ingestd_messages_received_total") >= 50
        stopping = time.time() * 1000
        assert daemon.stop() == 0
    finally:
        stop.set()
        thread.join(5)
    time.sleep(0.5)  # a will, if one comes, lands after the death
    offline = retained(mosquitto.port, STATE_TOPIC)[STATE_TOPIC]
    assert offline["online"] is False
    assert offline["timestamp"] != born, "the will, not the clean stop's death"
    assert stopping - 1000 <= offline["timestamp"] <= time.time() * 1000


def test_an_offline_state_for_our_host_id_is_corrected_while_up(
    spb: Callable[..., Daemon], mosquitto: Mosquitto, collect: Callable[[str], Collector]
) -> None:
    daemon = spb()
    born = start_host(daemon)
    watch = collect(STATE_TOPIC)
    wait_until(lambda: watch.count() >= 1, 5)  # the retained online
    forged = json.dumps({"online": False, "timestamp": int(time.time() * 1000)}).encode()
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    client.publish(STATE_TOPIC, forged, qos=1, retain=True).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()
    wait_until(lambda: watch.count() >= 3, 10, message=lambda: str(watch.messages))
    assert [json.loads(m.payload)["online"] for m in watch.messages[:3]] == [True, False, True]
    assert retained(mosquitto.port, STATE_TOPIC)[STATE_TOPIC] == {"online": True, "timestamp": born}
    assert daemon.ready()


# ---------------------------------------------------------------- 6. bad input


def test_bad_sparkplug_input_becomes_rejections_and_failed_events(
    spb: Callable[..., Daemon], edges: Callable[..., Edge], collect: Callable[[str], Collector],
    migrated_pg: str,
) -> None:  # fmt: skip
    daemon = spb(INGESTD_INGEST__MAX_PAYLOAD_BYTES="4096")
    start_host(daemon)
    failed = collect("ingestd/failed/#")
    commands = collect("spBv1.0/+/NCMD/#")
    edge = edges()
    edge.nbirth()
    good = encode_payload([metric("x", "Double", 1.0, T0)], seq=1, timestamp_ms=ms(T0))
    no_bdseq = encode_payload([metric("x", "Double", 1.0, T0)], seq=0, timestamp_ms=ms(T0))
    mixed_at = T0 + timedelta(seconds=5)
    mixed = encode_payload(
        [
            metric("good1", "Double", 1.5, mixed_at),
            Payload.Metric(name="liar", datatype=DT["Int32"], string_value="x",
                           timestamp=ms(mixed_at)),
            metric("good2", "String", "fine", mixed_at),
        ],
        seq=1, timestamp_ms=ms(mixed_at),
    )  # fmt: skip
    big = encode_payload([metric("huge", "String", "y" * 5000, T0)], seq=2, timestamp_ms=ms(T0))
    unknown_alias = encode_payload([by_alias(99, "Double", 1.0, T0)], seq=3, timestamp_ms=ms(T0))
    cases = [
        ("spBv1.0/plant/NDATA/edge1", b"\x12\x05ab", "sparkplug_malformed"),
        ("spBv1.0/plant/NDATA", good, "sparkplug_bad_topic"),
        ("spBv1.0/plant/DDATA/edge1", good, "sparkplug_bad_topic"),
        ("spBv1.0/plant/NDATA/edge1/dev1", good, "sparkplug_bad_topic"),
        ("spBv1.0/plant/NBIRTH/edge2", no_bdseq, "sparkplug_no_bdseq"),
        ("spBv1.0/plant/NDATA/edge3", good, "sparkplug_no_birth"),
        ("spBv1.0/plant/NDATA/edge1", mixed, "sparkplug_bad_metric"),
        ("spBv1.0/plant/NDATA/edge1", big, "payload_too_large"),
        ("spBv1.0/plant/NDATA/edge1", unknown_alias, "sparkplug_unknown_alias"),
    ]
    for topic, payload, _ in cases:
        edge.publish(topic, payload, qos=1)
    wait_until(
        lambda: len(rejections(migrated_pg)) >= len(cases), 15,
        message=lambda: str(rejections(migrated_pg)),
    )  # fmt: skip
    wait_until(lambda: failed.count() >= len(cases), 10, message=lambda: str(failed.topics()))
    settle(daemon)
    stored = rejections(migrated_pg)  # (batches commit concurrently: order is not kept)
    assert sorted((topic, reason) for topic, reason, _ in stored) == sorted(
        (topic, reason) for topic, _, reason in cases
    )
    [bad_metric] = [error for _, reason, error in stored if reason == "sparkplug_bad_metric"]
    assert "liar" in bad_metric
    assert "good" not in bad_metric
    # The good metrics of the mixed payload are stored, in the same message's outcome.
    assert {k: [r[:4] for r in v] for k, v in rows(migrated_pg, "plant/edge1").items()} == {
        "bdSeq": [(T0, 0.0, None, "good")],
        REBIRTH_METRIC: [(T0, 0.0, None, "good")],
        "good1": [(mixed_at, 1.5, None, "good")],
        "good2": [(mixed_at, None, "fine", "good")],
    }
    assert count_rows(migrated_pg) == 4
    events = [json.loads(m.payload) for m in failed.messages]
    # Under the edge node's id where the topic names one ("/" is not a topic-safe level).
    for message, event in zip(failed.messages, events, strict=True):
        if event["reason"] == "sparkplug_bad_topic":
            assert message.topic == "ingestd/failed/_unknown"
        elif event["reason"] != "payload_too_large":  # not decoded: the device is unknown
            node = event["topic"].split("/")[3]
            assert event["device_id"] == f"plant/{node}", event
            assert message.topic == f"ingestd/failed/plant_{node}", event
    assert all(m.topic.startswith("ingestd/failed/") for m in failed.messages)
    assert all(m.qos == 1 for m in failed.messages)
    assert sorted((e["reason"], e["topic"]) for e in events) == sorted(
        (reason, topic) for topic, _, reason in cases
    )
    sent = {(topic, reason): payload for topic, payload, reason in cases}
    for event in events:
        original = base64.b64decode(event["payload"])
        if event["reason"] == "payload_too_large":
            assert sent[event["topic"], event["reason"]].startswith(original)
        else:
            assert original == sent[event["topic"], event["reason"]], event["reason"]
    m = daemon.metrics()
    for _, _, reason in cases:
        expected = sum(1 for c in cases if c[2] == reason)
        assert m[f'ingestd_messages_rejected_total{{reason="{reason}"}}'] == expected, reason
    # Data before any birth and an unknown alias ask for a rebirth (edge3 and edge1).
    wait_until(lambda: commands.count() >= 2, 5, message=lambda: str(commands.topics()))
    assert sorted(commands.topics()) == ["spBv1.0/plant/NCMD/edge1", "spBv1.0/plant/NCMD/edge3"]
    assert daemon.ready()


def test_a_string_with_a_nul_character_is_one_bad_metric(
    spb: Callable[..., Daemon], edges: Callable[..., Edge], migrated_pg: str
) -> None:
    """PostgreSQL text cannot hold U+0000 (valid UTF-8 and protobuf): such a value or name
    is one bad metric, never a storage failure that loses the good metrics beside it."""
    daemon = spb()
    start_host(daemon)
    edge = edges()
    edge.nbirth()
    edge.send("DBIRTH", [metric("nul", "String", "a\x00b", T0), metric("ok", "Double", 1.0, T0),
                         metric("bad\x00name", "Double", 2.0, T0)], device="dev1")  # fmt: skip
    wait_until(lambda: rejections(migrated_pg), 15)
    settle(daemon)
    [(_, reason, error)] = rejections(migrated_pg)
    assert reason == "sparkplug_bad_metric"
    assert "nul" in error
    assert "bad" in error
    assert count_rows(migrated_pg) == 3  # bdSeq, Node Control/Rebirth, ok
    assert count_rows(migrated_pg, "sensor_id = 'ok'") == 1


# ---------------------------------------------------------------- 7. check-config


def test_check_config_refuses_a_sparkplug_source_with_a_shared_group(tmp_path: Path) -> None:
    path = tmp_path / "ingestd.toml"
    path.write_text(
        '[mqtt]\nshared_group = "ingestd"\n\n'
        '[[ingest.sources]]\ntopic = "spBv1.0/#"\nformat = "sparkplug"\ntemplate = "spBv1.0/#"\n'
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    result = subprocess.run(
        [str(INGESTD), "check-config", "-c", str(path)], cwd=tmp_path, env=clean,
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert "shared_group" in result.stderr
    assert "sparkplug" in result.stderr
    # ... and says how to scale out instead: groups per instance, each its own host_id.
    assert 'topic = "spBv1.0/line1/#"' in result.stderr
    assert "sparkplug.host_id" in result.stderr


# ---------------------------------------------------------------- the simulator as edge node


def test_simulator_started_before_ingestd_is_asked_to_rebirth_and_stored(
    spb: Callable[..., Daemon], mosquitto: Mosquitto, migrated_pg: str, tmp_path: Path
) -> None:
    """ingestd comes up after the simulator's births: its DDATA cannot be read until the
    NCMD it triggers makes the simulator publish NBIRTH and DBIRTHs again."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    simulator = subprocess.Popen(
        [str(INGESTD), "simulate", "--url", mosquitto.url, "--format", "sparkplug",
         "--devices", "2", "--metrics", "3", "--rate", "50", "--duration", "20",
         "--group", "line1", "--edge-node", "sim1", "--bdseq", "3"],
        cwd=tmp_path, env=clean, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    watcher = Collector(mosquitto.port, "spBv1.0/line1/DDATA/sim1/#")
    try:
        # Its births are gone by the time ingestd subscribes: it already sends data.
        deadline = time.monotonic() + 10
        while not watcher.count() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert watcher.count(), "the simulator sent no DDATA"
        watcher.close()
        daemon = spb()
        start_host(daemon)
        wait_rows(migrated_pg, 30, "device_id LIKE 'line1/sim1/%'")
        assert daemon.metric("ingestd_sparkplug_rebirth_requests_total") >= 1
        reasons = {r[1] for r in rejections(migrated_pg)}
        assert reasons <= {"sparkplug_no_birth"}
        sensors = {
            tuple(r)
            for r in query(migrated_pg, "SELECT DISTINCT device_id, sensor_id FROM sensor_readings")
        }
        assert {("line1/sim1/dev-001", "temp"), ("line1/sim1/dev-002", "vib")} <= sensors
        assert ("line1/sim1", "bdSeq") in sensors
        assert scalar(migrated_pg, "SELECT value FROM sensor_readings WHERE sensor_id = 'bdSeq'"
                      " LIMIT 1") == 3.0  # fmt: skip
    finally:
        simulator.terminate()
        simulator.wait(10)
