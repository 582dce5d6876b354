"""SpoolDrainer: replays the spool into the database, oldest batch first, alongside live traffic.

It also watches an unreachable database: once it answers again, the PersistenceAgent goes
back to writing directly. Replays are idempotent through the unique key, so a batch that
was half-replayed before a crash is simply replayed again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import orjson
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    wait_random_exponential,
)

from agents.bus import Bus
from agents.events import ReadingsStored
from agents.persistence import PersistenceAgent
from daemon.metrics import Metrics
from db.postgres import PostgresWriter
from db.spool import Spool, SpooledBatch, SpoolError
from db.writer import Row, RowRejected, StorageError, WriteResult, reading_from_row
from edge.codecs import STORAGE_REJECTED

log = logging.getLogger("ingestd.drainer")
T = TypeVar("T")


class SpoolDrainer:
    """Empties the spool whenever the database takes writes."""

    name = "drainer"

    def __init__(
        self,
        spool: Spool,
        writer: PostgresWriter,
        persistence: PersistenceAgent,
        bus: Bus,
        metrics: Metrics,
        retry_max_seconds: float = 10.0,
    ) -> None:
        self.spool = spool
        self.writer = writer
        self.persistence = persistence
        self.bus = bus
        self.metrics = metrics
        self._retry_max_seconds = retry_max_seconds
        self.last_progress = time.monotonic()

    async def run(self) -> None:
        while True:
            batch = await self.spool.oldest()
            if batch is None:
                if self.persistence.database_up:
                    self.persistence.spooled.clear()
                    if self.spool.stats.batches == 0:
                        await self.persistence.spooled.wait()
                    continue
                await self._retrying(self.writer.ping, max_wait=2.0)
                self.persistence.mark_up()
                continue
            await self._replay(batch)

    async def _replay(self, batch: SpooledBatch) -> None:
        started = time.monotonic()
        try:
            result = await self._retrying(
                lambda: self.writer.write_rows(
                    batch.reading_rows, batch.rejection_rows, replay=True
                )
            )
        except RowRejected as exc:
            log.warning(
                "spooled batch refused by the database, isolating", extra={"error": str(exc)}
            )
            result = await self._replay_row_by_row(batch)
        self.persistence.mark_up()
        await self._forget(batch)
        stored = [row for row, new in zip(batch.reading_rows, result.new, strict=True) if new]
        self.metrics.stored += len(stored)
        self.metrics.duplicates += len(result.new) - len(stored)
        self.metrics.spool_replayed.inc(len(batch.reading_rows))
        self.metrics.write_seconds.observe(time.monotonic() - started)
        self.last_progress = time.monotonic()
        if stored:
            await self.bus.publish(ReadingsStored([reading_from_row(row) for row in stored]))
        if not self.spool.stats.batches:
            log.info("spool drained")

    async def _forget(self, batch: SpooledBatch) -> None:
        """Delete replayed batches; on a full disk, retry until there is room (never replay
        them again meanwhile: they are committed)."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(SpoolError),
            wait=wait_random_exponential(multiplier=0.5, max=self._retry_max_seconds),
            before_sleep=self._waiting,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self.spool.delete(batch.ids)

    def _waiting(self, _state: object) -> None:
        self.last_progress = time.monotonic()

    async def _replay_row_by_row(self, batch: SpooledBatch) -> WriteResult:
        new: list[bool] = []
        for row in batch.reading_rows:
            try:
                result = await self._retrying(partial(self.writer.write_rows, [row], []))
                new.append(result.new[0])
            except RowRejected as exc:
                await self._retrying(partial(self._store_refused, row, exc))
                new.append(False)
        for rejection in batch.rejection_rows:
            await self._retrying(partial(self.writer.write_rows, [], [rejection], replay=True))
        return WriteResult(new, len(batch.rejection_rows))

    async def _store_refused(self, row: Row, exc: RowRejected) -> WriteResult:
        """A reading the database refuses becomes a dead letter holding the reading as JSON."""
        payload = orjson.dumps(list(row), default=str)
        digest = hashlib.sha256(payload).hexdigest()
        rejection = (
            row[12], f"spool/{row[0]}/{row[1]}", payload, digest, len(payload),
            STORAGE_REJECTED, str(exc)[:500], row[0], row[13],
        )  # fmt: skip
        self.metrics.rejected.labels(STORAGE_REJECTED).inc()
        return await self.writer.write_rows([], [(rejection, False)])

    async def _retrying(self, call: Callable[[], Awaitable[T]], max_wait: float | None = None) -> T:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(StorageError) & retry_if_not_exception_type(RowRejected),
            wait=wait_random_exponential(
                multiplier=0.5,
                max=min(max_wait or self._retry_max_seconds, self._retry_max_seconds),
            ),
            before_sleep=self._failed,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await call()
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _failed(self, state: object) -> None:
        outcome = getattr(state, "outcome", None)
        error = outcome.exception() if outcome is not None else None
        if error is not None:
            self.persistence.mark_down(error)
        self.last_progress = time.monotonic()

    def has_work(self) -> bool:
        return self.persistence.database_up and self.spool.stats.batches > 0

    def stalled(self, now: float, timeout: float) -> bool:
        return self.has_work() and now - self.last_progress > timeout
