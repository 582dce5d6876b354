"""MqttSource: one broker connection that feeds the bus and releases acknowledgements.

What kind of connection it is (the persistent session of the JSON/value sources, or the
Sparkplug host's clean one) is its ``Session``. Every message is numbered on receipt
(AckTracker), handed to the bus without a queue hop, and acknowledged only once its
outcome is durable. With two connections, message numbers interleave: ``seq % stride``
tells which connection a message came on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from datetime import UTC, datetime

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agents.budget import InflightBudget
from agents.bus import Inbox
from agents.events import RawMessage
from agents.retry import backoff
from daemon.acks import AckTracker
from daemon.config import Config
from daemon.metrics import IntakeMetrics
from daemon.paho_bridge import PahoBridge
from daemon.sessions import PersistentSession, Session

__all__ = ["MqttSource"]

log = logging.getLogger("ingestd.mqtt")


class MqttSource:
    """Connects, subscribes, delivers messages to the validation inbox and sends PUBACKs."""

    def __init__(
        self,
        config: Config,
        inbox: Inbox[RawMessage],
        metrics: IntakeMetrics,
        session: Session | None = None,
        budget: InflightBudget | None = None,
        *,
        tag: int = 0,
        stride: int = 1,
    ) -> None:
        self._config = config
        self._mqtt = config.mqtt
        self.session = session or PersistentSession(config)
        self._inbox = inbox
        self._metrics = metrics
        self._connection = metrics.connection(self.session.name)
        self._tag, self._stride = tag, stride  # this connection's seqs: n * stride + tag
        # Only a session with business of its own (the Sparkplug host's STATE) looks at
        # each message: the persistent session's hot path skips the call.
        self._intercepts = type(self.session).intercept is not Session.intercept
        self._correlation_prefix = os.urandom(4).hex() + "-"
        self._stopping = False
        self._pending: Config | None = None  # a reloaded config, applied at the next connect
        self._client = self._build_client()
        self.bridge = PahoBridge(self._client, self._on_message, config.publish.max_queued_bytes)
        # Through the source, not bound to this bridge: a reload builds a new one.
        self.tracker = AckTracker(
            self._mqtt.max_inflight,
            self._ack,
            metrics,
            on_room=self.on_room,
        )
        # What the messages in flight carry (shared by the connections); reads pause while
        # it is full, as for the window.
        self.budget = budget or InflightBudget(
            config.mqtt.max_inflight_bytes,
            config.ingest.max_inflight_readings,
            largest_payload=config.ingest.max_payload_bytes,
        )
        self.budget.watch(self.on_room)
        self.connected = asyncio.Event()
        self.subscription_problem: str | None = None

    def _ack(self, mid: int, qos: int) -> bool:
        return self.bridge.ack(mid, qos)

    def publish(self, topic: str, payload: bytes, qos: int, *, retain: bool = False) -> bool:
        """The outbound port: queue a message on the current connection (see ``PahoBridge``)."""
        return self.bridge.publish_nowait(topic, payload, qos, retain=retain)

    def settle(self, seqs: list[int]) -> None:
        """Settle this connection's messages (``seqs`` as handed to the bus)."""
        stride = self._stride
        self.tracker.settle(seqs if stride == 1 else [seq // stride for seq in seqs])

    async def reconfigure(self, config: Config) -> None:
        """Reconnect with a reloaded config (broker, credentials, TLS, subscriptions...).

        The current connection is closed cleanly; acks still owed on it are void (a new
        epoch), so the broker redelivers those messages, and the unique key makes that
        harmless. A changed client id starts another persistent session.
        """
        self._pending = config
        if self.bridge.connected():
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)

    def _apply_pending(self) -> None:
        config, self._pending = self._pending, None
        if config is None:
            return
        self._config, self._mqtt = config, config.mqtt
        self.session.config = config
        self.tracker.resize(config.mqtt.max_inflight)
        self.budget.resize(
            config.mqtt.max_inflight_bytes,
            config.ingest.max_inflight_readings,
            config.ingest.max_payload_bytes,
        )
        self._client = self._build_client()
        self.bridge = PahoBridge(self._client, self._on_message, config.publish.max_queued_bytes)
        if self.tracker.full or self.budget.full:  # the old connection's messages hold them
            self.bridge.pause_reads()
        log.info("reconnecting with the reloaded config", extra={"broker": self._mqtt.url})

    def _build_client(self) -> aiomqtt.Client:
        mqtt, session = self._mqtt, self.session
        v5 = mqtt.protocol == "5"
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0 if session.clean else mqtt.session_expiry_seconds
            properties.ReceiveMaximum = min(mqtt.max_inflight, 65535)
        will_topic, will_payload = session.will()
        return aiomqtt.Client(
            mqtt.host,
            mqtt.port,
            identifier=session.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            # The persistent session: never clean (aiomqtt's v5 default cleans on the first
            # connect, which would throw away a backlog). The Sparkplug host: always clean.
            clean_session=None if v5 else session.clean,
            # paho rejects any clean_start but its default on v3.1.1, where clean_session rules.
            clean_start=session.clean if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
            username=mqtt.username,
            password=mqtt.password.get_secret_value() if mqtt.password else None,
            tls_context=self._tls_context(),
            keepalive=mqtt.keepalive_seconds,
            timeout=mqtt.connect_timeout_seconds,
            will=aiomqtt.Will(will_topic, will_payload, qos=1, retain=True),
            max_queued_outgoing_messages=self._config.publish.max_queued,
            max_inflight_messages=100,
            logger=logging.getLogger("ingestd.paho"),
        )

    def _tls_context(self) -> ssl.SSLContext | None:
        if not self._mqtt.use_tls:
            return None
        tls = self._mqtt.tls
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
        if tls.cert_file:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        if tls.insecure:
            context.check_hostname = False
        return context

    # -- hot path --------------------------------------------------------------------------

    def _on_message(
        self, topic: str, payload: bytes, mid: int, qos: int, dup: bool, retain: bool
    ) -> None:
        """Called by the bridge on the loop thread for every PUBLISH received."""
        if self._stopping:
            return  # read while closing only to see the broker out: unacknowledged, redelivered
        self._metrics.received += 1
        local = self.tracker.track(mid, qos)
        if self._intercepts and self.session.intercept(topic, payload, self.publish):
            self.tracker.settle([local])  # the connection's own business: nothing to store
            return
        seq = local * self._stride + self._tag
        self.budget.admit(seq, len(payload))
        raw = RawMessage(
            seq,
            topic,
            payload,
            qos,
            datetime.now(UTC),
            time.monotonic(),
            f"{self._correlation_prefix}{seq:x}",
            dup or retain,
            retain,
        )
        try:
            # Never blocks: the inbox holds more than the in-flight window, and reads pause
            # below when the window is full.
            self._inbox.put_nowait(raw)
        except asyncio.QueueFull:
            # Should it ever be full anyway: void every ack of this connection, free the
            # slot, and end the connection (the exception does); the broker redelivers.
            self.tracker.new_epoch()
            self.tracker.settle([local])
            self.budget.release([seq])
            raise
        if self.tracker.full or self.budget.full:
            self.bridge.pause_reads()
            self._metrics.intake_paused.set(1)
            self._metrics.intake_pauses.inc()

    def on_room(self) -> None:
        """The window or the budget has room again: read on, unless the other is full."""
        if not self._stopping and not self.tracker.full and not self.budget.full:
            self.bridge.resume_reads()
            self._metrics.intake_paused.set(0)

    # -- connection lifecycle --------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected until ``close``: reconnect with capped, jittered backoff."""
        while not self._stopping:
            retrying = backoff(
                (aiomqtt.MqttError, OSError),
                first=self._mqtt.reconnect_min_seconds,
                cap=self._mqtt.reconnect_max_seconds,
                before_sleep=self._log_retry,
            )
            async for attempt in retrying:
                with attempt:
                    self._apply_pending()
                    await self._connect()
            try:
                await self._serve()
            except (aiomqtt.MqttError, OSError) as exc:
                self._lost(exc)
            else:  # a clean disconnect: ours, to reconnect with a reloaded config
                self.connected.clear()
                self._connection.connected.set(0)
            if not self._stopping:
                # Releases aiomqtt's connection lock so the client can connect again.
                with contextlib.suppress(aiomqtt.MqttError):
                    await self._client.__aexit__(None, None, None)

    async def _connect(self) -> None:
        # A new epoch before connecting: acks settled from here on for earlier messages
        # are discarded, never sent on the new connection.
        self.tracker.new_epoch()
        self.bridge.begin_connection()
        will_topic, will_payload = self.session.will()  # anew: STATE's birth timestamp
        self._client._client.will_set(will_topic, will_payload, 1, retain=True)
        try:
            await self._client.__aenter__()
        except aiomqtt.MqttError as exc:
            self._connection.disconnects["connect_failed"].inc()
            raise aiomqtt.MqttError(f"cannot connect to {self._mqtt.url}: {exc}") from exc
        self.bridge.take_over_reads()
        self._connection.connected.set(1)
        self._connection.connects.inc()
        self.connected.set()
        log.info("connected", extra={"broker": self._mqtt.url, "client_id": self.session.client_id})

    async def _serve(self) -> None:
        topics = self.session.subscriptions
        if not topics:  # only Sparkplug sources: this connection carries status and events
            self._announce(self.session.birth())
            await self.bridge.wait_disconnected()
            return
        qos: int = self._mqtt.subscribe_qos
        subscriptions: list[tuple[str, SubscribeOptions]] | list[tuple[str, int]]
        if self._mqtt.protocol == "5":
            # Retain handling 1: retained messages only for a new subscription, not each
            # time the persistent session is resumed.
            subscriptions = [
                (topic, SubscribeOptions(qos=qos, retainHandling=1)) for topic in topics
            ]
        else:
            subscriptions = [(topic, qos) for topic in topics]
        # The SUBACK queues behind a persistent session's backlog: hence the long timeout,
        # and a connection lost meanwhile must end the wait.
        disconnected = asyncio.ensure_future(self.bridge.wait_disconnected())
        subscribing = asyncio.ensure_future(
            self._client.subscribe(subscriptions, timeout=self._mqtt.subscribe_timeout_seconds)
        )
        try:
            await asyncio.wait({disconnected, subscribing}, return_when=asyncio.FIRST_COMPLETED)
            if not subscribing.done():
                await disconnected  # raises the connection's error
                raise aiomqtt.MqttError("disconnected while subscribing")
            self._check_granted(topics, subscribing.result())
            self._announce(self.session.birth())  # online once subscribed, every connection
            await disconnected
        finally:
            subscribing.cancel()
            disconnected.cancel()

    def _announce(self, message: tuple[str, bytes]) -> None:
        topic, payload = message
        self.bridge.publish_nowait(topic, payload, 1, retain=True)

    def _check_granted(self, topics: list[str], granted: object) -> None:
        # A broker refuses a filter (ACL, bad $share name) with a failure code, not an error.
        codes = granted if isinstance(granted, list | tuple) else []
        refused = [topic for topic, code in zip(topics, codes, strict=False) if _failed(code)]
        if refused:
            log.error("broker refused subscriptions", extra={"topics": refused})
        self.subscription_problem = f"broker refused {', '.join(refused)}" if refused else None
        log.info("subscribed", extra={"topics": topics})

    def _lost(self, exc: BaseException) -> None:
        self.connected.clear()
        self._connection.connected.set(0)
        self._connection.disconnects["lost"].inc()
        log.warning("connection lost", extra={"error": str(exc)})

    def _log_retry(self, state: object) -> None:
        outcome = getattr(state, "outcome", None)
        error = outcome.exception() if outcome is not None else None
        sleep = getattr(getattr(state, "next_action", None), "sleep", 0.0)
        log.warning(
            "broker unreachable, retrying",
            extra={"error": str(error), "in_seconds": round(sleep, 2)},
        )

    def stop_intake(self) -> None:
        """Deliver nothing more: the first phase of shutdown."""
        self._stopping = True
        self.bridge.pause_reads()

    async def close(self) -> None:
        """Say offline and disconnect cleanly (a persistent session stays on the broker)."""
        self._stopping = True
        if self.bridge.connected():
            # Read (and drop) until the broker closes: a socket closed with unread bytes is
            # reset, and the broker may then take the reset for a lost client and publish
            # the will over the death it was just sent.
            self.bridge.resume_reads()
            await self._quiet_then_say_death()
            try:
                await self._client.__aexit__(None, None, None)
            except aiomqtt.MqttError as exc:
                log.warning("unclean disconnect", extra={"error": str(exc)})
        self._connection.connected.set(0)
        self.connected.clear()

    async def _quiet_then_say_death(self) -> None:
        """A clean session (nothing to keep) stops the inflow first, and waits for the
        broker to take the death, so nothing unread is left when the socket closes."""
        if not self.session.clean:
            self._announce(self.session.death())  # never unsubscribe a persistent session
            return
        topic, payload = self.session.death()
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self._client.unsubscribe(self.session.subscriptions)
                await self._client.publish(topic, payload, qos=1, retain=True)


def _failed(code: object) -> bool:
    """A SUBACK code of 0x80 or more refuses the subscription."""
    value = code.value if isinstance(code, ReasonCode) else code
    return isinstance(value, int) and value >= 0x80
