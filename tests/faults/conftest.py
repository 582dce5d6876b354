"""Fixtures for the fault-injection suite: own PostgreSQL servers, daemons, a tmpfs, a report."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.faultlib import OwnPostgres, counts, write_report
from tests.harness.daemon import INGESTD, Daemon
from tests.harness.servers import Mosquitto, Postgres, unique_name


def migrate(url: str) -> None:
    result = subprocess.run(
        [str(INGESTD), "migrate"],
        env={"INGESTD_DATABASE__URL": url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def private_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A directory outside pytest's tmp root for servers that drop privileges.

    Another pytest session starting on this machine (other engineers run the suite too)
    re-tightens pytest's root to 0700, which cuts the mosquitto and postgres users off
    their directories below it mid-test. Removed afterwards (a cluster is ~50 MB) unless
    ``INGESTD_FAULTS_KEEP=1`` is set and the test failed: then its server logs stay.
    """
    path = Path(tempfile.mkdtemp(prefix="ingestd-faults-"))
    path.chmod(0o711)
    yield path
    failed = getattr(request.node, "rep_call", None)
    keep = os.environ.get("INGESTD_FAULTS_KEEP") == "1" and failed is not None and failed.failed
    if not keep:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mosquitto(private_dir: Path) -> Iterator[Mosquitto]:
    """This test's own broker (overrides the shared fixture: lives in ``private_dir``)."""
    with Mosquitto(private_dir / "mosquitto") as broker:
        yield broker


@pytest.fixture
def own_pg(private_dir: Path) -> Iterator[OwnPostgres]:
    with Postgres(private_dir / "pg") as server:
        name = unique_name("faults_")
        server.create_database(name)
        own = OwnPostgres(server, name)
        migrate(own.url)
        yield own
        server.ensure_running()  # a failed test may leave it stopped; __exit__ stops it


@pytest.fixture
def daemon_factory(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Callable[..., Daemon]]:
    """Daemons on this test's broker, each with a unique client id and its own state dir."""
    daemons: list[Daemon] = []

    def make(database_url: str, state_dir: Path | None = None, **env: str) -> Daemon:
        workdir = tmp_path / f"daemon{len(daemons)}"
        base = {
            "INGESTD_MQTT__URL": mosquitto.url,
            "INGESTD_MQTT__CLIENT_ID": unique_name("ingestd-fault-"),
            "INGESTD_DATABASE__URL": database_url,
            "INGESTD_DAEMON__STATE_DIR": str(state_dir or workdir / "state"),
            "INGESTD_DAEMON__SHUTDOWN_TIMEOUT_SECONDS": "8",
            "INGESTD_MQTT__RECONNECT_MAX_SECONDS": "2",
        }
        daemon = Daemon(workdir, {**base, **env})
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        with contextlib.suppress(Exception):
            daemon.stop()
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(5)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs("8m")`` mounts a tmpfs of that size (root only); unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mountpoint = tmp_path / f"tmpfs{len(mounted)}"
        mountpoint.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mountpoint)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(mountpoint)
        return mountpoint

    try:
        yield mount
    finally:
        for mountpoint in mounted:  # lazy: works even if a daemon still holds a file there
            subprocess.run(["umount", "-l", str(mountpoint)], timeout=30, check=False)


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Numbers a scenario wants in the summary table (see faultlib.write_report)."""
    report: dict[str, Any] = {}
    yield report
    failed = getattr(request.node, "rep_call", None)
    report["outcome"] = "failed" if failed is not None and failed.failed else "passed"
    url = report.pop("url", None)
    if report["outcome"] == "failed" and url and "stored" not in report:
        with contextlib.suppress(Exception):  # what a failed scenario left in the database
            found = counts(url)
            report.update(
                stored=found.readings,
                duplicates=found.duplicates,
                rejected=found.rejections,
                rejected_by_reason=found.by_reason,
            )
    write_report(request.node.name, report)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep
