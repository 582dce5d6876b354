"""``ingestd anomaly replay``: the detector over a CSV, and one clear line for bad input."""

from __future__ import annotations

import csv
import io
import math
import random
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agents.anomaly import AnomalyDetector
from agents.anomaly.replay import ReplayError, parse_settings, replay
from daemon.cli import main
from tests.harness.daemon import INGESTD

T0 = datetime(2026, 11, 2, tzinfo=UTC)
SPIKE = 2000  # the row (0-based, after the header) that holds the spike


def readings(n: int = 2500) -> list[tuple[str, str]]:
    """A daily cycle every 5 minutes in NAB's timestamp format, one spike at SPIKE."""
    rng = random.Random(7)
    rows = []
    for i in range(n):
        value = 20 + 5 * math.sin(2 * math.pi * i / 288) + rng.gauss(0, 0.5)
        if i == SPIKE:
            value += 10
        ts = (T0 + i * timedelta(minutes=5)).strftime("%Y-%m-%d %H:%M:%S")
        rows.append((ts, f"{value:.3f}"))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "timestamp,value") -> Path:
    path.write_text(header + "\n" + "".join(f"{ts},{value}\n" for ts, value in rows))
    return path


def test_replay_writes_the_columns_and_alerts_at_the_spike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = readings()
    assert main(["anomaly", "replay", str(write_csv(tmp_path / "in.csv", rows))]) == 0
    out = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert out[0] == ["timestamp", "value", "anomaly_score", "alert"]
    assert [(r[0], r[1]) for r in out[1:]] == rows
    assert [i for i, r in enumerate(out[1:]) if r[3] == "1"] == [SPIKE]
    assert all(0.0 <= float(r[2]) <= 1.0 for r in out[1:])
    assert float(out[1 + SPIKE][2]) == 1.0


def test_replay_is_the_detector(tmp_path: Path) -> None:
    """The same verdicts as the detector fed directly: any column order, extra columns,
    ISO-8601 with offsets, a BOM and blank lines change nothing."""
    rows = readings(600)
    detector = AnomalyDetector()
    expected = [
        detector.update(datetime.fromisoformat(ts).replace(tzinfo=UTC), float(v)) for ts, v in rows
    ]
    iso = [(f"{ts.replace(' ', 'T')}+00:00", v) for ts, v in rows]
    text = "\ufeffnote,Value, Timestamp \n" + "".join(f"x,{v},{ts}\n\n" for ts, v in iso)
    (tmp_path / "in.csv").write_text(text)
    out = io.StringIO()
    summary = replay(tmp_path / "in.csv", out)
    got = list(csv.reader(io.StringIO(out.getvalue())))[1:]
    assert [r[0] for r in got] == [ts for ts, _ in iso]
    assert [r[2] for r in got] == [f"{v.score:.6f}" for v in expected]
    assert [r[3] == "1" for r in got] == [v.alert for v in expected]
    assert (summary.readings, summary.alerts) == (600, sum(v.alert for v in expected))


def test_out_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_csv(tmp_path / "in.csv", readings(400))
    dest = tmp_path / "scores.csv"
    assert main(["anomaly", "replay", str(source), "--out", str(dest)]) == 0
    assert capsys.readouterr().out == ""
    lines = dest.read_text().splitlines()
    assert lines[0] == "timestamp,value,anomaly_score,alert"
    assert len(lines) == 401
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "scores.csv"]


def test_set_changes_a_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_csv(tmp_path / "in.csv", readings())
    assert main(["anomaly", "replay", str(source), "--set", "warmup=2100"]) == 0
    out = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert all(r[3] == "0" for r in out[1:])  # the spike falls in the longer warm-up
    assert parse_settings(["cooldown=600", "alert_threshold=0.6"]).cooldown == 600
    for bad in ("cooldown", "cooldown=x", "cooldown=1.5", "nope=1", "hysteresis=2"):
        with pytest.raises(ReplayError, match="--set"):
            parse_settings([bad])


GOOD = "2026-11-02 00:00:00,1.5\n"


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (None, "in.csv: cannot read: No such file or directory"),
        ("", "in.csv: the file is empty"),
        ("2026-11-02 00:00:00,1.5\n", "in.csv:1: no header row"),
        ("time,value\n" + GOOD, "in.csv:1: the header has no 'timestamp' column"),
        ("timestamp,reading\n" + GOOD, "in.csv:1: the header has no 'value' column"),
        ("timestamp,value\n" + GOOD + "yesterday,2\n", "in.csv:3: timestamp 'yesterday'"),
        ("timestamp,value\n" + GOOD + "2026-13-02 00:00:00,2\n", "in.csv:3: timestamp"),
        ("timestamp,value\n" + GOOD * 2 + "2026-11-02 00:10:00,abc\n", "in.csv:4: value 'abc'"),
        ("timestamp,value\n" + GOOD + "2026-11-02 00:10:00,\n", "in.csv:3: value '' is not"),
        ("timestamp,value\n" + GOOD + "\n2026-11-02 00:10:00,NaN\n", "in.csv:4: value 'NaN'"),
        ("timestamp,value\n" + GOOD + "2026-11-02 00:10:00,-inf\n", "in.csv:3: value '-inf'"),
        ("timestamp,value\n" + GOOD + "2026-11-02 00:10:00,1e999\n", "in.csv:3: value '1e999'"),
        ("timestamp,value\n" + GOOD + "2026-11-02 00:10:00\n", "in.csv:3: 1 column(s)"),
        ("timestamp,value\n" + GOOD + "2026-11-02 00:10:00,\xff\n", "in.csv:3: not UTF-8"),
    ],
)
def test_bad_input_is_one_line_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, complaint: str
) -> None:
    source = tmp_path / "in.csv"
    if content is not None:
        source.write_bytes(content.encode("latin-1" if "\xff" in content else "utf-8"))
    dest = tmp_path / "out.csv"
    assert main(["anomaly", "replay", str(source), "--out", str(dest)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ingestd: {tmp_path}/")
    assert complaint in err
    assert err.count("\n") == 1
    assert not dest.exists()  # nothing half-written is left behind
    assert [p.name for p in tmp_path.iterdir()] == (["in.csv"] if content is not None else [])


def test_the_command_fails_cleanly_and_explains_itself(tmp_path: Path) -> None:
    """As a user meets it: the installed command, a bad row, no traceback; and --help."""
    source = tmp_path / "in.csv"
    source.write_text("timestamp,value\n" + GOOD + "2026-11-02 00:05:00,oops\n")
    result = subprocess.run(
        [str(INGESTD), "anomaly", "replay", str(source)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == f"ingestd: {source}:3: value 'oops' is not a number\n"
    assert result.stdout.splitlines() == [
        "timestamp,value,anomaly_score,alert",
        "2026-11-02 00:00:00,1.5,0.000000,0",
    ]
    helped = subprocess.run(
        [str(INGESTD), "anomaly", "replay", "--help"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert helped.returncode == 0
    for column in ("timestamp", "value", "anomaly_score", "alert", "--out"):
        assert column in helped.stdout
