"""What every scenario shares: its options, the ``Row`` it returns, and the ``Scenario`` base."""

from __future__ import annotations

import statistics
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bench.env import BenchEnv


@dataclass
class Row:
    """One scenario run: the numbers the table shows, plus details for the JSON file."""

    scenario: str
    run: int
    readings: int
    seconds: float | None = None  # what the scenario times (see its describe line)
    # readings / seconds: msg/s wherever a message holds one reading (the array scenarios
    # keep their msg/s in figures["messages_per_s"])
    msg_per_s: float | None = None
    peak_rss_mb: float | None = None
    p50_ms: float | None = None  # latency scenarios only
    p99_ms: float | None = None
    # Further headline numbers (medians are taken of each, and targets read them).
    figures: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def finish(self, seconds: float) -> None:
        self.seconds = seconds
        self.msg_per_s = self.readings / seconds if seconds > 0 else None


class ScenarioError(RuntimeError):
    """A scenario could not complete; the message says what was seen.

    ``details`` (what was measured up to the failure) goes into the JSON file with the error.
    """

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


@dataclass
class Options:
    """The command line as the scenarios see it, plus the rows measured so far in this run."""

    readings: int = 200_000
    live_rate: float = 5_000.0
    latency_seconds: float = 20.0
    soak_seconds: float = 600.0
    soak_rate: float | None = None  # None: half the median ingestd drain rate of this run
    outage_seconds: float = 60.0
    wan_delay_ms: float = 25.0
    arrays: int = 2_000  # messages of ingestd-arrays / -near-limit; singles: x 500 readings
    sparkplug_messages: int = 40_000  # DDATA of sparkplug-ddata, 10 readings each
    results: list[Row] = field(default_factory=list)

    def median_rate(self, scenario: str) -> float | None:
        rates = [
            r.msg_per_s
            for r in self.results
            if r.scenario == scenario and r.error is None and r.msg_per_s
        ]
        return statistics.median(rates) if rates else None


class Scenario(ABC):
    """Base class: a named measurement that returns a ``Row``."""

    name: ClassVar[str]
    describe: ClassVar[str]
    # At most this many runs whatever --runs says (long scenarios: once). Capped scenarios
    # run in the last rounds, so they see every earlier result (the soak reads the drain rate).
    max_runs: ClassVar[int | None] = None
    # One reading per message, so its readings/s is comparable with the reference consumers'
    # msg/s (x ceil, x naive); False for array backlogs.
    compares_messages: ClassVar[bool] = True

    def __init__(self, options: Options) -> None:
        self.options = options

    def readings_for(self, requested: int) -> int:
        """How many readings this scenario uses when ``requested`` were asked for."""
        return requested

    def note(self, summary: dict[str, Any]) -> str:
        """A short remark for the table, from this scenario's medians."""
        return ""

    @abstractmethod
    def run(self, env: BenchEnv, readings: int, run: int) -> Row:
        """Measure once and return the result row."""


def check_readings(
    env: BenchEnv, dsn: str, expected: int, row: Row, seq_sum: int | None = None
) -> None:
    """Every reading stored once: ``expected`` rows, as many distinct unique keys, nothing
    rejected and, for live traffic where ``seq`` is the reading's index, the right sum."""
    stats = env.reading_stats(dsn)
    env.drop_database(dsn)
    row.details["database"] = stats
    problems = []
    if stats["rows"] != expected:
        problems.append(f"{stats['rows']} rows in sensor_readings, expected {expected}")
    if stats["distinct_keys"] != stats["rows"]:
        problems.append(f"only {stats['distinct_keys']} distinct (device, sensor, ts) keys")
    if stats["rejected"]:
        problems.append(f"{stats['rejected']} rejected messages stored")
    if seq_sum is not None and stats["seq_sum"] != seq_sum:
        problems.append(f"sum(seq) is {stats['seq_sum']}, expected {seq_sum}")
    row.details["stored_once"] = not problems
    if problems:
        raise ScenarioError("; ".join(problems), row.details)
