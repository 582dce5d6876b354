"""Storage: the database, and the local spool behind it, as one object with one state.

A batch is durable once the database committed it or, while the database is away, once
the spool holds it (PostgreSQL only: the embedded SQLite file is as local as a spool
would be, so there a batch waits for the file instead). Readiness, the PersistenceAgent
and the SpoolDrainer all read and change the state here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from agents.metrics import PipelineMetrics
from db.rows import AlertChange, ReadingRow, RejectionRow
from db.spool import Spool, SpoolError
from db.writer import RowRejected, StorageError, Writer, WriteResult
from edge.errors import IngestdError

__all__ = ["NotDurableError", "Storage"]

log = logging.getLogger("ingestd.storage")


class NotDurableError(IngestdError):
    """Neither the database nor the spool took the batch: wait and try again."""


class Storage:
    """Makes batches durable and knows whether it can: database up, spooling, or neither."""

    def __init__(self, writer: Writer, spool: Spool | None, metrics: PipelineMetrics) -> None:
        self.writer = writer
        self.spool = spool
        self.metrics = metrics
        self.database_up = False
        self.spool_full = False
        self.spooled = asyncio.Event()  # wakes the drainer

    async def start(self) -> None:
        """Open the spool, then the database; an unreachable database is not an error here."""
        if self.spool is not None:
            await self.spool.open()
            if self.spool.stats.batches:
                log.info("spool holds a backlog", extra={"readings": self.spool.stats.readings})
        try:
            await self.writer.start()
        except StorageError as exc:
            log.error(  # noqa: TRY400 - an expected outage, not a bug: no traceback
                "database unreachable at start; writes will retry", extra={"error": str(exc)}
            )
        else:
            self.mark_up()

    async def close(self, grace_seconds: float) -> None:
        try:
            await self.writer.close(grace_seconds=grace_seconds)
        finally:
            if self.spool is not None:
                await self.spool.close()

    def not_ready_reason(self) -> str | None:
        """None while readings can be made durable, else why not."""
        if self.database_up:
            return None
        if self.spool is None:
            return "database unavailable"
        if self.spool_full:
            return "database unavailable and the spool is full"
        return None

    def mark_up(self) -> None:
        if not self.database_up:
            self.database_up = True
            self.metrics.database_up.set(1)
            log.info("database writable")

    def mark_down(self, error: BaseException) -> None:
        kind = error.kind if isinstance(error, StorageError) else "failed"
        self.metrics.database_errors.labels(kind).inc()
        if self.database_up:
            self.metrics.database_outages.inc()
            where = "spooling" if self.spool is not None else "retrying"
            log.warning(f"database unavailable, {where}", extra={"error": str(error)})
        self.database_up = False
        self.metrics.database_up.set(0)

    async def store(
        self,
        readings: Sequence[ReadingRow],
        rejections: Sequence[RejectionRow],
        alerts: Sequence[AlertChange] = (),
        *,
        in_order: bool = False,
    ) -> WriteResult | None:
        """Commit (a WriteResult) or spool (None); raises NotDurableError or RowRejected.

        ``in_order``: spool while the spool still holds older batches, so these are applied
        after them (an alert's closing must not overtake its spooled opening).
        """
        spool = self.spool
        behind = in_order and spool is not None and spool.stats.batches > 0
        if (self.database_up or spool is None) and not behind:
            started = time.monotonic()
            try:
                result = await self.writer.write(readings, rejections, alerts=alerts)
            except RowRejected:
                raise
            except StorageError as exc:
                self.mark_down(exc)
                if spool is None:
                    raise NotDurableError(str(exc)) from exc
            else:
                self.mark_up()
                self._spool_has_room()  # nothing is withheld any more
                if readings:  # an alerts-only write is not a batch of readings
                    self.metrics.write_seconds.observe(time.monotonic() - started)
                    self.metrics.batch_size.observe(len(readings))
                return result
        assert spool is not None  # the branch above returns or raises without one
        await self._spool(spool, readings, rejections, alerts)
        return None

    async def _spool(
        self,
        spool: Spool,
        readings: Sequence[ReadingRow],
        rejections: Sequence[RejectionRow],
        alerts: Sequence[AlertChange],
    ) -> None:
        try:
            await spool.put(list(readings), list(rejections), list(alerts))
        except SpoolError as exc:
            if not self.spool_full:
                self.spool_full = True
                self.metrics.spool_full.set(1)
                log.error("spool full: acknowledgements withheld", extra={"error": str(exc)})  # noqa: TRY400
            raise NotDurableError(str(exc)) from exc
        self._spool_has_room()
        self.spooled.set()

    def _spool_has_room(self) -> None:
        if self.spool_full:
            self.spool_full = False
            self.metrics.spool_full.set(0)
            log.info("acknowledging again")
