"""AckTracker: PUBACKs released strictly in receive order, once each outcome is durable.

MQTT requires acknowledgements in the order the messages arrived, so a message that is
settled early waits for every earlier one. Each message is tagged with the connection
(epoch) it came on: an ack for an earlier connection is never sent, because the same
packet id may name a different message on the new one; the broker redelivers instead,
and the unique key makes the redelivery harmless.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable

from daemon.metrics import IntakeMetrics

# Entry layout (a list, mutated in place: cheaper than an object per message).
_MID, _QOS, _EPOCH, _SETTLED = 0, 1, 2, 3


class AckTracker:
    """Numbers messages on receipt and releases their acks in order once settled."""

    def __init__(
        self,
        window: int,
        send_ack: Callable[[int, int], bool],
        metrics: IntakeMetrics,
        on_room: Callable[[], None] = lambda: None,
    ) -> None:
        self.epoch = 0
        self._send_ack = send_ack
        self._metrics = metrics
        self._on_room = on_room
        self._entries: deque[list[int]] = deque()
        self._base = 0  # seq of _entries[0]
        self._next = 0
        self.resize(window)
        self._drained = asyncio.Event()
        self._drained.set()

    def resize(self, window: int) -> None:
        """Set the window; reads pause and resume against it from the next message on."""
        self.window = window
        # Resume a little below the window, not at every single ack (at least when empty).
        self._resume_at = max(1, window - max(1, window // 10))

    @property
    def pending(self) -> int:
        return len(self._entries)

    @property
    def full(self) -> bool:
        return len(self._entries) >= self.window

    def new_epoch(self) -> int:
        """Start a new connection: acks of everything received so far are void."""
        self.epoch += 1
        return self.epoch

    def track(self, mid: int, qos: int) -> int:
        """Register a received message; returns its sequence number."""
        seq = self._next
        self._next = seq + 1
        self._entries.append([mid, qos, self.epoch, 0])
        self._drained.clear()
        return seq

    def settle(self, seqs: Iterable[int]) -> None:
        """Mark messages durable and release every ack that is now in order."""
        entries, base = self._entries, self._base
        for seq in seqs:
            index = seq - base
            if 0 <= index < len(entries):
                entries[index][_SETTLED] = 1
        was_full = len(entries) >= self._resume_at
        sent = discarded = 0
        epoch = self.epoch
        while entries and entries[0][_SETTLED]:
            mid, qos, entry_epoch, _ = entries.popleft()
            if qos:
                if entry_epoch == epoch and self._send_ack(mid, qos):
                    sent += 1
                else:
                    discarded += 1
        self._base = self._next - len(entries)
        self._metrics.acks_sent += sent
        if discarded:
            self._metrics.acks_discarded.inc(discarded)
        if not entries:
            self._drained.set()
        if was_full and len(entries) < self._resume_at:
            self._on_room()

    async def wait_drained(self) -> None:
        """Return once every tracked message is settled."""
        await self._drained.wait()
