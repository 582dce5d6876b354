"""The storage backend for a database URL, chosen once where the config is resolved.

``postgresql://`` is a database across a network: its writer gets a pool, and batches go
to the local spool while it is away. ``sqlite:///`` is the embedded file, as local as a
spool would be: writes simply retry.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from db.postgres import PG_ERRORS, PostgresWriter
from db.schema import SchemaError, ensure_current, upgrade
from db.sqlite import SqliteWriter
from db.writer import Writer

__all__ = ["Backend", "WriterOptions", "backend_for"]

log = logging.getLogger("ingestd")


@dataclass(frozen=True, slots=True)
class WriterOptions:
    """What a writer is told by the config."""

    url: str
    command_timeout: float = 15.0
    connect_timeout: float = 10.0
    connections: int = 2  # PostgreSQL: one per batch in flight, plus one


class Backend(ABC):
    """A kind of database: how to write to it, and how to get its schema ready."""

    spooled = False  # whether batches wait in the local spool while it is away

    @abstractmethod
    def writer(self, options: WriterOptions) -> Writer:
        """A new writer for the database."""

    @abstractmethod
    def prepare(self, options: WriterOptions) -> str | None:
        """Make the schema usable before ``run``; returns a problem, or None."""


class SqliteBackend(Backend):
    def writer(self, options: WriterOptions) -> Writer:
        return SqliteWriter(Path(options.url.removeprefix("sqlite:///")))

    def prepare(self, options: WriterOptions) -> str | None:
        """The embedded file is created and migrated by ``run`` itself."""
        from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415 - only when used

        try:
            upgrade(options.url)
        except (SQLAlchemyError, OSError) as exc:
            return f"cannot prepare the SQLite database {options.url}: {exc}"
        return None


class PostgresBackend(Backend):
    spooled = True

    def writer(self, options: WriterOptions) -> Writer:
        return PostgresWriter(
            options.url,
            command_timeout=options.command_timeout,
            connect_timeout=options.connect_timeout,
            pool_size=options.connections,
        )

    def prepare(self, options: WriterOptions) -> str | None:
        """A shared database is migrated by ``ingestd migrate``: here it is only checked."""
        try:
            asyncio.run(ensure_current(options.url, options.connect_timeout))
        except SchemaError as exc:
            return str(exc)
        except PG_ERRORS as exc:
            # An edge host may boot before its uplink: start anyway, writes retry until it
            # answers.
            log.error(  # noqa: TRY400 - an expected outage, not a bug: no traceback
                "database unreachable at start; schema not verified", extra={"error": repr(exc)}
            )
        return None


_BACKENDS: dict[str, type[Backend]] = {
    "sqlite": SqliteBackend,
    "postgresql": PostgresBackend,
    "postgres": PostgresBackend,
}


def backend_for(url: str) -> Backend:
    """The backend of a ``postgresql://`` or ``sqlite:///`` URL (the config checked which)."""
    return _BACKENDS[urlsplit(url).scheme]()
