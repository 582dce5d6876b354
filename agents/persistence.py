"""PersistenceAgent: one durable transaction per batch of readings and rejections, then settle.

Batches form naturally: whatever waits in the inbox when the previous write finishes
goes into the next one, so a batch is flushed as soon as the inbox runs empty and
never waits on a timer while acknowledgements are held (a stock mosquitto lets a
client hold only 20 unacknowledged messages).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    wait_random_exponential,
)

from agents.base import Agent
from agents.bus import Bus, Inbox
from agents.events import (
    EnrichedMessage,
    RawMessage,
    ReadingsStored,
    RejectedMessage,
    RejectionsStored,
)
from daemon.metrics import Metrics
from db.writer import RowRejected, StorageError, Writer, WriteResult
from edge.codecs import STORAGE_REJECTED, Reading

log = logging.getLogger("ingestd.persistence")

Item = EnrichedMessage | RejectedMessage


class PersistenceAgent(Agent):
    """Stores each batch in one transaction; a message settles once its outcome is committed."""

    name = "persistence"

    def __init__(
        self,
        bus: Bus,
        metrics: Metrics,
        inbox: Inbox[Any],
        writer: Writer,
        settle: Callable[[list[int]], None],
        batch_size: int,
        retry_max_seconds: float = 10.0,
    ) -> None:
        super().__init__(bus, metrics, inbox)
        self.writer = writer
        self._settle_acks = settle
        self.batch_limit = batch_size
        self._retry_max_seconds = retry_max_seconds
        self.database_up = False

    async def handle(self, batch: list[Item]) -> None:
        try:
            result = await self._write_retrying(batch)
        except RowRejected as exc:
            # Something in the batch is unacceptable to the database: find it by storing
            # each message alone, and store the culprits as rejections instead.
            log.warning("batch refused by the database, isolating", extra={"error": str(exc)})
            for item in batch:
                await self._store_alone(item)
            return
        await self._settle(batch, result)

    async def recover(self, held: list[Item]) -> None:
        for item in held:
            await self._store_alone(item)

    async def _store_alone(self, item: Item) -> None:
        try:
            result = await self._write_retrying([item])
        except RowRejected as exc:
            item = RejectedMessage(item.message, STORAGE_REJECTED, str(exc)[:500], _device(item))
            result = await self._write_retrying([item])
        await self._settle([item], result)

    async def _write_retrying(self, batch: list[Item]) -> WriteResult:
        readings: list[tuple[Reading, RawMessage]] = []
        rejections: list[RejectedMessage] = []
        for item in batch:
            if type(item) is EnrichedMessage:
                message = item.message
                readings.extend((reading, message) for reading in item.readings)
            else:
                rejections.append(item)  # type: ignore[arg-type]
        # Until the store-and-forward spool exists, an unreachable database is waited out:
        # intake pauses when the in-flight window fills, and the broker keeps the rest.
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(StorageError) & retry_if_not_exception_type(RowRejected),
            wait=wait_random_exponential(multiplier=0.2, max=self._retry_max_seconds),
            before_sleep=self._on_retry,
            reraise=True,
        )
        started = time.monotonic()
        async for attempt in retrying:
            with attempt:
                result = await self.writer.write(readings, rejections)
        self.metrics.write_seconds.observe(time.monotonic() - started)
        self.metrics.batch_size.observe(len(readings))
        if not self.database_up:
            self.database_up = True
            self.metrics.database_up.set(1)
            log.info("database writable")
        return result

    def _on_retry(self, state: Any) -> None:
        error = state.outcome.exception() if state.outcome else None
        self.metrics.database_errors.labels(type(error).__name__).inc()
        if self.database_up or state.attempt_number == 1:
            log.warning("database write failed, retrying", extra={"error": str(error)})
        self.database_up = False
        self.metrics.database_up.set(0)
        self.last_progress = time.monotonic()  # waiting out an outage is not a stall

    async def _settle(self, batch: list[Item], result: WriteResult) -> None:
        stored: list[tuple[Reading, RawMessage]] = []
        flags = iter(result.new)
        rejections: list[RejectedMessage] = []
        now = time.monotonic()
        observe = self.metrics.end_to_end_seconds.observe
        for item in batch:
            if type(item) is EnrichedMessage:
                for reading in item.readings:
                    if next(flags):
                        stored.append((reading, item.message))
            else:
                rejections.append(item)  # type: ignore[arg-type]
                self.metrics.rejected.labels(item.reason).inc()  # type: ignore[union-attr]
            observe(now - item.message.received_mono)
        total = len(result.new)
        self.metrics.stored += len(stored)
        self.metrics.duplicates += total - len(stored)
        self._settle_acks([item.message.seq for item in batch])
        if stored:
            await self.bus.publish(ReadingsStored(stored))
        if rejections:
            await self.bus.publish(RejectionsStored(rejections))


def _device(item: Item) -> str | None:
    if type(item) is EnrichedMessage and item.readings:
        return item.readings[0].device_id
    return getattr(item, "device_id", None)
