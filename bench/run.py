"""ingestd benchmark (``make bench``): throughput, WAN, latency, memory, scale-out, catch-up.

ingestd runs side by side with a count-only paho subscriber (the Python receive ceiling)
and a naive consumer doing one INSERT per message, then under live traffic.

    .venv/bin/python -m bench.run [--readings N] [--runs K] [--scenarios a,b,c] [--quick]
                                   [--live-rate R] [--latency-seconds S] [--soak-seconds S]
                                   [--soak-rate R] [--outage-seconds S] [--wan-delay-ms MS]
                                   [--arrays N] [--json PATH] [--keep]

Prints one table (medians over the runs) and the PASS/MISS lines of the targets, and writes
every run plus machine info to a JSON file. Exits 0 even when a target is missed; exits 1
only when a scenario failed to complete. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.base import Options, Row, Scenario, ScenarioError
from bench.env import BenchEnv
from bench.scenarios import DEFAULT_SCENARIOS, SCENARIOS

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_READINGS = 200_000
QUICK_READINGS = 20_000
DEFAULT_RUNS = 3

# (default, --quick) of the live scenarios' lengths.
LATENCY_SECONDS = (20.0, 5.0)
SOAK_SECONDS = (600.0, 60.0)
OUTAGE_SECONDS = (60.0, 15.0)

# The issue's targets, checked on the medians by `targets`.
TARGET_VS_CEILING = 0.7
TARGET_VS_NAIVE = 5.0
TARGET_WAN_VS_LOOPBACK = 0.8
TARGET_P50_MS = 50.0
TARGET_P99_MS = 250.0
TARGET_RSS_MB = 150.0
TARGET_SOAK_GROWTH_PCT = 10.0
TARGET_SCALE_OUT = 1.2
TARGET_MIN_SHARE = 0.25  # "both working": each instance stored at least this share
TARGET_ARRAYS_VS_SINGLES = 1.5  # readings/s of ingestd-arrays / ingestd-singles
ARRAYS = (2_000, 200)  # (default, --quick) messages of the array backlogs
ARRAY_SCENARIOS = ("ingestd-arrays", "ingestd-near-limit", "ingestd-singles")
TARGET_SPARKPLUG_VS_JSON = 2.0  # readings/s of sparkplug-ddata / ingestd (JSON singles)
TARGET_ANOMALY_ON_VS_OFF = 0.9  # readings/s of ingestd (detection on) / ingestd-noanomaly
SPARKPLUG_MESSAGES = (40_000, 4_000)  # (default, --quick) DDATA of sparkplug-ddata


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[:2]))
    parser.add_argument(
        "--readings", type=int, help=f"drain size (default {DEFAULT_READINGS:,}; quick "
        f"{QUICK_READINGS:,})"
    )  # fmt: skip
    parser.add_argument(
        "--runs", type=int, help=f"repeat and report medians (default {DEFAULT_RUNS}; quick 1);"
        " soak and catch-up run once"
    )  # fmt: skip
    parser.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma list of {', '.join(SCENARIOS)} (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="default bench/results/<UTC timestamp>.json")
    parser.add_argument(
        "--quick", action="store_true", help="smoke sizes: 20,000 readings, one run, short live"
        " scenarios (latency 5 s, soak 60 s, outage 15 s)"
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server logs)")
    live = parser.add_argument_group("live scenarios")
    live.add_argument(
        "--live-rate", type=float, default=5000.0,
        help="publish rate of latency and catch-up, msg/s (default %(default)g)",
    )  # fmt: skip
    live.add_argument("--latency-seconds", type=float, help="default 20 (quick 5)")
    live.add_argument("--soak-seconds", type=float, help="default 600 (quick 60)")
    live.add_argument(
        "--soak-rate", type=float, help="msg/s (default: half the median ingestd drain rate of"
        " this run, or 4000 when ingestd was not run)"
    )  # fmt: skip
    live.add_argument("--outage-seconds", type=float, help="catch-up: default 60 (quick 15)")
    live.add_argument(
        "--wan-delay-ms", type=float, default=25.0,
        help="ingestd-wan: delay each way (default %(default)g)",
    )  # fmt: skip
    arrays = parser.add_argument_group("array backlogs")
    arrays.add_argument(
        "--arrays", type=int, help="messages of ingestd-arrays and ingestd-near-limit; "
        "ingestd-singles sends 500x as many single readings (default 2,000; quick 200)",
    )  # fmt: skip
    sparkplug = parser.add_argument_group("sparkplug-ddata")
    sparkplug.add_argument(
        "--sparkplug-messages", type=int, help="DDATA messages of 10 metrics (default 40,000:"
        " 400,000 readings; quick 4,000)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    quick = int(args.quick)
    if args.readings is None:
        args.readings = QUICK_READINGS if args.quick else DEFAULT_READINGS
    if args.runs is None:
        args.runs = 1 if args.quick else DEFAULT_RUNS
    if args.latency_seconds is None:
        args.latency_seconds = LATENCY_SECONDS[quick]
    if args.soak_seconds is None:
        args.soak_seconds = SOAK_SECONDS[quick]
    if args.outage_seconds is None:
        args.outage_seconds = OUTAGE_SECONDS[quick]
    if args.arrays is None:
        args.arrays = ARRAYS[quick]
    if args.sparkplug_messages is None:
        args.sparkplug_messages = SPARKPLUG_MESSAGES[quick]
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    if min(args.readings, args.runs, args.arrays, args.sparkplug_messages) < 1:
        parser.error("--readings, --runs, --arrays and --sparkplug-messages must be positive")
    if min(args.live_rate, args.latency_seconds, args.soak_seconds, args.outage_seconds) <= 0:
        parser.error("rates and durations must be positive")
    args.scenarios = names
    return args


def options(args: argparse.Namespace) -> Options:
    return Options(
        readings=args.readings,
        live_rate=args.live_rate,
        latency_seconds=args.latency_seconds,
        soak_seconds=args.soak_seconds,
        soak_rate=args.soak_rate,
        outage_seconds=args.outage_seconds,
        wan_delay_ms=args.wan_delay_ms,
        arrays=args.arrays,
        sparkplug_messages=args.sparkplug_messages,
    )


# ---------------------------------------------------------------------------- running


def run_one(scenario: Scenario, env: BenchEnv, readings: int, run: int) -> Row:
    """Run a scenario once; a failure becomes a row with ``error`` set (and a log line)."""
    n = scenario.readings_for(readings)
    print(f"[run {run + 1}] {scenario.name}: {n} readings ...", flush=True)
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        row = scenario.run(env, n, run)
    except Exception as exc:
        row = Row(scenario.name, run, n, error=f"{type(exc).__name__}: {exc}")
        if isinstance(exc, ScenarioError):
            row.details.update(exc.details)
        traceback.print_exc()
    row.details["scenario_wall_seconds"] = round(time.monotonic() - started, 1)
    # The machine may be shared: a 1-minute load average well above what the scenario
    # itself runs (~2-3 busy processes) means someone else took CPU during the run.
    row.details["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    if row.error is not None:
        print(f"         FAILED: {row.error.splitlines()[0]}", flush=True)
    elif row.msg_per_s is not None and row.seconds is not None:
        rate = f"{row.msg_per_s:,.0f} readings/s"
        if "messages_per_s" in row.figures:
            rate += f" ({row.figures['messages_per_s']:,.0f} msg/s)"
        print(f"         {rate}, {row.seconds:.2f} s", flush=True)
    return row


def run_all(args: argparse.Namespace, env: BenchEnv, opts: Options) -> list[Row]:
    """Every selected scenario, ``--runs`` times, interleaved (run 1 of each, then run 2...).

    A scenario with ``max_runs`` (soak, catch-up: long) runs in the last rounds only, so it
    sees every earlier result (the soak's rate is half the median drain rate).
    """
    scenarios = [SCENARIOS[name](opts) for name in args.scenarios]
    rows = opts.results
    for run in range(args.runs):
        for scenario in scenarios:
            cap = scenario.max_runs or args.runs
            if run >= args.runs - min(cap, args.runs):
                rows.append(run_one(scenario, env, args.readings, run))
    return rows


# ---------------------------------------------------------------------------- results


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def medians(rows: list[Row]) -> dict[str, dict[str, Any]]:
    """Per scenario: the median of each number over its successful runs (RSS: the max)."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r.scenario for r in rows):
        ok = [r for r in rows if r.scenario == name and r.error is None]
        failed = [r for r in rows if r.scenario == name and r.error is not None]
        out[name] = {
            "runs": len(ok),
            "failed_runs": len(failed),
            # runs whose final database check found missing or extra readings
            "stored_once_failed": sum(1 for r in failed if r.details.get("stored_once") is False),
        }
        if not ok:
            continue
        rss = [r.peak_rss_mb for r in ok if r.peak_rss_mb is not None]
        out[name].update(
            readings=_median([r.readings for r in ok]),
            seconds=_median([r.seconds for r in ok]),
            msg_per_s=_median([r.msg_per_s for r in ok]),
            p50_ms=_median([r.p50_ms for r in ok]),
            p99_ms=_median([r.p99_ms for r in ok]),
            peak_rss_mb=max(rss) if rss else None,  # a peak: the worst run counts
        )
        for key in dict.fromkeys(k for r in ok for k in r.figures):
            out[name][key] = _median([r.figures.get(key) for r in ok])
    return out


def ratio(summary: dict[str, dict[str, Any]], name: str, base: str) -> float | None:
    rate = summary.get(name, {}).get("msg_per_s")
    base_rate = summary.get(base, {}).get("msg_per_s")
    return rate / base_rate if rate and base_rate else None


def _check(label: str, value: float | None, passed: bool | None, unit: str) -> dict[str, Any]:
    return {"target": label, "value": value, "unit": unit, "passed": passed}


def _at_least(value: float | None, target: float) -> bool | None:
    return None if value is None else value >= target


def _at_most(value: float | None, target: float) -> bool | None:
    return None if value is None else value <= target


def stored_once(summary: dict[str, dict[str, Any]], name: str) -> bool | None:
    """False when a run's database check failed, True when a run passed it, else None."""
    s = summary.get(name)
    if not s:
        return None
    if s["stored_once_failed"]:
        return False
    return True if s["runs"] else None


def targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets evaluated on the medians (``passed`` is None when not measured)."""
    get = lambda name, key: summary.get(name, {}).get(key)  # noqa: E731
    vs_ceiling = ratio(summary, "ingestd", "ceiling")
    vs_naive = ratio(summary, "ingestd", "naive")
    wan = ratio(summary, "ingestd-wan", "ingestd")
    scale = ratio(summary, "scale-out", "ingestd")
    share = get("scale-out", "share_min")
    rss, p50, p99 = (
        get("ingestd", "peak_rss_mb"),
        get("latency", "p50_ms"),
        get("latency", "p99_ms"),
    )
    soak_rss, soak_fds = get("soak", "rss_mb_growth_pct"), get("soak", "fds_growth_pct")
    soak_once, scale_once = stored_once(summary, "soak"), stored_once(summary, "scale-out")
    checks = [
        _check(f"ingestd >= {TARGET_VS_CEILING:g}x ceiling", vs_ceiling,
               _at_least(vs_ceiling, TARGET_VS_CEILING), "x"),
        _check(f"ingestd >= {TARGET_VS_NAIVE:g}x naive", vs_naive,
               _at_least(vs_naive, TARGET_VS_NAIVE), "x"),
        _check(f"WAN (50 ms RTT) >= {TARGET_WAN_VS_LOOPBACK:g}x loopback", wan,
               _at_least(wan, TARGET_WAN_VS_LOOPBACK), "x"),
        _check(f"latency p50 <= {TARGET_P50_MS:g} ms", p50, _at_most(p50, TARGET_P50_MS), " ms"),
        _check(f"latency p99 <= {TARGET_P99_MS:g} ms", p99, _at_most(p99, TARGET_P99_MS), " ms"),
        _check(f"ingestd peak RSS < {TARGET_RSS_MB:g} MB", rss,
               None if rss is None else rss < TARGET_RSS_MB, " MB"),
        _check(f"soak RSS growth < {TARGET_SOAK_GROWTH_PCT:g}%", soak_rss,
               None if soak_rss is None else soak_rss < TARGET_SOAK_GROWTH_PCT, "%"),
        _check(f"soak fd growth < {TARGET_SOAK_GROWTH_PCT:g}%", soak_fds,
               None if soak_fds is None else soak_fds < TARGET_SOAK_GROWTH_PCT, "%"),
        _check("soak: every reading stored once", None, soak_once, ""),
        _check(f"scale-out >= {TARGET_SCALE_OUT:g}x one instance", scale,
               _at_least(scale, TARGET_SCALE_OUT), "x"),
        _check(f"scale-out: both working (>= {TARGET_MIN_SHARE:.0%} each)",
               None if share is None else share * 100, _at_least(share, TARGET_MIN_SHARE), "%"),
        _check("scale-out: every reading stored once", None, scale_once, ""),
    ]  # fmt: skip
    if any(name in summary for name in ARRAY_SCENARIOS):
        for name in ARRAY_SCENARIOS:
            peak = get(name, "peak_rss_mb")
            checks.append(_check(f"{name} peak RSS <= {TARGET_RSS_MB:g} MB", peak,
                                 _at_most(peak, TARGET_RSS_MB), " MB"))  # fmt: skip
        arrays = ratio(summary, "ingestd-arrays", "ingestd-singles")
        checks.append(
            _check(f"arrays >= {TARGET_ARRAYS_VS_SINGLES:g}x singles (readings/s)", arrays,
                   _at_least(arrays, TARGET_ARRAYS_VS_SINGLES), "x")
        )  # fmt: skip
    if "ingestd-noanomaly" in summary:
        on_off = ratio(summary, "ingestd", "ingestd-noanomaly")
        checks.append(
            _check(f"anomaly on >= {TARGET_ANOMALY_ON_VS_OFF:g}x off (drain)", on_off,
                   _at_least(on_off, TARGET_ANOMALY_ON_VS_OFF), "x")
        )  # fmt: skip
    if "sparkplug-ddata" in summary:
        spb = ratio(summary, "sparkplug-ddata", "ingestd")
        checks.append(
            _check(f"sparkplug >= {TARGET_SPARKPLUG_VS_JSON:g}x ingestd (readings/s)", spb,
                   _at_least(spb, TARGET_SPARKPLUG_VS_JSON), "x")
        )  # fmt: skip
        peak = get("sparkplug-ddata", "peak_rss_mb")
        checks.append(_check(f"sparkplug-ddata peak RSS < {TARGET_RSS_MB:g} MB", peak,
                             None if peak is None else peak < TARGET_RSS_MB, " MB"))  # fmt: skip
        checks.append(_check("sparkplug-ddata: every reading stored once", None,
                             stored_once(summary, "sparkplug-ddata"), ""))  # fmt: skip
        decode = get("sparkplug-ddata", "decode_us_per_metric")
        checks.append(_check("Sparkplug decode per metric (no target)", decode, None, " us"))
    if "catch-up" in summary:
        drain = get("catch-up", "seconds")
        checks.append(_check("catch-up: heal -> spool empty (no target)", drain, None, " s"))
    return checks


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(summary: dict[str, dict[str, Any]], scenarios: dict[str, Scenario]) -> str:
    """The stdout table: one line per scenario, medians, ratios of msg/s."""
    header = (
        f"{'scenario':<18} {'readings':>9} {'seconds':>8} {'readings/s':>10} {'x ceil':>6} "
        f"{'x naive':>7} {'p50 ms':>7} {'p99 ms':>7} {'RSS MB':>6}  notes"
    )
    lines = [header, "-" * (len(header) + 30)]
    drains = {"ceiling", "naive", "scale-out"} | {n for n in summary if n.startswith("ingestd")}
    for name, s in summary.items():
        if not s["runs"]:
            lines.append(f"{name:<18} {'FAILED':>9}")
            continue
        comparable = name in drains and scenarios[name].compares_messages
        x_ceiling = ratio(summary, name, "ceiling") if comparable else None
        x_naive = ratio(summary, name, "naive") if comparable else None
        note = scenarios[name].note(s)
        if name in ("ingestd-wan", "ingestd-proxy", "scale-out", "sparkplug-ddata"):
            vs = ratio(summary, name, "ingestd")
            if vs is not None:
                note = "; ".join(filter(None, [f"x ingestd {vs:.2f}", note]))
        if name in ("ingestd-arrays", "ingestd-near-limit"):
            vs = ratio(summary, name, "ingestd-singles")
            if vs is not None:
                note = "; ".join(filter(None, [f"x singles {vs:.2f}", note]))
        if s["runs"] > 1 or s["failed_runs"]:
            note = "; ".join(filter(None, [note, f"{s['runs']} runs"]))
        if s["failed_runs"]:
            note += f", {s['failed_runs']} FAILED"
        lines.append(
            f"{name:<18} {s['readings']:>9,.0f} {_fmt(s['seconds'], '.2f'):>8} "
            f"{_fmt(s['msg_per_s'], ',.0f'):>10} {_fmt(x_ceiling, '.2f'):>6} "
            f"{_fmt(x_naive, '.2f'):>7} {_fmt(s['p50_ms'], '.1f'):>7} "
            f"{_fmt(s['p99_ms'], '.1f'):>7} {_fmt(s['peak_rss_mb'], '.1f'):>6}  {note}".rstrip()
        )
        if name == "latency" and s.get("daemon_p50_ms") is not None:
            lines.append(
                f"{'latency (daemon)':<18} {'':>9} {'':>8} {'':>10} {'':>6} {'':>7} "
                f"{s['daemon_p50_ms']:>7.1f} {s['daemon_p99_ms']:>7.1f} {'':>6}  "
                "ingestd_end_to_end_latency_seconds: receipt -> durable (bucket estimate)"
            )
    return "\n".join(lines)


def details(rows: list[Row]) -> str:
    """Per run: startup/drain split, CPU seconds per process, ingestd's batch figures, and
    the figures of the live scenarios."""
    lines: list[str] = []
    for r in rows:
        if r.error is not None:
            continue
        d = r.details
        add = _Lines(lines, f"  {r.scenario} run {r.run + 1}: ")
        if "drain_seconds" in d and "startup_seconds" in d:
            startup, drain = d["startup_seconds"], d["drain_seconds"]
            line = f"startup {startup:.2f} s + drain {drain:.2f} s"
            if drain:
                line += f" ({r.readings / drain:,.0f} readings/s once flowing)"
            add(line)
        if d.get("impl"):
            add(d["impl"])
        if d.get("cpu_seconds"):
            add("cpu seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in d["cpu_seconds"].items()))
        if d.get("batches"):
            add(
                f"{d['batches']:g} batches, avg {d.get('batch_size_avg')} readings;"
                f" write avg {d.get('write_ms_avg')} ms; end-to-end avg"
                f" {d.get('end_to_end_ms_avg')} ms"
            )
        if d.get("messages"):
            low, high = d["readings_per_message"]
            add(
                f"{d['messages']:,} messages of {low:,}-{high:,} readings, payload avg"
                f" {d['payload_bytes_avg']:,.0f} B, max {d['payload_bytes_max']:,} B; in flight"
                f" at most (sampled): {d.get('inflight_max_sampled', 0):,.0f} messages,"
                f" {d.get('inflight_bytes_max_sampled', 0) / 2**20:.1f} MiB,"
                f" {d.get('inflight_readings_max_sampled', 0):,.0f} readings"
            )
        for inst in d.get("instances", []):
            add(
                f"{inst['name']}: stored {inst['stored']:,.0f} ({inst['share']:.1%}),"
                f" peak RSS {inst['peak_rss_mb']} MB, cpu {inst['cpu_seconds']} s,"
                f" duplicates {inst['duplicates']:g}"
            )
        if "proxy" in d:
            p = d["proxy"]
            add(
                f"proxy {p['delay_ms_each_way']} ms each way: {p['bytes_up']:,} B up,"
                f" {p['bytes_down']:,} B down, {p['accepted']} connections; chunks late by"
                f" {p['avg_late_ms']} ms on average, {p['max_late_ms']} ms at worst"
            )
        add_sparkplug(add, r)
        add_live(add, r)
    return "\n".join(lines)


class _Lines:
    """Appends a run's detail lines: the first after the run's name, the rest aligned."""

    def __init__(self, lines: list[str], head: str) -> None:
        self.lines = lines
        self.head = head

    def __call__(self, text: str) -> None:
        self.lines.append(self.head + text)
        self.head = " " * len(self.head)


def add_sparkplug(add: _Lines, r: Row) -> None:
    """The detail lines of sparkplug-ddata: the publisher's pacing, the host's counters and
    the decode micro-benchmark."""
    d = r.details
    pub, decode = d.get("spb_publisher"), d.get("decode")
    if not decode or not pub:
        return
    spb = d.get("sparkplug", {})
    add(
        f"births: {d['birth_readings']:,} readings stored before the clock; publisher:"
        f" {pub['sent']:,} DDATA in {d['publish_seconds']} s, {pub['writes']:,} writes, at most"
        f" {pub['ahead_max']:,} ahead of ingestd's receipt (limit {d['ahead_messages']:,}),"
        f" waited {pub['waits']:,} times; seq errors"
        f" {spb.get('seq_errors_total', 0):g}, rebirth requests"
        f" {spb.get('rebirth_requests_total', 0):g}"
    )
    add(
        f"SparkplugHost.decode: {decode['us_per_metric']} us/metric, {decode['us_per_message']}"
        f" us/message (median of {decode['rounds']} rounds of {decode['messages_per_round']:,}"
        f" DDATA; rounds {', '.join(str(x) for x in decode['us_per_metric_rounds'])})"
    )


def add_live(add: _Lines, r: Row) -> None:
    """The detail lines of the latency, soak and catch-up scenarios."""
    d = r.details
    pub = d.get("publisher")
    if pub:
        lag = pub["lag_ms"]
        add(
            f"publisher: {pub['sent']:,} sent at {_fmt(pub['rate_achieved'], ',.0f')} msg/s"
            f" (target {pub['rate_target']:,.0f}), lag p50 {lag['p50']} ms, p99 {lag['p99']}"
            f" ms, max {lag['p100']} ms; cpu {pub['cpu_seconds']} s"
        )
    events = d.get("events")
    if events:
        lat = events["latency_ms"]
        add(
            f"events: {events['unique']:,} of {r.readings:,} received"
            f" ({r.readings - events['unique']:,} lost, {events['duplicates']} duplicated;"
            f" the daemon published {d.get('daemon_events_published', 0):,.0f});"
            f" latency p50 {lat['p50']} p90 {lat['p90']} p99 {lat['p99']} p99.9 {lat['p99_9']}"
            f" max {lat['p100']} ms"
        )
    if events and "publish_to_daemon_ms" in events:
        a, b = events["publish_to_daemon_ms"], events["daemon_to_event_ms"]
        add(
            f"split at the daemon's receipt (received_at): publish -> daemon p50 {a['p50']}"
            f" p99 {a['p99']} ms; daemon -> event p50 {b['p50']} p99 {b['p99']} ms"
        )
    hist = d.get("daemon_histogram")
    if hist:
        add(f"daemon histogram: p50 {hist['p50_ms']} ms, p99 {hist['p99_ms']} ms")
    for key, unit in (("rss_mb", " MB"), ("fds", "")):
        g = d.get(key)
        if g:
            add(
                f"{key}: {g['start']}{unit} at {g['start_t']:.0f} s -> {g['end']}{unit} at"
                f" {g['end_t']:.0f} s ({g['growth_pct']:+.1f}%), max {g['max']}{unit}"
                f" ({g['max_growth_pct']:+.1f}%)"
            )
    if "tail_seconds" in d:
        add(
            f"stored all {d['tail_seconds']} s after the last publish; backlog max"
            f" {r.figures.get('backlog_max', 0):,.0f} readings"
        )
    phases = d.get("phases")
    if phases:
        add(
            f"outage {phases['outage_seconds']} s; spool peak {phases['spool_peak']:,.0f}"
            f" readings ({phases['spool_bytes_peak'] / 1e6:.1f} MB, oldest"
            f" {phases['spool_age_peak_seconds']} s); database up {phases['detect_seconds']} s"
            f" after heal; spool empty {phases['drain_seconds']} s after heal;"
            f" {phases['replayed']:,.0f} replayed at {_fmt(phases['replay_msg_per_s'], ',.0f')}"
            f" msg/s; {phases['live_stored_while_draining']:,.0f} live stored meanwhile;"
            f" live backlog on the broker then ~{phases['live_backlog_at_empty']:,} readings"
        )


def target_lines(checks: list[dict[str, Any]]) -> str:
    lines = []
    for c in checks:
        verdict = {True: "PASS", False: "MISS", None: "n/a "}[c["passed"]]
        if c["passed"] is None and c["value"] is not None:
            verdict = "INFO"
        measured = "" if c["value"] is None else f"measured {c['value']:.2f}{c['unit']}"
        lines.append(f"{verdict}  {c['target']:<40} {measured}".rstrip())
    return "\n".join(lines)


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write atomically (``*.tmp`` then rename; ``*.tmp`` is git-ignored)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = options(args)
    stamp = datetime.now(UTC)
    json_path = args.json or RESULTS / f"{stamp:%Y%m%dT%H%M%SZ}.json"
    started = time.monotonic()
    with BenchEnv(keep=args.keep) as env:
        if args.keep:
            print(f"servers and logs in {env.root}")
        machine = env.machine()
        rows = run_all(args, env, opts)
    summary = medians(rows)
    checks = targets(summary)
    wall = time.monotonic() - started
    instances = {name: SCENARIOS[name](opts) for name in summary}
    print()
    print(table(summary, instances))
    print(details(rows))
    print()
    print(target_lines(checks))
    write_json(
        json_path,
        {
            "started_at": stamp.isoformat(),
            "wall_seconds": round(wall, 1),
            "options": {k: v for k, v in vars(args).items() if k != "json"},
            "machine": machine,
            "scenarios": {
                name: {"describe": SCENARIOS[name].describe, "max_runs": SCENARIOS[name].max_runs}
                for name in args.scenarios
            },
            "runs": [asdict(r) for r in rows],
            "medians": summary,
            "targets": checks,
        },
    )
    print(f"\n{len(rows)} scenario runs in {wall:.0f} s; results in {json_path}")
    return 1 if any(r.error is not None for r in rows) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped, nothing written", file=sys.stderr)
        sys.exit(130)
