"""The live-traffic scenarios: ingestd runs and is subscribed first, then a paced publisher
(``live.py``) sends readings at a steady rate while the benchmark watches.

* ``latency``: publish -> processed event, as a subscriber on ``ingestd/processed/#`` sees it,
  next to the daemon's own ``ingestd_end_to_end_latency_seconds`` histogram.
* ``soak``: a long run at half the drain rate, sampling the daemon's RSS and open fds.
* ``catch-up``: PostgreSQL behind a proxy that is cut for ``--outage-seconds``; time from
  heal until the daemon's spool is empty, live traffic going on throughout.

Each ends by checking that every published reading is stored once: ``seq`` is the
reading's index, so besides the row count and the unique key, ``sum(seq)`` must be
N(N-1)/2.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from bench import live, load
from bench.base import Row, Scenario, ScenarioError, check_readings
from bench.env import BenchEnv, cpu_seconds, open_fds, peak_rss_mb, rss_mb
from bench.ingestd_process import (
    DaemonProcess,
    histogram,
    histogram_delta,
    histogram_quantile,
    timeline_point,
    wait_stored,
)
from bench.proxy import DelayProxy
from tests.harness.servers import Mosquitto

WARM_UP = len(load.TOPICS)  # one reading per series before the clock runs (old timestamps)
DEFAULT_SOAK_RATE = 4_000.0  # when no ingestd drain was measured in this run
SOAK_WARM_UP = 0.2  # the first 20% of the soak is warm-up: growth is measured after it
PRE_OUTAGE_SECONDS = 10.0
CATCH_UP_TIMEOUT = 300.0  # after heal, at least; 5x the outage when that is longer
SPOOL_KEYS = {
    "ingestd_spool_readings": "spool",
    "ingestd_spool_bytes": "spool_bytes",
    "ingestd_spool_oldest_age_seconds": "spool_age",
    "ingestd_spool_replayed_total": "replayed",
}


def seq_sum(n: int) -> int:
    """sum(seq) of ``n`` live readings (seq 0..n-1; warm-up readings have seq 0)."""
    return n * (n - 1) // 2


@contextlib.contextmanager
def subscribed_daemon(
    workdir: Path, broker: Mosquitto, dsn: str, client_id: str, row: Row
) -> Iterator[DaemonProcess]:
    """``ingestd run`` with default settings, started, subscribed, database writable; stopped
    (SIGTERM) on the way out, its exit code in ``row.details``."""
    daemon = DaemonProcess(workdir, broker.url, client_id, dsn)
    try:
        daemon.start()
        daemon.wait_subscribed(broker.log_text)
        yield daemon
    finally:
        row.details["exit_code"] = daemon.stop()


def check_exit(row: Row, daemon: DaemonProcess) -> None:
    if row.details.get("exit_code") != 0:
        raise ScenarioError(
            f"ingestd exited {row.details.get('exit_code')} on SIGTERM:\n{daemon.log_tail()}",
            row.details,
        )


# -------------------------------------------------------------------------------- latency


class Latency(Scenario):
    """Publish -> processed event at a steady live rate."""

    name = "latency"
    describe = (
        "ingestd subscribed first, then a paced QoS 1 publisher (--live-rate msg/s for"
        " --latency-seconds); latency = receipt of the processed event by a subscriber on"
        " ingestd/processed/# minus the reading's ts (its send time)"
    )

    def readings_for(self, requested: int) -> int:
        return max(1, int(self.options.live_rate * self.options.latency_seconds))

    def run(self, env: BenchEnv, readings: int, run: int) -> Row:
        row = Row(self.name, run, readings)
        workdir = env.workdir(self.name)
        dsn = env.database(self.name)
        with (
            env.broker(workdir) as broker,
            subscribed_daemon(workdir, broker, dsn, f"bench-latency-{run}", row) as daemon,
        ):
            subscriber = live.subscriber(workdir, broker.port, readings)
            publisher = live.publisher(workdir, broker.port, self.options.live_rate, readings)
            try:
                # A first batch through every stage (connections, caches) before measuring;
                # its events carry 2026-01-01 timestamps, which the subscriber skips.
                load.RawPublisher(broker.port, "bench-warm-up").publish(
                    load.publish_packets(WARM_UP)
                )
                wait_stored([daemon], WARM_UP, time.time())
                before = daemon.metrics()
                subscriber.start()
                subscriber.wait_ready()
                started = time.time()
                publisher.start()
                timeline: list[dict[str, float]] = []
                row.details["timeline"] = timeline
                wait_stored(
                    [daemon], WARM_UP + readings, started, poll=0.5, timeline=timeline,
                    check=publisher.check,
                )  # fmt: skip
                published = publisher.report()
                subscriber.stop()
                events = subscriber.report()
                after = daemon.metrics()
                row.peak_rss_mb = peak_rss_mb(daemon.pid)
                row.details.update(daemon.summary())
                row.details["cpu_seconds"] = {"consumer": round(cpu_seconds(daemon.pid), 2)}
            finally:
                subscriber.kill()
                publisher.kill()
        self._fill(row, readings, published, events, before, after)
        check_readings(env, dsn, WARM_UP + readings, row, seq_sum(readings))
        check_exit(row, daemon)
        return row

    @staticmethod
    def _fill(
        row: Row,
        readings: int,
        published: dict[str, Any],
        events: dict[str, Any],
        before: dict[str, float],
        after: dict[str, float],
    ) -> None:
        """The row from the publisher's and subscriber's reports and the daemon's metrics
        before and after the measured traffic (the warm-up is subtracted)."""
        buckets = histogram_delta(histogram(after), histogram(before))
        processed = 'ingestd_events_published_total{kind="processed"}'
        sent_events = after.get(processed, 0.0) - before.get(processed, 0.0)
        latency = events["latency_ms"]
        row.seconds = published["seconds"]
        row.msg_per_s = published["rate_achieved"]
        row.p50_ms, row.p99_ms = latency["p50"], latency["p99"]
        daemon_p50 = histogram_quantile(0.5, buckets)
        daemon_p99 = histogram_quantile(0.99, buckets)
        row.figures.update(
            events_lost=readings - events["unique"],
            # QoS 0 events the daemon handed to paho but the subscriber never saw
            events_lost_after_publish=sent_events - events["unique"],
            publish_lag_max_ms=published["lag_ms"]["p100"],
        )
        if daemon_p50 is not None and daemon_p99 is not None:
            row.figures.update(daemon_p50_ms=daemon_p50 * 1000, daemon_p99_ms=daemon_p99 * 1000)
        row.details.update(
            publisher=published,
            events={k: v for k, v in events.items() if k != "per_second"},
            events_per_second=events["per_second"],
            daemon_events_published=sent_events,
            daemon_histogram={
                "metric": "ingestd_end_to_end_latency_seconds (warm-up subtracted)",
                "buckets": buckets,
                "p50_ms": _round(daemon_p50 and daemon_p50 * 1000, 2),
                "p99_ms": _round(daemon_p99 and daemon_p99 * 1000, 2),
            },
        )
        if published["acked"] != readings:
            raise ScenarioError(f"{published['acked']} of {readings} acknowledged", row.details)

    def note(self, summary: dict[str, Any]) -> str:
        lost = summary.get("events_lost")
        lag = summary.get("publish_lag_max_ms")
        parts = []
        if lost is not None:
            parts.append(f"events lost {lost:.0f}")
        if lag is not None:
            parts.append(f"publisher lag max {lag:.0f} ms")
        return ", ".join(parts)


class LatencyFloor(Scenario):
    """Diagnostic: the same publisher and subscriber with nothing in between but the broker.

    The subscriber takes the readings themselves (``sensors/+/+``): what the measurement
    chain (two paho hops, one broker, a shared 2-core machine) costs without ingestd.
    """

    name = "latency-floor"
    describe = (
        "diagnostic: the latency scenario's publisher and subscriber without ingestd (the"
        " subscriber takes sensors/+/+ itself): the floor of the measurement"
    )

    def readings_for(self, requested: int) -> int:
        return max(1, int(self.options.live_rate * self.options.latency_seconds))

    def run(self, env: BenchEnv, readings: int, run: int) -> Row:
        row = Row(self.name, run, readings)
        workdir = env.workdir(self.name)
        with env.broker(workdir) as broker:
            subscriber = live.subscriber(workdir, broker.port, readings, load.TOPIC_FILTER)
            publisher = live.publisher(workdir, broker.port, self.options.live_rate, readings)
            try:
                subscriber.start()
                subscriber.wait_ready()
                publisher.start()
                published = publisher.report(timeout=self.options.latency_seconds * 3 + 60)
                subscriber.stop()
                events = subscriber.report()
            finally:
                subscriber.kill()
                publisher.kill()
        latency = events["latency_ms"]
        row.seconds = published["seconds"]
        row.msg_per_s = published["rate_achieved"]
        row.p50_ms, row.p99_ms = latency["p50"], latency["p99"]
        row.figures["events_lost"] = readings - events["unique"]
        row.details.update(
            publisher=published,
            events={k: v for k, v in events.items() if k != "per_second"},
            events_per_second=events["per_second"],
        )
        return row

    def note(self, summary: dict[str, Any]) -> str:
        return "no ingestd: publisher -> broker -> subscriber"


# ----------------------------------------------------------------------------------- soak


class Soak(Scenario):
    """Half the drain rate for a long time: does the daemon's RSS or fd count creep up?"""

    name = "soak"
    describe = (
        "paced live publisher at half the median ingestd drain rate (or --soak-rate) for"
        " --soak-seconds; the daemon's VmRSS and open fds sampled; growth from the end of the"
        " first 20% (warm-up) to the end"
    )
    max_runs: ClassVar[int | None] = 1

    def rate(self) -> float:
        if self.options.soak_rate:
            return self.options.soak_rate
        drain = self.options.median_rate("ingestd")
        return round(drain / 2) if drain else DEFAULT_SOAK_RATE

    def readings_for(self, requested: int) -> int:
        return max(1, int(self.rate() * self.options.soak_seconds))

    def run(self, env: BenchEnv, readings: int, run: int) -> Row:
        row = Row(self.name, run, readings)
        workdir = env.workdir(self.name)
        dsn = env.database(self.name)
        rate = self.rate()
        row.details["rate_source"] = "--soak-rate" if self.options.soak_rate else (
            "half the median ingestd drain rate" if self.options.median_rate("ingestd")
            else f"default {DEFAULT_SOAK_RATE:g} (no ingestd drain measured)"
        )  # fmt: skip
        with (
            env.broker(workdir) as broker,
            subscribed_daemon(workdir, broker, dsn, f"bench-soak-{run}", row) as daemon,
        ):
            publisher = live.publisher(workdir, broker.port, rate, readings)
            try:
                started = time.time()
                publisher.start()
                samples = self._sample(daemon, publisher, started, rate)
                row.details["samples"] = samples
                published = publisher.report()
                ended = time.time()
                wait_stored([daemon], readings, started, poll=0.5)
                row.details["tail_seconds"] = round(time.time() - ended, 2)
                row.peak_rss_mb = peak_rss_mb(daemon.pid)
                row.details.update(daemon.summary())
            finally:
                publisher.kill()
        row.seconds = published["seconds"]
        row.msg_per_s = published["rate_achieved"]
        row.details["publisher"] = published
        warm = SOAK_WARM_UP * self.options.soak_seconds
        for key in ("rss_mb", "fds"):
            growth = _growth(samples, key, warm)
            row.details[key] = growth
            row.figures[f"{key}_growth_pct"] = growth["growth_pct"]
        row.figures["backlog_max"] = max(s["backlog"] for s in samples)
        check_readings(env, dsn, readings, row, seq_sum(readings))
        check_exit(row, daemon)
        return row

    def _sample(
        self, daemon: DaemonProcess, publisher: live.LiveProcess, started: float, rate: float
    ) -> list[dict[str, float]]:
        """RSS and fds (read before the scrape, whose socket would count), then the counters;
        ``backlog`` is what the publisher should have sent by now minus what is stored."""
        interval = max(1.0, self.options.soak_seconds / 150)
        samples = []
        while publisher.running():
            daemon.check_alive()
            publisher.check()
            t = time.time() - started
            sample = {"t": round(t, 1), "rss_mb": rss_mb(daemon.pid), "fds": open_fds(daemon.pid)}
            m = daemon.metrics()
            sample.update(timeline_point(m))
            expected = min(rate * t, publisher.count or float("inf"))
            sample["backlog"] = max(0.0, expected - m.get("ingestd_readings_stored_total", 0.0))
            samples.append(sample)
            time.sleep(max(0.0, started + t + interval - time.time()))
        publisher.check()
        return samples

    def note(self, summary: dict[str, Any]) -> str:
        rss, fds = summary.get("rss_mb_growth_pct"), summary.get("fds_growth_pct")
        if rss is None or fds is None:
            return ""
        return f"RSS {rss:+.1f}%, fds {fds:+.1f}% after warm-up"


def _growth(samples: list[dict[str, float]], key: str, warm_up: float) -> dict[str, float]:
    """Start (first sample after the warm-up), end, max, and growth in percent of start."""
    steady = [s for s in samples if s["t"] >= warm_up] or samples[-1:]
    start, end = steady[0][key], steady[-1][key]
    peak = max(s[key] for s in steady)
    return {
        "start": round(start, 2),
        "end": round(end, 2),
        "max": round(peak, 2),
        "growth_pct": round((end - start) / start * 100, 2) if start else 0.0,
        "max_growth_pct": round((peak - start) / start * 100, 2) if start else 0.0,
        "start_t": steady[0]["t"],
        "end_t": steady[-1]["t"],
    }


# ------------------------------------------------------------------------------- catch-up


class CatchUp(Scenario):
    """A database outage under live traffic: how long until the spool is replayed?"""

    name = "catch-up"
    describe = (
        "PostgreSQL behind a proxy (no delay); live publisher at --live-rate; after 10 s the"
        " proxy resets and refuses every connection for --outage-seconds, then heals;"
        " seconds = heal until ingestd_spool_readings is 0 again, msg/s = replay rate"
    )
    max_runs: ClassVar[int | None] = 1

    def readings_for(self, requested: int) -> int:
        # An estimate for the progress line; the row gets the count actually published.
        return int(self.options.live_rate * (PRE_OUTAGE_SECONDS + self.options.outage_seconds))

    def run(self, env: BenchEnv, readings: int, run: int) -> Row:
        row = Row(self.name, run, readings)
        workdir = env.workdir(self.name)
        dsn = env.database(self.name)
        timeline: list[dict[str, float]] = []
        row.details["timeline"] = timeline
        with (
            env.broker(workdir) as broker,
            DelayProxy(env.postgres.port, 0.0) as proxy,
            subscribed_daemon(
                workdir, broker, proxy.url_for(dsn), f"bench-catch-up-{run}", row
            ) as daemon,
        ):
            publisher = live.publisher(workdir, broker.port, self.options.live_rate, None)
            try:
                started = time.time()
                publisher.start()
                phases = self._outage(daemon, publisher, proxy, started, timeline, row)
                publisher.stop()
                published = publisher.report()
                row.readings = published["acked"]
                wait_stored([daemon], row.readings, started, poll=0.5, timeline=timeline)
                row.details["all_stored_t"] = round(time.time() - started, 2)
                row.peak_rss_mb = peak_rss_mb(daemon.pid)
                row.details.update(daemon.summary())
            finally:
                publisher.kill()
                row.details["proxy"] = proxy.stats()
        row.details.update(publisher=published, phases=phases)
        row.seconds = phases["drain_seconds"]
        row.msg_per_s = phases["replay_msg_per_s"]
        row.figures.update(
            {k: phases[k] for k in ("spool_peak", "detect_seconds", "outage_seconds")}
        )
        check_readings(env, dsn, row.readings, row, seq_sum(row.readings))
        check_exit(row, daemon)
        return row

    def _outage(
        self,
        daemon: DaemonProcess,
        publisher: live.LiveProcess,
        proxy: DelayProxy,
        started: float,
        timeline: list[dict[str, float]],
        row: Row,
    ) -> dict[str, Any]:
        """Cut at 10 s, heal after the outage, return once the spool is empty again."""
        outage = self.options.outage_seconds
        timeout = max(CATCH_UP_TIMEOUT, 5 * outage)
        t: dict[str, float] = {}  # cut, heal, up (database_up again), empty (spool 0)
        at_heal: dict[str, float] = {}
        peak = {"spool": 0.0, "spool_bytes": 0.0, "spool_age": 0.0}
        while True:
            daemon.check_alive()
            publisher.check()
            m = daemon.metrics()
            now = time.time() - started
            point = {"t": round(now, 2), **timeline_point(m)}
            point.update({short: m[key] for key, short in SPOOL_KEYS.items() if key in m})
            timeline.append(point)
            peak = {key: max(value, point.get(key, 0.0)) for key, value in peak.items()}
            if "cut" not in t and now >= PRE_OUTAGE_SECONDS:
                proxy.cut()
                t["cut"] = now
            elif "cut" in t and "heal" not in t and now >= t["cut"] + outage:
                proxy.heal()
                t["heal"] = now
                at_heal = point
            elif "heal" in t:
                if "up" not in t and point.get("db_up") == 1:
                    t["up"] = now
                if "up" in t and point.get("spool", 0.0) == 0:
                    t["empty"] = now
                    break
                if now - t["heal"] > timeout:
                    raise ScenarioError(
                        f"spool not empty {timeout:.0f} s after heal:"
                        f" {point.get('spool', 0):.0f} readings left\n{daemon.log_tail()}",
                        row.details,
                    )
            time.sleep(0.25)
        if not peak["spool"]:
            raise ScenarioError("the spool was never used during the outage", row.details)
        drain = t["empty"] - t["heal"]
        replaying = t["empty"] - t["up"]
        replayed = point.get("replayed", 0.0) - at_heal.get("replayed", 0.0)
        stored_live = point.get("stored", 0.0) - at_heal.get("stored", 0.0) - replayed
        return {
            "outage_seconds": round(t["heal"] - t["cut"], 2),
            "times": {k: round(v, 2) for k, v in t.items()},
            "detect_seconds": round(t["up"] - t["heal"], 2),
            "drain_seconds": round(drain, 2),
            "spool_peak": peak["spool"],
            "spool_bytes_peak": peak["spool_bytes"],
            "spool_age_peak_seconds": round(peak["spool_age"], 1),
            "replayed": replayed,
            "replay_msg_per_s": round(replayed / replaying, 1) if replaying > 0 else None,
            "live_stored_while_draining": stored_live,
            # published (at the nominal rate) but not yet received: the broker's live backlog
            "live_backlog_at_empty": round(
                self.options.live_rate * now - point.get("received", 0.0)
            ),
        }

    def note(self, summary: dict[str, Any]) -> str:
        peak, detect = summary.get("spool_peak"), summary.get("detect_seconds")
        if peak is None:
            return ""
        return f"spool peak {peak:,.0f}; database seen up {detect:.1f} s after heal"


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
