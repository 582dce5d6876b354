"""Fixtures for end-to-end tests: a migrated database and a daemon factory."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.daemon import INGESTD, Daemon
from tests.harness.servers import Mosquitto, unique_name


@pytest.fixture
def migrated_pg(pg_url: str) -> str:
    result = subprocess.run(
        [str(INGESTD), "migrate"], env={"INGESTD_DATABASE__URL": pg_url, "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "revision" in result.stdout
    return pg_url


@pytest.fixture
def daemon_factory(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def make(database_url: str | None = None, **env: str) -> Daemon:
        base = {
            "INGESTD_MQTT__URL": mosquitto.url,
            "INGESTD_MQTT__CLIENT_ID": unique_name("ingestd-test-"),
            "INGESTD_DAEMON__SHUTDOWN_TIMEOUT_SECONDS": "8",
        }
        if database_url:
            base["INGESTD_DATABASE__URL"] = database_url
        daemon = Daemon(tmp_path / f"daemon{len(daemons)}", {**base, **env})
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        daemon.stop()
