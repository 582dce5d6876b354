"""SpoolDrainer: replays the spool into the database, oldest batch first, alongside live traffic.

It also watches an unreachable database: once it answers again, ``Storage`` goes back to
writing directly. Replays are idempotent through the unique key, so a batch that was
half-replayed before a crash is simply replayed again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import orjson
from tenacity import retry_if_exception_type, retry_if_not_exception_type

from agents.bus import Bus
from agents.events import AlertsStored, ReadingsStored
from agents.metrics import PipelineMetrics
from agents.reasons import STORAGE_REJECTED
from agents.retry import backoff
from agents.storage import Storage
from db.rows import AlertOutcome, ReadingRow, RejectionRow
from db.spool import Spool, SpooledBatch, SpoolError
from db.writer import RowRejected, StorageError, Writer, WriteResult

__all__ = ["SpoolDrainer"]

log = logging.getLogger("ingestd.drainer")
T = TypeVar("T")


class SpoolDrainer:
    """Empties the spool whenever the database takes writes."""

    name = "drainer"

    def __init__(
        self,
        spool: Spool,
        storage: Storage,
        bus: Bus,
        metrics: PipelineMetrics,
        retry_max_seconds: float = 10.0,
        batch_size: int = 1000,
    ) -> None:
        self.spool = spool
        self.batch_size = batch_size  # readings per replayed transaction, as live batches
        self.storage = storage
        self.writer: Writer = storage.writer
        self.bus = bus
        self.metrics = metrics
        self._retry_max_seconds = retry_max_seconds
        self.last_progress = time.monotonic()

    async def run(self) -> None:
        while True:
            if not self.storage.database_up:
                # Probe with a cheap query at most 2 s apart, not with a replay whose backoff
                # grows to retry_max_seconds: a database that comes back is noticed at once.
                await self._retrying(self.writer.ping, max_wait=2.0)
                self.storage.mark_up()
                continue
            batch = await self.spool.oldest(self.batch_size)
            if batch is None:
                self.storage.spooled.clear()
                if self.spool.stats.batches == 0:
                    await self.storage.spooled.wait()
                continue
            await self._replay(batch)

    async def _replay(self, batch: SpooledBatch) -> None:
        started = time.monotonic()
        try:
            result = await self._retrying(
                partial(
                    self.writer.write,
                    batch.readings,
                    batch.rejections,
                    replay=True,
                    alerts=batch.alerts,
                )
            )
        except RowRejected as exc:
            log.warning(
                "spooled batch refused by the database, isolating", extra={"error": str(exc)}
            )
            result = await self._replay_row_by_row(batch)
        self.storage.mark_up()
        await self._forget(batch)
        stored = [row for row, new in zip(batch.readings, result.new, strict=True) if new]
        self.metrics.stored += len(stored)
        self.metrics.duplicates += len(result.new) - len(stored)
        self.metrics.spool_replayed.inc(len(batch.readings))
        self.metrics.write_seconds.observe(time.monotonic() - started)
        self.last_progress = time.monotonic()
        if stored:
            await self.bus.publish(ReadingsStored(stored))
        if result.alerts:
            await self.bus.publish(AlertsStored(result.alerts))
        if not self.spool.stats.batches:
            log.info("spool drained")

    async def _forget(self, batch: SpooledBatch) -> None:
        """Delete replayed batches; on a full disk, retry until there is room (never replay
        them again meanwhile: they are committed)."""
        async for attempt in backoff(
            SpoolError, first=0.5, cap=self._retry_max_seconds, before_sleep=self._waiting
        ):
            with attempt:
                await self.spool.delete(batch.ids)

    def _waiting(self, _state: object) -> None:
        self.last_progress = time.monotonic()

    async def _replay_row_by_row(self, batch: SpooledBatch) -> WriteResult:
        new: list[bool] = []
        for row in batch.readings:
            try:
                result = await self._retrying(partial(self.writer.write, [row], []))
                new.append(result.new[0])
            except RowRejected as exc:
                await self._retrying(partial(self._store_refused, row, exc))
                new.append(False)
        for rejection in batch.rejections:
            await self._retrying(partial(self.writer.write, [], [rejection], replay=True))
        alerts: list[AlertOutcome] = []
        if batch.alerts:
            try:
                written = await self._retrying(
                    partial(self.writer.write, [], [], replay=True, alerts=batch.alerts)
                )
                alerts = written.alerts
            except RowRejected as exc:  # a bug, not data a device sent: log it, go on
                log.error(  # noqa: TRY400
                    "spooled alert changes refused by the database",
                    extra={"error": str(exc), "changes": [str(c) for c in batch.alerts]},
                )
        return WriteResult(new, len(batch.rejections), alerts)

    async def _store_refused(self, row: ReadingRow, exc: RowRejected) -> WriteResult:
        """A reading the database refuses becomes a dead letter holding the reading as JSON."""
        payload = orjson.dumps(list(row), default=str)
        rejection = RejectionRow(
            received_at=row.received_at,
            topic=f"spool/{row.device_id}/{row.sensor_id}",
            payload=payload,
            payload_sha256=hashlib.sha256(payload).hexdigest(),
            payload_size=len(payload),
            reason=STORAGE_REJECTED,
            error=str(exc)[:500],
            device_id=row.device_id,
            correlation_id=row.correlation_id,
        )
        # As a replay: a crash before the spool forgets this batch must not store it twice.
        result = await self.writer.write([], [rejection], replay=True)
        self.metrics.rejected.labels(STORAGE_REJECTED).inc()  # once, not once per attempt
        return result

    async def _retrying(self, call: Callable[[], Awaitable[T]], max_wait: float | None = None) -> T:
        retrying = backoff(
            retry_if_exception_type(StorageError) & retry_if_not_exception_type(RowRejected),
            first=0.5,
            cap=min(max_wait or self._retry_max_seconds, self._retry_max_seconds),
            before_sleep=self._failed,
        )
        async for attempt in retrying:
            with attempt:
                return await call()
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _failed(self, state: object) -> None:
        outcome = getattr(state, "outcome", None)
        error = outcome.exception() if outcome is not None else None
        if error is not None:
            self.storage.mark_down(error)
        self.last_progress = time.monotonic()

    def has_work(self) -> bool:
        return self.storage.database_up and self.spool.stats.batches > 0

    def stalled(self, now: float, timeout: float) -> bool:
        return self.has_work() and now - self.last_progress > timeout
