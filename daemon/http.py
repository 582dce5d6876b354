"""A small asyncio HTTP server for ``/metrics``, ``/healthz`` and ``/readyz``.

Enough HTTP/1.1 for Prometheus and probes (one request per connection); no framework,
so the daemon carries no web stack it does not need.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("ingestd.http")

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
_MAX_HEADER_BYTES = 16 * 1024


class HealthServer:
    """Serves metrics from ``registry`` and readiness from ``ready()`` (reason or None)."""

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, ready: Callable[[], str | None]
    ) -> None:
        self._host = host
        self._port = port
        self._registry = registry
        self._ready = ready
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                status, content_type, body = self._respond(head)
                writer.write(
                    f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                )
                if not head.startswith(b"HEAD "):
                    writer.write(body)
                await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that went away or sent garbage gets nothing more
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _respond(self, head: bytes) -> tuple[int, str, bytes]:
        if len(head) > _MAX_HEADER_BYTES:
            return 405, "text/plain", b"request too large\n"
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[0] not in {"GET", "HEAD"}:
            return 405, "text/plain", b"only GET\n"
        path = parts[1].split("?", 1)[0]
        if path == "/metrics":
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            return 200, content_type, encoder(self._registry)
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            reason = self._ready()
            if reason is None:
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", f"not ready: {reason}\n".encode()
        return 404, "text/plain", b"not found\n"
