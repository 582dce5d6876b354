"""SparkplugHost: the decoder of a ``sparkplug`` source, a Sparkplug B 3.0 host application.

Per edge node it keeps the birth (names, aliases, datatypes, bdSeq; durable in the birth
cache), the next expected seq, and whether the node and its devices are online. A gap in
seq, data before a birth or an unknown alias asks the node for a rebirth (NCMD), at most
once per cooldown; each online/offline change is published retained on
``{prefix}/devices/{device_id}/state``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import orjson

from agents.decoding import DecoderContext
from agents.events import RawMessage
from agents.sparkplug.births import Birth, BirthCache
from agents.sparkplug.metrics import SparkplugCounts
from edge import sparkplug as sp
from edge.codecs import MAX_ID_LENGTH
from edge.readings import PartialPayloadError, PayloadError, Reading, format_ts
from edge.sparkplug_b_pb2 import Payload

__all__ = ["SparkplugHost"]

_REBIRTH = "Node Control/Rebirth"


class SparkplugHost:
    """Decodes Sparkplug messages into readings and keeps each edge node's session state."""

    def __init__(self, context: DecoderContext) -> None:
        self._context = context
        self._births = BirthCache(context.state_dir / "sparkplug.db")
        self._births.open()
        self._expected_seq: dict[str, int] = {}  # node id -> the seq its next message carries
        self._last_rebirth: dict[str, float] = {}
        self.counts = SparkplugCounts(self._births, context.metrics)

    def decode(self, message: RawMessage, fields: dict[str, str]) -> list[Reading]:
        topic = sp.parse_topic(message.topic)
        try:
            return self._decode(topic, message)
        except PayloadError as exc:
            exc.device_id = exc.device_id or topic.device_id  # rejections name their device
            raise

    def _decode(self, topic: sp.SparkplugTopic, message: RawMessage) -> list[Reading]:
        if topic.verb in {"STATE", "NCMD", "DCMD"}:
            return []  # commands and host states are not readings (ours included)
        payload = sp.decode_payload(message.payload)
        if topic.verb == "NDEATH":
            self._node_death(topic, payload, message.received_at)
            return []
        if topic.verb == "NBIRTH" and sp.bdseq(payload) is None:  # refused: changes nothing
            raise PayloadError(sp.SPARKPLUG_NO_BDSEQ, f"{topic.node_id}: NBIRTH without bdSeq")
        self._check_seq(topic, payload)
        match topic.verb:
            case "NBIRTH" | "DBIRTH":
                return self._birth(topic, payload, message)
            case "DDEATH":
                self._set_online(topic.device_id, False, "DDEATH", message.received_at)
                return []
            case _:  # NDATA, DDATA
                return self._data(topic, payload, message)

    # -- births and deaths -----------------------------------------------------------------

    def _birth(
        self, topic: sp.SparkplugTopic, payload: Payload, message: RawMessage
    ) -> list[Reading]:
        key = topic.device_id
        if topic.verb == "NBIRTH":  # its bdSeq was checked in _decode
            birth = Birth(bdseq=sp.bdseq(payload), templates=sp.template_definitions(payload))
        else:
            birth = Birth()
            if self._births.get(topic.node_id) is None:
                self._request_rebirth(topic)  # a device of a node whose birth we never saw
        for metric in payload.metrics:
            if metric.HasField("name"):
                alias = metric.alias if metric.HasField("alias") else None
                birth.add(metric.name, alias, metric.datatype)
        birth.online = True
        self._births.put(key, birth)
        born = _payload_time(payload, message.received_at)
        self._announce(key, True, topic.verb, born)
        return self._readings(key, birth, payload, message)

    def _node_death(
        self, topic: sp.SparkplugTopic, payload: Payload, received_at: datetime
    ) -> None:
        birth = self._births.get(topic.node_id)
        bdseq = sp.bdseq(payload)
        if birth is None or bdseq is None or bdseq != birth.bdseq:
            self._context.metrics.sparkplug_stale_deaths.inc()  # an old session's will
            return
        self._expected_seq.pop(topic.node_id, None)
        self._set_online(topic.node_id, False, "NDEATH", received_at)
        for key in self._births.devices_of(topic.node_id):
            self._set_online(key, False, "NDEATH", received_at)

    def _set_online(self, key: str, online: bool, cause: str, at: datetime) -> None:
        birth = self._births.get(key)
        if birth is None or birth.online == online:
            return
        birth.online = online
        self._births.put(key, birth)
        self._announce(key, online, cause, at)

    def _announce(self, key: str, online: bool, cause: str, at: datetime) -> None:
        body = orjson.dumps({"online": online, "ts": format_ts(at), "cause": cause})
        topic = f"{self._context.prefix}/devices/{key}/state"
        self._context.outbound.publish(topic, body, 1, retain=True)
        self.counts.refresh()

    # -- data ------------------------------------------------------------------------------

    def _data(
        self, topic: sp.SparkplugTopic, payload: Payload, message: RawMessage
    ) -> list[Reading]:
        key = topic.device_id
        birth = self._births.get(key)
        if birth is None:
            self._request_rebirth(topic)
            raise PayloadError(sp.SPARKPLUG_NO_BIRTH, f"{key}: {topic.verb} before any birth")
        for metric in payload.metrics:
            if (
                not metric.HasField("name")
                and metric.HasField("alias")  # neither: a bad metric (_readings), not alias 0
                and metric.alias not in birth.by_alias
            ):
                self._request_rebirth(topic)
                raise PayloadError(
                    sp.SPARKPLUG_UNKNOWN_ALIAS, f"{key}: alias {metric.alias} is not in its birth"
                )
        if not birth.online:  # data from a node or device marked offline: it is back
            cause = "NBIRTH" if topic.device is None else "DBIRTH"
            self._set_online(key, True, cause, message.received_at)
        return self._readings(key, birth, payload, message)

    def _readings(
        self, key: str, birth: Birth, payload: Payload, message: RawMessage
    ) -> list[Reading]:
        """One reading per metric; a bad metric is reported, never loses the others."""
        readings: list[Reading] = []
        problems: list[str] = []
        # A seq is 0..255; the uint64 field can carry more than the BIGINT column holds.
        seq = payload.seq if payload.HasField("seq") and payload.seq < 1 << 63 else None
        node = birth if key.count("/") == 1 else self._births.get(key.rsplit("/", 1)[0])
        templates = node.templates if node is not None else {}  # definitions: the NBIRTH's
        for metric in payload.metrics:
            fast = _plain_reading(metric, birth, key, seq)
            if fast is not None:
                readings.append(fast)
                continue
            if not metric.HasField("name") and not metric.HasField("alias"):
                problems.append(f"{sp.metric_label(metric)}: cannot be named")
                continue
            name, datatype = _resolve(metric, birth)
            skip = sp.skip_reason(metric, datatype)
            if skip is not None or sp.is_definition(metric):
                self._context.metrics.sparkplug_skipped.labels(skip or "definition").inc()
                continue
            try:
                value = sp.metric_value(metric, datatype, templates)
                ts = sp.metric_time(metric, payload, message.received_at)
                _storable(name, value.text)
            except PayloadError as exc:
                problems.append(exc.message)
                continue
            readings.append(
                Reading(
                    key, name, ts, value.value, quality=sp.quality(metric), seq=seq,
                    value_text=value.text,
                )
            )  # fmt: skip
        if problems:
            raise PartialPayloadError(sp.SPARKPLUG_BAD_METRIC, "; ".join(problems)[:1000], readings)
        return readings

    # -- seq and rebirth -------------------------------------------------------------------

    def _check_seq(self, topic: sp.SparkplugTopic, payload: Payload) -> None:
        node = topic.node_id
        seq = payload.seq if payload.HasField("seq") else None
        if topic.verb == "NBIRTH":
            self._expected_seq[node] = ((seq or 0) + 1) % 256  # the new base
            return
        expected = self._expected_seq.get(node)
        if seq is None or (expected is not None and seq != expected):
            self._context.metrics.sparkplug_seq_errors.inc()
            self._request_rebirth(topic)
        if seq is not None:
            self._expected_seq[node] = (seq + 1) % 256

    def _request_rebirth(self, topic: sp.SparkplugTopic) -> None:
        node, now = topic.node_id, time.monotonic()
        last = self._last_rebirth.get(node)
        if last is not None and now - last < self._context.rebirth_cooldown_seconds:
            return
        self._last_rebirth[node] = now
        stamp = int(time.time() * 1000)
        command = sp.encode_payload(
            [sp.encode_metric(name=_REBIRTH, datatype=sp.DATATYPES["Boolean"], value=True,
                              timestamp_ms=stamp)],
            seq=None, timestamp_ms=stamp,
        )  # fmt: skip
        ncmd = f"spBv1.0/{topic.group}/NCMD/{topic.node}"
        self._context.outbound.publish(ncmd, command, 0)
        self._context.metrics.sparkplug_rebirth_requests.inc()

    def close(self) -> None:
        self._births.close()


def _resolve(metric: Payload.Metric, birth: Birth) -> tuple[str, int]:
    """The metric's name and datatype: from itself where it says, else from its birth."""
    known = (
        birth.by_name.get(metric.name)
        if metric.HasField("name")
        else birth.by_alias.get(metric.alias)
    )
    name = metric.name if metric.HasField("name") else (known.name if known else str(metric.alias))
    if metric.HasField("datatype"):
        return name, metric.datatype
    return name, known.datatype if known else 0


def _payload_time(payload: Payload, received_at: datetime) -> datetime:
    """When a BIRTH was sent (its payload timestamp), else when it arrived."""
    if payload.HasField("timestamp"):
        try:
            return datetime.fromtimestamp(payload.timestamp / 1000, UTC)
        except (OverflowError, OSError, ValueError):
            pass
    return received_at


def _storable(name: str, text: str | None) -> None:
    """What the database can hold: a sensor id of at most 128 characters, no NUL anywhere."""
    if len(name) > MAX_ID_LENGTH or "\x00" in name:
        raise PayloadError(
            sp.SPARKPLUG_BAD_METRIC, f"{name[:40]!r}: a metric name of 1..128 characters, no NUL"
        )
    if text is not None and "\x00" in text:
        raise PayloadError(sp.SPARKPLUG_BAD_METRIC, f"{name}: a value with a NUL character")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_MS = 253402300799999  # 9999-12-31T23:59:59.999


def _plain_reading(
    metric: Payload.Metric, birth: Birth, key: str, seq: int | None
) -> Reading | None:
    """The common DDATA metric read in one step: by alias, a plain number, its own timestamp,
    no properties, nothing to skip. None sends it down the general path (same outcome)."""
    if (
        metric.HasField("name")
        or not metric.HasField("alias")
        or metric.HasField("properties")
        or metric.is_null
        or metric.is_transient
        or not metric.HasField("timestamp")
    ):
        return None
    definition = birth.by_alias.get(metric.alias)
    if definition is None:
        return None
    datatype = metric.datatype if metric.HasField("datatype") else definition.datatype
    number = sp.plain_number(metric, datatype)
    ms, name = metric.timestamp, definition.name
    if number is None or ms > _MAX_MS or len(name) > MAX_ID_LENGTH or "\x00" in name:
        return None
    return Reading(key, name, _EPOCH + timedelta(milliseconds=ms), number, None, "good", seq)
