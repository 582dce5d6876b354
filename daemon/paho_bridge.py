"""Everything ingestd needs below aiomqtt 2.5.1's public API, in one place.

aiomqtt has no manual acknowledgements, no way to stop reading the socket, and its
message queue either grows without bound or discards when full. ingestd needs all
three, and the Python MQTT client is the throughput ceiling of the whole pipeline, so
this module reaches into the paho client aiomqtt wraps:

- ``manual_ack_set(True)`` before connecting, and PUBACKs sent from the event-loop thread;
- its own message callback (no queue hop, no silent discard);
- its own socket reader, removed and re-added to pause intake when the in-flight window
  is full (TCP backpressure then reaches the broker); it reads a bounded run of packets
  per wake-up through a buffered socket (paho alone makes 3 ``recv`` calls per packet),
  and decodes a complete QoS 0/1 PUBLISH found in that buffer itself with
  ``daemon.mqtt_packets`` (paho builds a message object, logs, and matches the topic
  against per-filter callbacks for each: about a third of the daemon's CPU in a profile).
  Everything else, partial packets and PUBLISHes with v5 properties included, goes
  through paho as before;
- an outbox that coalesces PUBACKs and QoS 0 publishes into one write per loop turn
  (paho alone makes a ``send`` and several objects per packet).

Drop it piece by piece as aiomqtt grows these features; the version is pinned exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

from daemon.mqtt_packets import RawPublish, decode_publish, encode_publish_qos0

__all__ = ["OnPublish", "PahoBridge"]

# on_publish(topic, payload, mid, qos, dup, retain), called for every PUBLISH received.
OnPublish = Callable[[str, bytes, int, int, bool, bool], None]

_READ_CHUNK = 64 * 1024
# Packets handled per wake-up before yielding to the other tasks (acks, writes, agents).
_PACKETS_PER_TURN = 256
# paho bounds queued QoS 1 messages (max_queued_messages) but not its outgoing packets.
_MAX_OUTBOX_BYTES = 4 * 1024 * 1024


class _BufferedSocket:
    """Serves paho's small ``recv`` calls from one large read; delegates everything else."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buffer = b""
        self._pos = 0

    def recv(self, size: int) -> bytes:
        if self._pos >= len(self._buffer):
            self._buffer = self._sock.recv(_READ_CHUNK)  # raises BlockingIOError when empty
            self._pos = 0
            if not self._buffer:
                return b""  # EOF: paho treats it as a lost connection
        chunk = self._buffer[self._pos : self._pos + size]
        self._pos += len(chunk)
        return chunk

    def buffered(self) -> int:
        return len(self._buffer) - self._pos

    def pending(self) -> int:
        """What is readable without waiting for the socket (paho asks TLS sockets this)."""
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return self.buffered() + int(inner)

    def take_publish(self, v5: bool) -> RawPublish | None:
        """The next packet, if it is a whole QoS 0/1 PUBLISH already buffered, decoded.

        Consumes the packet; returns None and consumes nothing for anything else (see
        ``decode_publish``).
        """
        decoded = decode_publish(self._buffer, self._pos, v5)
        if decoded is None:
            return None
        self._pos, publish = decoded
        return publish

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class PahoBridge:
    """Manual acks, direct message callbacks, pausable buffered reads and coalesced writes."""

    def __init__(
        self, client: aiomqtt.Client, on_publish: OnPublish, max_queued_bytes: int = 8 << 20
    ) -> None:
        self._client = client
        self._paho: paho.Client = client._client
        # QoS 1 publishes paho holds until their PUBACK: bounded in bytes here (paho
        # bounds only their count), since a failed event carries a payload of up to 64 KiB.
        self.max_queued_bytes = max_queued_bytes
        self.queued_bytes = 0
        self._queued: dict[int, int] = {}  # mid -> payload bytes
        self._count_pubacks()
        self._loop = asyncio.get_running_loop()
        self._fd = -1
        self._sock: _BufferedSocket | None = None
        self._paused = False
        self._reading = False
        self._outbox = bytearray()
        self._flush_scheduled = False
        self._generation = 0
        self._v5 = False
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._loop_thread = threading.get_ident()
        self._writer_sock: Any = None
        self._writer_fd = -1
        self._paho.manual_ack_set(True)
        # aiomqtt defers adding the writer with call_soon_threadsafe but removes it at once:
        # a socket closed in between leaves a writer on a dead (or reused) descriptor, which
        # aborts uvloop. Ours add and remove on the loop thread, for the current socket only.
        self._paho.on_socket_register_write = self._register_write
        self._paho.on_socket_unregister_write = self._unregister_write

        self._on_publish = on_publish

        def deliver(_client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
            # What paho decodes itself: PUBLISHes with v5 properties, or split across reads.
            on_publish(
                _topic(message._topic),
                bytes(message.payload),
                message.mid,
                message.qos,
                bool(message.dup),
                bool(message.retain),
            )

        self._paho.on_message = deliver

    def _count_pubacks(self) -> None:
        """Free a QoS 1 publish's bytes at its PUBACK, then let aiomqtt see it too."""
        acknowledged = self._paho.on_publish  # aiomqtt's: completes its publish() futures

        def on_puback(client: paho.Client, userdata: Any, mid: int, *args: Any) -> None:
            self.queued_bytes -= self._queued.pop(mid, 0)
            if acknowledged is not None:
                acknowledged(client, userdata, mid, *args)

        self._paho.on_publish = on_puback

    # -- connection ------------------------------------------------------------------------

    def begin_connection(self) -> None:
        """Call before every connect: nothing buffered for an earlier connection is sent."""
        self._generation += 1
        self._outbox.clear()
        self._flush_scheduled = False  # a flush still scheduled belongs to the old generation

    def take_over_reads(self) -> None:
        """Swap in the buffered socket and our reader; call right after each connect."""
        raw = self._paho._sock
        if raw is None:
            return
        self._sock = _BufferedSocket(raw)
        self._paho._sock = self._sock
        if self._writer_sock is raw:  # registered while connecting: it is the wrapper now
            self._writer_sock = self._sock
        self._v5 = self._paho._protocol == paho.MQTTv5
        self._fd = raw.fileno()
        _enable_tcp_keepalive(raw)
        self._loop.remove_reader(self._fd)
        self._reading = False
        if not self._paused:
            self._add_reader()

    # -- reads -----------------------------------------------------------------------------

    def pause_reads(self) -> None:
        """Stop reading the socket: nothing more is delivered until ``resume_reads``."""
        self._paused = True
        if self._keepalive_timer is None:
            self._keepalive_timer = self._loop.call_later(1.0, self._hold_keepalive)
        if self._reading:
            # Once the socket is closed aiomqtt has removed the reader, and the fd number
            # may already belong to another socket: leave it alone then.
            if self._sock is not None and self._paho._sock is self._sock:
                self._loop.remove_reader(self._fd)
            self._reading = False

    def resume_reads(self) -> None:
        self._paused = False
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None
        if not self._reading:
            self._add_reader()
            if self._reading and self._sock is not None and self._sock.buffered():
                # Already read from the kernel: the fd may never become readable for these.
                self._loop.call_soon(self._on_readable)

    def _hold_keepalive(self) -> None:
        # paho declares the link dead when no byte arrives for a keepalive interval, and
        # while reads are paused none can: tell it bytes did arrive. It still sends its
        # PINGREQs, so the broker sees a live client; TCP keepalive (set on connect) catches
        # a dead peer meanwhile. Without this, a long pause (a full spool, a slow commit)
        # would cost a reconnect and a redelivery of the whole window.
        self._keepalive_timer = None
        if not self._paused:
            return
        if self._sock is not None and self._paho._sock is self._sock:
            with self._paho._msgtime_mutex:
                self._paho._last_bytes_received = paho.time_func()
            self._paho._ping_t = 0
        self._keepalive_timer = self._loop.call_later(1.0, self._hold_keepalive)

    def _add_reader(self) -> None:
        # After a disconnect aiomqtt removed the reader and the fd may be closed or reused.
        if self._fd < 0 or self._sock is None or self._paho._sock is not self._sock:
            return
        self._loop.add_reader(self._fd, self._on_readable)
        self._reading = True

    def _on_readable(self) -> None:
        if self._sock is None:
            return
        sock: _BufferedSocket = self._sock
        paho_client, v5, on_publish = self._paho, self._v5, self._on_publish
        taken = 0
        try:
            for _ in range(_PACKETS_PER_TURN):
                if self._paused or paho_client._sock is not sock:
                    return
                # Our decoder only starts on a packet boundary, never inside one paho began.
                publish = sock.take_publish(v5) if not paho_client._in_packet["command"] else None
                if publish is not None:
                    taken += 1
                    topic, payload, mid, qos, dup, retain = publish
                    on_publish(_topic(topic), payload, mid, qos, dup, retain)
                    continue
                rc = paho_client._packet_read()
                if rc == paho.MQTT_ERR_AGAIN:
                    return
                if rc > 0:
                    paho_client._loop_rc_handle(rc)  # closes the socket, reports the loss
                    return
            if not self._paused and sock.buffered():
                self._loop.call_soon(self._on_readable)  # more already read: next turn
        except Exception as exc:  # noqa: BLE001 - any failure here means the connection is unusable
            self._fail(exc)
        finally:
            if taken:  # paho's keepalive must know bytes arrived
                with paho_client._msgtime_mutex:
                    paho_client._last_bytes_received = paho.time_func()

    def _fail(self, exc: BaseException) -> None:
        # As aiomqtt's own reader does: an exception while reading ends the connection; the
        # unacknowledged messages are redelivered on the next one.
        disconnected: asyncio.Future[None] = self._client._disconnected
        if not disconnected.done():
            disconnected.set_exception(aiomqtt.MqttError(f"read failed: {exc!r}"))
        self._paho._sock_close()

    # -- writes ----------------------------------------------------------------------------

    def _register_write(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            self._add_writer(sock)
        else:  # paho's connect runs in an executor thread
            self._loop.call_soon_threadsafe(self._add_writer, sock)

    def _add_writer(self, sock: Any) -> None:
        fd = sock.fileno()
        if fd < 0 or self._paho._sock is not sock or self._writer_sock is sock:
            return  # closed or replaced meanwhile, or already registered
        self._remove_writer()
        self._loop.add_writer(fd, self._on_writable)
        self._writer_sock, self._writer_fd = sock, fd

    def _unregister_write(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            if self._writer_sock is sock:
                self._remove_writer()
        else:
            self._loop.call_soon_threadsafe(self._unregister_later, sock)

    def _unregister_later(self, sock: Any) -> None:
        if self._writer_sock is sock:
            self._remove_writer()

    def _remove_writer(self) -> None:
        if self._writer_sock is not None:
            self._loop.remove_writer(self._writer_fd)
            self._writer_sock, self._writer_fd = None, -1

    def _on_writable(self) -> None:
        try:
            self._paho.loop_write()
        except Exception as exc:  # noqa: BLE001 - any failure here means the connection is unusable
            self._fail(exc)

    def ack(self, mid: int, qos: int) -> bool:
        """Queue the PUBACK for ``mid``; False when there is no connection to send it on."""
        if qos != 1 or not self._paho.is_connected():
            return qos == 0
        # PUBACK: type 4, remaining length 2, packet id (v5 allows omitting the reason code).
        self._queue(b"\x40\x02" + mid.to_bytes(2, "big"))
        return True

    def publish_nowait(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> bool:
        """Queue a publish without awaiting the broker; False when it could not be queued."""
        if not self._paho.is_connected():
            return False
        if qos == 0:
            if len(self._outbox) >= _MAX_OUTBOX_BYTES:
                return False
            self._queue(encode_publish_qos0(topic, payload, retain, self._v5))
            return True
        if self._queued and self.queued_bytes + len(payload) > self.max_queued_bytes:
            return False  # the broker is slow to acknowledge: drop (counted) rather than grow
        info = self._paho.publish(topic, payload, qos, retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return False
        self._queued[info.mid] = len(payload)
        self.queued_bytes += len(payload)
        return True

    def _queue(self, packet: bytes) -> None:
        self._outbox += packet
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush, self._generation)

    def _flush(self, generation: int) -> None:
        """Hand everything queued this turn to paho as one outgoing packet, one write."""
        if generation != self._generation:
            return  # scheduled for an earlier connection, whose bytes were already dropped
        self._flush_scheduled = False
        data, self._outbox = bytes(self._outbox), bytearray()
        if not data or not self._paho.is_connected():
            return
        # Command 0 is no MQTT packet type: paho writes the bytes and runs no callbacks.
        self._paho._out_packet.append(
            {
                "command": 0,
                "mid": 0,
                "qos": 0,
                "pos": 0,
                "to_process": len(data),
                "packet": data,
                "info": None,
            }
        )
        self._paho.loop_write()

    # -- state -----------------------------------------------------------------------------

    def connected(self) -> bool:
        return bool(self._paho.is_connected())

    async def wait_disconnected(self) -> None:
        """Return (or raise aiomqtt's error) when the current connection ends."""
        await asyncio.shield(self._client._disconnected)


def _topic(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:  # not valid UTF-8: kept readable, and rejected downstream
        return raw.decode("utf-8", "replace")


def _enable_tcp_keepalive(sock: Any) -> None:
    """Let the kernel find a dead peer (probes after 30 s idle), also while reads are paused."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
