"""``ingestd anomaly replay``: the streaming detector over a ``timestamp,value`` CSV, one row
at a time (the file is never loaded whole), to see on history what the detector would say.

Input: a header row naming ``timestamp`` and ``value`` (any order, any case; other columns
are ignored), then one reading per row; timestamps ISO-8601 or ``YYYY-MM-DD HH:MM:SS``
(without an offset they are UTC). Output: ``timestamp,value,anomaly_score,alert`` with the
input's timestamp text, the score to 6 decimals, and alert 1 on the reading that opens one.
"""

from __future__ import annotations

import _csv
import csv
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, TextIO

from agents.anomaly.rules import ANOMALY, SeriesRules
from agents.anomaly.series import Series
from agents.anomaly.settings import DetectorSettings
from edge.errors import IngestdError

__all__ = [
    "OUTPUT_COLUMNS",
    "ReplayError",
    "ReplaySummary",
    "parse_settings",
    "replay",
    "replay_to_path",
]

INPUT_COLUMNS = ("timestamp", "value")
OUTPUT_COLUMNS = ("timestamp", "value", "anomaly_score", "alert")
_RULES = SeriesRules(kinds=frozenset({ANOMALY}))


class ReplayError(IngestdError):
    """Input the replay cannot use; the message names the file and, where known, the line."""


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    """What one replay did: readings judged, alerts opened."""

    readings: int
    alerts: int


def replay(source: Path, out: TextIO, settings: DetectorSettings | None = None) -> ReplaySummary:
    """Judge every reading of ``source`` with a fresh detector, writing rows to ``out``
    (nothing before the header has been checked)."""
    # The daemon's judgement of one series with only the adaptive detector on: its alert
    # episodes (warm-up, clear, cooldown by reading time) decide where an alert opens.
    series = Series(_RULES, settings)
    writer = csv.writer(out, lineterminator="\n")
    readings = alerts = 0
    with _open_readings(source) as rows:
        writer.writerow(OUTPUT_COLUMNS)
        for ts_text, value_text, ts, value in rows:
            alert = any(finding.opens for finding in series.judge(ts, value, None, adaptive=True))
            writer.writerow((ts_text, value_text, f"{series.score:.6f}", 1 if alert else 0))
            readings += 1
            alerts += alert
    return ReplaySummary(readings, alerts)


def replay_to_path(
    source: Path, dest: Path, settings: DetectorSettings | None = None
) -> ReplaySummary:
    """:func:`replay` into ``dest``, which appears only complete: written beside it, then
    renamed; after an error nothing is left behind and an existing ``dest`` is untouched."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        out = tmp.open("w", encoding="utf-8", newline="")
    except OSError as exc:
        raise ReplayError(f"{dest}: cannot write: {exc.strerror or exc}") from None
    try:
        with out:
            summary = replay(source, out, settings)
        tmp.replace(dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ReplayError(f"{dest}: cannot write: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return summary


def parse_settings(assignments: Sequence[str]) -> DetectorSettings:
    """Default settings changed by ``NAME=VALUE`` items (``--set cooldown=600``)."""
    raw: dict[str, object] = {}
    for item in assignments:
        name, _, text = item.partition("=")
        number = _number(text)
        if number is None:
            raise ReplayError(f"--set {item}: expected NAME=NUMBER, e.g. --set cooldown=600")
        raw[name.strip()] = number
    try:
        return DetectorSettings.from_mapping(raw)
    except ValueError as exc:
        raise ReplayError(f"--set: {exc}") from None


def _number(text: str) -> int | float | None:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


@contextmanager
def _open_readings(source: Path) -> Iterator[Iterator[tuple[str, str, datetime, float]]]:
    """The file opened and its header checked; yields (timestamp text, value text, ts,
    value) per data row, raising ReplayError on a bad one."""
    try:
        file = source.open("rb")
    except OSError as exc:
        raise ReplayError(f"{source}: cannot read: {exc.strerror or exc}") from None
    with file:
        reader = csv.reader(_text_lines(source, file))
        rows = _rows(source, reader)
        ts_at, value_at = _header(source, next(rows, None))
        yield (
            _reading(row, ts_at, value_at, f"{source}:{reader.line_num}")
            for row in rows
            if row and (len(row) > 1 or row[0].strip())  # blank lines, as NAB's files end
        )


def _text_lines(source: Path, file: BinaryIO) -> Iterator[str]:
    """Lines decoded one by one, so a byte that is not UTF-8 is reported with its line."""
    try:
        for number, line in enumerate(file, 1):
            try:
                yield line.decode("utf-8-sig" if number == 1 else "utf-8")  # a spreadsheet's BOM
            except UnicodeDecodeError:
                raise ReplayError(f"{source}:{number}: not UTF-8 text") from None
    except OSError as exc:
        raise ReplayError(f"{source}: cannot read: {exc.strerror or exc}") from None


def _rows(source: Path, reader: _csv.Reader) -> Iterator[list[str]]:
    try:
        yield from reader
    except csv.Error as exc:
        raise ReplayError(f"{source}:{reader.line_num}: not a readable CSV row: {exc}") from None


def _header(source: Path, row: list[str] | None) -> tuple[int, int]:
    """Positions of the timestamp and value columns in the header row."""
    wanted = " and ".join(INPUT_COLUMNS)
    if row is None:
        raise ReplayError(f"{source}: the file is empty: expected a header row naming {wanted}")
    names = [cell.strip().lower() for cell in row]
    missing = [column for column in INPUT_COLUMNS if column not in names]
    if len(missing) == len(INPUT_COLUMNS):
        raise ReplayError(
            f"{source}:1: no header row: the first line must name the columns {wanted}"
            f" (got {','.join(row)[:60]!r})"
        )
    if missing:
        raise ReplayError(
            f"{source}:1: the header has no {missing[0]!r} column (it has {', '.join(names)})"
        )
    return names.index("timestamp"), names.index("value")


def _reading(
    row: list[str], ts_at: int, value_at: int, where: str
) -> tuple[str, str, datetime, float]:
    if len(row) <= max(ts_at, value_at):
        raise ReplayError(f"{where}: {len(row)} column(s), too few for timestamp and value")
    ts_text, value_text = row[ts_at], row[value_at].strip()
    try:
        ts = datetime.fromisoformat(ts_text.strip())
    except ValueError:
        raise ReplayError(
            f"{where}: timestamp {ts_text[:40]!r} is not ISO-8601"
            " (e.g. 2026-11-27T07:30:00Z or 2026-11-27 07:30:00)"
        ) from None
    try:
        value = float(value_text)
    except ValueError:
        raise ReplayError(f"{where}: value {value_text[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise ReplayError(f"{where}: value {value_text[:40]!r} is not a finite number")
    return ts_text, value_text, ts, value
