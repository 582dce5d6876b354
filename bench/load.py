"""Queue readings for an offline persistent session: the backlog every drain scenario starts from.

``queue_backlog`` does the three steps a scenario needs before it starts its consumer:

1. create the consumer's persistent session (connect with its client id and
   ``clean_session=False``, subscribe ``sensors/+/+`` at QoS 1, disconnect);
2. publish the readings at QoS 1 with ``RawPublisher``, which writes pre-built MQTT packets
   straight to a socket (several times faster than paho, so queueing 200,000 readings takes
   a few seconds, not tens);
3. check that the broker really holds them: a PUBACK to an offline session only means
   "received", so the broker's ``$SYS/broker/store/messages/count`` must have grown by N
   and its log must not mention dropped messages.
"""

from __future__ import annotations

import functools
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import paho.mqtt.client as mqtt

TOPIC_FILTER = "sensors/+/+"
DEVICES = 100
SENSORS = ("temperature", "vibration", "pressure", "current")
TOPICS = tuple(f"sensors/dev-{d:03d}/{s}" for d in range(DEVICES) for s in SENSORS)
BASE_TS = datetime(2026, 1, 1, tzinfo=UTC)
PUBLISH_WINDOW = 20_000  # unacknowledged PUBLISHes on the wire (packet ids must stay unique)
CHUNK = 1_000  # packets per sendall()
CHUNK_BYTES = 1 << 20  # ... or fewer, so a chunk of 64 KiB payloads stays ~1 MiB
STORE_COUNT_TOPIC = "$SYS/broker/store/messages/count"


# ----------------------------------------------------------------------------- readings


def readings(n: int) -> Iterable[tuple[str, bytes]]:
    """``n`` (topic, JSON payload) pairs spread round-robin over 100 devices x 4 sensors.

    Each (device, sensor) series gets one reading per second from ``BASE_TS``, so
    ``(device_id, sensor_id, ts)`` is unique and every reading must become one new row.
    The payload is formatted by hand (faster than ``json.dumps``, and still valid JSON).
    """
    ts = ""
    for i in range(n):
        seq, series = divmod(i, len(TOPICS))
        if series == 0:
            ts = (BASE_TS + timedelta(seconds=seq)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        value = 20.0 + (i % 997) / 10.0
        payload = f'{{"value": {value:.2f}, "ts": "{ts}", "unit": "degC", "seq": {seq}}}'
        yield TOPICS[series], payload.encode()


# ------------------------------------------------------------------------- MQTT packets


def _varint(n: int) -> bytes:
    """MQTT's variable-length "remaining length" encoding."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(raw)) + raw


def connect_packet(client_id: str, keepalive: int = 60) -> bytes:
    """MQTT 3.1.1 CONNECT with clean session (the publisher keeps no state)."""
    body = _string("MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive) + _string(client_id)
    return b"\x10" + _varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    """MQTT 3.1.1 PUBLISH at QoS 1."""
    body = _string(topic) + struct.pack("!H", packet_id) + payload
    return b"\x32" + _varint(len(body)) + body


@functools.lru_cache(maxsize=2)
def publish_packets(n: int) -> tuple[bytes, ...]:
    """The QoS 1 PUBLISH packets for ``readings(n)``, built once per size and reused."""
    return tuple(
        publish_packet(topic, payload, i % 65535 + 1)
        for i, (topic, payload) in enumerate(readings(n))
    )


# ------------------------------------------------------------------ array backlogs


ARRAY_READINGS = 500  # readings per array in ingestd-arrays (and per message group for singles)


@dataclass(frozen=True)
class Workload:
    """A pre-built backlog: the PUBLISH packets and what they hold."""

    packets: tuple[bytes, ...]
    readings: int
    per_message: tuple[int, int]  # fewest and most readings in one message
    payload_bytes: tuple[float, int]  # average and largest payload

    @property
    def messages(self) -> int:
        return len(self.packets)

    @property
    def seq_sum(self) -> int:
        """``seq`` is the reading's index over the whole backlog: the sum of 0..N-1."""
        return self.readings * (self.readings - 1) // 2


def _reading_object(index: int, ts: str) -> str:
    """One reading as compact JSON (~52 bytes), the same in arrays and single messages."""
    return f'{{"value":{20.0 + (index % 997) / 10.0:.2f},"ts":"{ts}","seq":{index}}}'


class _Timestamps:
    """``ts`` strings one second apart from ``BASE_TS``, formatted once, shared by the series."""

    def __init__(self) -> None:
        self._cache: list[str] = []

    def __getitem__(self, k: int) -> str:
        while len(self._cache) <= k:
            t = BASE_TS + timedelta(seconds=len(self._cache))
            self._cache.append(t.strftime("%Y-%m-%dT%H:%M:%SZ"))
        return self._cache[k]


@functools.lru_cache(maxsize=4)
def array_workload(
    messages: int,
    per_message: int | None = None,
    max_bytes: int | None = None,
    *,
    single: bool = False,
) -> Workload:
    """``messages`` payloads, message ``m`` on ``TOPICS[m % 400]``.

    Each message is a JSON array of ``per_message`` readings, or as many as fit in
    ``max_bytes`` (filled greedily, so every payload is just under it); ``single`` sends each
    reading as a plain JSON object (``per_message`` must be 1). Readings are numbered 0..N-1
    over the whole backlog (``seq``, so ``sum(seq)`` checks every one was stored once); each
    (device, sensor) series counts its own readings, one second apart, so every ``ts`` of a
    series is distinct, within an array and across the arrays of that series.
    """
    if (per_message is None) == (max_bytes is None):
        raise ValueError("give per_message or max_bytes")
    if single and per_message != 1:
        raise ValueError("single messages hold one reading")
    stamps = _Timestamps()
    next_in_series = [0] * len(TOPICS)
    packets: list[bytes] = []
    counts: list[int] = []
    sizes: list[int] = []
    index = 0
    for m in range(messages):
        series = m % len(TOPICS)
        k = next_in_series[series]
        items: list[str] = []
        if per_message is not None:
            items = [_reading_object(index + j, stamps[k + j]) for j in range(per_message)]
            size = sum(map(len, items)) + len(items) + 1  # commas and brackets
        else:
            assert max_bytes is not None
            size = 1  # "[" ... "]": one more byte than the commas
            while True:
                item = _reading_object(index + len(items), stamps[k + len(items)])
                if size + len(item) + 1 > max_bytes:
                    break
                items.append(item)
                size += len(item) + 1
        payload = (items[0] if single else "[" + ",".join(items) + "]").encode()
        packets.append(publish_packet(TOPICS[series], payload, m % 65535 + 1))
        counts.append(len(items))
        sizes.append(len(payload))
        next_in_series[series] = k + len(items)
        index += len(items)
    return Workload(
        packets=tuple(packets),
        readings=index,
        per_message=(min(counts), max(counts)),
        payload_bytes=(sum(sizes) / len(sizes), max(sizes)),
    )


# ---------------------------------------------------------------------------- publisher


class PublishError(RuntimeError):
    """The broker refused the publisher or did not acknowledge every message."""


class RawPublisher:
    """QoS 1 publisher on a plain socket: pre-built packets, chunked writes, counted PUBACKs.

    A 3.1.1 PUBACK is exactly 4 bytes (``0x40 0x02 id id``), so counting acknowledgements is
    counting bytes. At most ``PUBLISH_WINDOW`` messages are unacknowledged at any time, which
    keeps packet ids unique among those in flight.
    """

    def __init__(self, port: int, client_id: str = "bench-publisher", timeout: float = 60.0):
        self.port = port
        self.client_id = client_id
        self.timeout = timeout
        self._pending = b""
        self.acked = 0

    def publish(self, packets: Sequence[bytes]) -> int:
        """Send pre-built PUBLISH packets; return once the broker acknowledged all of them.

        Packet ids must be unique within any ``PUBLISH_WINDOW`` consecutive packets.
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._handshake(sock)
            sent = 0
            for chunk in _chunks(packets):
                sock.sendall(b"".join(chunk))
                sent += len(chunk)
                self._read_acks(sock, until=sent - PUBLISH_WINDOW)
            self._read_acks(sock, until=sent)
            sock.sendall(b"\xe0\x00")  # DISCONNECT
        return sent

    def _handshake(self, sock: socket.socket) -> None:
        sock.sendall(connect_packet(self.client_id))
        connack = _recv_exactly(sock, 4)
        if connack[:2] != b"\x20\x02" or connack[3] != 0:
            raise PublishError(f"broker refused the publisher: CONNACK {connack.hex()}")

    def _read_acks(self, sock: socket.socket, until: int) -> None:
        """Read PUBACKs without blocking, then block until at least ``until`` are in."""
        sock.setblocking(False)
        try:
            self._drain(sock)
        finally:
            sock.settimeout(self.timeout)
        while self.acked < until:
            data = sock.recv(65536)
            if not data:
                raise PublishError(f"broker closed the connection after {self.acked} PUBACKs")
            self._count(data)

    def _drain(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            if not data:
                raise PublishError(f"broker closed the connection after {self.acked} PUBACKs")
            self._count(data)

    def _count(self, data: bytes) -> None:
        buf = self._pending + data
        whole = len(buf) // 4 * 4
        acks, self._pending = buf[:whole], buf[whole:]
        if acks[0::4] != b"\x40" * (whole // 4) or acks[1::4] != b"\x02" * (whole // 4):
            raise PublishError("unexpected packet from the broker (expected only PUBACKs)")
        self.acked += whole // 4


def _chunks(packets: Sequence[bytes]) -> Iterable[Sequence[bytes]]:
    """Consecutive runs of at most ``CHUNK`` packets and (unless one packet is larger)
    ``CHUNK_BYTES`` bytes."""
    start, size = 0, 0
    for i, packet in enumerate(packets):
        if i > start and (i - start >= CHUNK or size + len(packet) > CHUNK_BYTES):
            yield packets[start:i]
            start, size = i, 0
        size += len(packet)
    if start < len(packets):
        yield packets[start:]


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise PublishError("broker closed the connection during the handshake")
        data += more
    return data


# ----------------------------------------------------------------------- session + check


def _paho(port: int, client_id: str = "", clean: bool = True) -> mqtt.Client:
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
        protocol=mqtt.MQTTv311,
    )  # fmt: skip
    client.connect("127.0.0.1", port)
    return client


def create_session(port: int, client_id: str, topic_filter: str = TOPIC_FILTER) -> None:
    """Leave a persistent session with a QoS 1 subscription behind for ``client_id``."""
    subscribed = threading.Event()
    client = _paho(port, client_id, clean=False)
    client.on_subscribe = lambda *_: subscribed.set()
    client.loop_start()
    try:
        client.subscribe(topic_filter, qos=1)
        if not subscribed.wait(10):
            raise PublishError(f"no SUBACK for the session of {client_id!r}")
    finally:
        client.disconnect()
        client.loop_stop()


def broker_store_count(port: int, timeout: float = 5.0) -> int:
    """The broker's stored-message count, as of its next ``$SYS`` update.

    ``$SYS`` topics are retained; the retained copy can be up to ``sys_interval`` old, so
    this waits for a live (non-retained) publication, which reflects the current state.
    """
    values: list[int] = []
    fresh = threading.Event()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        if not msg.retain:
            values.append(int(msg.payload))
            fresh.set()

    client = _paho(port)
    client.on_message = on_message
    client.subscribe(STORE_COUNT_TOPIC)
    client.loop_start()
    try:
        if not fresh.wait(timeout):
            raise PublishError(f"broker published no {STORE_COUNT_TOPIC} within {timeout}s")
    finally:
        client.disconnect()
        client.loop_stop()
    return values[-1]


@dataclass(frozen=True)
class Backlog:
    """What was queued for the consumers and how long queueing took."""

    client_ids: tuple[str, ...]
    readings: int
    publish_seconds: float
    store_count: int


def queue_backlog(
    broker_port: int,
    broker_log: Callable[[], str],
    client_ids: str | Sequence[str],
    n: int,
    topic_filter: str = TOPIC_FILTER,
    packets: Sequence[bytes] | None = None,
) -> Backlog:
    """Create the sessions, queue ``n`` readings, check the broker holds them.

    ``packets`` (a ``Workload``'s) replaces the one-reading messages of ``readings(n)``;
    ``n`` then still counts readings, and the store must grow by ``len(packets)`` messages.

    With several client ids and a ``$share/<group>/...`` filter, the broker queues each
    message for one of them (mosquitto 2.0 takes turns, also between offline sessions):
    the store count still grows by ``n``, one stored copy per message.
    """
    ids = (client_ids,) if isinstance(client_ids, str) else tuple(client_ids)
    for client_id in ids:
        create_session(broker_port, client_id, topic_filter)
    if packets is None:
        packets = publish_packets(n)
    before = broker_store_count(broker_port)
    started = time.monotonic()
    RawPublisher(broker_port).publish(packets)
    publish_seconds = time.monotonic() - started
    after = _wait_store_count(broker_port, before + len(packets))
    if "dropped" in broker_log():
        raise PublishError("the broker log reports dropped messages: raise max_queued_messages")
    return Backlog(ids, n, publish_seconds, after)


def _wait_store_count(port: int, expected: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        count = broker_store_count(port)
        if count >= expected:
            return count
    raise PublishError(f"broker holds {count} messages, expected at least {expected}")
