"""The module below aiomqtt's public API: buffered reads, raw packets, coalesced writes."""

from __future__ import annotations

import asyncio
import threading

import aiomqtt
import paho.mqtt.client as mqtt
import pytest
from harness.servers import Mosquitto, wait_until

from daemon.paho_bridge import PahoBridge, _BufferedSocket, _publish_qos0, _remaining_length


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
    assert _remaining_length(length) == encoded


def test_qos0_publish_packet_layout() -> None:
    assert _publish_qos0("a/b", b"hi", False, False) == b"\x30\x07\x00\x03a/bhi"
    assert _publish_qos0("a/b", b"hi", True, True) == b"\x31\x08\x00\x03a/b\x00hi"


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
    bridge = PahoBridge(client, lambda _message: None)
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
    bridge = PahoBridge(client, lambda _message: None)
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
    bridge = PahoBridge(client, lambda message: received.append(message.payload))
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
