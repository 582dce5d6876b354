"""Proof that the test harness starts real, private servers that behave like the real thing."""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg
import paho.mqtt.client as mqtt
import pytest

from tests.harness import servers
from tests.harness.servers import (
    HarnessError,
    Mosquitto,
    Postgres,
    free_port,
    leaked_tasks,
    wait_until,
    wait_until_async,
)

TIMEOUT = 10.0


class PahoClient:
    """A paho 2.x client on its own network thread, with events for the tests to wait on."""

    def __init__(self, broker: Mosquitto, client_id: str = "", *, clean_session: bool = True):
        self.broker = broker
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.session_present: bool | None = None
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.session_present = bool(flags.session_present)
        if not rc.is_failure:
            self.connected.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: Any, rcs: Any, props: Any) -> None:
        self.subscribed.set()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos)
        assert self.subscribed.wait(TIMEOUT), "no SUBACK"

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published()

    def receive(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=TIMEOUT)

    def __enter__(self) -> PahoClient:
        self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(TIMEOUT), f"no CONNACK from {self.broker.url}"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _accepts(port: int) -> bool:
    return servers._port_accepts(port)


def _roundtrip(broker: Mosquitto, topic: str) -> None:
    with PahoClient(broker) as sub, PahoClient(broker) as pub:
        sub.subscribe(topic)
        pub.publish(topic, b"ping")
        msg = sub.receive()
        assert (msg.topic, msg.payload) == (topic, b"ping")


# --------------------------------------------------------------------------- helpers


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert port not in (1883, 5432)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_wait_until_returns_value_and_times_out() -> None:
    calls = iter([0, 0, 42])
    assert wait_until(lambda: next(calls), timeout=TIMEOUT) == 42
    with pytest.raises(TimeoutError, match="never"):
        wait_until(lambda: False, timeout=0.05, message=lambda: "never")


async def test_wait_until_async_accepts_coroutine_predicates() -> None:
    state = {"n": 0}

    async def ready() -> int:
        state["n"] += 1
        return state["n"] if state["n"] >= 3 else 0

    assert await wait_until_async(ready, timeout=TIMEOUT) == 3


async def test_leaked_tasks_sees_pending_tasks_only() -> None:
    before = set(asyncio.all_tasks())
    done_soon = asyncio.create_task(asyncio.sleep(0))
    forever = asyncio.create_task(asyncio.Event().wait())
    assert await leaked_tasks(before) == [forever]
    assert done_soon.done()
    forever.cancel()
    assert await leaked_tasks(before) == []


LEAK_TESTS = """
import asyncio
import contextlib

import pytest_asyncio

@pytest_asyncio.fixture
async def background():
    task = asyncio.create_task(asyncio.Event().wait())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

def test_sync():
    pass

async def test_fixture_stops_its_task_in_teardown(background):
    pass

async def test_clean():
    task = asyncio.create_task(asyncio.Event().wait())
    task.cancel()

async def test_awaits_its_task():
    await asyncio.create_task(asyncio.sleep(0))

async def test_leaks():
    asyncio.create_task(asyncio.Event().wait(), name="the-leak")
"""


def test_leak_guard_fails_only_the_leaking_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = Path(__file__).resolve().parents[2]  # the import root: tests.harness lives there
    pytester.makeconftest((repo / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_leak=LEAK_TESTS)
    monkeypatch.setenv("PYTHONPATH", str(repo))
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-o", "asyncio_mode=auto",
        "-o", "asyncio_default_fixture_loop_scope=function",
    )  # fmt: skip
    result.assert_outcomes(passed=5, errors=1)  # the failing check is a teardown error
    result.stdout.fnmatch_lines(["*test_leaks*", "*leaked 1 asyncio task*", "*the-leak*"])


def test_missing_binaries_point_to_make_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(servers, "MOSQUITTO_FALLBACKS", ())
    monkeypatch.setattr(servers.glob, "glob", lambda pattern: [])
    with pytest.raises(HarnessError, match="make test"):
        Mosquitto(tmp_path / "m").start()
    with pytest.raises(HarnessError, match="make test"):
        Postgres(tmp_path / "p").start()


# --------------------------------------------------------------------------- mosquitto


def test_mosquitto_pub_sub(shared_mosquitto: Mosquitto, unique_topic_prefix: str) -> None:
    assert shared_mosquitto.url == f"mqtt://127.0.0.1:{shared_mosquitto.port}"
    assert shared_mosquitto.port != 1883
    _roundtrip(shared_mosquitto, f"{unique_topic_prefix}/hello")


def test_mosquitto_persists_queued_qos1_across_graceful_restart(
    mosquitto: Mosquitto, unique_topic_prefix: str
) -> None:
    topic, client_id = f"{unique_topic_prefix}/queued", f"{unique_topic_prefix}-sub"
    with PahoClient(mosquitto, client_id, clean_session=False) as sub:
        sub.subscribe(topic, qos=1)
    # The persistent session is offline now: the broker must queue for it.
    with PahoClient(mosquitto) as pub:
        pub.publish(topic, b"kept", qos=1)

    mosquitto.restart()

    assert mosquitto.db_path.stat().st_size > 0, mosquitto.log_text()
    with PahoClient(mosquitto, client_id, clean_session=False) as sub:
        assert sub.session_present, "session was not restored from persistence"
        msg = sub.receive()
    assert (msg.topic, msg.payload, msg.qos) == (topic, b"kept", 1)
    assert "Saving in-memory database" in mosquitto.log_text()
    assert "Error" not in mosquitto.log_text()


def test_mosquitto_kill_then_restart(mosquitto: Mosquitto, unique_topic_prefix: str) -> None:
    port = mosquitto.port
    mosquitto.kill()
    assert not mosquitto.running
    assert not _accepts(port)
    mosquitto.restart()
    assert mosquitto.port == port
    _roundtrip(mosquitto, f"{unique_topic_prefix}/again")


# --------------------------------------------------------------------------- postgres


async def test_postgres_database_accepts_asyncpg(pg_url: str, postgres_server: Postgres) -> None:
    assert pg_url.startswith(f"postgresql://postgres@127.0.0.1:{postgres_server.port}/test_")
    assert postgres_server.port != 5432
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT current_database()") == pg_url.rsplit("/", 1)[1]
        assert await conn.fetchval("SHOW fsync") == "off"
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
    finally:
        await conn.close()


def test_postgres_create_and_drop_database(postgres_server: Postgres) -> None:
    url = postgres_server.create_database()
    name = url.rsplit("/", 1)[1]
    exists = f"SELECT count(*) FROM pg_database WHERE datname = '{name}'"
    assert postgres_server.psql(exists) == "1"
    postgres_server.drop_database(name)
    assert postgres_server.psql(exists) == "0"
    with pytest.raises(ValueError, match="plain database name"):
        postgres_server.create_database('x"; DROP DATABASE postgres; --')


async def _insert(url: str, value: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS kept (v int)")
        await conn.execute("INSERT INTO kept VALUES ($1)", value)
    finally:
        await conn.close()


async def _values(url: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        return [r["v"] for r in await conn.fetch("SELECT v FROM kept ORDER BY v")]
    finally:
        await conn.close()


async def test_postgres_stop_kill_start_keeps_committed_data(tmp_path: Path) -> None:
    with Postgres(tmp_path / "pg") as pg:
        url = pg.create_database("keep")
        version_file = pg.data_dir / "PG_VERSION"
        initdb_stamp = os.stat(version_file).st_mtime_ns

        await _insert(url, 1)
        pg.stop()
        assert not pg.running
        pg.start()
        assert await _values(url) == [1]

        await _insert(url, 2)  # committed, then an immediate "crash"
        pg.kill()
        assert not pg.running
        assert not _accepts(pg.port)
        pg.start()
        assert await _values(url) == [1, 2]
        assert "not properly shut down" in pg.log_text()
        assert os.stat(version_file).st_mtime_ns == initdb_stamp  # no second initdb
    assert not pg.running
