"""A TCP proxy for fault injection: put it between the daemon and a server, then break the link.

The proxy runs its own asyncio loop in a background thread, so synchronous tests drive it
with plain method calls. It listens on a free port on 127.0.0.1 and forwards to
``upstream_host:upstream_port``. Modes (``proxy.mode``; switch with the methods below):

``pass``       forward bytes both ways (the initial mode).
``drop``       reset every open connection (SO_LINGER 0, then close: the peer sees RST) and
               reset every new one right after accepting it: "connection refused/reset".
``blackhole``  a half-open network: open connections stay open but every byte, in both
               directions, is read and silently discarded; new connections are accepted and
               treated the same (the upstream is never dialled). Nothing is ever closed, so
               a client without its own timeouts hangs forever.
``heal``       back to forwarding for new connections (``mode`` reads ``pass`` again).
               Connections that were black-holed stay black-holed: the bytes they lost are
               gone, so the stream could not be resumed anyway, exactly as after a real
               half-open episode. The client has to notice and reconnect by itself.

Counters (``accepted``, ``refused``, ``reset``, ``blackholed``, ``open_connections``) let a
test assert that the fault really happened, e.g. that the daemon opened new connections
after ``heal()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

from tests.harness.loop_thread import LoopThread, reset
from tests.harness.servers import HOST, HarnessError

__all__ = ["TcpProxy"]

T = TypeVar("T")

PASS, DROP, BLACKHOLE = "pass", "drop", "blackhole"
_CHUNK = 65536


class _Connection:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.blackholed = False
        self.closed = False
        self.killed = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []


class TcpProxy:
    """``with TcpProxy(port) as proxy: connect to proxy.port; proxy.drop(); proxy.heal()``."""

    def __init__(self, upstream_port: int, upstream_host: str = HOST) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = HOST
        self.port = 0
        self._mode = PASS
        self._loop = LoopThread(f"tcp-proxy-{id(self):x}")
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self.accepted = 0  # connections accepted in any mode
        self.forwarded = 0  # connections dialled through to the upstream
        self.refused = 0  # new connections reset because the mode was drop
        self.reset = 0  # open connections reset by drop()
        self.blackholed = 0  # connections that ended up in the black hole

    # -- info
    @property
    def mode(self) -> str:
        return self._mode

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for c in self._connections if not c.closed)

    def url_for(self, dbname: str, user: str = "postgres") -> str:
        """A PostgreSQL URL that goes through the proxy."""
        return f"postgresql://{user}@{self.host}:{self.port}/{dbname}"

    # -- lifecycle
    def start(self) -> None:
        if self._loop.running:
            raise HarnessError("proxy already started")
        self._loop.start()
        self._server = self._call(
            asyncio.start_server(self._accept, self.host, 0, reuse_address=True)
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop listening, reset every connection, stop the loop thread."""
        if not self._loop.running:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for conn in list(self._connections):
                self._kill(conn)
            # Reset connections end their tasks by themselves; cancel only stragglers
            # (cancelling a server's connection task makes asyncio log an error).
            tasks = [t for c in self._connections for t in c.tasks if not t.done()]
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=2)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

        with contextlib.suppress(Exception):
            self._call(shutdown(), timeout=10)
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

    def __repr__(self) -> str:
        return (
            f"<TcpProxy :{self.port} -> {self.upstream_host}:{self.upstream_port} {self._mode} "
            f"accepted={self.accepted} reset={self.reset} refused={self.refused} "
            f"blackholed={self.blackholed}>"
        )

    # -- modes (callable from any thread; they return once the mode is in effect)
    def set_mode(self, mode: str) -> None:
        if mode == "heal":
            mode = PASS
        if mode not in (PASS, DROP, BLACKHOLE):
            raise ValueError(f"unknown proxy mode {mode!r}")

        async def apply() -> None:
            self._mode = mode
            for conn in list(self._connections):
                if conn.closed:
                    continue
                if mode == DROP:
                    self.reset += 1
                    self._kill(conn)
                elif mode == BLACKHOLE and not conn.blackholed:
                    conn.blackholed = True
                    self.blackholed += 1

        self._call(apply())

    def passthrough(self) -> None:
        self.set_mode(PASS)

    def drop(self) -> None:
        self.set_mode(DROP)

    def blackhole(self) -> None:
        self.set_mode(BLACKHOLE)

    def heal(self) -> None:
        self.set_mode("heal")

    # -- internals (loop thread)
    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return self._loop.call(coro, timeout)

    def _kill(self, conn: _Connection) -> None:
        conn.closed = True
        conn.killed.set()
        reset(conn.client)
        reset(conn.upstream)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._mode == DROP:
            self.refused += 1
            reset(writer)
            return
        conn = _Connection(writer)
        me = asyncio.current_task()
        if me is not None:
            conn.tasks.append(me)  # type: ignore[arg-type]
        with self._lock:
            self._connections.add(conn)
        try:
            if self._mode == BLACKHOLE:
                conn.blackholed = True
                self.blackholed += 1
                await self._discard(reader, conn)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                conn.closed = True
                reset(writer)
                return
            conn.upstream = up_writer
            self.forwarded += 1
            if self._mode == DROP:  # the mode changed while we were dialling
                self._kill(conn)
                return
            if self._mode == BLACKHOLE and not conn.blackholed:
                conn.blackholed = True
                self.blackholed += 1
            other = asyncio.ensure_future(self._pump(up_reader, writer, conn))
            conn.tasks.append(other)
            try:
                await self._pump(reader, up_writer, conn)
            finally:
                await asyncio.gather(other, return_exceptions=True)
            if not conn.closed:  # both directions ended cleanly
                conn.closed = True
                for w in (writer, up_writer):
                    with contextlib.suppress(OSError):
                        w.close()
        finally:
            with self._lock:
                self._connections.discard(conn)

    async def _discard(self, reader: asyncio.StreamReader, conn: _Connection) -> None:
        """Read and drop everything; a black hole never answers and never closes."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while not conn.closed:
                if not await reader.read(_CHUNK):
                    break
        await conn.killed.wait()  # the peer closed its side: keep ours open regardless

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Connection
    ) -> None:
        try:
            while not conn.closed:
                data = await reader.read(_CHUNK)
                if conn.closed:
                    return
                if conn.blackholed:
                    if not data:
                        await self._discard(reader, conn)  # never pass a FIN through
                        return
                    continue  # read and discard: the sender never notices
                if not data:
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            if not conn.closed:
                self._kill(conn)
