"""The in-flight budget: bytes and readings of the messages inside the daemon.

The AckTracker bounds how many messages are unacknowledged; this bounds what they carry.
A message costs its payload bytes from receipt and its decoded readings from validation,
until the Publisher has handled its events (``release``): every queue between the socket
and the outbound events holds only messages that are charged here, so memory follows the
budgets, whatever the payload shape.

Reads from the socket pause while either budget is full. Room is kept for one more payload
of the largest size a source accepts, so the byte count stays within its budget; a single
message larger than a budget still passes on its own (never a deadlock).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

__all__ = ["InflightBudget"]


class InflightBudget:
    """Payload bytes and decoded readings in flight, against their budgets."""

    def __init__(
        self,
        max_bytes: int,
        max_readings: int,
        *,
        largest_payload: int = 0,
        on_room: Callable[[], None] = lambda: None,
    ) -> None:
        self.bytes = 0
        self.readings = 0
        self._bytes: dict[int, int] = {}  # seq -> payload bytes (an int each: cheap)
        self._readings: dict[int, int] = {}  # seq -> readings charged
        self._room_for_readings = asyncio.Event()
        self._room_for_readings.set()
        self._on_room = [on_room]
        self.resize(max_bytes, max_readings, largest_payload)

    def watch(self, on_room: Callable[[], None]) -> None:
        """Call ``on_room`` too when the budget stops being full (each broker connection)."""
        self._on_room.append(on_room)

    def resize(self, max_bytes: int, max_readings: int, largest_payload: int = 0) -> None:
        """New budgets (a reload); they apply from the next message on."""
        self.max_bytes = max_bytes
        self.max_readings = max_readings
        self._reserve = largest_payload

    @property
    def full(self) -> bool:
        """Whether reads should pause: no room for one more largest payload, or readings."""
        return (self.bytes > 0 and self.bytes + self._reserve >= self.max_bytes) or (
            self.readings >= self.max_readings
        )

    def admit(self, seq: int, size: int) -> None:
        """A message was received: its payload counts from now on."""
        self._bytes[seq] = size
        self.bytes += size

    def has_room(self, readings: int) -> bool:
        """Whether ``readings`` more fit now (or nothing else is charged, or nothing to add)."""
        return not readings or not self.readings or self.readings + readings <= self.max_readings

    async def charge(self, seq: int, readings: int) -> None:
        """A message decoded into ``readings``: wait for room, unless nothing else is charged."""
        while not self.has_room(readings):
            self._room_for_readings.clear()
            await self._room_for_readings.wait()
        self.charge_now(seq, readings)

    def charge_now(self, seq: int, readings: int) -> None:
        """``charge`` when ``has_room`` said yes: no coroutine on the hot path."""
        if seq in self._bytes:
            self._readings[seq] = self._readings.get(seq, 0) + readings
            self.readings += readings

    def try_charge(self, seq: int, readings: int) -> bool:
        """Charge now if there is room (the hot path); False: ``await charge(...)``."""
        if readings and self.readings and self.readings + readings > self.max_readings:
            return False
        self.charge_now(seq, readings)
        return True

    def release(self, seqs: Iterable[int]) -> None:
        """These messages are done: their events are out (or counted as dropped)."""
        was_full = self.full
        pop_bytes, pop_readings = self._bytes.pop, self._readings.pop
        for seq in seqs:
            # A message released twice (a crash replay) counts once.
            self.bytes -= pop_bytes(seq, 0)
            self.readings -= pop_readings(seq, 0)
        if self.readings < self.max_readings:
            self._room_for_readings.set()
        if was_full and not self.full:
            for on_room in self._on_room:
                on_room()
