"""Plausible plant-floor sensor signals for the edge simulator, deterministic given a seed.

Each signal is sampled at ``t`` seconds since its series started; given the same seed and
the same sequence of ``t`` it yields the same values. A ``Series`` adds what the wire
needs: a strictly increasing timestamp and a sequence number.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple, Protocol

_TAU = 2.0 * math.pi
_ONE_US = timedelta(microseconds=1)


class Signal(Protocol):
    """A sensor signal sampled at non-decreasing ``t`` (seconds since its series started)."""

    def sample(self, t: float) -> float:
        """The value at ``t``."""
        ...


class _Clocked:
    """Tracks the time step between samples, so random processes scale with time, not rate."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._last_t = 0.0

    def step(self, t: float) -> float:
        """Seconds since the previous sample (0 for the first one or a clock going back)."""
        dt = max(t - self._last_t, 0.0)
        self._last_t = max(t, self._last_t)
        return dt


class Temperature(_Clocked):
    """Bearing temperature in degC: around 60, a slow sinusoid plus a bounded random walk."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.base = rng.uniform(55.0, 65.0)
        self.amplitude = rng.uniform(1.5, 4.0)
        self.period = rng.uniform(600.0, 3600.0)  # seconds: a shift-scale thermal cycle
        self.phase = rng.uniform(0.0, _TAU)
        self.walk = 0.0

    def sample(self, t: float) -> float:
        dt = self.step(t)
        # Ornstein-Uhlenbeck: a random walk pulled back to 0, so drift stays within a few degC.
        self.walk += -self.walk * dt / 300.0 + 0.1 * math.sqrt(dt) * self.rng.gauss(0.0, 1.0)
        cycle = self.amplitude * math.sin(_TAU * t / self.period + self.phase)
        return round(self.base + cycle + self.walk + self.rng.gauss(0.0, 0.03), 2)


class Vibration(_Clocked):
    """Velocity RMS in mm/s: a healthy machine's noise floor with occasional bursts."""

    MEAN_GAP = 90.0  # seconds between bursts (impacts, cavitation, a loose guard)

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.floor = rng.uniform(1.0, 2.5)  # ISO 10816 zone A/B for a mid-size machine
        self.burst_left = 0.0
        self.burst_gain = 1.0

    def sample(self, t: float) -> float:
        dt = self.step(t)
        if self.burst_left > 0.0:
            self.burst_left -= dt
        elif self.rng.random() < -math.expm1(-dt / self.MEAN_GAP):  # Poisson arrivals
            self.burst_left = self.rng.uniform(2.0, 10.0)
            self.burst_gain = self.rng.uniform(2.5, 6.0)
        gain = self.burst_gain if self.burst_left > 0.0 else 1.0
        return round(max(0.05, self.floor * gain * (1.0 + self.rng.gauss(0.0, 0.08))), 3)


class Pressure(_Clocked):
    """Line pressure in bar: setpoint steps held for tens of seconds, plus sensor noise."""

    SETPOINTS = (4.0, 5.5, 6.0, 6.5, 7.2)
    MEAN_HOLD = 45.0  # seconds

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.level = rng.choice(self.SETPOINTS)
        self.hold = rng.expovariate(1.0 / self.MEAN_HOLD)

    def sample(self, t: float) -> float:
        self.hold -= self.step(t)
        while self.hold <= 0.0:
            self.level = self.rng.choice(self.SETPOINTS)
            self.hold += self.rng.expovariate(1.0 / self.MEAN_HOLD)
        return round(self.level + self.rng.gauss(0.0, 0.015), 3)


class Current(_Clocked):
    """Motor current in A: a duty cycle between idle and load, with ripple noise."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.idle = rng.uniform(4.0, 6.0)
        self.load = rng.uniform(14.0, 22.0)
        self.period = rng.uniform(20.0, 60.0)  # seconds per machine cycle
        self.offset = rng.uniform(0.0, self.period)
        self.duty = rng.uniform(0.5, 0.8)

    def sample(self, t: float) -> float:
        self.step(t)
        working = (t + self.offset) % self.period < self.duty * self.period
        level = self.load if working else self.idle
        return round(max(0.0, level + self.rng.gauss(0.0, 0.2)), 2)


@dataclass(frozen=True, slots=True)
class SensorSpec:
    """A kind of sensor every simulated device carries."""

    sensor_id: str
    unit: str
    make: Callable[[random.Random], Signal]


# What each simulated device carries, in publishing order.
DEVICE_SENSORS: tuple[SensorSpec, ...] = (
    SensorSpec("temp", "degC", Temperature),
    SensorSpec("vib", "mm/s", Vibration),
    SensorSpec("pressure", "bar", Pressure),
    SensorSpec("current", "A", Current),
)


class Sample(NamedTuple):
    """One reading of a series, ready to encode."""

    value: float
    ts: datetime
    seq: int


@dataclass(slots=True)
class Series:
    """One (device, sensor) stream: its signal, sequence number and last timestamp."""

    device_id: str
    sensor_id: str
    unit: str
    signal: Signal
    seq: int = 0
    started: datetime | None = None
    last_ts: datetime | None = field(default=None, repr=False)

    def next(self, now: datetime) -> Sample:
        """The reading at ``now``; ts is bumped 1 µs past the previous one if needed.

        Strictly increasing ts keeps readings distinct on the daemon's unique key
        (device_id, sensor_id, ts) however fast we publish or however the clock steps.
        """
        ts = now if self.last_ts is None or now > self.last_ts else self.last_ts + _ONE_US
        if self.started is None:
            self.started = ts
        self.last_ts = ts
        seq = self.seq
        self.seq += 1
        return Sample(self.signal.sample((ts - self.started).total_seconds()), ts, seq)


def series_rng(seed: int | None, device_id: str, sensor_id: str) -> random.Random:
    """The RNG of one series: seeded per series, so adding devices never changes the others."""
    if seed is None:
        return random.Random()
    return random.Random(f"{seed}/{device_id}/{sensor_id}")


def device_ids(count: int, prefix: str = "dev") -> list[str]:
    """Device ids such as ``dev-001`` (wider when there are more than 999 devices)."""
    width = max(3, len(str(count)))
    return [f"{prefix}-{n:0{width}d}" for n in range(1, count + 1)]


def make_series(
    devices: list[str], seed: int | None, sensors: tuple[SensorSpec, ...] = DEVICE_SENSORS
) -> list[Series]:
    """Every (device, sensor) series, device by device."""
    return [
        Series(
            device, spec.sensor_id, spec.unit, spec.make(series_rng(seed, device, spec.sensor_id))
        )
        for device in devices
        for spec in sensors
    ]
