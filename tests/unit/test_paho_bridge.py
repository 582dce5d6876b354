"""The module below aiomqtt's public API: buffered reads, raw packets, coalesced writes."""

from __future__ import annotations

import asyncio
import threading

import aiomqtt
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.mqtt_packets import decode_publish, encode_publish_qos0, remaining_length
from daemon.paho_bridge import PahoBridge, _BufferedSocket
from tests.harness.servers import Mosquitto, wait_until, wait_until_async


class FakeSocket:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.calls = 0

    def recv(self, size: int) -> bytes:
        self.calls += 1
        if not self.chunks:
            raise BlockingIOError
        return self.chunks.pop(0)

    def fileno(self) -> int:
        return 42


def test_buffered_socket_serves_small_reads_from_one_recv() -> None:
    fake = FakeSocket([b"abcdef", b""])
    sock = _BufferedSocket(fake)
    assert [sock.recv(1), sock.recv(2), sock.recv(10)] == [b"a", b"bc", b"def"]
    assert fake.calls == 1
    assert sock.recv(1) == b""  # EOF is passed through
    assert sock.fileno() == 42  # everything else is delegated


def test_buffered_socket_raises_when_nothing_is_readable() -> None:
    sock = _BufferedSocket(FakeSocket([b"xy"]))
    assert sock.recv(5) == b"xy"
    assert sock.buffered() == 0
    with pytest.raises(BlockingIOError):
        sock.recv(1)


@pytest.mark.parametrize(
    ("length", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
    ],
)
def test_remaining_length_is_mqtt_varint(length: int, encoded: bytes) -> None:
    assert remaining_length(length) == encoded


def publish_packet(
    topic: bytes,
    payload: bytes,
    *,
    qos: int = 1,
    mid: int = 7,
    dup: bool = False,
    retain: bool = False,
    properties: bytes | None = None,
) -> bytes:
    """A PUBLISH as a broker sends it (``properties``: the v5 property block, b"\x00" if empty)."""
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += mid.to_bytes(2, "big")
    if properties is not None:
        body += properties
    body += payload
    header = 0x30 | (dup << 3) | (qos << 1) | retain
    return bytes((header,)) + remaining_length(len(body)) + body


@pytest.mark.parametrize("v5", [False, True])
@pytest.mark.parametrize(
    ("qos", "dup", "retain"), [(0, False, False), (1, False, False), (1, True, True)]
)
def test_take_publish_decodes_a_buffered_publish(
    v5: bool, qos: int, dup: bool, retain: bool
) -> None:
    payload = b'{"value": 1}'
    packet = publish_packet(
        b"sensors/d/t", payload, qos=qos, mid=513, dup=dup, retain=retain,
        properties=b"\x00" if v5 else None,
    )  # fmt: skip
    sock = _BufferedSocket(FakeSocket([packet + b"\xd0\x00"]))  # then a PINGRESP
    assert sock.recv(0) == b""  # fills the buffer
    assert sock.take_publish(v5) == (b"sensors/d/t", payload, 513 if qos else 0, qos, dup, retain)
    assert sock.take_publish(v5) is None  # a PINGRESP is paho's
    assert sock.recv(2) == b"\xd0\x00"  # ... and nothing of it was consumed


def test_take_publish_decodes_long_packets_and_consecutive_ones() -> None:
    big = publish_packet(b"a/b", b"x" * 20_000, mid=1)  # a 3-byte remaining length
    small = publish_packet(b"a/c", b"", mid=2)
    sock = _BufferedSocket(FakeSocket([big + small]))
    sock.recv(0)
    assert sock.take_publish(False) == (b"a/b", b"x" * 20_000, 1, 1, False, False)
    assert sock.take_publish(False) == (b"a/c", b"", 2, 1, False, False)
    assert sock.buffered() == 0


@pytest.mark.parametrize(
    ("packet", "v5"),
    [
        (publish_packet(b"a/b", b"p")[:-1], False),  # not wholly read yet
        (publish_packet(b"a/b", b"p")[:2], False),
        (publish_packet(b"a/b", b"p", qos=2), False),  # QoS 2: paho's state machine
        (publish_packet(b"a/b", b"p", properties=b"\x02\x01\x01"), True),  # v5 properties
        (publish_packet(b"", b"p", properties=b"\x00"), True),  # topic alias
        (publish_packet(b"", b"p"), False),  # malformed: no topic
        (b"\x32\x03\x00\x09a", False),  # malformed: topic longer than the packet
        (b"\x32\xff\xff\xff\xff\x01", False),  # malformed: 5-byte remaining length
        (b"\x40\x02\x00\x01", False),  # a PUBACK
    ],
)
def test_take_publish_leaves_everything_else_to_paho(packet: bytes, v5: bool) -> None:
    sock = _BufferedSocket(FakeSocket([packet]))
    sock.recv(0)
    assert sock.take_publish(v5) is None
    assert sock.buffered() == len(packet)  # nothing consumed


def test_decode_publish_starts_at_the_given_position_and_says_where_it_ended() -> None:
    first, second = publish_packet(b"a/b", b"1", mid=1), publish_packet(b"a/c", b"22", qos=0)
    buf = first + second
    assert decode_publish(buf, 0, False) == (len(first), (b"a/b", b"1", 1, 1, False, False))
    assert decode_publish(buf, len(first), False) == (len(buf), (b"a/c", b"22", 0, 0, False, False))
    assert decode_publish(buf, len(buf), False) is None


def test_qos0_publish_packet_layout() -> None:
    assert encode_publish_qos0("a/b", b"hi", False, False) == b"\x30\x07\x00\x03a/bhi"
    assert encode_publish_qos0("a/b", b"hi", True, True) == b"\x31\x08\x00\x03a/b\x00hi"


class Subscriber:
    def __init__(self, port: int, topic: str) -> None:
        self.payloads: list[bytes] = []
        self.ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = lambda _c, _u, m: self.payloads.append(m.payload)
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, 0)
        self.client.loop_start()
        assert self.ready.wait(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.parametrize("protocol", [aiomqtt.ProtocolVersion.V311, aiomqtt.ProtocolVersion.V5])
async def test_coalesced_publishes_reach_a_real_broker_intact(
    mosquitto: Mosquitto, protocol: aiomqtt.ProtocolVersion
) -> None:
    subscriber = Subscriber(mosquitto.port, "bridge/#")
    payloads = [b"x" * size for size in (0, 1, 127, 128, 20_000, 70_000)] + [
        b"%d" % i for i in range(500)
    ]
    client = aiomqtt.Client("127.0.0.1", mosquitto.port, protocol=protocol)
    bridge = PahoBridge(client, lambda *_publish: None)
    bridge.begin_connection()
    async with client:
        bridge.take_over_reads()
        assert all(bridge.publish_nowait("bridge/t", p, 0) for p in payloads)
        await asyncio.to_thread(wait_until, lambda: len(subscriber.payloads) == len(payloads), 10)
    assert subscriber.payloads == payloads
    subscriber.close()


async def test_writes_queued_for_an_earlier_connection_are_dropped(mosquitto: Mosquitto) -> None:
    subscriber = Subscriber(mosquitto.port, "bridge/#")
    client = aiomqtt.Client("127.0.0.1", mosquitto.port)
    bridge = PahoBridge(client, lambda *_publish: None)
    bridge.begin_connection()
    async with client:
        bridge.take_over_reads()
        assert bridge.publish_nowait("bridge/old", b"stale", 0)
        bridge.begin_connection()  # as if the connection had been replaced before the flush
        assert bridge.publish_nowait("bridge/new", b"fresh", 0)
        await asyncio.to_thread(wait_until, lambda: subscriber.payloads, 10)
    assert subscriber.payloads == [b"fresh"]
    subscriber.close()


async def test_paused_reads_deliver_nothing_until_resumed(mosquitto: Mosquitto) -> None:
    received: list[bytes] = []
    client = aiomqtt.Client("127.0.0.1", mosquitto.port)
    bridge = PahoBridge(client, lambda _topic, payload, *_rest: received.append(payload))
    bridge.begin_connection()
    async with client:
        bridge.take_over_reads()
        await client.subscribe("pause/#", 1)
        bridge.pause_reads()
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        publisher.connect("127.0.0.1", mosquitto.port)
        publisher.loop_start()
        infos = [publisher.publish("pause/x", b"%d" % i, 1) for i in range(50)]
        for info in infos:
            await asyncio.to_thread(info.wait_for_publish, 10)
        assert received == []
        bridge.resume_reads()
        await asyncio.to_thread(wait_until, lambda: len(received) == 50, 10)
        for mid in range(1, 51):
            bridge.ack(mid, 1)
        publisher.loop_stop()
        publisher.disconnect()
    assert received == [b"%d" % i for i in range(50)]


async def test_publishes_with_and_without_v5_properties_arrive_in_order(
    mosquitto: Mosquitto,
) -> None:
    """Plain PUBLISHes take the bridge's decoder, ones with properties take paho's: both
    reach the callback, in the order the broker sent them, with the same fields."""
    received: list[tuple[str, bytes, int, bool]] = []
    client = aiomqtt.Client("127.0.0.1", mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5)
    bridge = PahoBridge(
        client,
        lambda topic, payload, mid, qos, _dup, retain: received.append(
            (topic, payload, qos, retain)
        ),
    )
    through_paho: list[bytes] = []
    deliver = client._client.on_message
    assert deliver is not None

    def counting(c: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        through_paho.append(message.payload)
        deliver(c, userdata, message)

    client._client.on_message = counting
    bridge.begin_connection()
    async with client:
        bridge.take_over_reads()
        await client.subscribe("mixed/#", 1)
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        publisher.connect("127.0.0.1", mosquitto.port)
        publisher.loop_start()
        tagged = Properties(PacketTypes.PUBLISH)
        tagged.UserProperty = ("k", "v")
        infos = [
            publisher.publish(f"mixed/{i}", b"%d" % i, 1, properties=tagged if i % 3 == 0 else None)
            for i in range(60)
        ]
        for info in infos:
            await asyncio.to_thread(info.wait_for_publish, 10)
        await asyncio.to_thread(wait_until, lambda: len(received) == 60, 10)
        publisher.loop_stop()
        publisher.disconnect()
    assert received == [(f"mixed/{i}", b"%d" % i, 1, False) for i in range(60)]
    tagged_payloads = {b"%d" % i for i in range(0, 60, 3)}
    assert tagged_payloads <= set(through_paho)  # properties: paho decodes them
    assert len(through_paho) < 60  # the rest took the bridge's decoder


async def test_qos1_publishes_beyond_max_queued_bytes_are_refused_until_pubacks(
    mosquitto: Mosquitto,
) -> None:
    subscriber = Subscriber(mosquitto.port, "bounded/#")
    client = aiomqtt.Client("127.0.0.1", mosquitto.port)
    bridge = PahoBridge(client, lambda *_publish: None, max_queued_bytes=3000)
    bridge.begin_connection()
    async with client:
        bridge.take_over_reads()
        kilobyte = b"k" * 1000
        # No await in between: no PUBACK can arrive, so each one waits for its PUBACK.
        results = [bridge.publish_nowait("bounded/k", kilobyte, 1) for _ in range(5)]
        assert results == [True, True, True, False, False]
        assert bridge.queued_bytes == 3000
        assert bridge.publish_nowait("bounded/q0", b"qos 0 is not counted", 0)
        await wait_until_async(lambda: bridge.queued_bytes == 0, 10)  # the PUBACKs free it
        assert bridge.publish_nowait("bounded/k", kilobyte, 1)
        await wait_until_async(lambda: bridge.queued_bytes == 0, 10)
        huge = b"h" * 5000
        assert bridge.publish_nowait("bounded/h", huge, 1)  # larger than the bound: alone
        assert not bridge.publish_nowait("bounded/k", b"x", 1)  # ... nothing joins it
        await wait_until_async(lambda: bridge.queued_bytes == 0, 10)
        async with asyncio.timeout(10):  # aiomqtt's own QoS 1 publishes still complete
            await client.publish("bounded/aiomqtt", b"a", qos=1)
        await asyncio.to_thread(wait_until, lambda: len(subscriber.payloads) == 7, 10)
    assert subscriber.payloads == [
        kilobyte, kilobyte, kilobyte, b"qos 0 is not counted", kilobyte, huge, b"a",
    ]  # fmt: skip
    subscriber.close()
