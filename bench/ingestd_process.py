"""``ingestd run`` as a subprocess, and what the benchmark reads from it.

``DaemonProcess`` starts one daemon with the settings that wire it up (broker, database,
client id, metrics port, state dir, log level) plus a scenario's own; ``wait_stored`` polls
one or more daemons until they stored N readings (with stall detection and a timeline);
``histogram`` / ``histogram_quantile`` turn a ``/metrics`` histogram into percentiles the way
Prometheus' ``histogram_quantile`` does.
"""

from __future__ import annotations

import math
import re
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.base import ScenarioError
from bench.env import INGESTD, free_port, ingestd_env, metrics

STALL_SECONDS = 30.0  # a drain with no progress for this long is reported as failed
POLL_SECONDS = 0.1
TIMELINE_SECONDS = 1.0  # gauges are sampled this often into details["timeline"]
TIMELINE_KEYS = {
    "ingestd_messages_received_total": "received",
    "ingestd_readings_stored_total": "stored",
    "ingestd_readings_duplicate_total": "duplicates",
    "ingestd_inflight_messages": "inflight",
    "ingestd_inflight_bytes": "inflight_bytes",
    "ingestd_inflight_readings": "inflight_readings",
    "ingestd_intake_paused": "paused",
    "ingestd_spool_readings": "spool",
    "ingestd_database_up": "db_up",
}
E2E = "ingestd_end_to_end_latency_seconds"


class DaemonProcess:
    """One ``ingestd run`` subprocess with its metrics port and log file."""

    def __init__(
        self,
        workdir: Path,
        broker_url: str,
        client_id: str,
        dsn: str,
        settings: dict[str, str] | None = None,
        name: str = "ingestd",
        config: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.config = config  # a TOML file (``ingestd run --config``); INGESTD_* still win
        self.client_id = client_id
        self.name = name
        self.metrics_port = free_port()
        self.log_path = workdir / f"{name}.log"
        self.env = ingestd_env(
            {
                "INGESTD_MQTT__URL": broker_url,
                "INGESTD_MQTT__CLIENT_ID": client_id,
                "INGESTD_DATABASE__URL": dsn,
                "INGESTD_METRICS__LISTEN": f"127.0.0.1:{self.metrics_port}",
                "INGESTD_LOG__LEVEL": "WARNING",
                "INGESTD_DAEMON__STATE_DIR": str(workdir / f"{name}-state"),
                **(settings or {}),
            }
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            argv = [str(INGESTD), "run"]
            if self.config is not None:
                argv += ["--config", str(self.config)]
            self.process = subprocess.Popen(
                argv, cwd=self.workdir, env=self.env, stdout=log, stderr=log
            )

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise ScenarioError(
                f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
            )

    def metrics(self) -> dict[str, float]:
        try:
            return metrics(self.metrics_port)
        except OSError:
            return {}  # not listening yet

    def metric(self, key: str) -> float:
        return self.metrics().get(key, 0.0)

    def wait_subscribed(self, broker_log: Callable[[], str], timeout: float = 30.0) -> None:
        """Until the broker logged this client's SUBSCRIBE and the database is writable.

        Connected is not enough for live traffic: a message published before the SUBSCRIBE
        reaches the broker is not for this session. The harness broker logs subscriptions
        as ``<client id> <qos> <filter>``.
        """
        line = re.compile(rf"^\S+ {re.escape(self.client_id)} \d \S", re.MULTILINE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if line.search(broker_log()) and self.metric("ingestd_database_up") == 1:
                return
            time.sleep(POLL_SECONDS)
        raise ScenarioError(f"{self.name} not subscribed within {timeout:.0f} s\n{self.log_tail()}")

    def wait_database_up(self, timeout: float = 30.0) -> None:
        """Until ``ingestd_database_up`` is 1 (the schema checked, the pool connected)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if self.metric("ingestd_database_up") == 1:
                return
            time.sleep(POLL_SECONDS)
        raise ScenarioError(
            f"{self.name}: database not up within {timeout:.0f} s\n{self.log_tail()}"
        )

    def summary(self) -> dict[str, Any]:
        """Batch size, write latency and backpressure figures from ``/metrics``."""
        m = self.metrics()

        def avg(name: str) -> float | None:
            count = m.get(f"{name}_count", 0.0)
            return m.get(f"{name}_sum", 0.0) / count if count else None

        write = avg("ingestd_write_duration_seconds")
        e2e = avg(E2E)
        return {
            "batches": m.get("ingestd_batch_size_readings_count"),
            "batch_size_avg": _round(avg("ingestd_batch_size_readings"), 1),
            "write_ms_avg": _round(write * 1000 if write is not None else None, 2),
            "end_to_end_ms_avg": _round(e2e * 1000 if e2e is not None else None, 1),
            "received": m.get("ingestd_messages_received_total"),
            "stored": m.get("ingestd_readings_stored_total"),
            "duplicates": m.get("ingestd_readings_duplicate_total"),
            "rejected": sum(
                v for k, v in m.items() if k.startswith("ingestd_messages_rejected_total")
            ),
            "intake_pauses": m.get("ingestd_intake_pauses_total"),
            "database_errors": sum(
                v for k, v in m.items() if k.startswith("ingestd_database_errors_total")
            ),
            "events_dropped": sum(
                v for k, v in m.items() if k.startswith("ingestd_events_dropped_total")
            ),
            "queue_full_waits": {
                k: v for k, v in m.items() if k.startswith("ingestd_queue_full_waits_total")
            },
        }

    def diagnostics(self) -> str:
        """The metrics that explain a stalled drain."""
        keys = (
            "ingestd_mqtt_connected", "ingestd_inflight_messages", "ingestd_inflight_window",
            "ingestd_intake_paused", "ingestd_queue_depth", "ingestd_messages_received_total",
            "ingestd_readings_stored_total", "ingestd_acks_sent_total", "ingestd_database_up",
            "ingestd_database_errors_total", "ingestd_messages_rejected_total",
            "ingestd_spool_readings", "ingestd_spool_replayed_total",
        )  # fmt: skip
        m = self.metrics()
        lines = [f"  {k} {v:g}" for k, v in sorted(m.items()) if k.startswith(keys)]
        return f"{self.name} metrics:\n" + "\n".join(lines)

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                return -9
        return self.process.returncode

    def log_tail(self, chars: int = 3000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- {self.name} log tail ---\n{text[-chars:]}"


# ------------------------------------------------------------------------------- draining


@dataclass
class Drained:
    """When the daemons stored their readings (wall clock) and how they got there."""

    first_stored: float | None
    done: float
    stored: list[float]  # per daemon
    timeline: list[dict[str, float]] = field(default_factory=list)


def wait_stored(
    daemons: Sequence[DaemonProcess],
    expected: int,
    started: float,
    *,
    poll: float = POLL_SECONDS,
    timeline: list[dict[str, float]] | None = None,
    stall_seconds: float = STALL_SECONDS,
    check: Callable[[], None] | None = None,
) -> Drained:
    """Poll until the daemons together stored ``expected`` readings (``handled``); fail on a
    stall.

    ``started`` is the wall-clock origin of the timeline. Each daemon's gauges are sampled
    into the timeline once a second (prefixed with its name when there are several).
    ``check`` is called on every poll (e.g. to fail at once when a publisher died).
    """
    timeline = [] if timeline is None else timeline
    first: float | None = None
    progress = (-1.0, time.monotonic())
    while True:
        if check is not None:
            check()
        samples = []
        for daemon in daemons:
            daemon.check_alive()
            samples.append(daemon.metrics())
        now = time.time()
        stored = [handled(s) for s in samples]
        if not timeline or now - started >= timeline[-1]["t"] + TIMELINE_SECONDS:
            point: dict[str, float] = {"t": round(now - started, 2)}
            for daemon, sample in zip(daemons, samples, strict=True):
                prefix = f"{daemon.name}." if len(daemons) > 1 else ""
                point.update(timeline_point(sample, prefix))
            timeline.append(point)
        total = sum(stored)
        if total and first is None:
            first = now
        if total >= expected:
            return Drained(first, now, stored, timeline)
        if total != progress[0]:
            progress = (total, time.monotonic())
        elif time.monotonic() - progress[1] > stall_seconds:
            report = "\n".join(f"{d.diagnostics()}\n{d.log_tail()}" for d in daemons)
            raise ScenarioError(
                f"stalled at {total:.0f} of {expected} stored\n{report}", {"timeline": timeline}
            )
        time.sleep(poll)


def handled(sample: dict[str, float]) -> float:
    """Readings with a durable row: newly stored plus those found already stored. After a
    connection reset during COMMIT the daemon cannot know whether the commit happened, so it
    spools the batch; replaying it then finds the rows there (duplicates, not new rows)."""
    return sample.get("ingestd_readings_stored_total", 0.0) + sample.get(
        "ingestd_readings_duplicate_total", 0.0
    )


def timeline_point(sample: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Counters, in-flight, pause flag, spool, database state and inbox depths."""
    point = {prefix + short: sample[key] for key, short in TIMELINE_KEYS.items() if key in sample}
    for key, value in sample.items():
        if key.startswith("ingestd_queue_depth{"):
            point[prefix + key.removeprefix("ingestd_queue_depth")] = value
    return point


# ------------------------------------------------------------------------------ histograms


def histogram(sample: dict[str, float], name: str = E2E) -> dict[str, float]:
    """A histogram's cumulative bucket counts ``{le: count}`` (``le`` as text, ``+Inf`` last)."""
    pattern = re.compile(rf'^{re.escape(name)}_bucket\{{.*?le="([^"]+)".*\}}$')
    buckets = {}
    for key, value in sample.items():
        match = pattern.match(key)
        if match:
            buckets[match.group(1)] = value
    return dict(sorted(buckets.items(), key=lambda kv: float(kv[0])))


def histogram_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """What was observed between two scrapes (the warm-up is subtracted this way)."""
    return {le: count - before.get(le, 0.0) for le, count in after.items()}


def histogram_quantile(q: float, buckets: dict[str, float]) -> float | None:
    """Prometheus' estimate: find the bucket holding rank ``q * total`` and interpolate
    linearly between its bounds (from 0 for the first bucket). A rank in the ``+Inf`` bucket
    returns the highest finite bound. None when the histogram is empty."""
    bounds = [(float(le), count) for le, count in buckets.items()]
    if not bounds or bounds[-1][1] <= 0:
        return None
    rank = q * bounds[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in bounds:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
