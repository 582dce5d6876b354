"""The servers and helpers every scenario shares: one PostgreSQL, a fresh broker per scenario.

Servers come from the test harness (``tests/harness/servers.py``): private directories,
kernel-picked ports, never the system services. ``BenchEnv`` is a context manager that
removes everything it started, also when a scenario fails or the run is interrupted.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.harness.servers import (
    Mosquitto,
    Postgres,
    find_mosquitto,
    free_port,
    unique_name,
)

REPO = Path(__file__).resolve().parent.parent

BIN = Path(sys.executable).parent
INGESTD = BIN / "ingestd"

# The harness config already sets max_inflight_messages 4000, max_inflight_bytes 16 MiB,
# max_queued_messages 1000000 and max_queued_bytes 0 (unlimited: the 2,000 payloads of 64 KiB
# of ingestd-near-limit, 128 MiB, fit). ingestd-singles queues 1,000,000 messages, exactly
# that count (mosquitto 2.0 takes a message while fewer than the maximum are queued), so the
# bench raises it (appended, the later line wins). The backlog lives in memory either way;
# persistence off spares the broker its autosaves, and $SYS every second lets load.py verify
# the backlog.
BROKER_CONF = "persistence false\nsys_interval 1\nmax_queued_messages 10000000\n"

__all__ = [
    "BIN",
    "INGESTD",
    "REPO",
    "BenchEnv",
    "CpuMeter",
    "cpu_seconds",
    "free_port",
    "metrics",
    "open_fds",
    "peak_rss_mb",
    "rss_mb",
]


class BenchEnv:
    """A temp directory, a PostgreSQL cluster (started once), and fresh brokers on demand."""

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self.root = Path(tempfile.mkdtemp(prefix="ingestd-bench-"))
        self.postgres = Postgres(self.root / "postgres", fast=True)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Self:
        try:
            self._stack.enter_context(self.postgres)
        except BaseException:
            self._cleanup_dir()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._stack.close()
        finally:
            self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def workdir(self, name: str) -> Path:
        """A fresh directory for one scenario run."""
        path = self.root / unique_name(f"{name}-")
        path.mkdir(parents=True)
        return path

    @contextlib.contextmanager
    def broker(self, workdir: Path) -> Iterator[Mosquitto]:
        """A fresh mosquitto for one scenario run (so no other session's queue is in it)."""
        broker = Mosquitto(workdir / "mosquitto", extra_conf=BROKER_CONF)
        with broker:
            yield broker

    def database(self, name: str) -> str:
        """A fresh database with ingestd's schema (``ingestd migrate``); returns its URL."""
        url = self.postgres.create_database(unique_name(f"bench_{name.replace('-', '_')}_"))
        result = subprocess.run(
            [str(INGESTD), "migrate"],
            env=ingestd_env({"INGESTD_DATABASE__URL": url}),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"ingestd migrate failed:\n{result.stdout}{result.stderr}")
        return url

    def drop_database(self, url: str) -> None:
        """Drop a scenario's database once it is checked (kept with ``--keep``)."""
        if not self.keep:
            self.postgres.drop_database(url.rsplit("/", 1)[1])

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.postgres.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return None

    def count_rows(self, url: str, table: str = "sensor_readings") -> int:
        return int(
            self.postgres.psql(f"SELECT count(*) FROM {table}", dbname=url.rsplit("/", 1)[1])
        )

    def reading_stats(self, url: str) -> dict[str, int]:
        """What the checks at the end of a scenario need: rows, distinct unique keys, the sum
        of ``seq`` (a checksum when seq is the reading's index) and rejections stored."""
        out = self.postgres.psql(
            "SELECT count(*), count(DISTINCT (device_id, sensor_id, ts)), coalesce(sum(seq), 0),"
            " (SELECT count(*) FROM rejected_messages) FROM sensor_readings",
            dbname=url.rsplit("/", 1)[1],
        )
        rows, keys, seq_sum, rejected = (int(v) for v in out.split("|"))
        return {"rows": rows, "distinct_keys": keys, "seq_sum": seq_sum, "rejected": rejected}

    def machine(self) -> dict[str, Any]:
        """What the numbers depend on, for the JSON report."""
        return {
            "nproc": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "mosquitto": _mosquitto_version(),
            "postgresql": self.postgres.psql("SHOW server_version"),
            "postgresql_settings": self.postgres.settings,
            "loadavg_at_start": os.getloadavg(),
            "git": _git_describe(),
        }


def ingestd_env(extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment without any INGESTD_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    env.update(extra)
    return env


def _mosquitto_version() -> str:
    out = subprocess.run(
        [find_mosquitto(), "-h"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else "unknown"


def _git_describe() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


# ----------------------------------------------------------------------- process probes


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size (``VmHWM``) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def rss_mb(pid: int) -> float:
    """Current resident set size (``VmRSS``) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    """File descriptors a live process holds open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, *, with_children: bool = False) -> float:
    """CPU time (user + system) of a live process; ``with_children`` adds every process it
    started: the reaped ones (``cutime``/``cstime``) and the live ones, one level down."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if with_children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
        for child in _children(pid):
            with contextlib.suppress(OSError, IndexError, ValueError):
                child_fields = Path(f"/proc/{child}/stat").read_text().rpartition(")")[2].split()
                ticks += int(child_fields[11]) + int(child_fields[12])
    return ticks / _CLOCK_TICKS


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                children.append(int(stat.parent.name))
    return children


class CpuMeter:
    """CPU seconds the broker and PostgreSQL (all backends) spent between start and stop."""

    def __init__(self, env: BenchEnv, broker: Mosquitto) -> None:
        self._pids = {"broker": (broker.pid, False), "postgres": (env.postmaster_pid(), True)}
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        out = {}
        for name, (pid, tree) in self._pids.items():
            if pid is not None:
                with contextlib.suppress(OSError):
                    out[name] = cpu_seconds(pid, with_children=tree)
        return out

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        self.used = {k: round(end[k] - self._start[k], 2) for k in end if k in self._start}
        return self.used


def metrics(port: int, timeout: float = 2.0) -> dict[str, float]:
    """Every sample of a Prometheus ``/metrics`` page as ``{'name{labels}': value}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples
