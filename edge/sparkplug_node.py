"""``ingestd simulate --format sparkplug``: one Sparkplug B 3.0 edge node with its devices.

The node (``spBv1.0/{group}/.../{edge_node}``) registers NDEATH as its MQTT will (QoS 1,
not retained, with its bdSeq), subscribes to its NCMD topic, then publishes NBIRTH (seq 0,
``bdSeq``, ``Node Control/Rebirth`` false, every metric with name, alias, datatype and
timestamp), one DBIRTH per device (name and alias), then DDATA round-robin over the
devices, by alias only (no name and no datatype: readers take both from the DBIRTH).
seq runs 0..255 across all of them and wraps. An NCMD with ``Node Control/Rebirth`` true
makes it publish NBIRTH (seq 0, the same bdSeq: bdSeq changes only with a new MQTT
session) and its DBIRTHs again before the next DDATA. A clean stop publishes NDEATH
itself before disconnecting. BIRTH and DATA go at QoS 0, as the specification requires,
whatever ``--qos`` says.

With ``--bad-ratio``, that share of DDATA slots carries malformed protobuf instead (the
daemon's reason: ``sparkplug_malformed``); it uses no seq, since no reader could see one.
Metric timestamps are ms and strictly increasing per device, so readings never collide
on the daemon's unique key however fast the node publishes.
"""

from __future__ import annotations

import random
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt

from edge.publishing import BrokerLink
from edge.readings import PayloadError
from edge.signals import DEVICE_SENSORS, SensorSpec, Series, device_ids, make_series
from edge.simulation import Message, SimulatorOptions
from edge.sparkplug import (
    BDSEQ_METRIC,
    DATATYPES,
    NAMESPACE,
    REBIRTH_METRIC,
    SPARKPLUG_MALFORMED,
    Payload,
    decode_payload,
    encode_metric,
    encode_payload,
)

__all__ = ["SPARKPLUG_BAD_REASONS", "SparkplugNode", "bad_sparkplug_variants", "device_sensors"]

SPARKPLUG_BAD_REASONS = (SPARKPLUG_MALFORMED,)

_UINT64 = DATATYPES["UInt64"]
_BOOLEAN = DATATYPES["Boolean"]
_STRING = DATATYPES["String"]
_INT64 = DATATYPES["Int64"]
_FLOAT = DATATYPES["Float"]
_DOUBLE = DATATYPES["Double"]
_REBIRTH_ALIAS = 2
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


def device_sensors(count: int) -> tuple[SensorSpec, ...]:
    """``count`` metrics per device: temp, vib, pressure, current, temp2, vib2, ..."""
    kinds = DEVICE_SENSORS
    return tuple(
        SensorSpec(
            kinds[i % len(kinds)].sensor_id + (str(i // len(kinds) + 1) if i >= len(kinds) else ""),
            kinds[i % len(kinds)].unit,
            kinds[i % len(kinds)].make,
        )
        for i in range(count)
    )


def bad_sparkplug_variants(good: bytes) -> list[bytes]:
    """Payloads no Sparkplug reader can parse, one of them ``good`` cut short by a byte."""
    return [
        good[:-1],  # the seq varint's value is gone
        b"\x12\xff\x01\x0a",  # a metric 255 bytes long, of which one arrived
        b"\x0f",  # wire type 7 does not exist
        b'{"value": 1.5}',  # JSON on a Sparkplug topic
        b"\x08\x80\x80\x80",  # a timestamp varint that never ends
    ]


class SparkplugNode:
    """The messages of one edge node in publishing order; also its will and NCMD handler."""

    def __init__(self, options: SimulatorOptions) -> None:
        self.group, self.edge_node = options.group, options.edge_node
        self.bdseq = options.bdseq
        self.devices = device_ids(options.devices, options.device_prefix)
        sensors = device_sensors(options.metrics)
        series = make_series(self.devices, options.seed, sensors)
        per_device = len(sensors)
        self.series = {
            device: series[i * per_device : (i + 1) * per_device]
            for i, device in enumerate(self.devices)
        }
        first_alias = 100  # node metrics below, device metrics from here: unique per node
        self.aliases = {
            (device, s.sensor_id): first_alias + i * per_device + j
            for i, device in enumerate(self.devices)
            for j, s in enumerate(self.series[device])
        }
        seeded = options.seed is not None
        self._rng = random.Random(f"{options.seed}/sparkplug-bad") if seeded else random.Random()
        self._bad_ratio = options.bad_ratio
        self._seq = 0
        self._pending: deque[Message] = deque()
        self._next_device = 0
        self._last_ms: dict[str | None, int] = {}  # per device (None: the node)
        self.rebirths = 0  # NCMD rebirth requests answered
        self._link: BrokerLink | None = None

    # --- topics and the session ---------------------------------------------------------------

    def topic(self, verb: str, device: str | None = None) -> str:
        """``spBv1.0/{group}/{verb}/{edge_node}[/{device}]``."""
        base = f"{NAMESPACE}/{self.group}/{verb}/{self.edge_node}"
        return f"{base}/{device}" if device is not None else base

    def attach(self, link: BrokerLink) -> None:
        """Before connecting: NDEATH as the will, and NCMD handling."""
        link.client.will_set(self.topic("NDEATH"), self.death_payload(), qos=1, retain=False)
        link.client.on_message = self._on_message
        self._link = link

    def online(self, link: BrokerLink, now: datetime) -> None:
        """Once connected: subscribe to NCMD, then queue the births."""
        link.client.subscribe(self.topic("NCMD"), qos=0)
        self.queue_births(now)

    def death_payload(self, now: datetime | None = None) -> bytes:
        """NDEATH: the bdSeq of this session, a timestamp, no seq."""
        ms = _ms(now or datetime.now(UTC))
        metric = encode_metric(
            name=BDSEQ_METRIC, datatype=_UINT64, value=self.bdseq, timestamp_ms=ms
        )
        return encode_payload([metric], seq=None, timestamp_ms=ms)

    def death(self, now: datetime) -> Message:
        """The NDEATH a clean stop publishes before disconnecting (QoS 1, as the will)."""
        return Message(self.topic("NDEATH"), self.death_payload(now), 0, qos=1)

    # --- publishing order ---------------------------------------------------------------------

    def next(self, now: datetime) -> Message:
        """Births still owed first, then DDATA (or, at the bad ratio, a malformed one)."""
        if self._pending:
            return self._pending.popleft()
        device = self.devices[self._next_device]
        self._next_device = (self._next_device + 1) % len(self.devices)
        if self._bad_ratio and self._rng.random() < self._bad_ratio:
            good = self._data(device, now, seq=0)  # a template to spoil; no seq is used
            payload = self._rng.choice(bad_sparkplug_variants(good.payload))
            return Message(good.topic, payload, 0, SPARKPLUG_MALFORMED, qos=0)
        return self._data(device, now, seq=self._next_seq())

    def queue_births(self, now: datetime) -> None:
        """NBIRTH (seq 0) and every DBIRTH go before anything else, dropping older births."""
        self._pending.clear()
        self._seq = 0
        self._pending.append(self._node_birth(now))
        self._pending.extend(self._device_birth(device, now) for device in self.devices)

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (seq + 1) % 256
        return seq

    def _tick(self, key: str | None, now: datetime) -> int:
        """ms for the next metrics of ``key``: now, or 1 ms past the previous ones."""
        ms = max(_ms(now), self._last_ms.get(key, -1) + 1)
        self._last_ms[key] = ms
        return ms

    def _node_birth(self, now: datetime) -> Message:
        ms = self._tick(None, now)
        metrics = [
            (BDSEQ_METRIC, 1, _UINT64, self.bdseq),
            (REBIRTH_METRIC, _REBIRTH_ALIAS, _BOOLEAN, False),
            ("Node Control/Scan Rate", 3, _INT64, 1000),
            ("Properties/Hardware Make", 4, _STRING, "ingestd simulator"),
        ]
        encoded = [
            encode_metric(name=name, alias=alias, datatype=kind, value=value, timestamp_ms=ms)
            for name, alias, kind, value in metrics
        ]
        payload = encode_payload(encoded, seq=self._next_seq(), timestamp_ms=_ms(now))
        return Message(self.topic("NBIRTH"), payload, len(encoded), qos=0)

    def _device_birth(self, device: str, now: datetime) -> Message:
        return self._device_message("DBIRTH", device, now, self._next_seq(), named=True)

    def _data(self, device: str, now: datetime, seq: int) -> Message:
        return self._device_message("DDATA", device, now, seq, named=False)

    def _device_message(
        self, verb: str, device: str, now: datetime, seq: int, *, named: bool
    ) -> Message:
        ms = self._tick(device, now)
        stamp = datetime.fromtimestamp(ms / 1000, UTC)
        metrics = [
            encode_metric(
                name=series.sensor_id if named else None,
                alias=self.aliases[device, series.sensor_id],
                datatype=_datatype(series),
                value=series.next(stamp).value,
                timestamp_ms=ms,
            )
            for series in self.series[device]
        ]
        if not named:  # DATA by alias only: the datatype, too, is the birth's
            for metric in metrics:
                metric.ClearField("datatype")
        payload = encode_payload(metrics, seq=seq, timestamp_ms=_ms(now))
        return Message(self.topic(verb, device), payload, len(metrics), qos=0)

    # --- commands -----------------------------------------------------------------------------

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self.handle_command(bytes(message.payload), datetime.now(UTC)) and self._link:
            self._link.wake.set()

    def handle_command(self, payload: bytes, now: datetime) -> bool:
        """Queue a rebirth if ``payload`` (an NCMD) asks for one; True when it did."""
        try:
            command = decode_payload(payload)
        except PayloadError:
            return False
        if not any(_is_rebirth(metric) for metric in command.metrics):
            return False
        self.rebirths += 1
        self.queue_births(now)
        return True


def _is_rebirth(metric: Payload.Metric) -> bool:
    named = metric.name == REBIRTH_METRIC or (
        not metric.HasField("name") and metric.alias == _REBIRTH_ALIAS
    )
    return named and metric.WhichOneof("value") == "boolean_value" and metric.boolean_value


def _datatype(series: Series) -> int:
    return _FLOAT if series.sensor_id.startswith("temp") else _DOUBLE


def _ms(now: datetime) -> int:
    return (now - _EPOCH) // _ONE_MS
