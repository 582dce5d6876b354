"""``ingestd simulate``: publish realistic sensor readings, and known-bad payloads, over MQTT.

Every bad message carries the rejection reason the daemon is expected to store for it, so
an end-to-end test can compare the report with the daemon's ``rejected_messages``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import random
import signal
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, get_args
from urllib.parse import unquote, urlsplit

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge.codecs import (
    BAD_TIMESTAMP,
    BAD_TYPE,
    BAD_VALUE,
    MALFORMED_JSON,
    MISSING_VALUE,
    NOT_UTF8,
    TOPIC_MISMATCH,
    encode_json,
    encode_value,
    format_ts,
)
from edge.signals import Series, device_ids, make_series

PayloadFormat = Literal["json", "value"]

# Bad kinds per format, each named by the reason the daemon must reject it with.
JSON_BAD_REASONS = (
    MALFORMED_JSON,
    NOT_UTF8,
    MISSING_VALUE,
    BAD_TYPE,
    BAD_TIMESTAMP,
    TOPIC_MISMATCH,
    BAD_VALUE,
)
VALUE_BAD_REASONS = (NOT_UTF8, MISSING_VALUE, BAD_TYPE, BAD_VALUE)

_WINDOW = 256  # messages awaiting their ack: deep enough to hide the broker round trip
_BURST = 64  # messages per event-loop turn, so writes and acks interleave with publishing
_MAX_LAG = 1.0  # seconds of backlog the pacer catches up; an older backlog is dropped
_DRAIN_TIMEOUT = 10.0  # seconds to wait for the last acks before giving up on them
_PROGRESS_EVERY = 1.0  # seconds between on_progress calls
_KEEPALIVE = 30  # seconds


class SimulatorError(Exception):
    """The broker could not be reached, refused us, or dropped us mid-run."""

    def __init__(self, message: str, report: SimulationReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(slots=True)
class SimulatorOptions:
    """What to publish, where and how fast."""

    url: str = "mqtt://127.0.0.1:1883"
    devices: int = 5
    rate: float = 100.0  # messages/s across all devices; 0 = as fast as the broker acks
    count: int | None = None  # stop after this many messages
    duration: float | None = None  # stop after this many seconds
    bad_ratio: float = 0.0
    format: PayloadFormat = "json"
    topic_prefix: str = "sensors"
    qos: int = 1
    seed: int | None = None
    device_prefix: str = "dev"
    client_id: str | None = None
    batch: int = 1  # readings per JSON message, sent as an array when > 1
    connect_timeout: float = 5.0  # seconds to keep retrying the first connection

    def __post_init__(self) -> None:
        problems = [
            text
            for bad, text in (
                (self.devices < 1, "devices must be at least 1"),
                (not math.isfinite(self.rate) or self.rate < 0, "rate must be >= 0"),
                (self.count is not None and self.count < 0, "count must be >= 0"),
                (self.duration is not None and not self.duration >= 0, "duration must be >= 0"),
                (not 0.0 <= self.bad_ratio <= 1.0, "bad_ratio must be within 0..1"),
                (self.format not in get_args(PayloadFormat), "format must be json or value"),
                (self.qos not in (0, 1, 2), "qos must be 0, 1 or 2"),
                (self.batch < 1, "batch must be at least 1"),
                (self.batch > 1 and self.format != "json", "batch needs the json format"),
                (
                    not self.topic_prefix or "+" in self.topic_prefix or "#" in self.topic_prefix,
                    "topic_prefix must be a non-empty topic without wildcards",
                ),
                (not self.connect_timeout >= 0, "connect_timeout must be >= 0"),
            )
            if bad
        ]
        if problems:
            raise ValueError("; ".join(problems))
        broker_address(self.url)


@dataclass(slots=True)
class SimulationReport:
    """What the broker accepted: only acknowledged messages are counted."""

    published: int = 0
    good: int = 0
    readings: int = 0  # readings in good messages (= good unless batch > 1)
    bad: int = 0
    bad_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    rate: float = 0.0  # achieved messages/s

    def to_json(self) -> str:
        """The report as one line of JSON."""
        data = dataclasses.asdict(self)
        data["seconds"] = round(self.seconds, 3)
        data["rate"] = round(self.rate, 1)
        return orjson.dumps(data).decode()

    def count(self, message: Message) -> None:
        """Account for one acknowledged message."""
        self.published += 1
        if message.reason is None:
            self.good += 1
            self.readings += message.readings
        else:
            self.bad += 1
            self.bad_by_reason[message.reason] = self.bad_by_reason.get(message.reason, 0) + 1

    def snapshot(self, seconds: float) -> SimulationReport:
        """A copy timed at ``seconds`` since the start, safe to hand to a callback."""
        rate = self.published / seconds if seconds > 0 else 0.0
        return dataclasses.replace(
            self, bad_by_reason=dict(self.bad_by_reason), seconds=seconds, rate=rate
        )


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT message to publish."""

    topic: str
    payload: bytes
    readings: int  # good readings it carries; 0 when bad
    reason: str | None = None  # the reason the daemon must reject it with; None when good


# --- payloads ---------------------------------------------------------------------------


def good_payload(fmt: PayloadFormat, series: Series, now: datetime, batch: int = 1) -> bytes:
    """The next ``batch`` readings of ``series`` as a payload (a JSON array when batch > 1)."""
    if fmt == "value":
        return encode_value(series.next(now).value)
    parts = []
    for _ in range(batch):
        sample = series.next(now)
        parts.append(encode_json(sample.value, sample.ts, series.unit, sample.seq))
    return parts[0] if batch == 1 else b"[" + b",".join(parts) + b"]"


def bad_payload(
    fmt: PayloadFormat, reason: str, series: Series, now: datetime, rng: random.Random
) -> bytes:
    """A payload for ``series``'s topic that the daemon must reject with ``reason``."""
    return rng.choice(bad_variants(fmt, reason, series, now, rng))


def bad_variants(
    fmt: PayloadFormat, reason: str, series: Series, now: datetime, rng: random.Random
) -> list[bytes]:
    """Every way this simulator gets a ``fmt`` payload wrong for ``reason``."""
    return _bad_json(reason, series, now, rng) if fmt == "json" else _bad_value(reason, rng)


def _bad_json(reason: str, series: Series, now: datetime, rng: random.Random) -> list[bytes]:
    """Ways a misbehaving device or gateway gets a JSON payload wrong."""
    value = round(rng.uniform(1.0, 100.0), 2)
    ts = format_ts(now)
    fields = f'"value": {value}, "ts": "{ts}"'
    variants: dict[str, list[str | bytes]] = {
        MALFORMED_JSON: [
            f'{{{fields}, "unit": "de',  # truncated mid-string
            f"{{{fields},}}",  # trailing comma
            f"{{'value': {value}}}",  # single quotes
            f"{{{fields}}} }}",  # garbage after the document
        ],
        NOT_UTF8: [
            f'{{"value": {value}, "unit": "'.encode() + b'\xb0C"}',  # a Latin-1 degree sign
            '{"value": 1.5}'.encode("utf-16"),  # UTF-16 with its BOM
        ],
        MISSING_VALUE: [
            orjson.dumps({"ts": ts, "unit": series.unit}),
            orjson.dumps({"val": value, "ts": ts}),
            b"[]",
        ],
        BAD_TYPE: [
            orjson.dumps({"value": str(value), "ts": ts}),
            orjson.dumps({"value": None, "ts": ts}),
            orjson.dumps({"value": True}),
            orjson.dumps([value]),
            orjson.dumps(value),
        ],
        BAD_TIMESTAMP: [
            orjson.dumps({"value": value, "ts": text})
            for text in ("yesterday", "2024-02-30T10:00:00Z", "17/03/2024 10:00", "")
        ],
        TOPIC_MISMATCH: [
            orjson.dumps({"value": value, "ts": ts, "device_id": f"not-{series.device_id}"}),
            orjson.dumps({"value": value, "sensor_id": f"{series.sensor_id}-2"}),
        ],
        BAD_VALUE: [
            f'{{"value": {word}, "ts": "{ts}"}}' for word in ("NaN", "Infinity", "-Infinity")
        ],
    }
    return [v if isinstance(v, bytes) else v.encode() for v in variants[reason]]


def _bad_value(reason: str, rng: random.Random) -> list[bytes]:
    """Ways a device gets a bare-number payload wrong."""
    value = round(rng.uniform(1.0, 100.0), 2)
    variants = {
        NOT_UTF8: [f"{value}".encode() + b"\xb0C"],
        MISSING_VALUE: [b"", b" \n"],
        BAD_TYPE: [b"ERR", b"OVERRANGE", f"{value}".replace(".", ",").encode()],  # decimal comma
        BAD_VALUE: [b"nan", b"inf", b"-Infinity"],
    }
    return variants[reason]


class MessageFactory:
    """Messages in publishing order: round-robin over every series, a seeded share bad."""

    def __init__(self, options: SimulatorOptions) -> None:
        self.series = make_series(device_ids(options.devices, options.device_prefix), options.seed)
        self._topics = [f"{options.topic_prefix}/{s.device_id}/{s.sensor_id}" for s in self.series]
        seeded = options.seed is not None
        self._rng = random.Random(f"{options.seed}/bad") if seeded else random.Random()
        self._format: PayloadFormat = options.format
        self._bad_ratio = options.bad_ratio
        self._batch = options.batch
        self._reasons = JSON_BAD_REASONS if options.format == "json" else VALUE_BAD_REASONS
        self._next = 0

    def next(self, now: datetime) -> Message:
        """The next message, its readings stamped at ``now``."""
        index = self._next
        self._next = (index + 1) % len(self.series)
        series, topic = self.series[index], self._topics[index]
        if self._bad_ratio and self._rng.random() < self._bad_ratio:
            reason = self._rng.choice(self._reasons)
            return Message(
                topic, bad_payload(self._format, reason, series, now, self._rng), 0, reason
            )
        payload = good_payload(self._format, series, now, self._batch)
        return Message(topic, payload, self._batch)


# --- MQTT ---------------------------------------------------------------------------------


def broker_address(url: str) -> tuple[str, int, bool, str | None, str | None]:
    """(host, port, tls, username, password) of an ``mqtt://`` or ``mqtts://`` URL."""
    parts = urlsplit(url)
    if parts.scheme not in {"mqtt", "mqtts"} or not parts.hostname:
        raise ValueError(f"broker URL {url!r} must look like mqtt://host:port or mqtts://host:port")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError(f"broker URL {url!r} has a bad port") from None
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return parts.hostname, port, tls, username, password


class _Link:
    """A paho client driven by the running asyncio loop's reader/writer callbacks.

    aiomqtt peaks near 4k QoS-1 msg/s on a 2-core machine (a task and event per publish);
    paho on the loop with our own in-flight window does ~10k, with no network thread.
    """

    def __init__(self, options: SimulatorOptions, on_ack: Callable[[Message], None]) -> None:
        self._loop = asyncio.get_running_loop()
        client_id = options.client_id or f"ingestd-sim-{os.getpid()}-{random.randrange(16**6):06x}"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, reconnect_on_failure=False
        )
        self.client.max_inflight_messages_set(0)  # unlimited: our window bounds it
        self.client.connect_timeout = max(options.connect_timeout, 0.1)  # per TCP attempt
        host, port, tls, username, password = broker_address(options.url)
        self.host, self.port = host, port
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set_context(ssl.create_default_context())
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect
        self._on_ack = on_ack
        self._pending: dict[int, Message] = {}
        self._connack: asyncio.Future[ReasonCode] | None = None
        self._fd: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # keepalive tasks, awaited by close()
        self._closing = False
        self.wake = asyncio.Event()  # set on every ack, on disconnection and on stop
        self.lost: str | None = None  # why the broker connection dropped, once it has

    @property
    def in_flight(self) -> int:
        """Messages published and not yet acknowledged."""
        return len(self._pending)

    async def open(self, budget: float) -> None:
        """Connect and await the CONNACK within ``budget`` s; OSError if the broker is not up."""
        budget = max(budget, 0.1)
        # The TCP connect blocks, so it runs in a thread; no socket callbacks are set yet,
        # so paho writes CONNECT itself there and we take the socket over afterwards.
        await asyncio.to_thread(self.client.connect, self.host, self.port, _KEEPALIVE)
        self.lost = None
        self._connack = self._loop.create_future()
        self._attach()
        try:
            code = await asyncio.wait_for(self._connack, timeout=budget)
        except TimeoutError:
            self._detach_and_close()
            raise SimulatorError(
                f"connected to {self.host}:{self.port} but got no CONNACK within {budget:.3g}s"
            ) from None
        if code.is_failure:
            self._detach_and_close()
            raise SimulatorError(f"the broker at {self.host}:{self.port} refused us: {code}")

    def _attach(self) -> None:
        sock = self.client.socket()
        if sock is None:
            raise OSError("paho returned no socket after connect")
        self._fd = sock.fileno()
        self.client.on_socket_close = self._on_socket_close
        self.client.on_socket_register_write = self._on_register_write
        self.client.on_socket_unregister_write = self._on_unregister_write
        self._loop.add_reader(self._fd, self.client.loop_read)
        if self.client.want_write():
            self._loop.add_writer(self._fd, self.client.loop_write)
        self._tasks.add(self._loop.create_task(self._keepalive(), name="simulator-keepalive"))

    def _detach_and_close(self) -> None:
        self._closing = True
        self._detach()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def _detach(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
            self._fd = None
        for task in self._tasks:
            task.cancel()

    async def _keepalive(self) -> None:
        """Let paho send PINGREQs and notice a silent broker."""
        while True:
            await asyncio.sleep(1.0)
            self.client.loop_misc()

    def publish(self, message: Message, qos: int) -> None:
        """Hand one message to paho; it is counted when the broker acknowledges it."""
        info = self.client.publish(message.topic, message.payload, qos)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.lost = self.lost or f"publish failed: {mqtt.error_string(info.rc)}"
            self.wake.set()
            return
        # Safe: with socket callbacks set, paho never writes (so never acks) inside publish.
        self._pending[info.mid] = message

    async def drain(self, budget: float) -> None:
        """Wait (at most ``budget`` s) until every message is acknowledged or the link is lost."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(budget):
                while self._pending and self.lost is None:
                    self.wake.clear()
                    await self.wake.wait()

    async def close(self) -> None:
        """Disconnect politely (DISCONNECT written, socket closed), then let go of the loop."""
        self._closing = True
        if self._fd is not None and self.lost is None:
            self.client.disconnect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    while self._fd is not None:
                        self.wake.clear()
                        await self.wake.wait()
        self._detach_and_close()
        if self._tasks:
            await asyncio.wait(self._tasks)
            self._tasks.clear()

    # paho callbacks, all called on the loop thread from loop_read/loop_write/loop_misc.

    def _on_connect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.ConnectFlags,
        code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(code)

    def _on_publish(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        _code: ReasonCode,
        _properties: Properties,
    ) -> None:
        message = self._pending.pop(mid, None)
        if message is not None:
            self._on_ack(message)
        self.wake.set()

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if not self._closing:
            self.lost = f"the broker connection was lost ({code})"
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(
                ConnectionResetError(f"disconnected before CONNACK ({code})")
            )
        self.wake.set()

    def _on_socket_close(self, _client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
        self._detach()
        self.wake.set()

    def _on_register_write(self, _client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
        if self._fd is not None:
            self._loop.add_writer(self._fd, self.client.loop_write)

    def _on_unregister_write(self, _client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
        if self._fd is not None:
            self._loop.remove_writer(self._fd)


async def _connect(link: _Link, budget: float, stop: asyncio.Event) -> bool:
    """Connect, retrying refused connections for ``budget`` s; False if stopped first."""
    deadline = time.monotonic() + budget
    delay = 0.05
    while not stop.is_set():
        remaining = deadline - time.monotonic()
        try:
            await link.open(remaining)
        except OSError as exc:  # refused, unreachable, reset: the broker may be starting
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SimulatorError(
                    f"cannot reach the MQTT broker at {link.host}:{link.port} "
                    f"within {budget:g}s: {exc}"
                ) from None
            await _wait(stop, min(delay, remaining))
            delay = min(delay * 2, 0.5)
        else:
            return True
    return False


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Wait for ``event``, at most ``seconds``."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


# --- pacing and the publishing loop ---------------------------------------------------------


class _Pacer:
    """Spreads messages evenly at ``rate`` msg/s on the monotonic clock; 0 = unpaced."""

    def __init__(self, rate: float, start: float) -> None:
        self.rate = rate
        self.origin = start
        self.sent = 0

    def due(self, now: float) -> int:
        """How many messages are due at ``now`` (message k is due at origin + k/rate)."""
        if self.rate <= 0:
            return _BURST
        owed = (now - self.origin) * self.rate - self.sent
        if owed > self.rate * _MAX_LAG:
            # After a stall, forgive the old backlog rather than publish it in one storm.
            self.origin = now - (self.sent + self.rate * _MAX_LAG) / self.rate
            owed = self.rate * _MAX_LAG
        return math.floor(owed) + 1

    def delay(self, now: float) -> float:
        """Seconds until the next message is due."""
        if self.rate <= 0:
            return 0.0
        return max(self.origin + self.sent / self.rate - now, 0.0)


async def simulate(
    options: SimulatorOptions,
    stop: asyncio.Event | None = None,
    on_progress: Callable[[SimulationReport], None] | None = None,
) -> SimulationReport:
    """Publish until ``count``, ``duration`` or ``stop``; the report of acknowledged messages.

    ``on_progress`` gets a snapshot about once a second. Raises SimulatorError when the
    broker cannot be reached or refuses us (``.report`` is None) or drops us mid-run
    (``.report`` says what was acknowledged before).
    """
    stop = stop or asyncio.Event()
    report = SimulationReport()
    link = _Link(options, report.count)
    relay = asyncio.create_task(_relay(stop, link.wake), name="simulator-stop-relay")
    start = time.monotonic()
    try:
        if not await _connect(link, options.connect_timeout, stop):
            return report
        start = time.monotonic()
        factory = MessageFactory(options)
        await _pump(
            link, factory, options, stop, start=start, report=report, on_progress=on_progress
        )
        await link.drain(_DRAIN_TIMEOUT)
    finally:
        relay.cancel()
        await link.close()
        await asyncio.wait({relay})
    final = report.snapshot(time.monotonic() - start)
    if link.lost is not None:
        raise SimulatorError(link.lost, final)
    return final


async def _relay(stop: asyncio.Event, wake: asyncio.Event) -> None:
    """Wake the publishing loop when ``stop`` is set."""
    await stop.wait()
    wake.set()


async def _pump(
    link: _Link,
    factory: MessageFactory,
    options: SimulatorOptions,
    stop: asyncio.Event,
    *,
    start: float,
    report: SimulationReport,
    on_progress: Callable[[SimulationReport], None] | None,
) -> None:
    """Publish in small bursts, bounded by the pace, the in-flight window and the count."""
    pacer = _Pacer(options.rate, start)
    end = start + options.duration if options.duration is not None else math.inf
    limit = options.count if options.count is not None else math.inf
    next_progress = start + _PROGRESS_EVERY
    while not stop.is_set() and link.lost is None and pacer.sent < limit:
        now = time.monotonic()
        if now >= end:
            break
        if on_progress is not None and now >= next_progress:
            on_progress(report.snapshot(now - start))
            next_progress = now + _PROGRESS_EVERY
        burst = int(min(pacer.due(now), _WINDOW - link.in_flight, limit - pacer.sent))
        if burst > 0:
            for _ in range(burst):
                link.publish(factory.next(datetime.now(UTC)), options.qos)
            pacer.sent += burst
            await asyncio.sleep(0)  # let the loop write them and read acks
            continue
        # Nothing may go now: sleep until the next one is due, an ack frees the window,
        # or stop; the window is full when the pacer is not what is holding us back.
        link.wake.clear()
        if link.in_flight >= _WINDOW:
            await link.wake.wait()
        else:
            await _wait(link.wake, min(pacer.delay(now), end - now, _PROGRESS_EVERY))


# --- command line -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ingestd simulate`` options."""
    defaults = SimulatorOptions()
    parser.add_argument("--url", default=defaults.url, help="broker, mqtt://host:port or mqtts://")
    parser.add_argument("--devices", type=int, default=defaults.devices, help="simulated devices")
    parser.add_argument(
        "--rate",
        type=float,
        default=defaults.rate,
        help="messages per second across all devices; 0 = as fast as possible",
    )
    parser.add_argument("--count", type=int, help="stop after this many messages")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument(
        "--bad-ratio",
        type=float,
        default=defaults.bad_ratio,
        help="fraction of deliberately bad messages (0..1)",
    )
    parser.add_argument("--format", choices=get_args(PayloadFormat), default=defaults.format)
    parser.add_argument("--seed", type=int, help="seed for reproducible signals and bad messages")
    parser.add_argument("--qos", type=int, choices=(0, 1, 2), default=defaults.qos)
    parser.add_argument("--topic-prefix", default=defaults.topic_prefix)
    parser.add_argument("--device-prefix", default=defaults.device_prefix)
    parser.add_argument("--client-id", help="MQTT client id (default: a unique one)")
    parser.add_argument(
        "--batch", type=int, default=defaults.batch, help="readings per JSON message (array)"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=defaults.connect_timeout,
        help="seconds to keep retrying the first connection",
    )


def options_from_args(args: argparse.Namespace) -> SimulatorOptions:
    """SimulatorOptions from parsed ``add_arguments`` options (missing ones keep defaults)."""
    names = {f.name for f in dataclasses.fields(SimulatorOptions)}
    return SimulatorOptions(**{k: v for k, v in vars(args).items() if k in names})


def run(args: argparse.Namespace) -> int:
    """Run ``ingestd simulate``: one JSON report line on stdout; 1 if the broker fails us."""
    try:
        options = options_from_args(args)
    except ValueError as exc:
        print(f"ingestd simulate: {exc}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(_run_until_signalled(options))
    except SimulatorError as exc:
        if exc.report is not None:
            print(exc.report.to_json(), flush=True)
        print(f"ingestd simulate: {exc}", file=sys.stderr)
        return 1
    print(report.to_json(), flush=True)
    return 0


async def _run_until_signalled(options: SimulatorOptions) -> SimulationReport:
    """``simulate``, with SIGINT and SIGTERM asking it to stop and report."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        return await simulate(options, stop)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
