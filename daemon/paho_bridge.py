"""Everything ingestd needs below aiomqtt 2.5.1's public API, in one place.

aiomqtt has no manual acknowledgements, no way to stop reading the socket, and its
message queue either grows without bound or discards when full. ingestd needs all
three, so this module reaches into the paho client aiomqtt wraps:

- ``manual_ack_set(True)`` before connecting, and ``ack()`` from the event-loop thread;
- its own ``on_message`` callback (no queue hop, no silent discard);
- its own socket reader, which it can remove and re-add to pause intake when the
  in-flight window is full (TCP backpressure then reaches the broker).

Drop it piece by piece as aiomqtt grows these features; the version is pinned exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

_MAX_OUT_PACKETS = 10_000


class PahoBridge:
    """Manual acks, direct message callbacks and pausable reads for one aiomqtt client."""

    def __init__(
        self, client: aiomqtt.Client, on_message: Callable[[paho.MQTTMessage], None]
    ) -> None:
        self._client = client
        self._paho: paho.Client = client._client
        self._loop = asyncio.get_running_loop()
        self._fd = -1
        self._paused = False
        self._reading = False
        self._paho.manual_ack_set(True)

        def deliver(_client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
            on_message(message)

        self._paho.on_message = deliver

    # -- reads -----------------------------------------------------------------------------

    def take_over_reads(self) -> None:
        """Replace aiomqtt's socket reader with ours; call right after each connect."""
        sock = self._paho.socket()
        if sock is None:
            return
        self._fd = sock.fileno()
        self._loop.remove_reader(self._fd)
        self._reading = False
        if not self._paused:
            self._add_reader()

    def pause_reads(self) -> None:
        """Stop reading the socket: nothing more is delivered until ``resume_reads``."""
        self._paused = True
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def resume_reads(self) -> None:
        self._paused = False
        if not self._reading:
            self._add_reader()

    @property
    def paused(self) -> bool:
        return self._paused

    def _add_reader(self) -> None:
        sock = self._paho.socket()
        # After a disconnect aiomqtt removed the reader and the fd may be closed or reused.
        if sock is None or sock.fileno() != self._fd or self._fd < 0:
            return
        self._loop.add_reader(self._fd, self._on_readable)
        self._reading = True

    def _on_readable(self) -> None:
        try:
            while not self._paused:
                self._paho.loop_read()
                # TLS sockets may hold decoded bytes that select() does not report.
                sock = self._paho.socket()
                if not (hasattr(sock, "pending") and sock.pending() > 0):  # type: ignore[union-attr]
                    break
        except Exception as exc:  # noqa: BLE001 - any failure here means the connection is unusable
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        # Mirrors aiomqtt's own reader: an exception while reading ends the connection; the
        # unacknowledged messages are redelivered on the next one.
        disconnected: asyncio.Future[None] = self._client._disconnected
        if not disconnected.done():
            disconnected.set_exception(aiomqtt.MqttError(f"read failed: {exc!r}"))
        self._paho.disconnect()

    # -- acks, publishing, state -----------------------------------------------------------

    def ack(self, mid: int, qos: int) -> bool:
        """Send the PUBACK for ``mid``; False when there is no connection to send it on."""
        if not self._paho.is_connected():
            return False
        return self._paho.ack(mid, qos) == paho.MQTT_ERR_SUCCESS

    def publish_nowait(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> bool:
        """Queue a publish without awaiting the broker; False when it could not be queued."""
        # paho bounds queued QoS 1 messages (max_queued_messages) but not outgoing packets:
        # QoS 0 events would pile up there without limit if the broker stopped reading.
        if not self._paho.is_connected() or len(self._paho._out_packet) >= _MAX_OUT_PACKETS:
            return False
        info = self._paho.publish(topic, payload, qos, retain)
        return info.rc == paho.MQTT_ERR_SUCCESS

    def connected(self) -> bool:
        return bool(self._paho.is_connected())

    async def wait_disconnected(self) -> None:
        """Return (or raise aiomqtt's error) when the current connection ends."""
        await asyncio.shield(self._client._disconnected)
