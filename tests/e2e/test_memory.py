"""Memory budgets end to end: a backlog of arrays, oversized and single readings drains
within the in-flight budgets (bytes, readings) and the batch size, storing every reading once.

The backlog waits in the daemon's persistent session while it is stopped, so the daemon
meets all of it at once when it starts; /metrics is scraped throughout the drain.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from tests.e2e.queries import query, scalar
from tests.harness.daemon import Daemon, publish_all
from tests.harness.servers import Mosquitto, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

MAX_BYTES = 256 * 1024
MAX_READINGS = 2000
BATCH_SIZE = 200  # a bucket of ingestd_batch_size_readings: "none above it" is exact
MAX_PAYLOAD = 32 * 1024
T0 = 1_790_000_000.0

BUDGETS = {
    "INGESTD_MQTT__MAX_INFLIGHT_BYTES": str(MAX_BYTES),
    "INGESTD_INGEST__MAX_INFLIGHT_READINGS": str(MAX_READINGS),
    "INGESTD_DATABASE__BATCH_SIZE": str(BATCH_SIZE),
    "INGESTD_INGEST__MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD),
}


def _entry(seq: int) -> dict[str, float | int]:
    # A global seq gives every reading its own ts (and lets the database say which arrived).
    return {"value": seq % 97 + 0.5, "ts": round(T0 + seq / 1000, 3), "seq": seq}


def _encode(entries: object) -> bytes:
    return json.dumps(entries, separators=(",", ":")).encode()


@dataclass
class Backlog:
    """What was published: messages in publish order, and what each kind adds up to."""

    messages: list[tuple[str, bytes]] = field(default_factory=list)
    readings: int = 0  # valid readings, each with its own seq 0..readings-1
    max_readings_per_message: int = 0
    oversized: list[bytes] = field(default_factory=list)

    def array(self, device: str, count: int) -> None:
        payload = _encode([_entry(self.readings + i) for i in range(count)])
        assert len(payload) <= MAX_PAYLOAD
        self._add(f"sensors/{device}/temp", payload, count)

    def near_limit_array(self, device: str) -> None:
        """As many readings as fit in max_payload_bytes."""
        entries: list[dict[str, float | int]] = []
        size = 1  # "[" ... "]" and a "," per entry
        while True:
            entry = _entry(self.readings + len(entries))
            grown = size + len(_encode(entry)) + 1
            if grown > MAX_PAYLOAD:
                break
            entries.append(entry)
            size = grown
        payload = _encode(entries)
        assert MAX_PAYLOAD - 100 < len(payload) <= MAX_PAYLOAD
        self._add(f"sensors/{device}/vib", payload, len(entries))

    def single(self, device: str) -> None:
        self._add(f"sensors/{device}/flow", _encode(_entry(self.readings)), 1)

    def too_large(self, size: int) -> None:
        """A valid array, but bigger than max_payload_bytes: rejected, never stored."""
        count, length = len(self.oversized), 1
        entries: list[dict[str, float]] = []
        while length <= size:
            entries.append({"value": 1.0, "ts": round(T0 + count + len(entries) / 1000, 3)})
            length += len(_encode(entries[-1])) + 1
        payload = _encode(entries)
        assert len(payload) > MAX_PAYLOAD
        self.oversized.append(payload)
        self.messages.append(("sensors/dev-big/temp", payload))

    def _add(self, topic: str, payload: bytes, readings: int) -> None:
        assert readings < MAX_READINGS  # no message alone is above the readings budget
        self.messages.append((topic, payload))
        self.readings += readings
        self.max_readings_per_message = max(self.max_readings_per_message, readings)


def backlog(arrays: int, near_limit: int, singles: int, oversized: list[int]) -> Backlog:
    """The kinds shuffled together (fixed seed), every array of 500 readings."""
    kinds = ["array"] * arrays + ["near"] * near_limit + ["single"] * singles
    kinds += [f"big:{size}" for size in oversized]
    random.Random(9).shuffle(kinds)
    built = Backlog()
    for index, kind in enumerate(kinds):
        device = f"dev-m{index % 5}"
        if kind == "array":
            built.array(device, 500)
        elif kind == "near":
            built.near_limit_array(device)
        elif kind == "single":
            built.single(device)
        else:
            built.too_large(int(kind.partition(":")[2]))
    return built


@dataclass
class Samples:
    """Every scrape of /metrics during the drain."""

    scrapes: list[dict[str, float]] = field(default_factory=list)

    def peak(self, name: str) -> float:
        return max((s.get(name, 0.0) for s in self.scrapes), default=0.0)


def drain_and_sample(daemon: Daemon, built: Backlog, timeout: float = 45) -> Samples:
    """Start the daemon on its backlog and scrape /metrics until every message is done."""
    samples = Samples()
    total = len(built.messages)

    def drained() -> bool:
        metrics = daemon.scrape()
        if metrics is None:
            return False
        samples.scrapes.append(metrics)
        return (
            metrics.get("ingestd_messages_received_total", 0) >= total
            and metrics.get("ingestd_acks_sent_total", 0) >= total
            and metrics.get("ingestd_inflight_messages", 1) == 0
            and metrics.get("ingestd_inflight_bytes", 1) == 0
        )

    daemon.start(wait_ready=False)
    last = samples.scrapes

    def progress() -> str:
        tail = {k: v for k, v in (last[-1] if last else {}).items() if "inflight" in k}
        return f"not drained: {tail}\n{daemon.log_text()[-3000:]}"

    wait_until(drained, timeout, interval=0.005, message=progress)
    return samples


def assert_within_budgets(samples: Samples, bytes_allowance: int) -> None:
    assert len(samples.scrapes) >= 5, "too few scrapes to say anything about the drain"
    for metrics in samples.scrapes:
        assert metrics["ingestd_inflight_bytes_budget"] == MAX_BYTES
        assert metrics["ingestd_inflight_readings_budget"] == MAX_READINGS
        assert metrics["ingestd_inflight_readings"] <= MAX_READINGS, metrics
        assert metrics["ingestd_inflight_bytes"] <= MAX_BYTES + bytes_allowance, metrics
    # The scrapes saw the backlog in flight, not only the end of it.
    assert samples.peak("ingestd_inflight_bytes") > MAX_BYTES // 4
    assert samples.peak("ingestd_inflight_readings") > 0


def assert_stored_once(url: str, daemon: Daemon, built: Backlog, final: dict[str, float]) -> None:
    readings, messages = built.readings, len(built.messages)
    row = query(
        url,
        "SELECT count(*), count(DISTINCT (device_id, sensor_id, ts)), count(DISTINCT seq),"
        " min(seq), max(seq) FROM sensor_readings",
    )[0]
    assert tuple(row) == (readings, readings, readings, 0, readings - 1)
    assert scalar(url, "SELECT count(*) FROM sensor_readings WHERE device_id = 'dev-big'") == 0
    assert final["ingestd_readings_stored_total"] == readings
    assert final["ingestd_readings_duplicate_total"] == 0
    assert final["ingestd_messages_received_total"] == messages
    assert final["ingestd_acks_sent_total"] == messages
    assert final["ingestd_acks_discarded_total"] == 0
    assert final["ingestd_inflight_readings"] == 0  # everything charged was released
    # No batch above batch_size: a 500-reading array was stored in parts.
    batches = final["ingestd_batch_size_readings_count"]
    assert final[f'ingestd_batch_size_readings_bucket{{le="{BATCH_SIZE:.1f}"}}'] == batches
    assert final["ingestd_batch_size_readings_sum"] == readings
    assert batches >= readings / BATCH_SIZE
    # The budgets bit: intake paused and resumed on the way.
    assert final["ingestd_intake_pauses_total"] > 0
    assert final["ingestd_intake_paused"] == 0
    assert "Traceback" not in daemon.log_text()


def assert_nothing_left_in_session(url: str, daemon: Daemon, port: int, readings: int) -> None:
    """Every message was acknowledged: after a restart only a new one arrives."""
    assert daemon.stop() == 0
    daemon.start()
    publish_all(port, [("sensors/dev-m9/flow", _encode(_entry(readings)))])
    wait_until(lambda: daemon.metric("ingestd_readings_stored_total") == 1, 20)
    metrics = daemon.metrics()
    assert metrics["ingestd_messages_received_total"] == 1
    assert metrics["ingestd_readings_duplicate_total"] == 0
    assert scalar(url, "SELECT count(*) FROM sensor_readings") == readings + 1
    assert daemon.stop() == 0


def queue_backlog(daemon: Daemon, port: int, built: Backlog) -> None:
    daemon.start()  # subscribes: the session exists from now on
    assert daemon.stop() == 0
    publish_all(port, built.messages)  # QoS 1, queued in the persistent session


def test_backlog_with_oversized_payloads_drains_within_the_budgets(
    mosquitto: Mosquitto, migrated_pg: str, daemon_factory: Callable[..., Daemon]
) -> None:
    # The largest oversized payload is above the whole byte budget: it passes alone.
    oversized = [40_000, 33_000, 64_000, 100_000, 300_000] + [34_000 + 997 * i for i in range(10)]
    built = backlog(arrays=40, near_limit=12, singles=1500, oversized=oversized)
    daemon = daemon_factory(migrated_pg, **BUDGETS)
    queue_backlog(daemon, mosquitto.port, built)

    samples = drain_and_sample(daemon, built)

    largest = max(len(p) for p in built.oversized)
    assert largest > MAX_BYTES
    assert_within_budgets(samples, bytes_allowance=largest)
    final = samples.scrapes[-1]
    assert_stored_once(migrated_pg, daemon, built, final)
    # Every oversized message rejected exactly once, truncated to max_payload_bytes.
    rejected = query(
        migrated_pg,
        "SELECT reason, payload_size, length(payload), payload_sha256 FROM rejected_messages",
    )
    assert sorted(r["payload_size"] for r in rejected) == sorted(len(p) for p in built.oversized)
    assert {r["reason"] for r in rejected} == {"payload_too_large"}
    assert {r["length"] for r in rejected} == {MAX_PAYLOAD}
    assert len({r["payload_sha256"] for r in rejected}) == len(built.oversized)
    assert final['ingestd_messages_rejected_total{reason="payload_too_large"}'] == len(oversized)
    rejections = sum(v for k, v in final.items() if k.startswith("ingestd_messages_rejected_total"))
    assert rejections == len(oversized)
    assert_nothing_left_in_session(migrated_pg, daemon, mosquitto.port, built.readings)


def test_backlog_without_oversized_payloads_stays_within_the_byte_budget(
    mosquitto: Mosquitto, migrated_pg: str, daemon_factory: Callable[..., Daemon]
) -> None:
    built = backlog(arrays=30, near_limit=20, singles=800, oversized=[])
    daemon = daemon_factory(migrated_pg, **BUDGETS)
    queue_backlog(daemon, mosquitto.port, built)

    samples = drain_and_sample(daemon, built)

    assert_within_budgets(samples, bytes_allowance=0)
    final = samples.scrapes[-1]
    assert_stored_once(migrated_pg, daemon, built, final)
    assert scalar(migrated_pg, "SELECT count(*) FROM rejected_messages") == 0
    assert_nothing_left_in_session(migrated_pg, daemon, mosquitto.port, built.readings)
