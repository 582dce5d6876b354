"""The TCP proxy itself (tests/harness/proxy.py), against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from tests.faults.faultlib import OwnPostgres
from tests.harness.proxy import TcpProxy

pytestmark = [pytest.mark.timeout(60)]


def test_pass_drop_blackhole_heal(own_pg: OwnPostgres) -> None:

    async def scenario(proxy: TcpProxy) -> None:
        url = proxy.url_for("postgres")
        conn = await asyncpg.connect(url, timeout=5)
        assert await conn.fetchval("SELECT 41 + 1") == 42

        proxy.drop()  # the open connection is reset, new ones are refused
        with pytest.raises((OSError, asyncpg.InterfaceError, asyncpg.PostgresError)):
            await conn.fetchval("SELECT 1", timeout=5)
        started = time.monotonic()
        with pytest.raises((OSError, asyncpg.InterfaceError, asyncpg.PostgresError)):
            await asyncpg.connect(url, timeout=5)
        assert time.monotonic() - started < 2, "a dropped link must fail fast, not time out"
        assert proxy.refused >= 1
        assert proxy.reset >= 1

        proxy.heal()
        conn = await asyncpg.connect(url, timeout=5)
        assert await conn.fetchval("SELECT 1") == 1

        proxy.blackhole()  # half-open: nothing answers, nothing closes
        with pytest.raises(TimeoutError):
            await conn.fetchval("SELECT 1", timeout=1)
        with pytest.raises(TimeoutError):
            await asyncpg.connect(url, timeout=1)
        assert proxy.blackholed >= 2
        assert proxy.open_connections >= 1  # still open: nothing told the client

        proxy.heal()
        fresh = await asyncpg.connect(url, timeout=5)
        assert await fresh.fetchval("SELECT 2") == 2
        await fresh.close()
        conn.terminate()

    with TcpProxy(own_pg.server.port) as proxy:
        assert proxy.mode == "pass"
        asyncio.run(scenario(proxy))
        assert proxy.mode == "pass"
