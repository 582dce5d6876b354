"""The simulator's MQTT side: a paho client driven by the running asyncio loop.

``BrokerLink`` publishes messages and reports each one as the broker acknowledges it;
``connect_with_retry`` waits for a broker that may still be starting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import ssl
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge.simulation import Message, SimulatorError, SimulatorOptions, broker_address

__all__ = ["BrokerLink", "connect_with_retry", "wait_at_most"]

_KEEPALIVE = 30  # seconds


class BrokerLink:
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


async def connect_with_retry(link: BrokerLink, budget: float, stop: asyncio.Event) -> bool:
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
            await wait_at_most(stop, min(delay, remaining))
            delay = min(delay * 2, 0.5)
        else:
            return True
    return False


async def wait_at_most(event: asyncio.Event, seconds: float) -> None:
    """Wait for ``event``, at most ``seconds``."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
