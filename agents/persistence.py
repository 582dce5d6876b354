"""PersistenceAgent: one durable transaction per batch of readings and rejections, then settle.

Batches form naturally: whatever waits in the inbox when a write slot frees up goes into
the next batch, so a batch is flushed as soon as the inbox runs empty and never waits on
a timer while acknowledgements are held (a stock mosquitto lets a client hold only 20
unacknowledged messages). Several batches are written at once (``batches_in_flight``):
with one, every message waits for the previous batch's round trips, and a database 50 ms
away caps throughput at one batch per round trip. Acks still leave in receive order,
whatever order the batches commit in (AckTracker), and so do the announcements of what was
stored: a batch that commits early holds its events until the batches before it have
announced theirs, so everything downstream (the anomaly detectors above all, which judge
each series in order) sees the readings in the order they were received.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any, assert_never

from agents.base import Agent
from agents.bus import Bus, Inbox
from agents.events import EnrichedMessage, ReadingsStored, RejectedMessage, RejectionsStored
from agents.metrics import PipelineMetrics
from agents.reasons import STORAGE_REJECTED
from agents.retry import backoff
from agents.storage import NotDurableError, Storage
from db.rows import ReadingRow, RejectionRow
from db.writer import RowRejected, WriteResult

__all__ = ["Item", "PersistenceAgent", "rejection_row"]

log = logging.getLogger("ingestd.persistence")

Item = EnrichedMessage | RejectedMessage
Announcement = ReadingsStored | RejectionsStored

# The events of the batch being written by the current task, held until its turn.
_held: contextvars.ContextVar[list[Announcement] | None] = contextvars.ContextVar(
    "held_announcements", default=None
)


class PersistenceAgent(Agent):
    """Stores each batch in one transaction; a message settles once its outcome is durable.

    Durable means committed to the database or, while the database is away, written to the
    local spool (``Storage``). While neither takes a batch, it waits with backoff and its
    messages stay unacknowledged, so intake pauses and the broker keeps the rest.
    """

    name = "persistence"

    def __init__(
        self,
        bus: Bus,
        metrics: PipelineMetrics,
        inbox: Inbox[Any],
        storage: Storage,
        settle: Callable[[list[int]], None],
        batch_size: int,
        *,
        max_payload_bytes: int = 64 * 1024,
        retry_max_seconds: float = 10.0,
        batches_in_flight: int = 1,
    ) -> None:
        super().__init__(bus, metrics, inbox)
        self.storage = storage
        self._settle_acks = settle
        self.batch_size = batch_size  # readings per transaction; a rejection counts as one
        self._carry: Item | None = None  # taken from the inbox, first of the next batch
        self.batches_in_flight = batches_in_flight
        self._in_flight: dict[int, list[Item]] = {}  # being written, recovered after a crash
        self._unannounced: dict[int, list[Announcement]] = {}  # committed, waiting their turn
        self._batch_ids = itertools.count()
        self.max_payload_bytes = max_payload_bytes
        self._retry_max_seconds = retry_max_seconds

    # -- the write pipeline ----------------------------------------------------------------

    async def run(self) -> None:
        """Write up to ``batches_in_flight`` batches at once, until cancelled.

        A crash in any write ends them all (the task group cancels the others) and the
        supervisor restarts the agent, which first stores again whatever was in flight.
        """
        # Batches committed before a crash whose turn to announce had not come: announce
        # them first (their messages are acknowledged; the budget waits for their events).
        for key in sorted(self._unannounced):
            for event in self._unannounced.pop(key):
                await self.bus.publish(event)
        if self._in_flight:
            await self.recover([item for batch in self._in_flight.values() for item in batch])
            self._in_flight.clear()
        slots = asyncio.Semaphore(self.batches_in_flight)
        turn = asyncio.Event()
        turn.set()
        try:
            async with asyncio.TaskGroup() as writes:
                while True:
                    await slots.acquire()
                    batch = await self._take_batch()
                    key = next(self._batch_ids)
                    self._in_flight[key] = batch
                    announced = asyncio.Event()
                    writes.create_task(self._write(key, batch, slots, turn, announced))
                    turn = announced
        except ExceptionGroup as crash:
            raise crash.exceptions[0] from None  # the write that crashed, with its traceback

    async def _write(
        self,
        key: int,
        batch: list[Item],
        slots: asyncio.Semaphore,
        turn: asyncio.Event,
        announced: asyncio.Event,
    ) -> None:
        held: list[Announcement] = []
        _held.set(held)  # this task's own context: only this batch's events
        await self.handle(batch)
        self._unannounced[key] = held  # committed: a crash from here on must not lose these
        del self._in_flight[key]
        slots.release()
        self.last_progress = time.monotonic()
        await turn.wait()  # the batch before this one has announced
        while held:  # one by one: a crash mid-way leaves only the rest to announce
            await self.bus.publish(held[0])
            del held[0]
        del self._unannounced[key]
        announced.set()

    async def _announce(self, event: Announcement) -> None:
        """Publish now, or hold until this batch's turn when written by ``run``."""
        held = _held.get()
        if held is None:
            await self.bus.publish(event)
        else:
            held.append(event)

    async def _take_batch(self) -> list[Item]:
        """Whole messages up to ``batch_size`` readings, whatever waits (natural batching).

        A message with more readings than that is a batch of its own, stored in parts.
        """
        first, self._carry = self._carry or await self.inbox.get(), None
        batch, size, limit, get = [first], _size(first), self.batch_size, self.inbox.get_nowait
        while size < limit:
            try:
                item = get()
            except asyncio.QueueEmpty:
                break
            weight = len(item.rows) if type(item) is EnrichedMessage else 1
            if size + weight > limit:
                self._carry = item
                break
            batch.append(item)
            size += weight
        return batch

    def has_work(self) -> bool:
        return bool(self._in_flight) or self._carry is not None or not self.inbox.empty()

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
            if isinstance(item, RejectedMessage):
                await self._store_alone(_redelivered(item))
            elif item.partial is not None:
                await self._store_alone(item._replace(partial=_redelivered(item.partial)))
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
        await self._announce(ReadingsStored([], done=(rejected.message.seq,)))

    async def _store(self, batch: list[Item]) -> None:
        readings: list[ReadingRow] = []
        rejections: list[RejectionRow] = []
        for item in batch:
            match item:
                case EnrichedMessage():
                    readings += item.rows
                    if item.partial is not None:
                        rejections.append(rejection_row(item.partial, self.max_payload_bytes))
                case RejectedMessage():
                    rejections.append(rejection_row(item, self.max_payload_bytes))
                case _:
                    assert_never(item)
        # One transaction per part of at most batch_size readings: no statement grows with
        # the payload's shape, and a large array never looks like a slow database.
        new: list[bool] = []  # per reading: a new row committed now
        committed = 0
        # Nothing to store (a Sparkplug death, a command): settle without a round trip.
        parts = range(0, max(len(readings), 1), self.batch_size) if readings or rejections else ()
        for start in parts:
            part = readings[start : start + self.batch_size]
            result = await self._make_durable(part, rejections if start == 0 else [])
            if result is None:  # spooled: the drainer announces these rows once replayed
                new += [False] * len(part)
            else:
                new += result.new
                committed += len(part)
        if readings:
            self.metrics.seen({row.device_id for row in readings}, time.time())
        await self._settle(batch, new, committed)

    async def _make_durable(
        self, readings: list[ReadingRow], rejections: list[RejectionRow]
    ) -> WriteResult | None:
        async for attempt in backoff(
            NotDurableError, first=0.2, cap=self._retry_max_seconds, before_sleep=self._waiting
        ):
            with attempt:
                return await self.storage.store(readings, rejections)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _waiting(self, _state: Any) -> None:
        self.last_progress = time.monotonic()  # waiting out an outage is not a stall

    async def _settle(self, batch: list[Item], new: list[bool], committed: int) -> None:
        """Acknowledge, then announce: rejections, new rows, and that the batch is done."""
        stored: list[ReadingRow] = []
        rejections: list[RejectedMessage] = []
        flags = iter(new)
        now = time.monotonic()
        observe = self.metrics.end_to_end_seconds.observe
        for item in batch:
            match item:
                case EnrichedMessage():
                    stored += [row for row in item.rows if next(flags)]
                    if item.partial is not None:
                        rejections.append(item.partial)
                        self.metrics.rejected.labels(item.partial.reason).inc()
                case RejectedMessage():
                    rejections.append(item)
                    self.metrics.rejected.labels(item.reason).inc()
                case _:
                    assert_never(item)
            observe(now - item.message.received_mono)
        self.metrics.stored += len(stored)
        self.metrics.duplicates += committed - len(stored)
        seqs = [item.message.seq for item in batch]
        self._settle_acks(seqs)
        if rejections:
            await self._announce(RejectionsStored(rejections))
        await self._announce(ReadingsStored(stored, done=tuple(seqs)))


def rejection_row(rejection: RejectedMessage, max_payload_bytes: int) -> RejectionRow:
    """The dead letter of a rejection: the first ``max_payload_bytes`` of the payload."""
    message = rejection.message
    return RejectionRow(
        message.received_at,
        message.topic,
        message.payload[:max_payload_bytes],
        hashlib.sha256(message.payload).hexdigest(),
        len(message.payload),
        rejection.reason,
        rejection.error,
        rejection.device_id,
        message.correlation_id,
        message.dup,
    )


def _ascii_safe(rejection: RejectedMessage) -> RejectedMessage:
    def escape(text: str | None) -> str | None:
        return None if text is None else text.encode("ascii", "backslashreplace").decode()

    message = rejection.message._replace(topic=escape(rejection.message.topic) or "")
    return RejectedMessage(
        message, rejection.reason, escape(rejection.error) or "", escape(rejection.device_id)
    )


def _redelivered(rejection: RejectedMessage) -> RejectedMessage:
    return rejection._replace(message=rejection.message._replace(dup=True))


def _size(item: Item) -> int:
    """What an item weighs in a batch: its readings, or one for a rejection."""
    return len(item.rows) if isinstance(item, EnrichedMessage) else 1


def _device(item: Item) -> str | None:
    match item:
        case EnrichedMessage():
            return item.rows[0].device_id if item.rows else None
        case RejectedMessage():
            return item.device_id
        case _:
            assert_never(item)
