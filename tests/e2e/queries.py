"""Ad-hoc SQL against a test database, from synchronous tests."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg


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
