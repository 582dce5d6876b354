"""Shared fixtures: private mosquitto / PostgreSQL servers and an asyncio task-leak guard.

The servers live in tests/harness/servers.py; this file only wires them into pytest.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.harness.servers import Mosquitto, Postgres, describe_tasks, leaked_tasks, unique_name

pytest_plugins = ["pytester"]


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """One PostgreSQL for the whole session. Tests that stop or kill a server should make
    their own ``Postgres(tmp_path)`` instead."""
    with Postgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture
def pg_url(postgres_server: Postgres) -> Iterator[str]:
    """URL (``postgresql://postgres@127.0.0.1:PORT/test_xxxxxxxx``) of a fresh database,
    dropped after the test."""
    postgres_server.ensure_running()
    name = unique_name("test_")
    url = postgres_server.create_database(name)
    yield url
    postgres_server.ensure_running()
    postgres_server.drop_database(name)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh broker for this test only: free to stop, kill and restart it."""
    with Mosquitto(tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture(scope="session")
def shared_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One broker for the session, for tests that never stop it (use unique topics)."""
    with Mosquitto(tmp_path_factory.mktemp("shared_mosquitto")) as broker:
        yield broker


@pytest.fixture
def unique_topic_prefix() -> str:
    """E.g. ``t1a2b3c4d``: keeps tests on a shared broker out of each other's topics."""
    return unique_name("t")


@pytest_asyncio.fixture
async def _asyncio_task_leak_guard() -> AsyncIterator[None]:
    before = set(asyncio.all_tasks())
    yield
    leaked = await leaked_tasks(before)
    if leaked:
        report = describe_tasks(leaked)
        for task in leaked:
            task.cancel()
        pytest.fail(f"test leaked {len(leaked)} asyncio task(s):\n{report}", pytrace=False)


@pytest.fixture(autouse=True)
def _no_leaked_asyncio_tasks(request: pytest.FixtureRequest) -> None:
    """For async tests on a function-scoped loop, fail if tasks outlive the test.

    Requested first (autouse), so it is torn down last: the other fixtures get to stop their
    own tasks before the check runs. Sync tests and tests on wider loops are left alone.
    """
    func = getattr(request, "function", None)
    if func is None or not inspect.iscoroutinefunction(func):
        return
    marker = request.node.get_closest_marker("asyncio")
    loop_scope = marker.kwargs.get("loop_scope", "function") if marker else "function"
    if loop_scope == "function":
        request.getfixturevalue("_asyncio_task_leak_guard")
