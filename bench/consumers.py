"""The reference consumers ingestd is compared with, each run as its own process.

    python -m bench.consumers ceiling --port P --client-id ID --count N
    python -m bench.consumers naive   --port P --client-id ID --count N --dsn postgresql://...

Both resume a persistent session that already holds the backlog (the harness created it
and subscribed it, so they do not subscribe again), acknowledge automatically on receipt,
and stop after ``--count`` messages. They print one JSON line on stdout: wall-clock
(``time.time()``) moments of connect, first and last message, the count, peak RSS, and
which implementation ran, so the parent can time them from process start exactly as it
times ingestd.

* ``ceiling``: paho (MQTT 3.1.1, ``clean_session=False``) that only counts: the Python
  receive ceiling, what any Python consumer on this machine can hope for at best.
* ``naive``: the pattern most first versions use: one ``json.loads`` and one autocommitted
  ``INSERT ... ON CONFLICT DO NOTHING`` per message, into the same ``sensor_readings`` table
  ingestd writes (same unique key). With psycopg installed it is paho + psycopg in one
  thread (the natural form); otherwise aiomqtt + asyncpg, awaiting each INSERT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt

INSERT = (
    "INSERT INTO sensor_readings"
    " (device_id, sensor_id, ts, value, unit, seq, received_at, correlation_id)"
    " VALUES ({}) ON CONFLICT DO NOTHING"
)
STALL_SECONDS = 30.0  # give up when no message arrived for this long


@dataclass
class Outcome:
    """What a consumer reports to the benchmark (one JSON line on stdout)."""

    consumer: str
    impl: str
    count: int = 0
    t_connect: float | None = None
    t_first: float | None = None
    t_last: float | None = None
    peak_rss_kb: int = 0
    cpu_seconds: float = 0.0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def handled(self) -> None:
        """Record one handled message."""
        now = time.time()
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        self.count += 1

    def emit(self) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.peak_rss_kb = _peak_rss_kb()
        self.cpu_seconds = round(usage.ru_utime + usage.ru_stime, 2)
        sys.stdout.write(json.dumps(asdict(self)) + "\n")
        sys.stdout.flush()


def _peak_rss_kb() -> int:
    """This process's peak RSS since its exec (``VmHWM``), in KiB.

    Not ``ru_maxrss``: Linux carries the peak of the pre-exec memory, i.e. of the benchmark
    process that forked this one, into it (with the bench holding a large pre-built backlog
    the ceiling consumer reported ~390 MB).
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _paho_client(client_id: str) -> mqtt.Client:
    return mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
        protocol=mqtt.MQTTv311,
    )  # fmt: skip


def _paho_drain(
    args: argparse.Namespace, outcome: Outcome, handle: Callable[[mqtt.MQTTMessage], None]
) -> None:
    """Drive a paho client in this thread, calling ``handle(message)`` for each message."""
    client = _paho_client(args.client_id)

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        handle(message)
        outcome.handled()
        if outcome.count >= args.count:
            client.disconnect()

    client.on_message = on_message
    outcome.t_connect = time.time()
    client.connect("127.0.0.1", args.port)
    progress = (0, time.monotonic())
    while outcome.count < args.count:
        rc = client.loop(timeout=1.0)
        if rc != mqtt.MQTT_ERR_SUCCESS and outcome.count < args.count:
            outcome.error = f"paho loop failed: {mqtt.error_string(rc)}"
            return
        if outcome.count != progress[0]:
            progress = (outcome.count, time.monotonic())
        elif time.monotonic() - progress[1] > STALL_SECONDS:
            outcome.error = f"stalled at {outcome.count} of {args.count} messages"
            return


# ------------------------------------------------------------------------------- ceiling


def run_ceiling(args: argparse.Namespace) -> Outcome:
    """Count messages, nothing else."""
    outcome = Outcome("ceiling", "paho-3.1.1-count-only")
    _paho_drain(args, outcome, lambda _message: None)
    return outcome


# --------------------------------------------------------------------------------- naive


def _row(topic: str, payload: Any) -> tuple[Any, ...]:
    """The INSERT parameters for one message (no validation: this is the naive consumer)."""
    _, device_id, sensor_id = topic.split("/")
    data = json.loads(payload)
    ts = datetime.fromisoformat(data["ts"])
    return (
        device_id, sensor_id, ts, float(data["value"]), data.get("unit"), data.get("seq"),
        datetime.now(UTC), str(uuid.uuid4()),
    )  # fmt: skip


def run_naive_psycopg(args: argparse.Namespace) -> Outcome:
    """paho + psycopg, one thread: receive, parse, INSERT (autocommit), next."""
    import psycopg  # noqa: PLC0415 - optional dependency

    outcome = Outcome("naive", "paho+psycopg, one INSERT per message, autocommit")
    sql = INSERT.format(", ".join(["%s"] * 8))
    with psycopg.connect(args.dsn, autocommit=True) as conn, conn.cursor() as cur:

        def handle(message: mqtt.MQTTMessage) -> None:
            cur.execute(sql, _row(message.topic, message.payload), prepare=True)

        _paho_drain(args, outcome, handle)
    return outcome


def run_naive_asyncpg(args: argparse.Namespace) -> Outcome:
    """aiomqtt + asyncpg: ``async for message: await conn.execute(INSERT ...)``."""
    import aiomqtt  # noqa: PLC0415
    import asyncpg  # noqa: PLC0415

    outcome = Outcome("naive", "aiomqtt+asyncpg, one INSERT per message, autocommit")
    sql = INSERT.format(", ".join(f"${i}" for i in range(1, 9)))

    async def consume() -> None:
        conn = await asyncpg.connect(args.dsn)
        try:
            outcome.t_connect = time.time()
            async with aiomqtt.Client(
                "127.0.0.1", args.port, identifier=args.client_id, clean_session=False,
                protocol=aiomqtt.ProtocolVersion.V311,
            ) as client:  # fmt: skip
                async for message in client.messages:
                    row = _row(str(message.topic), message.payload)
                    await conn.execute(sql, *row)
                    outcome.handled()
                    if outcome.count >= args.count:
                        break
        finally:
            await conn.close()

    try:
        asyncio.run(asyncio.wait_for(consume(), timeout=args.timeout))
    except TimeoutError:
        outcome.error = f"timed out after {args.timeout}s at {outcome.count} of {args.count}"
    return outcome


def run_naive(args: argparse.Namespace) -> Outcome:
    """The naive consumer: paho + psycopg when psycopg is installed, else aiomqtt + asyncpg."""
    try:
        import psycopg  # noqa: F401, PLC0415
    except ImportError:
        return run_naive_asyncpg(args)
    return run_naive_psycopg(args)


# ---------------------------------------------------------------------------------- main

CONSUMERS = {"ceiling": run_ceiling, "naive": run_naive}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("consumer", choices=sorted(CONSUMERS))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--dsn", help="postgresql:// URL (naive only)")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    outcome = CONSUMERS[args.consumer](args)
    if outcome.error is None and outcome.count < args.count:
        outcome.error = f"stopped at {outcome.count} of {args.count} messages"
    outcome.emit()
    return 0 if outcome.error is None else 1


if __name__ == "__main__":
    sys.exit(main())
