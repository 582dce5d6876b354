"""Builders and fakes for the agents' unit tests (one agent at a time; real parts elsewhere)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from agents.bus import Inbox
from agents.decoding import Router
from agents.events import EnrichedMessage, RawMessage
from agents.metrics import PipelineMetrics
from daemon.config import Config, IngestConfig, SourceConfig
from daemon.wiring import build_routes
from db.rows import AlertChange, ReadingRow, RejectionRow, TaskRow
from db.writer import OpenAlert, RowRejected, StorageError, WriteResult
from edge.readings import Reading

NOW = datetime(2026, 11, 27, 7, 30, 0, 123456, tzinfo=UTC)


def sample(
    metrics: PipelineMetrics, name: str, labels: dict[str, str] | None = None
) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


def raw(
    seq: int,
    topic: str = "sensors/d1/s1",
    payload: bytes = b'{"value": 1}',
    *,
    dup: bool = False,
    retain: bool = False,
) -> RawMessage:
    return RawMessage(seq, topic, payload, 1, NOW, time.monotonic(), f"corr-{seq}", dup, retain)


def reading(
    device: str = "d1", sensor: str = "s1", value: float = 1.0, second: int = 0, **extra: Any
) -> Reading:
    ts = NOW.replace(second=second)
    return Reading(device_id=device, sensor_id=sensor, ts=ts, value=value, **extra)


def row(
    device: str = "d1",
    sensor: str = "s1",
    value: float = 1.0,
    second: int = 0,
    *,
    message: RawMessage | None = None,
    **extra: Any,
) -> ReadingRow:
    """A row as enrichment makes it; ``message`` gives its receipt time and correlation id."""
    message = message or raw(0)
    columns: dict[str, Any] = {
        "unit": None, "quality": "good", "seq": None, "site": None, "area": None, "line": None,
        "asset": None, "sensor_type": None,
    }  # fmt: skip
    columns.update(extra)
    return ReadingRow(
        device_id=device,
        sensor_id=sensor,
        ts=NOW.replace(second=second),
        value=value,
        received_at=message.received_at,
        correlation_id=message.correlation_id,
        **columns,
    )


def enriched(seq: int, *rows: ReadingRow) -> EnrichedMessage:
    """Message ``seq`` with ``rows`` (default: one row at second ``seq % 60``), stamped as its."""
    message = raw(seq)
    stamped = [
        r._replace(received_at=message.received_at, correlation_id=message.correlation_id)
        for r in rows
    ]
    return EnrichedMessage(message, stamped or [row(second=seq % 60, message=message)])


def drain(inbox: Inbox[Any]) -> list[Any]:
    """Everything waiting in ``inbox`` now."""
    items = []
    while not inbox.empty():
        items.append(inbox.get_nowait())
    return items


async def until(condition: Callable[[], bool], changed: asyncio.Event, timeout: float = 5) -> None:  # noqa: ASYNC109
    """Wait (at most ``timeout`` s) until ``condition`` holds, re-checking whenever ``changed``
    is set."""
    async with asyncio.timeout(timeout):
        while not condition():
            changed.clear()
            await changed.wait()


async def give_the_loop_turns(turns: int = 20) -> None:
    """Let every ready task run a while: only for asserting that something does NOT happen."""
    for _ in range(turns):
        await asyncio.sleep(0)


class FakeWriter:
    """A Writer that behaves like the unique key: a (device, sensor, ts) is new once.

    ``up`` False makes every call fail as an unreachable database; ``script`` holds one
    outcome per write (an exception to raise, or None); ``refuse`` picks readings the
    database refuses as data (RowRejected). Alert changes are recorded in ``alert_changes``
    and applied to nothing (no outcomes); ``alerts_open`` is what ``open_alerts`` answers.
    """

    def __init__(self, log: list[str] | None = None) -> None:
        self.up = True
        self.keys: set[tuple[str, str, datetime]] = set()
        self.calls: list[tuple[list[ReadingRow], list[RejectionRow]]] = []
        self.replays: list[bool] = []
        self.rejections: list[RejectionRow] = []
        self.alert_changes: list[AlertChange] = []
        self.alerts_open: list[OpenAlert] = []
        self.script: list[BaseException | None] = []
        self.refuse: Callable[[ReadingRow], bool] = lambda _: False
        self.log = log if log is not None else []
        self.on_write: Callable[[], None] = lambda: None
        self.pings = 0
        self.started = False
        self.closed = False

    def _check_up(self) -> None:
        if not self.up:
            raise StorageError("connection refused", "unreachable")

    async def start(self) -> None:
        self._check_up()
        self.started = True

    async def ping(self) -> None:
        self.pings += 1
        self._check_up()

    async def write(
        self,
        readings: Sequence[ReadingRow],
        rejections: Sequence[RejectionRow],
        *,
        replay: bool = False,
        alerts: Sequence[AlertChange] = (),
    ) -> WriteResult:
        self.calls.append((list(readings), list(rejections)))
        self.replays.append(replay)
        self.on_write()
        self.log.append(
            "write " + ",".join(r.correlation_id.removeprefix("corr-") for r in readings)
        )
        if self.script:
            step = self.script.pop(0)
            if step is not None:
                raise step
        self._check_up()
        if any(self.refuse(r) for r in readings):
            raise RowRejected("DataError: value out of range")
        new = []
        for r in readings:
            key = (r.device_id, r.sensor_id, r.ts)
            new.append(key not in self.keys)
            self.keys.add(key)
        self.rejections.extend(rejections)
        self.alert_changes.extend(alerts)
        return WriteResult(new, len(rejections))

    async def open_alerts(self) -> list[OpenAlert]:
        self._check_up()
        return list(self.alerts_open)

    async def tasks(self, status: str | None = None, limit: int = 100) -> list[TaskRow]:
        self._check_up()
        return []

    async def task(self, task_id: int) -> TaskRow | None:
        self._check_up()
        return None

    async def set_task_status(self, task_id: int, status: str) -> TaskRow | None:
        self._check_up()
        return None

    async def task_counts(self) -> dict[tuple[str, str], int]:
        self._check_up()
        return {}

    async def load_devices(self) -> list[dict[str, Any]]:
        return []

    async def close(self, grace_seconds: float = 5.0) -> None:
        self.closed = True


class Settled:
    """The settle callback: records the sequence numbers settled, in order."""

    def __init__(self, log: list[str] | None = None) -> None:
        self.seqs: list[int] = []
        self.log = log if log is not None else []
        self.changed = asyncio.Event()

    def __call__(self, seqs: list[int]) -> None:
        self.seqs.extend(seqs)
        self.log.append("settle " + ",".join(map(str, seqs)))
        self.changed.set()


class FakeOutbound:
    """The MQTT connection's ``publish``: records (topic, decoded JSON body, qos)."""

    def __init__(self, result: bool = True) -> None:
        self.sent: list[tuple[str, dict[str, Any], int]] = []
        self.retained: list[bool] = []
        self.result = result
        self.changed = asyncio.Event()

    def publish(self, topic: str, payload: bytes, qos: int, *, retain: bool = False) -> bool:
        self.sent.append((topic, orjson.loads(payload), qos))
        self.retained.append(retain)
        self.changed.set()
        return self.result


def routes(*sources: SourceConfig) -> Router:
    """The routes the daemon builds from these sources (the default source when none)."""
    config = Config(ingest=IngestConfig(sources=sources or (SourceConfig(),)))
    return build_routes(config, FakeOutbound(), PipelineMetrics(CollectorRegistry()))
