"""The two kinds of broker connection ingestd keeps, and what differs between them.

``PersistentSession`` carries the JSON and value sources: a stable client id, never a clean
start (the broker keeps a backlog while ingestd is away), ``{prefix}/status`` as its will.
``SparkplugSession`` is the Sparkplug host's: the specification requires a clean session and
the host's STATE death as will, published retained on ``spBv1.0/STATE/{host_id}``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable

import orjson

from daemon.config import Config

__all__ = ["PersistentSession", "Session", "SparkplugSession"]

Publish = Callable[..., bool]  # (topic, payload, qos, *, retain) -> queued


class Session(ABC):
    """What one connection is: its client id, cleanliness, subscriptions and announcements."""

    name: str  # the `connection` label of its metrics
    clean: bool

    def __init__(self, config: Config) -> None:
        self.config = config

    @property
    @abstractmethod
    def client_id(self) -> str:
        """The MQTT client id."""

    @property
    @abstractmethod
    def subscriptions(self) -> list[str]:
        """The filters it subscribes to."""

    @abstractmethod
    def will(self) -> tuple[str, bytes]:
        """Topic and payload of its will (QoS 1, retained); set anew before each connect."""

    @abstractmethod
    def birth(self) -> tuple[str, bytes]:
        """What it publishes (QoS 1, retained) once subscribed, on every connection."""

    @abstractmethod
    def death(self) -> tuple[str, bytes]:
        """What it publishes before a clean disconnect."""

    def intercept(self, topic: str, payload: bytes, publish: Publish) -> bool:
        """Handle a message that is the connection's own business; True keeps it off the
        pipeline (it is acknowledged at once)."""
        return False


class PersistentSession(Session):
    """The JSON/value sources' connection, with its persistent session."""

    name = "main"
    clean = False

    @property
    def client_id(self) -> str:
        return self.config.mqtt.client_id

    @property
    def subscriptions(self) -> list[str]:
        return self.config.subscriptions

    def will(self) -> tuple[str, bytes]:
        return self._status, b"offline"

    def birth(self) -> tuple[str, bytes]:
        return self._status, b"online"

    def death(self) -> tuple[str, bytes]:
        return self.will()

    @property
    def _status(self) -> str:
        return f"{self.config.publish.prefix}/status"


class SparkplugSession(Session):
    """The Sparkplug host's connection: clean session, STATE birth and death."""

    name = "sparkplug"
    clean = True

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._born_ms = _now_ms()

    @property
    def client_id(self) -> str:
        return f"{self.config.mqtt.client_id}-spb"

    @property
    def state_topic(self) -> str:
        return f"spBv1.0/STATE/{self.config.sparkplug.host_id}"

    @property
    def subscriptions(self) -> list[str]:
        topics = [source.topic for source in self.config.sparkplug_sources]
        return [*topics, self.state_topic]  # its own STATE, to correct a stale offline

    def will(self) -> tuple[str, bytes]:
        # A new birth timestamp per connection; the will carries the same one (the spec).
        self._born_ms = _now_ms()
        return self.state_topic, _state(False, self._born_ms)

    def birth(self) -> tuple[str, bytes]:
        return self.state_topic, _state(True, self._born_ms)

    def death(self) -> tuple[str, bytes]:
        return self.state_topic, _state(False, _now_ms())

    def intercept(self, topic: str, payload: bytes, publish: Publish) -> bool:
        if topic != self.state_topic:
            return False
        try:
            online = orjson.loads(payload).get("online")
        except (orjson.JSONDecodeError, AttributeError):
            online = None
        if online is not True:  # our own STATE reads offline while we are up: say online
            state_topic, body = self.birth()
            publish(state_topic, body, 1, retain=True)
        return True


def _state(online: bool, timestamp_ms: int) -> bytes:
    return orjson.dumps({"online": online, "timestamp": timestamp_ms})


def _now_ms() -> int:
    return int(time.time() * 1000)
