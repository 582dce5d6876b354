"""PersistenceAgent: one durable transaction per batch of readings and rejections, then settle.

Batches form naturally: whatever waits in the inbox when a write slot frees up goes into
the next batch, so a batch is flushed as soon as the inbox runs empty and never waits on
a timer while acknowledgements are held (a stock mosquitto lets a client hold only 20
unacknowledged messages). Several batches are written at once (``batches_in_flight``):
with one, every message waits for the previous batch's round trips, and a database 50 ms
away caps throughput at one batch per round trip. Acks still leave in receive order,
whatever order the batches commit in (AckTracker).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

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
from db.spool import Spool, SpoolError
from db.writer import RowRejected, StorageError, Writer, WriteResult, reading_row, rejection_row
from edge.codecs import STORAGE_REJECTED, Reading

log = logging.getLogger("ingestd.persistence")

Item = EnrichedMessage | RejectedMessage


class NotDurableError(Exception):
    """Neither the database nor the spool took the batch: wait and try again."""


class PersistenceAgent(Agent):
    """Stores each batch in one transaction; a message settles once its outcome is durable.

    Durable means committed to the database or, while the database is away, written to the
    local spool (when there is one: PostgreSQL). While neither takes a batch, it waits with
    backoff and its messages stay unacknowledged, so intake pauses and the broker keeps the rest.
    """

    name = "persistence"

    def __init__(
        self,
        bus: Bus,
        metrics: Metrics,
        inbox: Inbox[Any],
        writer: Writer,
        settle: Callable[[list[int]], None],
        batch_size: int,
        *,
        spool: Spool | None = None,
        max_payload_bytes: int = 64 * 1024,
        retry_max_seconds: float = 10.0,
        batches_in_flight: int = 1,
    ) -> None:
        super().__init__(bus, metrics, inbox)
        self.writer = writer
        self.spool = spool
        self._settle_acks = settle
        self.batch_limit = batch_size
        self.batches_in_flight = batches_in_flight
        self._in_flight: dict[int, list[Item]] = {}  # being written, recovered after a crash
        self._batch_ids = itertools.count()
        self.max_payload_bytes = max_payload_bytes
        self._retry_max_seconds = retry_max_seconds
        self.database_up = False
        self.spool_full = False
        self.spooled = asyncio.Event()  # wakes the drainer

    # -- database state, shared with the drainer -------------------------------------------

    def mark_up(self) -> None:
        if not self.database_up:
            self.database_up = True
            self.metrics.database_up.set(1)
            log.info("database writable")

    def mark_down(self, error: BaseException) -> None:
        self.metrics.database_errors.labels(type(error.__cause__ or error).__name__).inc()
        if self.database_up:
            self.metrics.database_outages.inc()
            where = "spooling" if self.spool is not None else "retrying"
            log.warning(f"database unavailable, {where}", extra={"error": str(error)})
        self.database_up = False
        self.metrics.database_up.set(0)

    # -- the write pipeline ----------------------------------------------------------------

    async def run(self) -> None:
        """Write up to ``batches_in_flight`` batches at once, until cancelled.

        A crash in any write ends them all (the task group cancels the others) and the
        supervisor restarts the agent, which first stores again whatever was in flight.
        """
        if self._in_flight:
            await self.recover([item for batch in self._in_flight.values() for item in batch])
            self._in_flight.clear()
        slots = asyncio.Semaphore(self.batches_in_flight)
        try:
            async with asyncio.TaskGroup() as writes:
                while True:
                    await slots.acquire()
                    batch = await self.inbox.get_batch(self.batch_limit)
                    key = next(self._batch_ids)
                    self._in_flight[key] = batch
                    writes.create_task(self._write(key, batch, slots))
        except ExceptionGroup as crash:
            raise crash.exceptions[0] from None  # the write that crashed, with its traceback

    async def _write(self, key: int, batch: list[Item], slots: asyncio.Semaphore) -> None:
        await self.handle(batch)
        del self._in_flight[key]
        slots.release()
        self.last_progress = time.monotonic()

    def has_work(self) -> bool:
        return bool(self._in_flight) or not self.inbox.empty()

    # -- storing ---------------------------------------------------------------------------

    async def handle(self, batch: list[Item]) -> None:
        try:
            await self._store(batch)
        except RowRejected as exc:
            # Something in the batch is unacceptable to the database: find it by storing
            # each message alone, and store the culprits as rejections instead.
            log.warning("batch refused by the database, isolating", extra={"error": str(exc)})
            for item in batch:
                await self._store_alone(item)

    async def recover(self, held: list[Item]) -> None:
        # What was in flight at a crash may have been committed already: rows are stored
        # once by their key, and rejections are marked as redeliveries so that the DUP
        # guard stores them once too.
        for item in held:
            if type(item) is RejectedMessage:
                await self._store_alone(replace(item, message=replace(item.message, dup=True)))
            else:
                await self._store_alone(item)

    async def _store_alone(self, item: Item) -> None:
        try:
            await self._store([item])
        except RowRejected as exc:
            reason = str(exc)[:500]
            await self._store_dead_letter(
                RejectedMessage(item.message, STORAGE_REJECTED, reason, _device(item))
            )

    async def _store_dead_letter(self, rejected: RejectedMessage) -> None:
        # If even the dead letter is refused (text the database's encoding cannot hold),
        # an ASCII-escaped copy is tried; the payload bytes are stored unchanged.
        error: RowRejected | None = None
        for candidate in (rejected, _ascii_safe(rejected)):
            try:
                await self._store([candidate])
            except RowRejected as exc:
                error = exc
            else:
                return
        # Nothing of it can be stored: say so loudly and let it go, rather than block every
        # later acknowledgement behind it or crash on every redelivery.
        log.error(
            "message cannot be stored, even as a dead letter",
            extra={"topic": _ascii_safe(rejected).message.topic, "error": str(error)},
        )
        self.metrics.unstorable.inc()
        self._settle_acks([rejected.message.seq])

    async def _store(self, batch: list[Item]) -> None:
        readings: list[tuple[Reading, RawMessage]] = []
        rejections: list[RejectedMessage] = []
        for item in batch:
            if type(item) is EnrichedMessage:
                message = item.message
                readings.extend((reading, message) for reading in item.readings)
            else:
                rejections.append(item)  # type: ignore[arg-type]
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(NotDurableError),
            wait=wait_random_exponential(multiplier=0.2, max=self._retry_max_seconds),
            before_sleep=self._waiting,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                result = await self._store_once(readings, rejections)
        if readings:
            self.metrics.seen({reading.device_id for reading, _ in readings}, time.time())
        if result is None:
            await self._settle_spooled(batch)
        else:
            await self._settle(batch, result)

    async def _store_once(
        self, readings: list[tuple[Reading, RawMessage]], rejections: list[RejectedMessage]
    ) -> WriteResult | None:
        """Commit to the database (a WriteResult), or spool (None), or raise NotDurableError."""
        if self.database_up or self.spool is None:
            started = time.monotonic()
            try:
                result = await self.writer.write(readings, rejections)
            except RowRejected:
                raise
            except StorageError as exc:
                self.mark_down(exc)
                if self.spool is None:
                    raise NotDurableError(str(exc)) from exc
            else:
                self.mark_up()
                self._spool_has_room()  # nothing is withheld any more
                self.metrics.write_seconds.observe(time.monotonic() - started)
                self.metrics.batch_size.observe(len(readings))
                return result
        assert self.spool is not None
        try:
            await self.spool.put(
                [reading_row(reading, message) for reading, message in readings],
                [(rejection_row(r, self.max_payload_bytes), r.message.dup) for r in rejections],
            )
        except SpoolError as exc:
            if not self.spool_full:
                self.spool_full = True
                self.metrics.spool_full.set(1)
                log.error("spool full: acknowledgements withheld", extra={"error": str(exc)})  # noqa: TRY400
            raise NotDurableError(str(exc)) from exc
        self._spool_has_room()
        self.spooled.set()
        return None

    def _spool_has_room(self) -> None:
        if self.spool_full:
            self.spool_full = False
            self.metrics.spool_full.set(0)
            log.info("acknowledging again")

    def _waiting(self, _state: Any) -> None:
        self.last_progress = time.monotonic()  # waiting out an outage is not a stall

    async def _settle_spooled(self, batch: list[Item]) -> None:
        """Spooled is durable: acknowledge; processed events follow when the drainer replays."""
        now = time.monotonic()
        rejections: list[RejectedMessage] = []
        for item in batch:
            if type(item) is RejectedMessage:
                rejections.append(item)
                self.metrics.rejected.labels(item.reason).inc()
            self.metrics.end_to_end_seconds.observe(now - item.message.received_mono)
        self._settle_acks([item.message.seq for item in batch])
        if rejections:
            await self.bus.publish(RejectionsStored(rejections))

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


def _ascii_safe(rejection: RejectedMessage) -> RejectedMessage:
    def escape(text: str | None) -> str | None:
        return None if text is None else text.encode("ascii", "backslashreplace").decode()

    message = replace(rejection.message, topic=escape(rejection.message.topic) or "")
    return RejectedMessage(
        message, rejection.reason, escape(rejection.error) or "", escape(rejection.device_id)
    )


def _device(item: Item) -> str | None:
    if type(item) is EnrichedMessage and item.readings:
        return item.readings[0].device_id
    return getattr(item, "device_id", None)
