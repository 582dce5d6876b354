"""Fixtures for end-to-end tests: a migrated database and a daemon factory."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from harness.daemon import INGESTD, Daemon
from harness.servers import Mosquitto, unique_name


def query(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def scalar(url: str, sql: str, *args: Any) -> Any:
    return query(url, sql, *args)[0][0]


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
