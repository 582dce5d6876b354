"""Sparkplug B 3.0: topics, payloads and metrics, as pure functions (no MQTT, no state).

The host side (birth cache, seq, rebirth requests) builds on these; the simulator's edge
node writes with ``encode_metric``/``encode_payload``. Reasons are stable machine codes
(stored in ``rejected_messages.reason``); skip reasons label metrics that are counted and
not stored. Values are read by ``metric_value`` (``edge.sparkplug_values`` says how).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.message import DecodeError

from edge.readings import PayloadError
from edge.sparkplug_b_pb2 import DataType, Payload
from edge.sparkplug_encoding import (
    DataSetSpec,
    TemplateSpec,
    encode_metric,
    encode_payload,
    pack_array,
)
from edge.sparkplug_values import (
    DATATYPE_NAMES,
    DATATYPES,
    SIGNED_BITS,
    SPARKPLUG_BAD_METRIC,
    UNSIGNED_BITS,
    MetricValue,
    Templates,
    datetime_of_ms,
    metric_label,
    metric_value,
    shortest_float32,
)

__all__ = [
    "BDSEQ_METRIC",
    "DATATYPES",
    "DATATYPE_NAMES",
    "DEVICE_VERBS",
    "NAMESPACE",
    "NODE_VERBS",
    "REBIRTH_METRIC",
    "SKIP_BYTES",
    "SKIP_FILE",
    "SKIP_NULL",
    "SKIP_REASONS",
    "SKIP_TRANSIENT",
    "SPARKPLUG_BAD_METRIC",
    "SPARKPLUG_BAD_TOPIC",
    "SPARKPLUG_MALFORMED",
    "SPARKPLUG_NO_BDSEQ",
    "SPARKPLUG_NO_BIRTH",
    "SPARKPLUG_REASONS",
    "SPARKPLUG_UNKNOWN_ALIAS",
    "DataSetSpec",
    "DataType",
    "MetricValue",
    "Payload",
    "SparkplugTopic",
    "TemplateSpec",
    "Templates",
    "bdseq",
    "decode_payload",
    "encode_metric",
    "encode_payload",
    "is_definition",
    "metric_label",
    "metric_time",
    "metric_value",
    "pack_array",
    "parse_topic",
    "plain_number",
    "quality",
    "skip_reason",
    "template_definitions",
]

# Why a Sparkplug message is rejected whole (SPARKPLUG_BAD_METRIC: one metric only).
SPARKPLUG_MALFORMED = "sparkplug_malformed"
SPARKPLUG_BAD_TOPIC = "sparkplug_bad_topic"
SPARKPLUG_UNKNOWN_ALIAS = "sparkplug_unknown_alias"
SPARKPLUG_NO_BIRTH = "sparkplug_no_birth"
SPARKPLUG_NO_BDSEQ = "sparkplug_no_bdseq"
SPARKPLUG_REASONS = (
    SPARKPLUG_MALFORMED, SPARKPLUG_BAD_TOPIC, SPARKPLUG_UNKNOWN_ALIAS, SPARKPLUG_NO_BIRTH,
    SPARKPLUG_NO_BDSEQ, SPARKPLUG_BAD_METRIC,
)  # fmt: skip

# Why a metric is skipped (counted, not stored, not a rejection).
SKIP_BYTES = "bytes"
SKIP_FILE = "file"
SKIP_NULL = "null"
SKIP_TRANSIENT = "transient"
SKIP_REASONS = (SKIP_BYTES, SKIP_FILE, SKIP_NULL, SKIP_TRANSIENT)

NAMESPACE = "spBv1.0"
NODE_VERBS = frozenset({"NBIRTH", "NDEATH", "NDATA", "NCMD"})
DEVICE_VERBS = frozenset({"DBIRTH", "DDEATH", "DDATA", "DCMD"})
BDSEQ_METRIC = "bdSeq"
REBIRTH_METRIC = "Node Control/Rebirth"

_QUALITY = {192: "good", 0: "bad", 500: "stale"}
_SKIPPED_TYPES: dict[int, str] = {DataType.Bytes: SKIP_BYTES, DataType.File: SKIP_FILE}
# Datatype numbers as plain ints, for use at run time (an attribute of the generated
# enum wrapper costs about a microsecond).
_INT64 = DATATYPES["Int64"]
_UINT64 = DATATYPES["UInt64"]


@dataclass(frozen=True, slots=True)
class SparkplugTopic:
    """``spBv1.0/{group}/{verb}/{node}[/{device}]``; STATE has group "" and node = host id."""

    group: str
    verb: str
    node: str
    device: str | None

    @property
    def node_id(self) -> str:
        """``{group}/{node}``: the device_id of node metrics."""
        return f"{self.group}/{self.node}"

    @property
    def device_id(self) -> str:
        """``{group}/{node}/{device}``, or the node_id for node verbs."""
        return f"{self.group}/{self.node}/{self.device}" if self.device else self.node_id


def parse_topic(topic: str) -> SparkplugTopic:
    """The parts of a Sparkplug B topic; PayloadError(SPARKPLUG_BAD_TOPIC) for anything else."""
    levels = topic.split("/")
    if levels[0] != NAMESPACE:
        raise PayloadError(SPARKPLUG_BAD_TOPIC, f"{topic[:200]!r} is not under {NAMESPACE}/")
    if len(levels) == 3 and levels[1] == "STATE" and levels[2]:
        return SparkplugTopic(group="", verb="STATE", node=levels[2], device=None)
    if len(levels) not in (4, 5) or not all(levels):
        raise PayloadError(
            SPARKPLUG_BAD_TOPIC,
            f"{topic[:200]!r} is not {NAMESPACE}/group/VERB/node[/device] with no empty level",
        )
    group, verb, node = levels[1:4]
    device = levels[4] if len(levels) == 5 else None
    if (verb in NODE_VERBS and device is None) or (verb in DEVICE_VERBS and device is not None):
        return SparkplugTopic(group=group, verb=verb, node=node, device=device)
    if verb in NODE_VERBS or verb in DEVICE_VERBS:
        need = "needs a device level" if device is None else "takes no device level"
        raise PayloadError(SPARKPLUG_BAD_TOPIC, f"{verb} {need}: {topic[:200]!r}")
    raise PayloadError(SPARKPLUG_BAD_TOPIC, f"unknown Sparkplug verb {verb[:40]!r}")


def decode_payload(payload: bytes) -> Payload:
    """The Payload in ``payload``; PayloadError(SPARKPLUG_MALFORMED) if it is not one.

    Metric names that are not UTF-8 make the payload malformed too: every later step
    reads them.
    """
    try:
        message = Payload.FromString(payload)
    except DecodeError as exc:
        raise PayloadError(SPARKPLUG_MALFORMED, f"not a Sparkplug B payload: {exc}") from None
    for index, metric in enumerate(message.metrics):
        if not isinstance(metric.name, str):  # upb gives invalid UTF-8 back as bytes
            raise PayloadError(SPARKPLUG_MALFORMED, f"metric {index} has a name that is not UTF-8")
    return message


def skip_reason(metric: Payload.Metric, datatype: int) -> str | None:
    """Why ``metric`` is counted and not stored (a SKIP_* reason), or None to store it."""
    if metric.is_null:
        return SKIP_NULL
    if metric.is_transient:
        return SKIP_TRANSIENT
    return _SKIPPED_TYPES.get(datatype)


def is_definition(metric: Payload.Metric) -> bool:
    """True for a Template definition (kept to read instances, never a reading)."""
    return metric.WhichOneof("value") == "template_value" and metric.template_value.is_definition


def template_definitions(payload: Payload) -> dict[str, Payload.Template]:
    """The Template definitions of a BIRTH, by metric name (what instances reference)."""
    return {
        metric.name: metric.template_value for metric in payload.metrics if is_definition(metric)
    }


def quality(metric: Payload.Metric) -> str:
    """good / bad / stale / uncertain, from the metric's Quality property (none: good)."""
    if not metric.HasField("properties"):
        return "good"
    properties = metric.properties
    for key, value in zip(properties.keys, properties.values, strict=False):
        if key == "Quality":
            which = value.WhichOneof("value")
            if which == "int_value":
                return _QUALITY.get(value.int_value, "uncertain")
            if which == "long_value":
                return _QUALITY.get(value.long_value, "uncertain")
            return "uncertain"
    return "good"


def metric_time(metric: Payload.Metric, payload: Payload, received_at: datetime) -> datetime:
    """The metric's timestamp, else the payload's, else ``received_at``: aware UTC.

    PayloadError(SPARKPLUG_BAD_METRIC) for a timestamp beyond year 9999.
    """
    if metric.HasField("timestamp"):
        ms = metric.timestamp
    elif payload.HasField("timestamp"):
        ms = payload.timestamp
    else:
        return received_at if received_at.tzinfo is UTC else received_at.astimezone(UTC)
    return datetime_of_ms(ms, metric)


def bdseq(payload: Payload) -> int | None:
    """The value of the payload's ``bdSeq`` metric (Int64 or UInt64), if it has one."""
    for metric in payload.metrics:
        if metric.name != BDSEQ_METRIC:
            continue
        if metric.datatype not in (_INT64, _UINT64):
            return None
        which = metric.WhichOneof("value")
        if which == "long_value":
            return metric.long_value if metric.long_value < 1 << 63 else None
        return metric.int_value if which == "int_value" else None
    return None


_DOUBLE, _FLOAT = DATATYPES["Double"], DATATYPES["Float"]
# The largest int_value each small integer type reads as itself (no sign to extend).
_PLAIN_INTS = {
    **{code: (1 << (bits - 1)) - 1 for code, bits in SIGNED_BITS.items() if bits <= 32},
    **{code: (1 << bits) - 1 for code, bits in UNSIGNED_BITS.items() if bits <= 32},
}


def plain_number(metric: Payload.Metric, datatype: int) -> float | None:
    """The hot path's shortcut: a finite Double, Float or small non-negative integer value
    read directly, or None when ``metric_value`` must decide (any other case)."""
    which = metric.WhichOneof("value")
    if which == "double_value":
        number: float = metric.double_value
        return number if datatype == _DOUBLE and math.isfinite(number) else None
    if which == "float_value":
        if datatype != _FLOAT or not math.isfinite(metric.float_value):
            return None
        return shortest_float32(metric.float_value)
    if which == "int_value":
        raw, largest = metric.int_value, _PLAIN_INTS.get(datatype, -1)
        return float(raw) if raw <= largest else None  # negatives: metric_value decides
    return None
