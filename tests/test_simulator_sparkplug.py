"""``ingestd simulate --format sparkplug``: the edge node's messages, and a run against mosquitto.

The broker tests subscribe to ``spBv1.0/#`` with paho and read what arrived with the
codec: NBIRTH (seq 0, bdSeq), DBIRTHs, DDATA by alias only, seq wrapping, a rebirth on
NCMD keeping bdSeq, and the will NDEATH when the node's connection is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge import simulator
from edge.readings import PayloadError
from edge.simulator import SimulationReport, SimulatorError, SimulatorOptions, simulate
from edge.sparkplug import (
    DATATYPES,
    REBIRTH_METRIC,
    SPARKPLUG_MALFORMED,
    Payload,
    bdseq,
    decode_payload,
    encode_metric,
    encode_payload,
    metric_value,
    parse_topic,
)
from edge.sparkplug_node import SparkplugNode, bad_sparkplug_variants, device_sensors
from tests.harness.proxy import TcpProxy
from tests.harness.servers import Mosquitto, wait_until_async

T0 = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


def sparkplug(**overrides: Any) -> SimulatorOptions:
    return SimulatorOptions(**{"format": "sparkplug", "seed": 1, **overrides})


@dataclass
class Seen:
    """One Sparkplug message as a host reads it."""

    topic: str
    verb: str
    device: str | None
    payload: Payload
    retain: bool = False
    qos: int = 0

    @property
    def seq(self) -> int | None:
        return self.payload.seq if self.payload.HasField("seq") else None


def read(topic: str, raw: bytes) -> Seen:
    parsed = parse_topic(topic)
    return Seen(topic, parsed.verb, parsed.device, decode_payload(raw))


def births_and_data(node: SparkplugNode, count: int, now: datetime = T0) -> list[Seen]:
    node.queue_births(now)
    return [read(m.topic, m.payload) for m in (node.next(now) for _ in range(count))]


# ------------------------------------------------------------------------- the node itself


def test_a_session_opens_with_nbirth_then_every_dbirth_then_ddata_by_alias() -> None:
    node = SparkplugNode(sparkplug(devices=3, metrics=5, bdseq=9))
    seen = births_and_data(node, 10)
    assert [(s.verb, s.device, s.seq) for s in seen[:4]] == [
        ("NBIRTH", None, 0),
        ("DBIRTH", "dev-001", 1),
        ("DBIRTH", "dev-002", 2),
        ("DBIRTH", "dev-003", 3),
    ]
    nbirth = seen[0].payload
    assert bdseq(nbirth) == 9
    by_name = {m.name: m for m in nbirth.metrics}
    assert by_name[REBIRTH_METRIC].datatype == DATATYPES["Boolean"]
    assert by_name[REBIRTH_METRIC].boolean_value is False
    for message in seen[:4]:  # BIRTH metrics: name, alias, datatype, timestamp
        for made in message.payload.metrics:
            assert made.name
            assert made.HasField("alias")
            assert made.datatype
            assert made.HasField("timestamp")
        assert message.payload.HasField("timestamp")
    assert [m.name for m in seen[1].payload.metrics] == [
        "temp",
        "vib",
        "pressure",
        "current",
        "temp2",
    ]
    for message in seen[4:]:  # DDATA: alias, timestamp and value only
        assert message.verb == "DDATA"
        for made in message.payload.metrics:
            assert not made.HasField("name")
            assert not made.HasField("datatype")
            assert made.HasField("alias")
            assert made.HasField("timestamp")
    assert [s.device for s in seen[4:10]] == ["dev-001", "dev-002", "dev-003"] * 2
    assert [s.seq for s in seen] == list(range(10))


def test_aliases_are_unique_across_the_node_and_data_decodes_through_the_births() -> None:
    node = SparkplugNode(sparkplug(devices=4, metrics=6))
    seen = births_and_data(node, 1 + 4 + 8)
    births = {(m.alias): m for s in seen[:5] for m in s.payload.metrics}
    assert len(births) == sum(len(s.payload.metrics) for s in seen[:5]) == 4 + 4 * 6
    for message in seen[5:]:
        for made in message.payload.metrics:
            birth = births[made.alias]
            value = metric_value(made, birth.datatype)
            assert value.value is not None
            assert value.text is None
            assert birth.name in {"temp", "vib", "pressure", "current", "temp2", "vib2"}


def test_seq_wraps_after_255_across_all_messages() -> None:
    node = SparkplugNode(sparkplug(devices=2))
    seqs = [s.seq for s in births_and_data(node, 600)]
    assert seqs == [n % 256 for n in range(600)]


def test_metric_timestamps_strictly_increase_per_device_even_with_a_stuck_clock() -> None:
    node = SparkplugNode(sparkplug(devices=2, metrics=3))
    seen = births_and_data(node, 3 + 400)
    stamps: dict[str | None, list[int]] = {}
    for message in seen:
        times = {m.timestamp for m in message.payload.metrics}
        assert len(times) == 1  # one instant per message
        stamps.setdefault(message.device, []).append(times.pop())
    for series in stamps.values():
        assert all(a < b for a, b in itertools.pairwise(series))


def test_a_rebirth_command_restarts_the_births_with_the_same_bdseq() -> None:
    node = SparkplugNode(sparkplug(devices=2, bdseq=42))
    before = births_and_data(node, 7)
    assert before[-1].seq == 6
    command = encode_metric(
        name=REBIRTH_METRIC, datatype=DATATYPES["Boolean"], value=True, timestamp_ms=1
    )
    assert node.handle_command(encode_payload([command], seq=None, timestamp_ms=1), T0)
    after = [read(m.topic, m.payload) for m in (node.next(T0) for _ in range(5))]
    assert [(s.verb, s.seq) for s in after] == [
        ("NBIRTH", 0),
        ("DBIRTH", 1),
        ("DBIRTH", 2),
        ("DDATA", 3),
        ("DDATA", 4),
    ]
    assert bdseq(after[0].payload) == bdseq(before[0].payload) == 42
    assert node.rebirths == 1


@pytest.mark.parametrize(
    "payload",
    [
        encode_payload(
            [
                encode_metric(
                    name=REBIRTH_METRIC, datatype=DATATYPES["Boolean"], value=False, timestamp_ms=1
                )
            ],
            seq=None,
            timestamp_ms=1,
        ),
        encode_payload(
            [
                encode_metric(
                    name="Node Control/Reboot",
                    datatype=DATATYPES["Boolean"],
                    value=True,
                    timestamp_ms=1,
                )
            ],
            seq=None,
            timestamp_ms=1,
        ),
        b"\x0f not protobuf",
        b"",
    ],
)
def test_other_commands_change_nothing(payload: bytes) -> None:
    node = SparkplugNode(sparkplug())
    births_and_data(node, 8)
    assert not node.handle_command(payload, T0)
    assert read(*_topic_payload(node.next(T0))).verb == "DDATA"


def test_a_rebirth_may_also_come_by_alias() -> None:
    node = SparkplugNode(sparkplug())
    births = births_and_data(node, 1)
    [rebirth] = [m for m in births[0].payload.metrics if m.name == REBIRTH_METRIC]
    command = encode_metric(
        alias=rebirth.alias, datatype=DATATYPES["Boolean"], value=True, timestamp_ms=1
    )
    assert node.handle_command(encode_payload([command], seq=None, timestamp_ms=1), T0)


def _topic_payload(message: simulator.Message) -> tuple[str, bytes]:
    return message.topic, message.payload


def test_the_will_and_a_clean_death_carry_bdseq_and_no_seq() -> None:
    node = SparkplugNode(sparkplug(bdseq=255, group="line-3", edge_node="gw-7"))
    death = node.death(T0)
    assert (death.topic, death.qos, death.readings, death.reason) == (
        "spBv1.0/line-3/NDEATH/gw-7",
        1,
        0,
        None,
    )
    for raw in (death.payload, node.death_payload()):
        payload = decode_payload(raw)
        assert not payload.HasField("seq")
        assert payload.HasField("timestamp")
        assert bdseq(payload) == 255


def test_bad_messages_are_malformed_protobuf_on_ddata_topics_and_use_no_seq() -> None:
    node = SparkplugNode(sparkplug(devices=3, bad_ratio=0.3))
    node.queue_births(T0)
    messages = [node.next(T0) for _ in range(4 + 2000)]
    bad = [m for m in messages if m.reason is not None]
    assert 0.25 < len(bad) / 2000 < 0.35
    for message in bad:
        assert (message.reason, message.readings, message.qos) == (SPARKPLUG_MALFORMED, 0, 0)
        assert parse_topic(message.topic).verb == "DDATA"
        with pytest.raises(PayloadError) as caught:
            decode_payload(message.payload)
        assert caught.value.reason == SPARKPLUG_MALFORMED
    good = [read(m.topic, m.payload) for m in messages if m.reason is None]
    assert [s.seq for s in good] == [n % 256 for n in range(len(good))]
    assert {m.payload for m in bad} >= set(bad_sparkplug_variants(b"x")[1:])


def test_every_bad_variant_fails_to_decode() -> None:
    node = SparkplugNode(sparkplug())
    births_and_data(node, 5)
    for payload in bad_sparkplug_variants(node.next(T0).payload):
        with pytest.raises(PayloadError):
            decode_payload(payload)


def test_readings_count_every_birth_and_data_metric() -> None:
    node = SparkplugNode(sparkplug(devices=2, metrics=7))
    node.queue_births(T0)
    messages = [node.next(T0) for _ in range(6)]
    assert [m.readings for m in messages] == [4, 7, 7, 7, 7, 7]
    assert all(m.qos == 0 for m in messages)


def test_device_sensors_name_metrics_by_kind() -> None:
    assert [s.sensor_id for s in device_sensors(9)] == [
        "temp", "vib", "pressure", "current", "temp2", "vib2", "pressure2", "current2", "temp3",
    ]  # fmt: skip


def test_the_node_is_deterministic_given_a_seed() -> None:
    def run(seed: int) -> list[bytes]:
        node = SparkplugNode(sparkplug(seed=seed, bad_ratio=0.2))
        node.queue_births(T0)
        return [node.next(T0 + timedelta(seconds=i)).payload for i in range(50)]

    assert run(3) == run(3)
    assert run(3) != run(4)


@pytest.mark.parametrize(
    "bad",
    [
        {"group": ""},
        {"group": "a/b"},
        {"edge_node": "e+"},
        {"edge_node": "#"},
        {"metrics": 0},
        {"bdseq": 256},
        {"bdseq": -1},
        {"batch": 2},
    ],
)
def test_options_reject_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"must|needs"):
        sparkplug(**bad)


def test_cli_arguments_map_onto_options() -> None:
    parser = argparse.ArgumentParser()
    simulator.add_arguments(parser)
    argv = "--format sparkplug --group g1 --edge-node n1 --metrics 9 --bdseq 17"
    args = parser.parse_args(argv.split(" "))
    options = simulator.options_from_args(args)
    assert (options.format, options.group, options.edge_node, options.metrics, options.bdseq) == (
        "sparkplug",
        "g1",
        "n1",
        9,
        17,
    )


def test_the_sparkplug_simulator_imports_nothing_of_the_daemon() -> None:
    probe = (
        "import sys, edge.simulator, edge.sparkplug_node\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'daemon', 'agents', 'db'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------- against mosquitto


class Host:
    """A paho subscriber on ``spBv1.0/#`` that reads every message with the codec."""

    def __init__(self, port: int) -> None:
        self.seen: list[Seen] = []
        self.rejected: list[str] = []  # reasons, for what the codec refused
        self._changed = threading.Condition()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("spBv1.0/#", qos=1)
        self.client.loop_start()
        assert subscribed.wait(5), "no SUBACK"

    def _on_message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            seen = read(message.topic, bytes(message.payload))
        except PayloadError as exc:
            with self._changed:
                self.rejected.append(exc.reason)
            return
        if seen.verb == "NCMD":  # its own rebirth requests
            return
        seen.retain, seen.qos = bool(message.retain), message.qos
        with self._changed:
            self.seen.append(seen)
            self._changed.notify_all()

    def wait_for(self, verb: str, count: int = 1, timeout: float = 5.0) -> list[Seen]:
        """Every message up to and including the ``count``-th ``verb``."""
        with self._changed:

            def found() -> bool:
                return sum(s.verb == verb for s in self.seen) >= count

            assert self._changed.wait_for(found, timeout), (
                f"{count} {verb} not seen in {timeout}s: {Counter(s.verb for s in self.seen)}"
            )
            ends = [i for i, s in enumerate(self.seen) if s.verb == verb]
            return self.seen[: ends[count - 1] + 1]

    def snapshot(self) -> list[Seen]:
        with self._changed:
            return list(self.seen)

    def rebirth(self, group: str, node: str) -> None:
        """What a host sends: NCMD, QoS 0, not retained, a timestamp and no seq."""
        metric = encode_metric(
            name=REBIRTH_METRIC, datatype=DATATYPES["Boolean"], value=True, timestamp_ms=1
        )
        payload = encode_payload([metric], seq=None, timestamp_ms=1)
        self.client.publish(f"spBv1.0/{group}/NCMD/{node}", payload, qos=0).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def host(mosquitto: Mosquitto) -> Iterator[Host]:
    client = Host(mosquitto.port)
    yield client
    client.close()


def check_session(seen: list[Seen], devices: int) -> None:
    """NBIRTH with seq 0, then a DBIRTH per device, then DDATA; seq continuous mod 256."""
    assert seen[0].verb == "NBIRTH"
    assert [s.verb for s in seen[1 : 1 + devices]] == ["DBIRTH"] * devices
    assert {s.verb for s in seen[1 + devices :]} <= {"DDATA", "NDEATH"}
    data = [s for s in seen if s.verb != "NDEATH"]
    assert [s.seq for s in data] == [n % 256 for n in range(len(data))]


async def test_a_run_publishes_a_whole_session_and_reports_it(
    mosquitto: Mosquitto, host: Host
) -> None:
    options = sparkplug(url=mosquitto.url, devices=3, metrics=4, count=300, rate=0.0, bdseq=5)
    report = await simulate(options)
    seen = await asyncio.to_thread(host.wait_for, "NDEATH")  # the clean stop's own, last
    check_session(seen, devices=3)
    assert seen[-1].verb == "NDEATH"
    assert not seen[-1].payload.HasField("seq")
    assert bdseq(seen[0].payload) == bdseq(seen[-1].payload) == 5
    assert max(s.seq or 0 for s in seen) == 255  # 300 messages: seq wrapped
    assert all(not s.retain and s.qos == 0 for s in seen[:-1])  # BIRTH and DATA at QoS 0
    assert seen[-1].qos == 1
    ddata = [s for s in seen if s.verb == "DDATA"]
    assert all(not m.HasField("name") for s in ddata for m in s.payload.metrics)
    assert report.published == len(seen) == 301  # --count messages and the NDEATH
    assert report.readings == sum(len(s.payload.metrics) for s in seen if s.verb != "NDEATH")
    assert (report.bad, report.good) == (0, 301)


def test_the_cli_reports_what_it_published(
    mosquitto: Mosquitto, host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    simulator.add_arguments(parser)
    argv = f"--url {mosquitto.url} --format sparkplug --count 120 --rate 0 --bad-ratio 0.2"
    args = parser.parse_args([*argv.split(), "--seed", "4", "--devices", "2"])
    code = simulator.run(args)
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    report = json.loads(out)
    seen_raw = host.wait_for("NDEATH")
    assert report["published"] == 121
    assert 10 < report["bad"] < 45
    assert report["bad_by_reason"] == {SPARKPLUG_MALFORMED: report["bad"]}
    assert host.rejected == [SPARKPLUG_MALFORMED] * report["bad"]
    check_session(seen_raw, devices=2)
    assert len(seen_raw) + report["bad"] == report["published"]
    good = [s for s in seen_raw if s.verb != "NDEATH"]
    assert report["readings"] == sum(len(s.payload.metrics) for s in good)


def data_after_rebirth(seen: list[Seen]) -> int:
    births = [i for i, s in enumerate(seen) if s.verb == "NBIRTH"]
    return sum(s.verb == "DDATA" for s in seen[births[1] :]) if len(births) > 1 else 0


async def test_a_rebirth_request_gets_nbirth_with_the_same_bdseq(
    mosquitto: Mosquitto, host: Host
) -> None:
    stop = asyncio.Event()
    options = sparkplug(url=mosquitto.url, devices=2, rate=300.0, bdseq=77)
    run = asyncio.create_task(simulate(options, stop))
    try:
        first = await asyncio.to_thread(host.wait_for, "DDATA", 5)
        await asyncio.to_thread(host.rebirth, "plant", "edge1")
        await asyncio.to_thread(host.wait_for, "NBIRTH", 2)
        await wait_until_async(lambda: data_after_rebirth(host.snapshot()) >= 4, 5)
    finally:
        stop.set()
        report = await asyncio.wait_for(run, 5)
    seen = await asyncio.to_thread(host.wait_for, "NDEATH")
    again = next(i for i, s in enumerate(seen) if i > 0 and s.verb == "NBIRTH")
    check_session(seen[:again], devices=2)
    check_session(seen[again:], devices=2)
    assert bdseq(first[0].payload) == bdseq(seen[again].payload) == bdseq(seen[-1].payload) == 77
    assert report.published == len(seen)


async def test_killing_the_connection_delivers_the_will_ndeath_with_the_bdseq(
    mosquitto: Mosquitto, host: Host
) -> None:
    with TcpProxy(mosquitto.port) as proxy:
        options = sparkplug(url=f"mqtt://127.0.0.1:{proxy.port}", devices=2, rate=200.0, bdseq=33)
        run = asyncio.create_task(simulate(options))
        try:
            births = await asyncio.to_thread(host.wait_for, "DDATA", 3)
            await asyncio.to_thread(proxy.drop)  # a reset, never a DISCONNECT
            [death] = [
                s for s in await asyncio.to_thread(host.wait_for, "NDEATH") if s.verb == "NDEATH"
            ]
        finally:
            with pytest.raises(SimulatorError, match="lost") as caught:
                await asyncio.wait_for(run, 5)
    assert death.topic == "spBv1.0/plant/NDEATH/edge1"
    assert (death.qos, death.retain, death.seq) == (1, False, None)
    assert bdseq(death.payload) == bdseq(births[0].payload) == 33
    report = caught.value.report
    assert isinstance(report, SimulationReport)
    assert report.published >= 6
