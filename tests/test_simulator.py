"""The edge simulator: signals, good and bad payloads, pacing, and a run against mosquitto."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edge import simulator
from edge.codecs import decode_json, decode_value
from edge.errors import IngestdError
from edge.readings import PayloadError, Reading
from edge.signals import DEVICE_SENSORS, Pressure, Series, device_ids, make_series
from edge.simulator import (
    JSON_BAD_REASONS,
    VALUE_BAD_REASONS,
    MessageFactory,
    SimulationReport,
    SimulatorError,
    SimulatorOptions,
    bad_variants,
    good_payload,
    simulate,
)
from edge.topics import TopicTemplate
from tests.harness.servers import Mosquitto, free_port

T0 = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
TEMPLATE = TopicTemplate.parse("sensors/{device_id}/{sensor_id}", "sensors/+/+")


def decode(
    payload: bytes, fmt: str, fields: dict[str, str], received_at: datetime
) -> list[Reading]:
    """What the daemon's ``fmt`` decoder makes of ``payload``."""
    return (decode_json if fmt == "json" else decode_value)(payload, fields, received_at)


def clock(seconds: int, step: float = 1.0) -> list[datetime]:
    """``seconds / step`` timestamps from T0, ``step`` apart."""
    return [T0 + timedelta(seconds=i * step) for i in range(int(seconds / step))]


def run_series(series: Series, times: list[datetime]) -> list[float]:
    return [series.next(now).value for now in times]


def fields_of(series: Series) -> dict[str, str]:
    return {"device_id": series.device_id, "sensor_id": series.sensor_id}


# --------------------------------------------------------------------------------- signals


def test_device_ids_are_zero_padded_and_widen_past_999() -> None:
    assert device_ids(3) == ["dev-001", "dev-002", "dev-003"]
    assert device_ids(1200, "press")[-1] == "press-1200"
    assert device_ids(1200)[0] == "dev-0001"


def test_series_cover_every_sensor_of_every_device() -> None:
    series = make_series(device_ids(2), seed=1)
    assert [(s.device_id, s.sensor_id, s.unit) for s in series[:4]] == [
        ("dev-001", "temp", "degC"),
        ("dev-001", "vib", "mm/s"),
        ("dev-001", "pressure", "bar"),
        ("dev-001", "current", "A"),
    ]
    assert len(series) == 2 * len(DEVICE_SENSORS)


def test_signals_are_deterministic_given_a_seed() -> None:
    times = clock(600)
    runs = [[run_series(s, times) for s in make_series(device_ids(3), seed)] for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_a_series_does_not_depend_on_how_many_devices_there_are() -> None:
    times = clock(60)
    few = make_series(device_ids(1), seed=3)[0]
    many = make_series(device_ids(50), seed=3)[0]
    assert run_series(few, times) == run_series(many, times)


def test_signals_stay_in_plausible_ranges_over_hours() -> None:
    values = {
        s.sensor_id: run_series(s, clock(4 * 3600, step=2.0))
        for s in make_series(["dev-001"], seed=11)
    }
    assert all(40.0 < v < 80.0 for v in values["temp"])
    assert max(values["temp"]) - min(values["temp"]) > 1.0  # it drifts
    assert all(0.0 < v < 25.0 for v in values["vib"])
    assert max(values["vib"]) > 2 * statistics.median(values["vib"])  # bursts happen
    assert all(3.5 < v < 7.7 for v in values["pressure"])
    assert len({round(v) for v in values["pressure"]}) >= 2  # steps between setpoints
    assert all(0.0 <= v < 30.0 for v in values["current"])


def test_pressure_holds_each_setpoint_with_small_noise() -> None:
    signal = Pressure(random.Random(5))
    values = [signal.sample(t * 0.5) for t in range(2000)]
    nearest = [min(Pressure.SETPOINTS, key=lambda p, v=v: abs(p - v)) for v in values]
    assert all(abs(v - p) < 0.1 for v, p in zip(values, nearest, strict=True))
    changes = sum(a != b for a, b in itertools.pairwise(nearest))
    assert 2 <= changes < 100  # piecewise constant: few steps, not noise


def test_timestamps_strictly_increase_per_series_even_with_a_stuck_or_stepped_clock() -> None:
    series = make_series(["dev-001"], seed=1)[0]
    times = [T0, T0, T0, T0 - timedelta(seconds=5), T0 + timedelta(microseconds=2), T0]
    samples = [series.next(now) for now in times]
    stamps = [s.ts for s in samples]
    assert all(a < b for a, b in itertools.pairwise(stamps))
    assert stamps[:3] == [T0, T0 + timedelta(microseconds=1), T0 + timedelta(microseconds=2)]
    assert [s.seq for s in samples] == list(range(len(times)))


# -------------------------------------------------------------------------------- payloads


@pytest.mark.parametrize("batch", [1, 3])
def test_good_json_payloads_decode_to_the_series_readings(batch: int) -> None:
    series = make_series(["dev-001"], seed=2)[1]
    payload = good_payload("json", series, T0, batch)
    readings = decode(payload, "json", fields_of(series), datetime.now(UTC))
    assert len(readings) == batch
    assert [r.seq for r in readings] == list(range(batch))
    assert [r.ts for r in readings] == [T0 + timedelta(microseconds=i) for i in range(batch)]
    assert {(r.device_id, r.sensor_id, r.unit) for r in readings} == {("dev-001", "vib", "mm/s")}


def test_good_value_payload_is_the_bare_number() -> None:
    series = make_series(["dev-001"], seed=2)[0]
    payload = good_payload("value", series, T0)
    [reading] = decode(payload, "value", fields_of(series), T0)
    assert payload == repr(reading.value).encode()
    assert 40.0 < reading.value < 80.0


@pytest.mark.parametrize(
    ("fmt", "reason"),
    [("json", r) for r in JSON_BAD_REASONS] + [("value", r) for r in VALUE_BAD_REASONS],
)
def test_every_bad_variant_is_rejected_with_its_stated_reason(fmt: str, reason: str) -> None:
    series = make_series(["dev-007"], seed=4)[2]
    for seed in range(5):
        variants = bad_variants(fmt, reason, series, T0, random.Random(seed))  # type: ignore[arg-type]
        assert variants
        for payload in variants:
            with pytest.raises(PayloadError) as caught:
                decode(payload, fmt, fields_of(series), T0)
            assert caught.value.reason == reason, payload


@pytest.mark.parametrize("fmt", ["json", "value"])
def test_factory_mixes_in_the_requested_share_of_bad_messages(fmt: str) -> None:
    options = SimulatorOptions(devices=3, bad_ratio=0.3, seed=9, format=fmt)  # type: ignore[arg-type]
    factory = MessageFactory(options)
    messages = [factory.next(T0) for _ in range(3000)]
    reasons = Counter(m.reason for m in messages if m.reason is not None)
    assert 0.25 < sum(reasons.values()) / len(messages) < 0.35
    assert set(reasons) == set(JSON_BAD_REASONS if fmt == "json" else VALUE_BAD_REASONS)
    for message in messages:
        fields = TEMPLATE.match(message.topic)
        assert fields is not None
        if message.reason is None:
            assert len(decode(message.payload, fmt, fields, T0)) == message.readings == 1
        else:
            with pytest.raises(PayloadError) as caught:
                decode(message.payload, fmt, fields, T0)
            assert caught.value.reason == message.reason
            assert message.readings == 0


def test_factory_is_deterministic_and_round_robin() -> None:
    def run(seed: int) -> list[tuple[str, bytes, str | None]]:
        factory = MessageFactory(SimulatorOptions(devices=2, bad_ratio=0.2, seed=seed))
        return [(m.topic, m.payload, m.reason) for m in (factory.next(T0) for _ in range(200))]

    first = run(1)
    assert first == run(1)
    assert first != run(2)
    assert [topic for topic, _, _ in first[:5]] == [
        "sensors/dev-001/temp",
        "sensors/dev-001/vib",
        "sensors/dev-001/pressure",
        "sensors/dev-001/current",
        "sensors/dev-002/temp",
    ]


def test_good_readings_never_collide_on_the_unique_key() -> None:
    factory = MessageFactory(SimulatorOptions(devices=2, batch=4, seed=1))
    keys = [
        (r.device_id, r.sensor_id, r.ts)
        for m in (factory.next(T0) for _ in range(400))
        for r in decode(m.payload, "json", TEMPLATE.match(m.topic) or {}, T0)
    ]
    assert len(keys) == 1600 == len(set(keys))


# ------------------------------------------------------------------ options, pacing, report


@pytest.mark.parametrize(
    "bad",
    [
        {"devices": 0},
        {"rate": -1.0},
        {"bad_ratio": 1.5},
        {"qos": 3},
        {"format": "xml"},
        {"batch": 0},
        {"batch": 2, "format": "value"},
        {"url": "http://broker:1883"},
        {"topic_prefix": "sensors/#"},
        {"count": -1},
    ],
)
def test_options_reject_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"must|needs"):
        SimulatorOptions(**bad)


def test_pacer_spreads_messages_and_forgives_an_old_backlog() -> None:
    pacer = simulator._Pacer(rate=100.0, start=10.0)
    assert pacer.due(10.0) == 1  # the first message goes at once
    pacer.sent = 1
    assert pacer.due(10.005) == 0
    assert pacer.delay(10.005) == pytest.approx(0.005)
    assert pacer.due(10.105) == 10
    assert pacer.due(15.0) == 101  # five seconds stalled: only one second is caught up
    assert simulator._Pacer(rate=0.0, start=0.0).due(0.0) > 1


def test_report_counts_good_readings_and_bad_reasons() -> None:
    report = SimulationReport()
    for message in (
        simulator.Message("t", b"", readings=3),
        simulator.Message("t", b"", readings=0, reason="bad_type"),
        simulator.Message("t", b"", readings=0, reason="bad_type"),
    ):
        report.count(message)
    data = json.loads(report.snapshot(2.0).to_json())
    assert data == {
        "published": 3,
        "good": 1,
        "readings": 3,
        "bad": 2,
        "bad_by_reason": {"bad_type": 2},
        "seconds": 2.0,
        "rate": 1.5,
    }


def parse_cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    simulator.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_arguments_map_onto_options() -> None:
    args = parse_cli("--devices", "2", "--rate", "0", "--count", "7", "--duration", "1.5")
    options = simulator.options_from_args(args)
    assert (options.devices, options.rate, options.count, options.duration) == (2, 0.0, 7, 1.5)
    args = parse_cli("--format", "value", "--seed", "3", "--qos", "0", "--bad-ratio", "0.5")
    options = simulator.options_from_args(args)
    assert (options.format, options.seed, options.qos, options.bad_ratio) == ("value", 3, 0, 0.5)
    args = parse_cli("--topic-prefix", "plant/a", "--batch", "4", "--client-id", "sim-1")
    options = simulator.options_from_args(args)
    assert (options.topic_prefix, options.batch, options.client_id) == ("plant/a", 4, "sim-1")
    assert simulator.options_from_args(parse_cli()) == SimulatorOptions()


def test_cli_reports_an_unreachable_broker(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    code = simulator.run(parse_cli("--url", url, "--count", "5", "--connect-timeout", "0.3"))
    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert "cannot reach the MQTT broker" in err
    assert "Connection refused" in err


def test_cli_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert simulator.run(parse_cli("--devices", "0")) == 2
    assert "devices must be at least 1" in capsys.readouterr().err


def test_the_simulator_imports_nothing_of_the_daemon() -> None:
    probe = (
        "import sys, edge.simulator\n"
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


def test_every_exported_name_is_importable_and_errors_are_ingestd_errors() -> None:
    assert all(hasattr(simulator, name) for name in simulator.__all__)
    assert issubclass(SimulatorError, IngestdError)


# ------------------------------------------------------------------------- against a broker


class Subscriber:
    """A paho subscriber keeping every message of a filter, with a condition to wait on."""

    def __init__(self, port: int, topic_filter: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic_filter, qos=1)
        self.client.loop_start()
        assert self._subscribed.wait(5), "subscriber got no SUBACK"

    def _on_message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._changed:
            self.messages.append((message.topic, message.payload))
            self._changed.notify_all()

    def wait_for_topic(self, topic: str, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        """Every message received before the first one on ``topic``."""
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(t == topic for t, _ in self.messages), timeout
            )
            assert found, f"nothing on {topic} within {timeout}s ({len(self.messages)} messages)"
            return self.messages[: [t for t, _ in self.messages].index(topic)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscriber(mosquitto: Mosquitto) -> Iterator[Subscriber]:
    client = Subscriber(mosquitto.port, "sim/#")
    yield client
    client.close()


def mark_the_end(port: int, topic: str) -> None:
    """Publish a sentinel after the simulator's messages: mosquitto delivers in order, so
    once the subscriber has it, it has everything the simulator got acknowledged."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, b"end", qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def tally(messages: list[tuple[str, bytes]], fmt: str) -> dict[str, Any]:
    """What the daemon would make of ``messages``: the report's counts, from the wire.

    Also checks each series' good readings carry seq 0, 1, 2... in order.
    """
    template = TopicTemplate.parse("sim/{device_id}/{sensor_id}")
    good = readings = 0
    reasons: Counter[str] = Counter()
    seqs: dict[str, list[int | None]] = {}
    for topic, payload in messages:
        try:
            decoded = decode(payload, fmt, template.match(topic) or {}, T0)
        except PayloadError as exc:
            reasons[exc.reason] += 1
            continue
        good += 1
        readings += len(decoded)
        seqs.setdefault(topic, []).extend(r.seq for r in decoded)
    if fmt == "json":
        assert all(s == list(range(len(s))) for s in seqs.values()), seqs
    return {
        "published": len(messages),
        "good": good,
        "readings": readings,
        "bad": sum(reasons.values()),
        "bad_by_reason": dict(reasons),
    }


def test_cli_publishes_exactly_what_it_reports(
    mosquitto: Mosquitto, subscriber: Subscriber, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = f"--url {mosquitto.url} --count 200 --rate 0 --bad-ratio 0.25 --seed 5 --devices 3"
    code = simulator.run(parse_cli(*argv.split(), "--topic-prefix", "sim"))
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    [line] = out.splitlines()
    report = json.loads(line)
    mark_the_end(mosquitto.port, "sim/end/end")
    received = subscriber.wait_for_topic("sim/end/end")
    assert report["published"] == 200
    assert 20 < report["bad"] < 80
    wire = tally(received, "json")
    assert {k: report[k] for k in wire} == wire


async def test_simulate_batches_and_paces(mosquitto: Mosquitto, subscriber: Subscriber) -> None:
    options = SimulatorOptions(
        url=mosquitto.url, devices=2, rate=400.0, count=100, batch=5, topic_prefix="sim", seed=1
    )
    report = await simulate(options)
    assert (report.published, report.good, report.readings, report.bad) == (100, 100, 500, 0)
    assert 0.24 < report.seconds < 2.0  # 100 messages at 400/s take about a quarter second
    await asyncio.to_thread(mark_the_end, mosquitto.port, "sim/end/end")
    received = await asyncio.to_thread(subscriber.wait_for_topic, "sim/end/end")
    assert tally(received, "json")["readings"] == 500


@pytest.fixture
def frequent_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """on_progress every 20 ms instead of every second, so tests can react to progress."""
    monkeypatch.setattr(simulator, "_PROGRESS_EVERY", 0.02)


@pytest.mark.usefixtures("frequent_progress")
async def test_stop_event_ends_an_open_ended_run(mosquitto: Mosquitto) -> None:
    stop = asyncio.Event()
    progress: list[SimulationReport] = []

    def on_progress(report: SimulationReport) -> None:
        progress.append(report)
        if report.published >= 300:
            stop.set()

    options = SimulatorOptions(url=mosquitto.url, rate=2000.0, bad_ratio=0.1)
    report = await asyncio.wait_for(simulate(options, stop, on_progress), 5)
    assert stop.is_set()
    assert report.published >= 300
    assert report.published == report.good + report.bad == report.readings + report.bad
    assert progress
    assert all(p.published <= report.published for p in progress)


async def test_waits_for_a_broker_that_is_still_starting(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "late")
    options = SimulatorOptions(url=broker.url, count=10, rate=0.0, connect_timeout=8.0)
    run = asyncio.create_task(simulate(options))
    try:
        await asyncio.to_thread(broker.start)  # the simulator is already retrying
        report = await asyncio.wait_for(run, 8)
    finally:
        await asyncio.to_thread(broker.stop)
    assert report.published == 10


@pytest.mark.usefixtures("frequent_progress")
async def test_a_broker_dying_mid_run_is_an_error_with_a_partial_report(
    mosquitto: Mosquitto,
) -> None:
    underway = asyncio.Event()

    def on_progress(report: SimulationReport) -> None:
        if report.published >= 50:
            underway.set()

    run = asyncio.create_task(
        simulate(SimulatorOptions(url=mosquitto.url, rate=1000.0), None, on_progress)
    )
    await asyncio.wait_for(underway.wait(), 5)
    await asyncio.to_thread(mosquitto.kill)
    with pytest.raises(SimulatorError, match="lost") as caught:
        await asyncio.wait_for(run, 5)
    assert caught.value.report is not None
    assert caught.value.report.published >= 50
