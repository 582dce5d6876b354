"""Benchmark scenarios: each prepares its own servers and data, runs, and returns one ``Row``.

A scenario is a small class with a ``name``, a ``describe`` line and ``run(env, readings,
run)``. Add one by subclassing ``Scenario`` (``base.py``) and listing it in ``SCENARIOS``;
``run.py`` runs the selected ones ``--runs`` times, interleaved, and reports medians.

The drain scenarios here share one shape: a fresh broker, a persistent session pre-filled
with the backlog (``load.queue_backlog``), then the consumer starts and the clock runs from
its process start until its last reading is handled (counted for the ceiling, committed for
the naive consumer and ingestd). The live-traffic scenarios (latency, soak, catch-up) are
in ``live_scenarios.py``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from bench import load
from bench.base import Options, Row, Scenario, ScenarioError, check_readings
from bench.env import REPO, BenchEnv, CpuMeter, cpu_seconds, peak_rss_mb
from bench.ingestd_process import DaemonProcess, wait_stored
from bench.live_scenarios import CatchUp, Latency, LatencyFloor, Soak
from bench.proxy import DelayProxy
from bench.sparkplug import SparkplugDdata

__all__ = ["DEFAULT_SCENARIOS", "SCENARIOS", "Options", "Row", "Scenario", "check_readings"]

MAX_PAYLOAD_BYTES = 64 * 1024  # ingestd's default ingest.max_payload_bytes
NEAR_LIMIT_BYTES = MAX_PAYLOAD_BYTES - 36  # ingestd-near-limit fills each payload up to this
NAIVE_MAX_READINGS = 40_000  # one INSERT per message runs at ~2-4k/s: keep it under ~20 s
SHARED_GROUP = "bench"
MIN_SHARE = 0.25  # scale-out: each instance must store at least this share to count as working


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
            sys.executable, "-m", "bench.consumers", self.consumer, "--port", str(port),
            "--client-id", client_id, "--count", str(readings),
        ]  # fmt: skip
        if dsn is not None:
            argv += ["--dsn", dsn]
        started = time.time()
        result = subprocess.run(
            argv, cwd=REPO, capture_output=True, text=True, timeout=900, check=False
        )
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
    describe = "ingestd run, default settings, PostgreSQL on loopback"
    settings: ClassVar[dict[str, str]] = {}  # extra INGESTD_* variables for variants

    def delay_ms(self) -> float | None:
        """One-way delay of a ``DelayProxy`` between ingestd and PostgreSQL; None: direct."""
        return None

    def workload(self) -> load.Workload | None:
        """A pre-built backlog (arrays, ...); None: ``readings`` messages of one reading."""
        return None

    def run(self, env: BenchEnv, readings: int, run: int) -> Row:
        row = Row(self.name, run, readings)
        workdir = env.workdir(self.name)
        dsn = env.database(self.name)
        work = self.workload()
        if work is not None:
            assert work.readings == readings
            row.figures["messages"] = work.messages
            row.details.update(
                messages=work.messages,
                readings_per_message=list(work.per_message),
                payload_bytes_avg=round(work.payload_bytes[0], 1),
                payload_bytes_max=work.payload_bytes[1],
            )
        with env.broker(workdir) as broker, self._link(env, dsn, row) as daemon_dsn:
            client_id = f"bench-{self.name}-{run}"
            backlog = load.queue_backlog(
                broker.port, broker.log_text, client_id, readings,
                packets=None if work is None else work.packets,
            )  # fmt: skip
            row.details["publish_seconds"] = round(backlog.publish_seconds, 3)
            daemon = DaemonProcess(workdir, broker.url, client_id, daemon_dsn, self.settings)
            meter = CpuMeter(env, broker)
            meter.start()
            try:
                started = time.time()
                daemon.start()
                timeline: list[dict[str, float]] = []
                row.details["timeline"] = timeline
                drained = wait_stored([daemon], readings, started, timeline=timeline)
                row.finish(drained.done - started)
                row.peak_rss_mb = peak_rss_mb(daemon.pid)
                first = drained.first_stored or drained.done
                row.details.update(
                    startup_seconds=round(first - started, 3),
                    drain_seconds=round(drained.done - first, 3),
                    cpu_seconds={"consumer": round(cpu_seconds(daemon.pid), 2), **meter.stop()},
                    **daemon.summary(),
                )
            finally:
                row.details["exit_code"] = daemon.stop()
        if work is not None and row.seconds:
            row.figures["messages_per_s"] = work.messages / row.seconds
        for key in ("inflight", "inflight_bytes", "inflight_readings"):  # sampled once a second
            seen = [p[key] for p in row.details.get("timeline", ()) if key in p]
            if seen:
                row.details[f"{key}_max_sampled"] = max(seen)
        check_readings(env, dsn, readings, row, None if work is None else work.seq_sum)
        if row.details["exit_code"] != 0:
            raise ScenarioError(
                f"ingestd exited {row.details['exit_code']} on SIGTERM:\n{daemon.log_tail()}"
            )
        return row

    @contextlib.contextmanager
    def _link(self, env: BenchEnv, dsn: str, row: Row) -> Iterator[str]:
        """The database URL ingestd uses: direct, or through a delay proxy."""
        delay_ms = self.delay_ms()
        if delay_ms is None:
            yield dsn
            return
        with DelayProxy(env.postgres.port, delay_ms / 1000) as proxy:
            try:
                yield proxy.url_for(dsn)
            finally:
                row.details["proxy"] = proxy.stats()


class IngestdNoEvents(Ingestd):
    """Diagnostic variant: what publishing a processed event per reading costs."""

    name = "ingestd-noevents"
    describe = "ingestd run with INGESTD_PUBLISH__PROCESSED=false (no processed events)"
    settings: ClassVar[dict[str, str]] = {"INGESTD_PUBLISH__PROCESSED": "false"}


class IngestdNoAnomaly(Ingestd):
    """The drain with anomaly detection off: what detection costs the default drain."""

    name = "ingestd-noanomaly"
    describe = "ingestd run with INGESTD_ANOMALY__ENABLED=false (no detectors, alerts, tasks)"
    settings: ClassVar[dict[str, str]] = {"INGESTD_ANOMALY__ENABLED": "false"}


class IngestdWan(Ingestd):
    """The drain with PostgreSQL 50 ms away (25 ms each way); defaults, as deployed."""

    name = "ingestd-wan"
    describe = "ingestd run, default settings, PostgreSQL behind a 25 ms each way delay proxy"

    def delay_ms(self) -> float | None:
        return self.options.wan_delay_ms


class IngestdProxy(Ingestd):
    """Diagnostic: the WAN path with no delay, i.e. what the proxy itself costs."""

    name = "ingestd-proxy"
    describe = "ingestd run, default settings, PostgreSQL behind the delay proxy at 0 ms"

    def delay_ms(self) -> float | None:
        return 0.0


class IngestdArrayBacklog(Ingestd):
    """A drain like ``ingestd`` whose backlog is JSON arrays (or, for the comparison, the same
    readings one per message): ``--arrays`` messages (2,000) of 500 readings each, or as many
    as fit under ``ingest.max_payload_bytes``. ``readings`` here counts readings, the table's
    rate is readings/s, and the messages and msg/s are in the notes."""

    compares_messages = False  # x ceil / x naive would compare readings/s with msg/s

    def readings_for(self, requested: int) -> int:
        work = self.workload()
        assert work is not None
        return work.readings

    def note(self, summary: dict[str, Any]) -> str:
        work = self.workload()
        assert work is not None
        low, high = work.per_message
        avg = work.payload_bytes[0]
        if high == 1:
            return f"{work.messages:,} msgs of one reading, {avg:.0f} B"
        per = f"{low:,}" if low == high else f"{low:,}-{high:,}"
        rate = summary.get("messages_per_s")
        text = f"{work.messages:,} msgs x {per} readings, {avg / 1024:.1f} KiB"
        return text + ("" if rate is None else f"; {rate:,.0f} msg/s")


class IngestdArrays(IngestdArrayBacklog):
    name = "ingestd-arrays"
    describe = (
        f"ingestd run, default settings: a backlog of --arrays (2,000) JSON arrays of"
        f" {load.ARRAY_READINGS} readings (~28 KiB), each reading its own ts"
    )

    def workload(self) -> load.Workload:
        return load.array_workload(self.options.arrays, per_message=load.ARRAY_READINGS)


class IngestdNearLimit(IngestdArrayBacklog):
    name = "ingestd-near-limit"
    describe = (
        f"ingestd run, default settings: --arrays (2,000) JSON arrays filled to just under"
        f" ingest.max_payload_bytes ({MAX_PAYLOAD_BYTES:,} B; at most {NEAR_LIMIT_BYTES:,}):"
        " ~1,150 readings each, stored in parts of database.batch_size"
    )

    def workload(self) -> load.Workload:
        return load.array_workload(self.options.arrays, max_bytes=NEAR_LIMIT_BYTES)


class IngestdSingles(IngestdArrayBacklog):
    name = "ingestd-singles"
    describe = (
        f"ingestd run, default settings: the readings of ingestd-arrays (--arrays x"
        f" {load.ARRAY_READINGS}), the same JSON objects, one per message"
    )
    compares_messages = True  # one reading per message: comparable with the ceiling

    def workload(self) -> load.Workload:
        n = self.options.arrays * load.ARRAY_READINGS
        return load.array_workload(n, per_message=1, single=True)


class ScaleOut(Scenario):
    """Two ingestd instances sharing one subscription, one broker, one database."""

    name = "scale-out"
    describe = (
        f"two `ingestd run` with INGESTD_MQTT__SHARED_GROUP={SHARED_GROUP} (own client ids,"
        " metrics ports, state dirs), one broker, one database: drain of a backlog the broker"
        f" queued in turns for their two offline sessions on $share/{SHARED_GROUP}/sensors/+/+"
    )
    instances = 2

    def run(self, env: BenchEnv, readings: int, run: int) -> Row:
        row = Row(self.name, run, readings)
        workdir = env.workdir(self.name)
        dsn = env.database(self.name)
        ids = [f"bench-scale-{chr(ord('a') + i)}-{run}" for i in range(self.instances)]
        with env.broker(workdir) as broker:
            shared = f"$share/{SHARED_GROUP}/{load.TOPIC_FILTER}"
            backlog = load.queue_backlog(broker.port, broker.log_text, ids, readings, shared)
            row.details["publish_seconds"] = round(backlog.publish_seconds, 3)
            settings = {"INGESTD_MQTT__SHARED_GROUP": SHARED_GROUP}
            daemons = [
                DaemonProcess(workdir, broker.url, cid, dsn, settings, name=f"ingestd-{i + 1}")
                for i, cid in enumerate(ids)
            ]
            meter = CpuMeter(env, broker)
            meter.start()
            try:
                started = time.time()
                for daemon in daemons:
                    daemon.start()
                timeline: list[dict[str, float]] = []
                row.details["timeline"] = timeline
                drained = wait_stored(daemons, readings, started, timeline=timeline)
                row.finish(drained.done - started)
                first = drained.first_stored or drained.done
                row.details.update(
                    startup_seconds=round(first - started, 3),
                    drain_seconds=round(drained.done - first, 3),
                    cpu_seconds=meter.stop(),
                )
                instances = [self._instance(d, readings) for d in daemons]
            finally:
                codes = [d.stop() for d in daemons]
        row.details["instances"] = instances
        row.details["exit_codes"] = codes
        row.peak_rss_mb = max(i["peak_rss_mb"] for i in instances)
        row.figures["share_min"] = min(i["share"] for i in instances)
        row.figures["duplicates"] = sum(i["duplicates"] or 0 for i in instances)
        check_readings(env, dsn, readings, row)
        if any(code != 0 for code in codes):
            tails = "\n".join(d.log_tail() for d in daemons)
            raise ScenarioError(f"exit codes on SIGTERM: {codes}\n{tails}", row.details)
        return row

    @staticmethod
    def _instance(daemon: DaemonProcess, readings: int) -> dict[str, Any]:
        summary = daemon.summary()
        stored = summary.get("stored") or 0.0
        return {
            "name": daemon.name,
            "client_id": daemon.client_id,
            "share": round(stored / readings, 4),
            "peak_rss_mb": round(peak_rss_mb(daemon.pid), 1),
            "cpu_seconds": round(cpu_seconds(daemon.pid), 2),
            **summary,
        }

    def note(self, summary: dict[str, Any]) -> str:
        share = summary.get("share_min")
        return "" if share is None else f"smaller share {share:.0%}"


SCENARIOS: dict[str, type[Scenario]] = {
    s.name: s
    for s in (
        Ceiling, Naive, Ingestd, IngestdNoEvents, IngestdNoAnomaly, IngestdWan, IngestdProxy,
        ScaleOut,
        IngestdArrays, IngestdNearLimit, IngestdSingles, SparkplugDdata, Latency, LatencyFloor,
        Soak, CatchUp,
    )
}  # fmt: skip
DEFAULT_SCENARIOS = (
    "ceiling", "naive", "ingestd", "ingestd-noanomaly", "ingestd-wan", "scale-out",
    "sparkplug-ddata", "latency", "soak", "catch-up",
)  # fmt: skip
