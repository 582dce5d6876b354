"""NAB score of the streaming anomaly detector (``make bench-nab``; docs/anomaly.md).

Every series of a NAB snapshot goes through ``ingestd anomaly replay``'s code path (a fresh
detector, default settings); the outputs are laid out as NAB results twice: ``ingestd``
with the score column, ``ingestd_alert`` with the alert column (0/1) as ``anomaly_score``.
The shared scorer (../shared/nab/nabscore.py) scores the first with the threshold swept,
as published NAB results are, and the second at the fixed threshold 0.5, which is what a
plant gets from the default alerts.

    .venv/bin/python -m bench.nab [--nab DIR] [--scorer FILE] [--json PATH] [--keep]
                                  [--set NAME=VALUE ...]

Prints a table beside the published detectors, PASS/MISS lines for the targets and the
cost per reading, and writes everything to bench/results/nab-<UTC timestamp>.json.
Exits 0 when the run completed, whether or not the targets were met.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agents.anomaly import AnomalyDetector, DetectorSettings
from agents.anomaly.replay import ReplayError, parse_settings, replay_to_path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_NAB = REPO.parent / "shared" / "data" / "nab"
DEFAULT_SCORER = REPO.parent / "shared" / "nab" / "nabscore.py"
DETECTOR = "ingestd"
ALERT_DETECTOR = "ingestd_alert"
ALERT_THRESHOLD = 0.5
PROFILES = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")

# The targets: the score column with the threshold swept (NAB's headline), and the alerts
# users get, scored at the fixed threshold.
TARGET_SWEPT = 55.0
TARGET_ALERT = 45.0

# ../shared/nab/README.md: standard profile, threshold swept, their own result files scored
# by the shared scorer: (the 18 shared series, the whole 58-series corpus).
PUBLISHED = {
    "ARTime": (67.1, 74.9),
    "Numenta HTM": (61.3, 70.1),
    "contextOSE": (50.5, 69.9),
    "relative entropy": (50.0, 54.6),
    "random cut forest": (47.1, 51.7),
    "KNN-CAD": (43.7, 58.0),
    "Skyline": (34.7, 58.2),
    "windowed Gaussian": (12.1, 39.6),
    "null (no detections)": (0.0, 0.0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--nab", type=Path, default=DEFAULT_NAB, help="NAB snapshot (data/, labels/, config/)"
    )
    parser.add_argument("--scorer", type=Path, default=DEFAULT_SCORER, help="nabscore.py")
    parser.add_argument(
        "--json", type=Path, help="report path (default bench/results/nab-<time>.json)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the NAB-layout results (temp dir)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a detector setting other than its default, as `ingestd anomaly replay --set`",
    )
    return parser.parse_args(argv)


def replay_series(source: Path, root: Path, settings: DetectorSettings) -> dict[str, Any]:
    """One series through the replay (CSV in, CSV out), its alert column beside it, and the
    detector alone on the same readings; returns the counts and timings."""
    category = source.parent.name
    scores = root / DETECTOR / category / f"{DETECTOR}_{source.name}"
    alerts = root / ALERT_DETECTOR / category / f"{ALERT_DETECTOR}_{source.name}"
    scores.parent.mkdir(parents=True, exist_ok=True)
    alerts.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary = replay_to_path(source, scores, settings)
    replay_seconds = time.perf_counter() - started
    readings = []
    with scores.open(newline="") as fin, alerts.open("w", newline="") as fout:
        writer = csv.writer(fout, lineterminator="\n")
        writer.writerow(("timestamp", "value", "anomaly_score", "alert"))
        for row in csv.DictReader(fin):
            writer.writerow((row["timestamp"], row["value"], row["alert"], row["alert"]))
            ts = datetime.fromisoformat(row["timestamp"])
            readings.append((ts.replace(tzinfo=ts.tzinfo or UTC), float(row["value"])))
    detector = AnomalyDetector(settings)
    started = time.perf_counter()
    for ts, value in readings:
        detector.update(ts, value)
    detector_seconds = time.perf_counter() - started
    return {
        "series": f"{category}/{source.name}",
        "readings": summary.readings,
        "alerts": summary.alerts,
        "replay_seconds": round(replay_seconds, 4),
        "detector_seconds": round(detector_seconds, 4),
    }


def score(scorer: Path, nab: Path, results: Path, *extra: str) -> dict[str, Any]:
    """nabscore.py's JSON for one results folder (timestamps must match the data's rows)."""
    command = [sys.executable, str(scorer), "--nab-repo", str(nab), str(results)]
    done = subprocess.run(
        [*command, "--timestamps", "strict", *extra], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def targets(swept: dict[str, Any], alert: dict[str, Any]) -> list[dict[str, Any]]:
    checks = [
        ("standard profile, score column, threshold swept", swept, TARGET_SWEPT),
        (f"standard profile, alert column at {ALERT_THRESHOLD}", alert, TARGET_ALERT),
    ]
    return [
        {
            "target": label,
            "value": round(report["scores"]["standard"], 2),
            "at_least": goal,
            "passed": report["scores"]["standard"] >= goal,
        }
        for label, report, goal in checks
    ]


def table(swept: dict[str, Any], alert: dict[str, Any]) -> str:
    """Ours among the published detectors, best standard score first."""
    rows: list[tuple[str, float, float | None, float | None, str]] = [
        (name, s18, None, None, f"published; {s58:.1f} on all 58 series")
        for name, (s18, s58) in PUBLISHED.items()
    ]
    for name, report, how in (
        ("ingestd score", swept, "this run, threshold swept"),
        ("ingestd alert", alert, f"this run, alert column at {ALERT_THRESHOLD}"),
    ):
        std, low_fp, low_fn = (report["scores"][p] for p in PROFILES)
        profile = report["profiles"]["standard"]
        detail = (
            f"{how}; windows {profile['windows_detected']}/"
            f"{profile['windows_detected'] + profile['windows_missed']}, "
            f"{profile['fp_detections']} FP detections"
        )
        rows.append((name, std, low_fp, low_fn, detail))
    rows.sort(key=lambda r: -r[1])

    def cell(value: float | None) -> str:
        return f"{value:8.1f}" if value is not None else f"{'-':>8}"

    lines = [f"{'detector':22} {'standard':>8} {'low FP':>8} {'low FN':>8}  notes", "-" * 100]
    lines += [f"{n:22} {cell(s)} {cell(fp)} {cell(fn)}  {d}" for n, s, fp, fn, d in rows]
    return "\n".join(lines)


def _git() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    sources = sorted((args.nab / "data").glob("*/*.csv"))
    if not sources:
        raise RuntimeError(f"no series under {args.nab / 'data'}")
    settings = parse_settings(args.set)
    series = [replay_series(source, root, settings) for source in sources]
    swept = score(args.scorer, args.nab, root / DETECTOR)
    alert = score(args.scorer, args.nab, root / ALERT_DETECTOR, "--threshold", str(ALERT_THRESHOLD))
    readings = sum(s["readings"] for s in series)
    return {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "nab": str(args.nab),
        "settings": settings.as_dict(),
        "changed_settings": args.set,
        "machine": {
            "nproc": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "loadavg_at_start": os.getloadavg(),
            "git": _git(),
        },
        "readings": readings,
        "alerts": sum(s["alerts"] for s in series),
        "us_per_reading": {
            "replay": round(1e6 * sum(s["replay_seconds"] for s in series) / readings, 2),
            "detector": round(1e6 * sum(s["detector_seconds"] for s in series) / readings, 2),
        },
        "series": series,
        "swept": swept,
        "alert": alert,
        "targets": targets(swept, alert),
        "published_standard": {
            name: {"shared_18": a, "all_58": b} for name, (a, b) in PUBLISHED.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.now(UTC)
    json_path = args.json or RESULTS / f"nab-{stamp:%Y%m%dT%H%M%SZ}.json"
    root = Path(tempfile.mkdtemp(prefix="ingestd-nab-"))
    try:
        report = run(args, root)
    except (RuntimeError, OSError, ValueError, ReplayError) as exc:
        print(f"bench.nab: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"results kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    changed = f"; settings changed: {', '.join(args.set)}" if args.set else ""
    size = f"{len(report['series'])} series, {report['readings']:,} readings"
    print(f"NAB, {size} ({args.nab}){changed}\n")
    print(table(report["swept"], report["alert"]))
    cost = report["us_per_reading"]
    print(
        f"\nalerts opened: {report['alerts']}; µs per reading: {cost['detector']:.1f} detector, "
        f"{cost['replay']:.1f} replay (CSV in and out)"
    )
    for check in report["targets"]:
        verdict = "PASS" if check["passed"] else "MISS"
        goal = f"target >= {check['at_least']:.0f}"
        print(f"{verdict}  {check['target']}: {check['value']:.1f} ({goal})")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(json_path)
    shown = json_path.relative_to(REPO) if json_path.is_relative_to(REPO) else json_path
    print(f"\nwritten to {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
