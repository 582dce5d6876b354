"""``ingestd simulate``: publish realistic sensor readings, and known-bad payloads, over MQTT.

Every bad message carries the rejection reason the daemon is expected to store for it, so
an end-to-end test can compare the report with the daemon's ``rejected_messages``.

This module paces the run and holds the command line; the parts live beside it:
``edge.simulation`` (options, message, report, error), ``edge.payloads`` (good and bad
payloads, ``MessageFactory``), ``edge.sparkplug_node`` (``--format sparkplug``: an edge
node with devices) and ``edge.publishing`` (the MQTT client side). Their public names are
re-exported here.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import get_args

from edge.payloads import (
    JSON_BAD_REASONS,
    VALUE_BAD_REASONS,
    MessageFactory,
    bad_payload,
    bad_variants,
    good_payload,
)
from edge.publishing import BrokerLink, connect_with_retry, wait_at_most
from edge.simulation import (
    Message,
    PayloadFormat,
    SimulationReport,
    SimulatorError,
    SimulatorOptions,
    broker_address,
)
from edge.sparkplug_node import SPARKPLUG_BAD_REASONS, SparkplugNode

__all__ = [
    "JSON_BAD_REASONS",
    "SPARKPLUG_BAD_REASONS",
    "VALUE_BAD_REASONS",
    "Message",
    "MessageFactory",
    "PayloadFormat",
    "SimulationReport",
    "SimulatorError",
    "SimulatorOptions",
    "SparkplugNode",
    "add_arguments",
    "bad_payload",
    "bad_variants",
    "broker_address",
    "good_payload",
    "options_from_args",
    "run",
    "simulate",
]

_WINDOW = 256  # messages awaiting their ack: deep enough to hide the broker round trip
_BURST = 64  # messages per event-loop turn, so writes and acks interleave with publishing
_MAX_LAG = 1.0  # seconds of backlog the pacer catches up; an older backlog is dropped
_DRAIN_TIMEOUT = 10.0  # seconds to wait for the last acks before giving up on them
_PROGRESS_EVERY = 1.0  # seconds between on_progress calls


# --- pacing and the publishing loop ---------------------------------------------------------


class _Pacer:
    """Spreads messages evenly at ``rate`` msg/s on the monotonic clock; 0 = unpaced."""

    def __init__(self, rate: float, start: float) -> None:
        self.rate = rate
        self.origin = start
        self.sent = 0

    def due(self, now: float) -> int:
        """How many messages are due at ``now`` (message k is due at origin + k/rate)."""
        if self.rate <= 0:
            return _BURST
        owed = (now - self.origin) * self.rate - self.sent
        if owed > self.rate * _MAX_LAG:
            # After a stall, forgive the old backlog rather than publish it in one storm.
            self.origin = now - (self.sent + self.rate * _MAX_LAG) / self.rate
            owed = self.rate * _MAX_LAG
        return math.floor(owed) + 1

    def delay(self, now: float) -> float:
        """Seconds until the next message is due."""
        if self.rate <= 0:
            return 0.0
        return max(self.origin + self.sent / self.rate - now, 0.0)


async def simulate(
    options: SimulatorOptions,
    stop: asyncio.Event | None = None,
    on_progress: Callable[[SimulationReport], None] | None = None,
) -> SimulationReport:
    """Publish until ``count``, ``duration`` or ``stop``; the report of acknowledged messages.

    ``on_progress`` gets a snapshot about once a second. Raises SimulatorError when the
    broker cannot be reached or refuses us (``.report`` is None) or drops us mid-run
    (``.report`` says what was acknowledged before).
    """
    stop = stop or asyncio.Event()
    report = SimulationReport()
    link = BrokerLink(options, report.count)
    node = SparkplugNode(options) if options.format == "sparkplug" else None
    if node is not None:
        node.attach(link)  # its will and NCMD handler, before connecting
    relay = asyncio.create_task(_relay(stop, link.wake), name="simulator-stop-relay")
    start = time.monotonic()
    try:
        if not await connect_with_retry(link, options.connect_timeout, stop):
            return report
        start = time.monotonic()
        factory = node or MessageFactory(options)
        if node is not None:
            node.online(link, datetime.now(UTC))
        await _pump(
            link, factory, options, stop, start=start, report=report, on_progress=on_progress
        )
        if node is not None and link.lost is None:
            link.publish(node.death(datetime.now(UTC)), 1)  # a clean stop announces itself
        await link.drain(_DRAIN_TIMEOUT)
    finally:
        relay.cancel()
        await link.close()
        await asyncio.wait({relay})
    final = report.snapshot(time.monotonic() - start)
    if link.lost is not None:
        raise SimulatorError(link.lost, final)
    return final


async def _relay(stop: asyncio.Event, wake: asyncio.Event) -> None:
    """Wake the publishing loop when ``stop`` is set."""
    await stop.wait()
    wake.set()


async def _pump(
    link: BrokerLink,
    factory: MessageFactory | SparkplugNode,
    options: SimulatorOptions,
    stop: asyncio.Event,
    *,
    start: float,
    report: SimulationReport,
    on_progress: Callable[[SimulationReport], None] | None,
) -> None:
    """Publish in small bursts, bounded by the pace, the in-flight window and the count."""
    pacer = _Pacer(options.rate, start)
    end = start + options.duration if options.duration is not None else math.inf
    limit = options.count if options.count is not None else math.inf
    next_progress = start + _PROGRESS_EVERY
    while not stop.is_set() and link.lost is None and pacer.sent < limit:
        now = time.monotonic()
        if now >= end:
            break
        if on_progress is not None and now >= next_progress:
            on_progress(report.snapshot(now - start))
            next_progress = now + _PROGRESS_EVERY
        burst = int(min(pacer.due(now), _WINDOW - link.in_flight, limit - pacer.sent))
        if burst > 0:
            for _ in range(burst):
                message = factory.next(datetime.now(UTC))
                link.publish(message, options.qos if message.qos is None else message.qos)
            pacer.sent += burst
            await asyncio.sleep(0)  # let the loop write them and read acks
            continue
        # Nothing may go now: sleep until the next one is due, an ack frees the window,
        # or stop; the window is full when the pacer is not what is holding us back.
        link.wake.clear()
        if link.in_flight >= _WINDOW:
            await link.wake.wait()
        else:
            await wait_at_most(link.wake, min(pacer.delay(now), end - now, _PROGRESS_EVERY))


# --- command line -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ingestd simulate`` options."""
    defaults = SimulatorOptions()
    parser.add_argument("--url", default=defaults.url, help="broker, mqtt://host:port or mqtts://")
    parser.add_argument("--devices", type=int, default=defaults.devices, help="simulated devices")
    parser.add_argument(
        "--rate",
        type=float,
        default=defaults.rate,
        help="messages per second across all devices; 0 = as fast as possible",
    )
    parser.add_argument("--count", type=int, help="stop after this many messages")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument(
        "--bad-ratio",
        type=float,
        default=defaults.bad_ratio,
        help="fraction of deliberately bad messages (0..1)",
    )
    parser.add_argument("--format", choices=get_args(PayloadFormat), default=defaults.format)
    parser.add_argument("--seed", type=int, help="seed for reproducible signals and bad messages")
    parser.add_argument("--qos", type=int, choices=(0, 1, 2), default=defaults.qos)
    parser.add_argument("--topic-prefix", default=defaults.topic_prefix)
    parser.add_argument("--device-prefix", default=defaults.device_prefix)
    parser.add_argument("--client-id", help="MQTT client id (default: a unique one)")
    parser.add_argument(
        "--batch", type=int, default=defaults.batch, help="readings per JSON message (array)"
    )
    parser.add_argument("--group", default=defaults.group, help="Sparkplug group id")
    parser.add_argument("--edge-node", default=defaults.edge_node, help="Sparkplug edge node id")
    parser.add_argument(
        "--metrics", type=int, default=defaults.metrics, help="Sparkplug metrics per device"
    )
    parser.add_argument(
        "--bdseq", type=int, default=defaults.bdseq, help="Sparkplug bdSeq of the first session"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=defaults.connect_timeout,
        help="seconds to keep retrying the first connection",
    )


def options_from_args(args: argparse.Namespace) -> SimulatorOptions:
    """SimulatorOptions from parsed ``add_arguments`` options (missing ones keep defaults)."""
    names = {f.name for f in dataclasses.fields(SimulatorOptions)}
    return SimulatorOptions(**{k: v for k, v in vars(args).items() if k in names})


def run(args: argparse.Namespace) -> int:
    """Run ``ingestd simulate``: one JSON report line on stdout; 1 if the broker fails us."""
    try:
        options = options_from_args(args)
    except ValueError as exc:
        print(f"ingestd simulate: {exc}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(_run_until_signalled(options))
    except SimulatorError as exc:
        if exc.report is not None:
            print(exc.report.to_json(), flush=True)
        print(f"ingestd simulate: {exc}", file=sys.stderr)
        return 1
    print(report.to_json(), flush=True)
    return 0


async def _run_until_signalled(options: SimulatorOptions) -> SimulationReport:
    """``simulate``, with SIGINT and SIGTERM asking it to stop and report."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        return await simulate(options, stop)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
