"""A TCP proxy that adds a fixed delay each way (a WAN link) and can cut the link (an outage).

``DelayProxy(upstream_port, delay_seconds)`` listens on a free port on 127.0.0.1 and
forwards to the upstream (PostgreSQL in the benchmark). Every chunk of bytes is stamped on
arrival and written out ``delay_seconds`` later, in order, in each direction: latency is
added, bandwidth is not limited. A reader task never waits for the delay (it queues the
chunk with its due time and reads on), and a writer task sleeps only until the oldest
chunk is due, then writes every chunk that is due by then in one go. Sleeping for the
delay per chunk, serially, would cap a connection at one chunk per delay.

``cut()`` resets every open connection and every new one (the database host is gone);
``heal()`` forwards new connections again. The proxy runs its own asyncio loop in a daemon
thread, so the synchronous benchmark calls it with plain method calls.

``stats()`` reports what went through, and ``max_late_ms`` / ``avg_late_ms``: how much later
than its due time a chunk was written (at worst / on average). They stay near the event
loop's timer resolution (~1 ms) unless the proxy itself cannot keep up (or the machine is
overloaded), which would make it the bottleneck it must not be.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

from tests.harness.loop_thread import LoopThread, reset

T = TypeVar("T")

HOST = "127.0.0.1"
READ_CHUNK = 256 * 1024
# Bytes read but not yet written, per direction: beyond this the reader stops reading, so a
# stalled upstream pushes back on the sender instead of filling memory.
MAX_BUFFERED = 32 * 1024 * 1024


class _Direction:
    """The chunks of one direction of one connection, waiting for their due time."""

    def __init__(self) -> None:
        self.chunks: deque[tuple[float, bytes]] = deque()  # (due, data); b"" is the EOF
        self.buffered = 0
        self.arrived = asyncio.Event()  # the writer waits on this when the deque is empty
        self.room = asyncio.Event()  # the reader waits on this when MAX_BUFFERED is reached
        self.room.set()


class _Connection:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False


class DelayProxy:
    """``with DelayProxy(pg_port, 0.025) as proxy: connect to proxy.port; proxy.cut()``."""

    def __init__(self, upstream_port: int, delay_seconds: float, upstream_host: str = HOST):
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.delay = delay_seconds
        self.port = 0
        self.cut_off = False
        self._loop = LoopThread("delay-proxy")
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self.accepted = 0
        self.refused = 0  # connections reset on accept while cut
        self.reset = 0  # open connections reset by cut()
        self.bytes_up = 0  # client -> upstream
        self.bytes_down = 0  # upstream -> client
        self.chunks = 0
        self.max_late = 0.0  # seconds a chunk was written after its due time, at worst
        self._late_sum = 0.0
        self._writes = 0
        self.max_buffered = 0

    def url_for(self, dsn: str) -> str:
        """``dsn`` (a postgresql:// URL to the upstream) rewritten to go through the proxy."""
        return dsn.replace(f"@{self.upstream_host}:{self.upstream_port}/", f"@{HOST}:{self.port}/")

    # -- lifecycle (any thread) ------------------------------------------------------------

    def start(self) -> None:
        self._loop.start()
        self._server = self._call(asyncio.start_server(self._accept, HOST, 0))
        self.port = int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if not self._loop.running:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for conn in list(self._connections):
                self._kill(conn)
            tasks = [t for c in self._connections for t in c.tasks if not t.done()]
            if tasks:
                await asyncio.wait(tasks, timeout=2)

        with contextlib.suppress(Exception):
            self._call(shutdown())
        self._loop.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def cut(self) -> None:
        """Reset every open connection, and every new one until ``heal()``."""

        async def apply() -> None:
            self.cut_off = True
            for conn in list(self._connections):
                if not conn.closed:
                    self.reset += 1
                    self._kill(conn)

        self._call(apply())

    def heal(self) -> None:
        """Forward new connections again (the reset ones are gone; clients reconnect)."""

        async def apply() -> None:
            self.cut_off = False

        self._call(apply())

    def stats(self) -> dict[str, Any]:
        return {
            "delay_ms_each_way": round(self.delay * 1000, 1),
            "accepted": self.accepted,
            "refused": self.refused,
            "reset": self.reset,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "chunks": self.chunks,
            "max_late_ms": round(self.max_late * 1000, 2),
            "avg_late_ms": round(self._late_sum / self._writes * 1000, 3) if self._writes else 0,
            "max_buffered_bytes": self.max_buffered,
        }

    # -- the loop thread -------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return self._loop.call(coro, timeout)

    def _kill(self, conn: _Connection) -> None:
        conn.closed = True
        reset(conn.client)
        reset(conn.upstream)
        for task in conn.tasks:
            task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.cut_off:
            self.refused += 1
            reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            reset(writer)
            return
        conn = _Connection(writer)
        conn.upstream = up_writer
        for sock_writer in (writer, up_writer):
            sock = sock_writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.cut_off:  # cut while dialling
            self._kill(conn)
            return
        self._connections.add(conn)
        up, down = _Direction(), _Direction()
        conn.tasks = [
            asyncio.create_task(self._read(reader, up, conn, upstream=True)),
            asyncio.create_task(self._write(up_writer, up, conn)),
            asyncio.create_task(self._read(up_reader, down, conn, upstream=False)),
            asyncio.create_task(self._write(writer, down, conn)),
        ]
        await asyncio.gather(*conn.tasks, return_exceptions=True)
        if not conn.closed:  # both directions ended with an EOF
            conn.closed = True
            for w in (writer, up_writer):
                with contextlib.suppress(OSError):
                    w.close()
        self._connections.discard(conn)

    async def _read(
        self, reader: asyncio.StreamReader, way: _Direction, conn: _Connection, *, upstream: bool
    ) -> None:
        """Stamp each chunk with its due time on arrival; never wait for the delay here."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await way.room.wait()
                data = await reader.read(READ_CHUNK)
                way.chunks.append((loop.time() + self.delay, data))
                way.arrived.set()
                if not data:
                    return
                if upstream:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                way.buffered += len(data)
                self.max_buffered = max(self.max_buffered, way.buffered)
                if way.buffered >= MAX_BUFFERED:
                    way.room.clear()
        except OSError:
            if not conn.closed:
                self._kill(conn)

    async def _write(
        self, writer: asyncio.StreamWriter, way: _Direction, conn: _Connection
    ) -> None:
        """Write chunks in arrival order, each once its due time has come."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not way.chunks:
                    way.arrived.clear()
                    await way.arrived.wait()
                    continue
                wait = way.chunks[0][0] - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                now = loop.time()
                late = now - way.chunks[0][0]
                self.max_late = max(self.max_late, late)
                self._late_sum += late
                self._writes += 1
                ready: list[bytes] = []
                eof = False
                while way.chunks and way.chunks[0][0] <= now:
                    data = way.chunks.popleft()[1]
                    if not data:
                        eof = True
                        break
                    ready.append(data)
                if ready:
                    self.chunks += len(ready)
                    writer.write(b"".join(ready))
                    way.buffered -= sum(len(d) for d in ready)
                    if way.buffered < MAX_BUFFERED:
                        way.room.set()
                    await writer.drain()
                if eof:
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
        except OSError:
            if not conn.closed:
                self._kill(conn)
