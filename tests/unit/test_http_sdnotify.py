"""HealthServer (/metrics, /healthz, /readyz) and sd_notify against real sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from daemon.http import HealthServer
from daemon.metrics import Metrics, ReadinessCollector
from daemon.sdnotify import Notifier, watchdog_interval
from tests.harness.servers import unique_name


class Readiness:
    def __init__(self) -> None:
        self.reason: str | None = "broker not connected"

    def __call__(self) -> str | None:
        return self.reason


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


@pytest.fixture
def metrics(readiness: Readiness) -> Metrics:
    metrics = Metrics(CollectorRegistry(), "1.2.3")
    metrics.registry.register(ReadinessCollector(readiness))  # as the daemon is wired
    return metrics


@pytest_asyncio.fixture
async def server(metrics: Metrics, readiness: Readiness) -> AsyncIterator[HealthServer]:
    http = HealthServer("127.0.0.1", 0, metrics.registry, readiness)
    await http.start()
    try:
        yield http
    finally:
        await http.close()


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 5)  # the server closes the connection
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split(" ")[1]), headers, body


async def get(port: int, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return await request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())


async def test_port_zero_binds_a_free_port(server: HealthServer) -> None:
    assert server.port > 0


async def test_metrics_text_format(server: HealthServer, metrics: Metrics) -> None:
    metrics.intake.received = 42
    metrics.pipeline.rejected.labels("bad_type").inc(3)
    status, headers, body = await get(server.port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert headers["content-length"] == str(len(body))
    assert headers["connection"] == "close"
    text = body.decode()
    assert "ingestd_messages_received_total 42.0" in text
    assert 'ingestd_messages_rejected_total{reason="bad_type"} 3.0' in text
    assert "# TYPE ingestd_readings_stored_total counter" in text
    assert 'ingestd_build_info{version="1.2.3"} 1.0' in text
    assert "# EOF" not in text


async def test_metrics_openmetrics_when_accepted(server: HealthServer, metrics: Metrics) -> None:
    metrics.pipeline.stored = 5
    status, headers, body = await get(
        server.port, "/metrics?x=1",
        accept="application/openmetrics-text; version=1.0.0; charset=utf-8,text/plain;q=0.5",
    )  # fmt: skip
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    text = body.decode()
    assert "ingestd_readings_stored_total 5.0" in text
    assert "# TYPE ingestd_readings_stored counter" in text
    assert text.endswith("# EOF\n")


async def test_healthz(server: HealthServer) -> None:
    assert await get(server.port, "/healthz") == (
        200, {"content-type": "text/plain", "content-length": "3", "connection": "close"}, b"ok\n",
    )  # fmt: skip


async def test_readyz_follows_the_readiness_callback(
    server: HealthServer, readiness: Readiness
) -> None:
    status, _, body = await get(server.port, "/readyz")
    assert (status, body) == (503, b"not ready: broker not connected\n")
    readiness.reason = None
    status, _, body = await get(server.port, "/readyz")
    assert (status, body) == (200, b"ready\n")
    readiness.reason = "database unavailable"
    status, _, body = await get(server.port, "/readyz")
    assert (status, body) == (503, b"not ready: database unavailable\n")


async def test_ready_metric_agrees_with_readyz(server: HealthServer, readiness: Readiness) -> None:
    for reason in ("broker not connected", None, "database unavailable"):
        readiness.reason = reason
        status, _, _ = await get(server.port, "/readyz")
        _, _, body = await get(server.port, "/metrics")
        ready = 1.0 if reason is None else 0.0
        assert (status == 200, f"ingestd_ready {ready}" in body.decode()) == (reason is None, True)


@pytest.mark.parametrize("path", ["/", "/metricsx", "/healthz/", "/nope"])
async def test_unknown_paths_are_404(server: HealthServer, path: str) -> None:
    status, _, body = await get(server.port, path)
    assert (status, body) == (404, b"not found\n")


async def test_only_get_is_served(server: HealthServer) -> None:
    status, _, _ = await request(
        server.port, b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    )
    assert status == 405
    status, _, _ = await request(server.port, b"garbage\r\n\r\n")
    assert status == 405


async def test_client_that_sends_nothing_does_not_block_others(server: HealthServer) -> None:
    _, idle = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        status, _, _ = await get(server.port, "/healthz")
        assert status == 200
    finally:
        idle.close()
        await idle.wait_closed()


async def test_truncated_request_gets_no_response(server: HealthServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await writer.wait_closed()
    assert (await get(server.port, "/healthz"))[0] == 200


async def test_head_has_no_body(server: HealthServer) -> None:
    status, _, body = await request(server.port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    assert body == b""


async def test_close_stops_listening(metrics: Metrics, readiness: Readiness) -> None:
    http = HealthServer("127.0.0.1", 0, metrics.registry, readiness)
    await http.start()
    port = http.port
    await http.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


# ------------------------------------------------------------------------------ sd_notify


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket standing in for systemd's (short path: sun_path limit)."""
    directory = Path(tempfile.mkdtemp(prefix="sdn-"))
    path = directory / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield sock, str(path)
    finally:
        sock.close()
        path.unlink(missing_ok=True)
        directory.rmdir()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    name = unique_name("ingestd-test-")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def test_notifier_sends_ready_watchdog_stopping(notify_socket: tuple[socket.socket, str]) -> None:
    sock, address = notify_socket
    notifier = Notifier(address)
    try:
        assert notifier.enabled
        notifier.ready()
        notifier.watchdog()
        notifier.ready("consuming sensors/+/+")
        notifier.notify("STATUS=draining", "EXTEND_TIMEOUT_USEC=5000000")
        notifier.stopping()
        received = [sock.recv(4096) for _ in range(5)]
    finally:
        notifier.close()
    assert received == [
        b"READY=1", b"WATCHDOG=1", b"READY=1\nSTATUS=consuming sensors/+/+",
        b"STATUS=draining\nEXTEND_TIMEOUT_USEC=5000000", b"STOPPING=1",
    ]  # fmt: skip
    assert not notifier.enabled


def test_notifier_uses_notify_socket_env(
    monkeypatch: pytest.MonkeyPatch, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, address = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = Notifier()
    try:
        notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        notifier.close()


def test_notifier_abstract_address(abstract_socket: tuple[socket.socket, str]) -> None:
    sock, address = abstract_socket
    notifier = Notifier(address)
    try:
        notifier.ready()
        notifier.stopping()
        assert [sock.recv(4096), sock.recv(4096)] == [b"READY=1", b"STOPPING=1"]
    finally:
        notifier.close()


def test_notifier_disabled_without_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready()  # no-ops, no errors
    notifier.watchdog()
    notifier.close()


def test_notifier_survives_a_vanished_socket(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    try:
        assert notifier.enabled
        notifier.ready()  # ENOENT is swallowed: systemd going away must not kill the daemon
        notifier.watchdog()
    finally:
        notifier.close()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [("30000000", None, 15.0), ("30000000", "self", 15.0), ("30000000", "other", None),
     ("1000", None, 0.0005), (None, None, None), ("", None, None), ("soon", None, None)],
)  # fmt: skip
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            pids = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}
            monkeypatch.setenv(name, pids.get(value, value))
    assert watchdog_interval() == expected
