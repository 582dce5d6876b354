"""Benchmark scenarios: each prepares its own servers and data, runs, and returns one ``Row``.

A scenario is a small class with a ``name``, a ``describe`` line and ``run(env, readings)``.
Add one by subclassing ``Scenario`` and listing it in ``SCENARIOS``; ``run.py`` runs the
selected ones in order, ``--runs`` times, and reports medians.

The three drain scenarios share one shape: a fresh broker, a persistent session pre-filled
with the backlog (``load.queue_backlog``), then the consumer starts and the clock runs from
its process start until its last reading is handled (counted for the ceiling, committed for
the naive consumer and ingestd).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import load
from env import (
    INGESTD,
    BenchEnv,
    CpuMeter,
    cpu_seconds,
    free_port,
    ingestd_env,
    metrics,
    peak_rss_mb,
)

CONSUMERS = Path(__file__).with_name("consumers.py")
STALL_SECONDS = 30.0  # a drain with no progress for this long is reported as failed
POLL_SECONDS = 0.1
TIMELINE_SECONDS = 1.0  # ingestd's gauges are sampled this often into details["timeline"]
TIMELINE_KEYS = {
    "ingestd_messages_received_total": "received",
    "ingestd_readings_stored_total": "stored",
    "ingestd_inflight_messages": "inflight",
    "ingestd_intake_paused": "paused",
}
NAIVE_MAX_READINGS = 40_000  # one INSERT per message runs at ~2-4k/s: keep it under ~20 s


@dataclass
class Row:
    """One scenario run: the numbers the table shows, plus details for the JSON file."""

    scenario: str
    run: int
    readings: int
    seconds: float | None = None  # consumer process start -> last reading handled
    msg_per_s: float | None = None
    peak_rss_mb: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def finish(self, seconds: float) -> None:
        self.seconds = seconds
        self.msg_per_s = self.readings / seconds if seconds > 0 else None


class ScenarioError(RuntimeError):
    """A scenario could not complete; the message says what was seen."""


class Scenario(ABC):
    """Base class: a named measurement that returns a ``Row``."""

    name: ClassVar[str]
    describe: ClassVar[str]

    def readings_for(self, requested: int) -> int:
        """How many readings this scenario uses when ``requested`` were asked for."""
        return requested

    @abstractmethod
    def run(self, env: BenchEnv, readings: int, run: int) -> Row:
        """Measure once and return the result row."""


# ------------------------------------------------------------------ reference consumers


class ConsumerScenario(Scenario):
    """Drain a queued backlog with one of the reference consumers in ``consumers.py``."""

    consumer: ClassVar[str]
    needs_database: ClassVar[bool] = False

    def run(self, env: BenchEnv, readings: int, run: int) -> Row:
        row = Row(self.name, run, readings)
        workdir = env.workdir(self.name)
        dsn = env.database(self.name) if self.needs_database else None
        with env.broker(workdir) as broker:
            client_id = f"bench-{self.name}-{run}"
            backlog = load.queue_backlog(broker.port, broker.log_text, client_id, readings)
            row.details["publish_seconds"] = round(backlog.publish_seconds, 3)
            meter = CpuMeter(env, broker)
            meter.start()
            outcome, started = self._consume(broker.port, client_id, readings, dsn)
            cpu = {"consumer": outcome["cpu_seconds"], **meter.stop()}
        if outcome.get("error"):
            raise ScenarioError(f"{self.consumer} consumer: {outcome['error']}")
        row.finish(outcome["t_last"] - started)
        row.peak_rss_mb = outcome["peak_rss_kb"] / 1024
        row.details.update(
            impl=outcome["impl"],
            startup_seconds=round(outcome["t_first"] - started, 3),
            drain_seconds=round(outcome["t_last"] - outcome["t_first"], 3),
            cpu_seconds=cpu,
        )
        if dsn is not None:
            stored = env.count_rows(dsn)
            env.drop_database(dsn)
            row.details["rows"] = stored
            if stored != readings:
                raise ScenarioError(f"{stored} rows stored, expected {readings}")
        return row

    def _consume(
        self, port: int, client_id: str, readings: int, dsn: str | None
    ) -> tuple[dict[str, Any], float]:
        """Run the consumer process; return its JSON report and its wall-clock start."""
        argv = [
            sys.executable, str(CONSUMERS), self.consumer, "--port", str(port),
            "--client-id", client_id, "--count", str(readings),
        ]  # fmt: skip
        if dsn is not None:
            argv += ["--dsn", dsn]
        started = time.time()
        result = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
        lines = result.stdout.strip().splitlines()
        if not lines:
            raise ScenarioError(
                f"{self.consumer} consumer exited {result.returncode} without a report:\n"
                f"{result.stderr[-2000:]}"
            )
        return json.loads(lines[-1]), started


class Ceiling(ConsumerScenario):
    name = "ceiling"
    describe = "paho 3.1.1 subscriber that only counts (the Python receive ceiling)"
    consumer = "ceiling"


class Naive(ConsumerScenario):
    name = "naive"
    describe = "json.loads + one INSERT ... ON CONFLICT per message, autocommit"
    consumer = "naive"
    needs_database = True

    def readings_for(self, requested: int) -> int:
        return min(requested, NAIVE_MAX_READINGS)


# -------------------------------------------------------------------------------- ingestd


class Ingestd(Scenario):
    """``ingestd run`` draining its own persistent session into a fresh PostgreSQL database."""

    name = "ingestd"
    describe = "ingestd run, default settings, PostgreSQL"
    settings: ClassVar[dict[str, str]] = {}  # extra INGESTD_* variables for variants

    def run(self, env: BenchEnv, readings: int, run: int) -> Row:
        row = Row(self.name, run, readings)
        workdir = env.workdir(self.name)
        dsn = env.database(self.name)
        with env.broker(workdir) as broker:
            client_id = f"bench-ingestd-{run}"
            backlog = load.queue_backlog(broker.port, broker.log_text, client_id, readings)
            row.details["publish_seconds"] = round(backlog.publish_seconds, 3)
            daemon = DaemonProcess(workdir, broker.url, client_id, dsn, self.settings)
            meter = CpuMeter(env, broker)
            meter.start()
            try:
                self._drain(daemon, row)
                row.details["cpu_seconds"] = {
                    "consumer": round(cpu_seconds(daemon.pid), 2),
                    **meter.stop(),
                }
            finally:
                row.details["exit_code"] = daemon.stop()
        stored = env.count_rows(dsn)
        env.drop_database(dsn)
        row.details["rows"] = stored
        if stored != readings:
            raise ScenarioError(f"{stored} rows in sensor_readings, expected {readings}")
        if row.details["exit_code"] != 0:
            raise ScenarioError(
                f"ingestd exited {row.details['exit_code']} on SIGTERM:\n{daemon.log_tail()}"
            )
        return row

    def _drain(self, daemon: DaemonProcess, row: Row) -> None:
        """Start the daemon and wait until every reading is stored; fill in ``row``."""
        started = time.time()
        daemon.start()
        first_stored: float | None = None
        progress = (0.0, time.monotonic())
        timeline: list[dict[str, float]] = []
        row.details["timeline"] = timeline
        while True:
            time.sleep(POLL_SECONDS)
            daemon.check_alive()
            sample = daemon.metrics()
            stored = sample.get("ingestd_readings_stored_total", 0.0)
            now = time.time()
            if not timeline or now - started >= timeline[-1]["t"] + TIMELINE_SECONDS:
                timeline.append(_timeline_point(now - started, sample))
            if stored and first_stored is None:
                first_stored = now
            if stored >= row.readings:
                break
            if stored != progress[0]:
                progress = (stored, time.monotonic())
            elif time.monotonic() - progress[1] > STALL_SECONDS:
                raise ScenarioError(
                    f"ingestd stalled at {stored:.0f} of {row.readings} stored\n"
                    f"{daemon.diagnostics()}\n{daemon.log_tail()}"
                )
        row.finish(now - started)
        row.peak_rss_mb = peak_rss_mb(daemon.pid)
        row.details.update(
            startup_seconds=round((first_stored or now) - started, 3),
            drain_seconds=round(now - (first_stored or started), 3),
            **daemon.summary(),
        )


class DaemonProcess:
    """One ``ingestd run`` subprocess with its metrics port and log file."""

    def __init__(
        self,
        workdir: Path,
        broker_url: str,
        client_id: str,
        dsn: str,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.metrics_port = free_port()
        self.log_path = workdir / "ingestd.log"
        self.env = ingestd_env(
            {
                "INGESTD_MQTT__URL": broker_url,
                "INGESTD_MQTT__CLIENT_ID": client_id,
                "INGESTD_DATABASE__URL": dsn,
                "INGESTD_METRICS__LISTEN": f"127.0.0.1:{self.metrics_port}",
                "INGESTD_LOG__LEVEL": "WARNING",
                "INGESTD_DAEMON__STATE_DIR": str(workdir / "state"),
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
            self.process = subprocess.Popen(
                [str(INGESTD), "run"], cwd=self.workdir, env=self.env, stdout=log, stderr=log
            )

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise ScenarioError(
                f"ingestd exited with {self.process.returncode}:\n{self.log_tail()}"
            )

    def metrics(self) -> dict[str, float]:
        try:
            return metrics(self.metrics_port)
        except OSError:
            return {}  # not listening yet

    def metric(self, key: str) -> float:
        return self.metrics().get(key, 0.0)

    def summary(self) -> dict[str, Any]:
        """Batch size, write latency and backpressure figures from ``/metrics``."""
        m = self.metrics()

        def avg(name: str) -> float | None:
            count = m.get(f"{name}_count", 0.0)
            return m.get(f"{name}_sum", 0.0) / count if count else None

        write = avg("ingestd_write_duration_seconds")
        e2e = avg("ingestd_end_to_end_latency_seconds")
        return {
            "batches": m.get("ingestd_batch_size_readings_count"),
            "batch_size_avg": _round(avg("ingestd_batch_size_readings"), 1),
            "write_ms_avg": _round(write * 1000 if write is not None else None, 2),
            "end_to_end_ms_avg": _round(e2e * 1000 if e2e is not None else None, 1),
            "received": m.get("ingestd_messages_received_total"),
            "duplicates": m.get("ingestd_readings_duplicate_total"),
            "rejected": sum(v for k, v in m.items() if k.startswith("ingestd_messages_rejected")),
            "intake_pauses": m.get("ingestd_intake_pauses_total"),
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
        )  # fmt: skip
        m = self.metrics()
        lines = [f"  {k} {v:g}" for k, v in sorted(m.items()) if k.startswith(keys)]
        return "metrics:\n" + "\n".join(lines)

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
        return f"--- ingestd log tail ---\n{text[-chars:]}"


def _timeline_point(t: float, sample: dict[str, float]) -> dict[str, float]:
    """One point of the drain timeline: counters, in-flight, pause flag, inbox depths."""
    point = {"t": round(t, 2)}
    point.update({short: sample[key] for key, short in TIMELINE_KEYS.items() if key in sample})
    for key, value in sample.items():
        if key.startswith("ingestd_queue_depth{"):
            point[key.removeprefix("ingestd_queue_depth")] = value
    return point


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


class IngestdNoEvents(Ingestd):
    """Diagnostic variant: what publishing a processed event per reading costs."""

    name = "ingestd-noevents"
    describe = "ingestd run with INGESTD_PUBLISH__PROCESSED=false (no processed events)"
    settings: ClassVar[dict[str, str]] = {"INGESTD_PUBLISH__PROCESSED": "false"}


SCENARIOS: dict[str, type[Scenario]] = {
    s.name: s for s in (Ceiling, Naive, Ingestd, IngestdNoEvents)
}
DEFAULT_SCENARIOS = ("ceiling", "naive", "ingestd")
