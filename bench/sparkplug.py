"""The ``sparkplug-ddata`` scenario: a flood of Sparkplug B DDATA (10 metrics each, by alias)
into a running ingestd, side by side with the JSON drain (``ingestd``); and the decode
micro-benchmark of ``SparkplugHost.decode``.

    python -m bench.sparkplug publish --port P --metrics-port M --packets FILE [--ahead K]

Why a flood and not a queued backlog: the Sparkplug host has its own clean-session MQTT
connection (client id ``<mqtt.client_id>-spb``), so nothing is queued for it while ingestd is
offline. The scenario starts ingestd with one Sparkplug source (a TOML config the bench
writes), waits until its STATE (``spBv1.0/STATE/ingestd``, retained) reads online, then runs
the publisher, a process of its own so it does not share the benchmark's GIL:

1. every packet is pre-built by the bench (``workload``) before the clock starts: an NBIRTH
   (seq 0, bdSeq, names, aliases, datatypes) and one DBIRTH per device (100), then N DDATA of
   10 numeric metrics (Float, Double, Int32) by alias only (no name, no datatype: both are
   the birth's), ``seq`` running on from the births and wrapping 255 -> 0, each message one
   millisecond after its device's previous one, so every (device, metric, ts) is a new row;
2. the publisher sends the births as QoS 0 PUBLISHes on a raw socket and waits until ingestd
   stored their readings (``/metrics``);
3. it stamps the wall clock (the clock starts here, at the first DDATA) and sends the DDATA
   at QoS 0, as the specification has edge nodes do. A QoS 0 flood is dropped wherever a
   queue overflows, so the publisher paces itself against ingestd's progress: it keeps at
   most ``--ahead`` (2,000) messages beyond what ingestd has received
   (``ingestd_messages_received_total``, scraped every ``POLL_SECONDS``), i.e. the broker and
   the two sockets never hold more than that; ingestd's own window (4,000 messages, 50,000
   readings) fills behind it as usual.

The clock stops when the bench's poll sees every reading stored (as in the other drains).
At the end: every reading stored exactly once (``count(*)``, distinct keys, ``sum(seq)``
against the payloads' seq, ``ingestd_readings_stored_total``, no duplicates), no seq error
and no rebirth request (either would mean a lost or reordered message), nothing rejected,
nothing dropped in the broker log.

``decode_benchmark`` times ``SparkplugHost.decode`` alone, in the bench process before the
servers of the run start: a host on a temp state dir is fed the NBIRTH and DBIRTHs, then
rounds of pre-built 10-metric DDATA ``RawMessage``s (a multiple of 256, so seq runs on
across rounds); the figure is the median round's time per metric.
"""

from __future__ import annotations

import argparse
import functools
import json
import pickle
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import orjson
import paho.mqtt.client as mqtt

from bench import load
from bench.base import Row, Scenario, ScenarioError, check_readings
from bench.env import REPO, BenchEnv, CpuMeter, cpu_seconds, metrics, peak_rss_mb
from bench.ingestd_process import DaemonProcess, wait_stored
from edge.sparkplug import DATATYPES, encode_metric, encode_payload

GROUP = "bench"
EDGE_NODE = "edge1"
DEVICES = 100
HOST_ID = "ingestd"  # sparkplug.host_id's default
STATE_TOPIC = f"spBv1.0/STATE/{HOST_ID}"
BDSEQ = 7
# The 10 metrics of every device: (name, datatype). Aliases are unique per node: the node's
# own metrics 1-3, device d's from 100 + 10 d.
METRICS = (
    ("Temperature", "Float"), ("Pressure", "Float"), ("Flow", "Float"), ("Level", "Float"),
    ("Vibration", "Double"), ("Current", "Double"), ("Voltage", "Double"), ("Power", "Double"),
    ("Speed", "Int32"), ("Count", "Int32"),
)  # fmt: skip
PER_MESSAGE = len(METRICS)
NODE_METRICS = (
    ("bdSeq", 1, "UInt64", BDSEQ),
    ("Node Control/Rebirth", 2, "Boolean", False),
    ("Node Control/Scan Rate", 3, "Int64", 1000),
)
BASE_MS = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)  # births; DDATA after it
AHEAD_MESSAGES = 2_000  # publisher: at most this many DDATA beyond ingestd's received count
POLL_SECONDS = 0.02  # publisher: /metrics scrape interval while it waits
WRITE_MESSAGES = 500  # publisher: DDATA per sendall()
DECODE_ROUNDS = 5
DECODE_MESSAGES = 256 * 20  # per round: a multiple of 256, so seq runs on across rounds

CONFIG_TOML = f"""\
# written by bench/sparkplug.py: one Sparkplug source, everything else from INGESTD_* / defaults
[[ingest.sources]]
topic = "spBv1.0/#"
format = "sparkplug"
template = "spBv1.0/#"

[sparkplug]
host_id = "{HOST_ID}"
"""


# ---------------------------------------------------------------------------- workload


def _alias(device: int, j: int) -> int:
    return 100 + 10 * device + j


def _value(kind: str, i: int, j: int) -> float | int:
    if kind == "Int32":
        return (i * 7 + j) % 100_000 - 50_000
    return 20.0 + ((i * 13 + j * 101) % 997) / 10.0


def qos0_packet(topic: str, payload: bytes) -> bytes:
    """MQTT 3.1.1 PUBLISH at QoS 0 (no packet id)."""
    body = load._string(topic) + payload
    return b"\x30" + load._varint(len(body)) + body


@dataclass(frozen=True)
class Workload:
    """The pre-built packets of one scenario run and what they should store."""

    births: tuple[tuple[str, bytes], ...]  # (topic, payload): NBIRTH, then the DBIRTHs
    ddata: tuple[tuple[str, bytes], ...]  # (topic, payload)
    birth_readings: int
    seq_sum: int  # sum of the payload seq over every reading (births included)

    @property
    def messages(self) -> int:
        return len(self.ddata)

    @property
    def readings(self) -> int:
        """DDATA readings: what the clock measures."""
        return len(self.ddata) * PER_MESSAGE

    @property
    def total_readings(self) -> int:
        return self.birth_readings + self.readings

    @functools.cached_property
    def birth_packets(self) -> bytes:
        return b"".join(qos0_packet(t, p) for t, p in self.births)

    @functools.cached_property
    def ddata_packets(self) -> tuple[bytes, ...]:
        return tuple(qos0_packet(t, p) for t, p in self.ddata)

    def payload_bytes(self) -> tuple[float, int]:
        sizes = [len(p) for _, p in self.ddata]
        return sum(sizes) / len(sizes), max(sizes)


def _topic(verb: str, device: int | None = None) -> str:
    base = f"spBv1.0/{GROUP}/{verb}/{EDGE_NODE}"
    return base if device is None else f"{base}/dev-{device:03d}"


@functools.lru_cache(maxsize=2)
def workload(messages: int) -> Workload:
    """NBIRTH (seq 0), DBIRTHs (seq 1..100), then ``messages`` DDATA round-robin over the
    devices, by alias only, seq running on (mod 256); all built with ``edge.sparkplug``'s
    ``encode_metric`` / ``encode_payload``."""
    types = {kind: DATATYPES[kind] for _, kind in METRICS}
    births: list[tuple[str, bytes]] = []
    seq = 0
    seq_sum = 0
    node = [
        encode_metric(name=n, alias=a, datatype=DATATYPES[k], value=v, timestamp_ms=BASE_MS)
        for n, a, k, v in NODE_METRICS
    ]
    births.append((_topic("NBIRTH"), encode_payload(node, seq=seq, timestamp_ms=BASE_MS)))
    birth_readings = len(node)
    seq += 1
    for d in range(DEVICES):
        metrics_ = [
            encode_metric(
                name=name,
                alias=_alias(d, j),
                datatype=types[kind],
                value=_value(kind, d, j),
                timestamp_ms=BASE_MS,
            )
            for j, (name, kind) in enumerate(METRICS)
        ]
        births.append(
            (_topic("DBIRTH", d), encode_payload(metrics_, seq=seq, timestamp_ms=BASE_MS))
        )
        birth_readings += PER_MESSAGE
        seq_sum += seq * PER_MESSAGE
        seq = (seq + 1) % 256
    ddata: list[tuple[str, bytes]] = []
    for i in range(messages):
        d, k = i % DEVICES, i // DEVICES
        ms = BASE_MS + 1 + k  # one ms after the device's previous message
        metrics_ = []
        for j, (_name, kind) in enumerate(METRICS):
            metric = encode_metric(
                alias=_alias(d, j), datatype=types[kind], value=_value(kind, i, j),
                timestamp_ms=ms,
            )  # fmt: skip
            metric.ClearField("datatype")  # by alias only: the datatype is the birth's too
            metrics_.append(metric)
        ddata.append((_topic("DDATA", d), encode_payload(metrics_, seq=seq, timestamp_ms=ms)))
        seq_sum += seq * PER_MESSAGE
        seq = (seq + 1) % 256
    return Workload(tuple(births), tuple(ddata), birth_readings, seq_sum)


# ------------------------------------------------------------------ decode micro-benchmark


class _NullOutbound:
    """The host's way out (state announcements, rebirth requests), counted and dropped."""

    def __init__(self) -> None:
        self.published: list[str] = []

    def publish(self, topic: str, payload: bytes, qos: int, *, retain: bool = False) -> bool:
        self.published.append(topic)
        return True


def decode_benchmark(
    work: Workload | None = None, rounds: int = DECODE_ROUNDS, messages: int = DECODE_MESSAGES
) -> dict[str, Any]:
    """µs of ``SparkplugHost.decode`` per metric on 10-metric DDATA by alias (median round):
    the births of ``work``, then its first ``messages`` DDATA, ``rounds`` times."""
    from prometheus_client import CollectorRegistry  # noqa: PLC0415 - only for this

    from agents.decoding import DecoderContext  # noqa: PLC0415
    from agents.events import RawMessage  # noqa: PLC0415
    from agents.metrics import PipelineMetrics  # noqa: PLC0415
    from agents.sparkplug.host import SparkplugHost  # noqa: PLC0415

    assert messages % 256 == 0, "seq must run on across rounds"
    if work is None or work.messages < messages:
        work = workload(messages)
    data = work.ddata[:messages]
    now = datetime.now(UTC)

    def raw(i: int, topic: str, payload: bytes) -> RawMessage:
        return RawMessage(i, topic, payload, 0, now, 0.0, "")

    births = [raw(i, t, p) for i, (t, p) in enumerate(work.births)]
    batch = [raw(i, t, p) for i, (t, p) in enumerate(data)]
    registry = CollectorRegistry()
    with tempfile.TemporaryDirectory(prefix="ingestd-bench-decode-") as state:
        outbound = _NullOutbound()
        context = DecoderContext(outbound, Path(state), PipelineMetrics(registry))
        host = SparkplugHost(context)
        try:
            for message in births:
                host.decode(message, {})
            times = []
            metrics_seen = 0
            for _ in range(rounds):
                decode = host.decode
                started = time.perf_counter()
                for message in batch:
                    metrics_seen += len(decode(message, {}))
                times.append(time.perf_counter() - started)
        finally:
            host.close()
    seq_errors = registry.get_sample_value("ingestd_sparkplug_seq_errors_total") or 0.0
    if metrics_seen != rounds * messages * PER_MESSAGE or seq_errors:
        raise ScenarioError(f"decode benchmark: {metrics_seen} readings, {seq_errors:g} seq errors")
    median = statistics.median(times)
    per_metric = [t / (messages * PER_MESSAGE) * 1e6 for t in times]
    return {
        "us_per_metric": round(median / (messages * PER_MESSAGE) * 1e6, 3),
        "us_per_message": round(median / messages * 1e6, 2),
        "us_per_metric_rounds": [round(x, 3) for x in per_metric],
        "messages_per_round": messages,
        "rounds": rounds,
    }


# --------------------------------------------------------------------------- STATE online


def wait_state_online(port: int, timeout: float = 30.0) -> float:
    """Until the retained ``spBv1.0/STATE/<host id>`` reads ``"online": true`` (published
    after the Sparkplug connection subscribed); returns the wall-clock time it was seen."""
    online = threading.Event()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            if orjson.loads(msg.payload).get("online") is True:
                online.set()
        except (orjson.JSONDecodeError, AttributeError):
            pass

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.subscribe(STATE_TOPIC, qos=1)
    client.loop_start()
    try:
        if not online.wait(timeout):
            raise ScenarioError(f"{STATE_TOPIC} did not read online within {timeout:.0f} s")
    finally:
        client.disconnect()
        client.loop_stop()
    return time.time()


# ------------------------------------------------------------------------------ scenario


class SparkplugDdata(Scenario):
    """ingestd with one Sparkplug source, fed a paced QoS 0 flood of 10-metric DDATA."""

    name = "sparkplug-ddata"
    describe = (
        "ingestd run, defaults plus one Sparkplug source (spBv1.0/#): after NBIRTH + 100"
        " DBIRTHs, --sparkplug-messages (40,000) DDATA of 10 metrics by alias (Float, Double,"
        " Int32) at QoS 0 from a publisher process paced at most 2,000 messages ahead of"
        " ingestd's receipt; clock from the first DDATA to the last reading committed; plus"
        " a micro-benchmark of SparkplugHost.decode per metric"
    )
    compares_messages = False  # 10 readings per message: x ceil / x naive would mean nothing
    settings: ClassVar[dict[str, str]] = {}

    def readings_for(self, requested: int) -> int:
        return self.options.sparkplug_messages * PER_MESSAGE

    def note(self, summary: dict[str, Any]) -> str:
        parts = [f"{self.options.sparkplug_messages:,} DDATA x {PER_MESSAGE} metrics"]
        rate = summary.get("messages_per_s")
        if rate is not None:
            parts.append(f"{rate:,.0f} msg/s")
        decode = summary.get("decode_us_per_metric")
        if decode is not None:
            parts.append(f"decode {decode:.2f} us/metric")
        return "; ".join(parts)

    def run(self, env: BenchEnv, readings: int, run: int) -> Row:
        work = workload(self.options.sparkplug_messages)
        assert work.readings == readings
        row = Row(self.name, run, readings)
        decode = decode_benchmark(work)  # before this run's servers start: a quiet process
        row.figures["decode_us_per_metric"] = decode["us_per_metric"]
        avg, largest = work.payload_bytes()
        row.details.update(
            decode=decode,
            messages=work.messages,
            readings_per_message=[PER_MESSAGE, PER_MESSAGE],
            payload_bytes_avg=round(avg, 1),
            payload_bytes_max=largest,
            birth_readings=work.birth_readings,
            ahead_messages=AHEAD_MESSAGES,
        )
        workdir = env.workdir(self.name)
        dsn = env.database(self.name)
        config = workdir / "ingestd.toml"
        config.write_text(CONFIG_TOML)
        packets = workdir / "packets.pickle"
        with packets.open("wb") as f:
            pickle.dump((work.birth_packets, work.ddata_packets, work.birth_readings), f, 5)
        with env.broker(workdir) as broker:
            client_id = f"bench-{self.name}-{run}"
            daemon = DaemonProcess(
                workdir, broker.url, client_id, dsn, self.settings, config=config
            )
            meter = CpuMeter(env, broker)
            publisher: subprocess.Popen[str] | None = None
            try:
                started = time.time()
                daemon.start()
                online = wait_state_online(broker.port)
                daemon.wait_database_up()
                row.details["state_online_seconds"] = round(online - started, 3)
                meter.start()
                cpu_before = cpu_seconds(daemon.pid)
                publisher = self._start_publisher(workdir, broker.port, daemon, packets)
                timeline: list[dict[str, float]] = []
                row.details["timeline"] = timeline

                def check() -> None:
                    if publisher is not None and publisher.poll() not in (None, 0):
                        raise ScenarioError(
                            f"publisher exited {publisher.returncode}:\n"
                            f"{(workdir / 'publisher.log').read_text()[-2000:]}"
                        )

                drained = wait_stored(
                    [daemon], work.total_readings, started, timeline=timeline, check=check
                )
                report = self._publisher_report(publisher, workdir)
                t_first = report["t_first_ddata"]
                row.finish(drained.done - t_first)
                row.peak_rss_mb = peak_rss_mb(daemon.pid)
                sample = daemon.metrics()
                summary = daemon.summary()
                row.details.update(
                    spb_publisher=report,
                    publish_seconds=round(report["t_last_ddata"] - t_first, 3),
                    cpu_seconds={
                        "consumer": round(cpu_seconds(daemon.pid) - cpu_before, 2),
                        "publisher": report["cpu_seconds"],
                        **meter.stop(),
                    },
                    sparkplug={
                        k.removeprefix("ingestd_sparkplug_"): v
                        for k, v in sample.items()
                        if k.startswith("ingestd_sparkplug_") and "_created" not in k and v
                    },
                    **summary,
                )
            finally:
                if publisher is not None and publisher.poll() is None:
                    publisher.kill()
                    publisher.wait(10)
                row.details["exit_code"] = daemon.stop()
            dropped = "dropped" in broker.log_text()
        packets.unlink(missing_ok=True)
        row.figures["messages_per_s"] = work.messages / row.seconds if row.seconds else 0.0
        for key in ("inflight", "inflight_bytes", "inflight_readings"):
            seen = [p[key] for p in row.details.get("timeline", ()) if key in p]
            if seen:
                row.details[f"{key}_max_sampled"] = max(seen)
        self._check(row, work, sample, dropped)
        check_readings(env, dsn, work.total_readings, row, work.seq_sum)
        if row.details["exit_code"] != 0:
            raise ScenarioError(
                f"ingestd exited {row.details['exit_code']} on SIGTERM:\n{daemon.log_tail()}"
            )
        return row

    @staticmethod
    def _start_publisher(
        workdir: Path, port: int, daemon: DaemonProcess, packets: Path
    ) -> subprocess.Popen[str]:
        argv = [
            sys.executable, "-m", "bench.sparkplug", "publish", "--port", str(port),
            "--metrics-port", str(daemon.metrics_port), "--packets", str(packets),
            "--ahead", str(AHEAD_MESSAGES),
        ]  # fmt: skip
        log = (workdir / "publisher.log").open("w")
        try:
            return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
        finally:
            log.close()

    @staticmethod
    def _publisher_report(publisher: subprocess.Popen[str], workdir: Path) -> dict[str, Any]:
        try:
            out, _ = publisher.communicate(timeout=60)
        except subprocess.TimeoutExpired as exc:
            raise ScenarioError("the publisher did not finish after the drain") from exc
        lines = out.strip().splitlines()
        if publisher.returncode != 0 or not lines:
            raise ScenarioError(
                f"publisher exited {publisher.returncode}:\n"
                f"{(workdir / 'publisher.log').read_text()[-2000:]}"
            )
        report: dict[str, Any] = json.loads(lines[-1])
        return report

    @staticmethod
    def _check(row: Row, work: Workload, sample: dict[str, float], dropped: bool) -> None:
        """Every reading stored once by the daemon's own count; no lost or reordered message."""
        stored = sample.get("ingestd_readings_stored_total", 0.0)
        duplicates = sample.get("ingestd_readings_duplicate_total", 0.0)
        seq_errors = sample.get("ingestd_sparkplug_seq_errors_total", 0.0)
        rebirths = sample.get("ingestd_sparkplug_rebirth_requests_total", 0.0)
        problems = []
        if stored != work.total_readings:
            problems.append(
                f"ingestd_readings_stored_total {stored:g}, expected {work.total_readings}"
            )
        if duplicates:
            problems.append(f"{duplicates:g} duplicates")
        if seq_errors or rebirths:
            problems.append(f"{seq_errors:g} seq errors, {rebirths:g} rebirth requests")
        if row.details.get("rejected"):
            problems.append(f"{row.details['rejected']:g} messages rejected")
        if dropped:
            problems.append("the broker log reports dropped messages")
        if problems:
            row.details["stored_once"] = False
            raise ScenarioError("; ".join(problems), row.details)


# ----------------------------------------------------------------------------- publisher


def _received(port: int) -> float:
    return metrics(port).get("ingestd_messages_received_total", 0.0)


def _stored(port: int) -> float:
    sample = metrics(port)
    return sample.get("ingestd_readings_stored_total", 0.0) + sample.get(
        "ingestd_readings_duplicate_total", 0.0
    )


def publish(
    port: int, metrics_port: int, births: bytes, ddata: Sequence[bytes], birth_readings: int,
    ahead: int,
) -> dict[str, Any]:  # fmt: skip
    """Births, wait until they are stored, then the paced DDATA flood (see the module doc)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        load.RawPublisher(port, "bench-spb-edge1")._handshake(sock)
        sock.sendall(births)
        deadline = time.monotonic() + 60
        while _stored(metrics_port) < birth_readings:
            if time.monotonic() > deadline:
                raise RuntimeError("the births were not stored within 60 s")
            time.sleep(POLL_SECONDS)
        base = _received(metrics_port)
        n = len(ddata)
        sent = 0
        got = 0.0
        writes = waits = scrapes = 0
        ahead_max = 0
        t_first = time.time()
        while sent < n:
            allowed = ahead - (sent - int(got))
            if allowed > 0:
                k = min(allowed, WRITE_MESSAGES, n - sent)
                sock.sendall(b"".join(ddata[sent : sent + k]))
                sent += k
                writes += 1
                ahead_max = max(ahead_max, sent - int(got))
                continue
            waits += 1
            time.sleep(POLL_SECONDS)
            got = _received(metrics_port) - base
            scrapes += 1
        t_last = time.time()
        sock.sendall(b"\xe0\x00")  # DISCONNECT: no will
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "sent": sent,
        "t_first_ddata": t_first,
        "t_last_ddata": t_last,
        "writes": writes,
        "waits": waits,
        "scrapes": scrapes,
        "ahead_max": ahead_max,
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish")
    pub.add_argument("--port", type=int, required=True)
    pub.add_argument("--metrics-port", type=int, required=True)
    pub.add_argument("--packets", type=Path, required=True)
    pub.add_argument("--ahead", type=int, default=AHEAD_MESSAGES)
    args = parser.parse_args(argv)
    with args.packets.open("rb") as f:
        births, ddata, birth_readings = pickle.load(f)  # the bench's own file
    report = publish(args.port, args.metrics_port, births, ddata, birth_readings, args.ahead)
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
