"""ingestd benchmark (``make bench``): drain a queued backlog into PostgreSQL.

ingestd runs side by side with a count-only paho subscriber (the Python receive ceiling)
and a naive consumer doing one INSERT per message.

    .venv/bin/python bench/run.py [--readings N] [--runs K] [--scenarios a,b,c]
                                  [--json PATH] [--quick] [--keep]

Prints one table (medians over the runs) and the PASS/MISS lines of the targets, and writes
every run plus machine info to a JSON file. Exits 0 even when a target is missed; exits 1
only when a scenario failed to complete. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from env import BenchEnv
from scenarios import DEFAULT_SCENARIOS, SCENARIOS, Row, Scenario

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_READINGS = 200_000
QUICK_READINGS = 20_000

# The targets, checked on the medians by `targets`.
TARGET_VS_CEILING = 0.4
TARGET_VS_NAIVE = 3.0
TARGET_RSS_MB = 200.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[:2]))
    parser.add_argument("--readings", type=int, default=None, help=f"default {DEFAULT_READINGS}")
    parser.add_argument("--runs", type=int, default=1, help="repeat and report medians")
    parser.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma list of {', '.join(SCENARIOS)} (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="default bench/results/<UTC timestamp>.json")
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_READINGS} readings (CI smoke)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server logs)")
    args = parser.parse_args(argv)
    if args.readings is None:
        args.readings = QUICK_READINGS if args.quick else DEFAULT_READINGS
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    if args.readings < 1 or args.runs < 1:
        parser.error("--readings and --runs must be positive")
    args.scenarios = names
    return args


# ---------------------------------------------------------------------------- running


def run_one(scenario: Scenario, env: BenchEnv, readings: int, run: int) -> Row:
    """Run a scenario once; a failure becomes a row with ``error`` set (and a log line)."""
    n = scenario.readings_for(readings)
    print(f"[run {run + 1}] {scenario.name}: {n} readings ...", flush=True)
    started = time.monotonic()
    try:
        row = scenario.run(env, n, run)
    except Exception as exc:
        row = Row(scenario.name, run, n, error=f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    row.details["scenario_wall_seconds"] = round(time.monotonic() - started, 1)
    if row.error is None:
        print(f"         {row.msg_per_s:,.0f} msg/s in {row.seconds:.2f} s", flush=True)
    else:
        print(f"         FAILED: {row.error.splitlines()[0]}", flush=True)
    return row


def run_all(args: argparse.Namespace, env: BenchEnv) -> list[Row]:
    """Every selected scenario, ``--runs`` times, interleaved (run 1 of each, then run 2...)."""
    scenarios = [SCENARIOS[name]() for name in args.scenarios]
    return [
        run_one(scenario, env, args.readings, run)
        for run in range(args.runs)
        for scenario in scenarios
    ]


# ---------------------------------------------------------------------------- results


def medians(rows: list[Row]) -> dict[str, dict[str, Any]]:
    """Per scenario: the median of each number over its successful runs."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r.scenario for r in rows):
        ok = [r for r in rows if r.scenario == name and r.error is None]
        failed = sum(1 for r in rows if r.scenario == name and r.error is not None)
        out[name] = {"runs": len(ok), "failed_runs": failed}
        if ok:
            out[name].update(
                readings=ok[0].readings,
                seconds=statistics.median(r.seconds for r in ok if r.seconds is not None),
                msg_per_s=statistics.median(r.msg_per_s for r in ok if r.msg_per_s is not None),
                peak_rss_mb=statistics.median(
                    r.peak_rss_mb for r in ok if r.peak_rss_mb is not None
                ),
            )
    return out


def ratio(summary: dict[str, dict[str, Any]], name: str, base: str) -> float | None:
    rate = summary.get(name, {}).get("msg_per_s")
    base_rate = summary.get(base, {}).get("msg_per_s")
    return rate / base_rate if rate and base_rate else None


def targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets evaluated on the medians (``passed`` is None when not measured)."""
    rss = summary.get("ingestd", {}).get("peak_rss_mb")
    vs_ceiling = ratio(summary, "ingestd", "ceiling")
    vs_naive = ratio(summary, "ingestd", "naive")
    checks = [
        (f"ingestd >= {TARGET_VS_CEILING:g}x ceiling", vs_ceiling,
         None if vs_ceiling is None else vs_ceiling >= TARGET_VS_CEILING),
        (f"ingestd >= {TARGET_VS_NAIVE:g}x naive", vs_naive,
         None if vs_naive is None else vs_naive >= TARGET_VS_NAIVE),
        (f"ingestd peak RSS < {TARGET_RSS_MB:g} MB", rss,
         None if rss is None else rss < TARGET_RSS_MB),
    ]  # fmt: skip
    return [{"target": label, "value": value, "passed": ok} for label, value, ok in checks]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(summary: dict[str, dict[str, Any]]) -> str:
    """The stdout table: one line per scenario, medians, ratios of msg/s."""
    header = (
        f"{'scenario':<16} {'readings':>9} {'seconds':>8} {'msg/s':>9} "
        f"{'x ceiling':>9} {'x naive':>8} {'peak RSS MB':>11}"
    )
    lines = [header, "-" * len(header)]
    for name, s in summary.items():
        if not s["runs"]:
            lines.append(f"{name:<16} {'FAILED':>9}")
            continue
        lines.append(
            f"{name:<16} {s['readings']:>9} {s['seconds']:>8.2f} {s['msg_per_s']:>9,.0f} "
            f"{_fmt(ratio(summary, name, 'ceiling'), '.2f'):>9} "
            f"{_fmt(ratio(summary, name, 'naive'), '.2f'):>8} "
            f"{_fmt(s['peak_rss_mb'], '.1f'):>11}"
        )
    return "\n".join(lines)


def details(rows: list[Row]) -> str:
    """Per run: startup/drain split, CPU seconds per process, ingestd's batch figures."""
    lines = []
    for r in rows:
        if r.error is not None:
            continue
        d = r.details
        head = f"  {r.scenario} run {r.run + 1}: "
        pad = " " * len(head)
        startup, drain = d.get("startup_seconds", 0), d.get("drain_seconds", 0)
        line = f"{head}startup {startup:.2f} s + drain {drain:.2f} s"
        if drain:
            line += f" ({r.readings / drain:,.0f} msg/s once flowing)"
        lines.append(line)
        if d.get("impl"):
            lines.append(f"{pad}{d['impl']}")
        if d.get("cpu_seconds"):
            cpu = ", ".join(f"{k} {v:.1f}" for k, v in d["cpu_seconds"].items())
            lines.append(f"{pad}cpu seconds: {cpu}")
        if r.scenario.startswith("ingestd"):
            lines.append(
                f"{pad}{d.get('batches'):g} batches, avg {d.get('batch_size_avg')} readings;"
                f" write avg {d.get('write_ms_avg')} ms; end-to-end avg"
                f" {d.get('end_to_end_ms_avg')} ms"
            )
    return "\n".join(lines)


def target_lines(checks: list[dict[str, Any]]) -> str:
    lines = []
    for c in checks:
        verdict = {True: "PASS", False: "MISS", None: "n/a "}[c["passed"]]
        unit = "" if c["value"] is None else " MB" if "RSS" in c["target"] else "x"
        lines.append(f"{verdict}  {c['target']:<28} measured {_fmt(c['value'], '.2f')}{unit}")
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
    stamp = datetime.now(UTC)
    json_path = args.json or RESULTS / f"{stamp:%Y%m%dT%H%M%SZ}.json"
    started = time.monotonic()
    with BenchEnv(keep=args.keep) as env:
        if args.keep:
            print(f"servers and logs in {env.root}")
        machine = env.machine()
        rows = run_all(args, env)
    summary = medians(rows)
    checks = targets(summary)
    wall = time.monotonic() - started
    print()
    print(table(summary))
    print(details(rows))
    print()
    print(target_lines(checks))
    write_json(
        json_path,
        {
            "started_at": stamp.isoformat(),
            "wall_seconds": round(wall, 1),
            "options": {
                "readings": args.readings,
                "runs": args.runs,
                "scenarios": args.scenarios,
                "quick": args.quick,
            },
            "machine": machine,
            "scenarios": {name: SCENARIOS[name].describe for name in args.scenarios},
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
