"""Live traffic for the latency, soak and catch-up scenarios: a paced publisher and a
subscriber to ingestd's processed events, each run as its own process.

    python -m bench.live publish   --port P --rate R [--count N] [--client-id ID]
    python -m bench.live subscribe --port P [--topic 'ingestd/processed/#'] [--expect N]

Own processes, so neither competes with the other (or with the benchmark's polling) for
one GIL: a receive timestamp taken late because the publisher held the GIL would show up
as latency that ingestd did not add.

``publish`` sends QoS 1 readings at a steady rate from a plain socket (the packets of
``load.py``, built just before they are written), every ~2 ms the messages that are due
by then. Each reading's ``ts`` is the wall-clock moment it is written (microseconds,
strictly increasing, so every (device, sensor, ts) is a new row) and ``seq`` its index.
It stops after ``--count`` or on SIGTERM, waits for every PUBACK, and prints one JSON line:
how many were sent and acknowledged, the rate achieved, and how far behind schedule it
ever was (``lag``).

``subscribe`` subscribes (QoS 0, as the events are published), prints ``ready`` once the
SUBACK is in, and records the wall-clock receipt time of every event. On SIGTERM it keeps
listening until ``--expect`` events arrived or none came for ``--idle`` seconds, then
prints one JSON line: events received, unique, duplicated, and the latency
receipt - ``ts`` (the publisher's send time) as percentiles and per second.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt

from bench import load

REPO = Path(__file__).resolve().parents[1]  # run from here: python -m bench.live
TICK = 0.002  # the publisher writes every 2 ms: ~10 messages per write at 5,000 msg/s
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class _Stop:
    """Set by SIGTERM/SIGINT: the main loop checks it between writes."""

    requested = False

    @classmethod
    def install(cls) -> None:
        def handler(_signum: int, _frame: object) -> None:
            cls.requested = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def percentiles(values: list[float], qs: tuple[float, ...]) -> dict[str, float | None]:
    """Nearest-rank percentiles of ``values`` (sorted here), e.g. ``{'p50': ..}``."""
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for q in qs:
        key = f"p{q * 100:g}".replace(".", "_")
        out[key] = ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else None
    return out


# ------------------------------------------------------------------------------ publisher


class PacedPublisher(load.RawPublisher):
    """``RawPublisher`` at a fixed rate, with packets built at send time (ts = now)."""

    def run(self, rate: float, count: int | None) -> dict[str, Any]:
        topics = load.TOPICS
        lags: list[float] = []  # per write: how late its first (oldest) message was
        sent = 0
        last_us = 0
        with socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._handshake(sock)
            t0 = time.monotonic()
            wall0 = time.time()
            t_last = t0
            while not _Stop.requested and (count is None or sent < count):
                now = time.monotonic()
                due = int((now - t0) * rate) + 1
                if count is not None:
                    due = min(due, count)
                if due > sent:
                    lags.append(now - (t0 + sent / rate))
                    now_us = time.time_ns() // 1000
                    packets = []
                    for i in range(sent, due):
                        last_us = max(now_us, last_us + 1)
                        ts = (EPOCH + timedelta(microseconds=last_us)).strftime(
                            "%Y-%m-%dT%H:%M:%S.%fZ"
                        )
                        value = 20.0 + (i % 997) / 10.0
                        payload = (
                            f'{{"value": {value:.2f}, "ts": "{ts}", "unit": "degC", "seq": {i}}}'
                        )
                        packets.append(
                            load.publish_packet(
                                topics[i % len(topics)], payload.encode(), i % 65535 + 1
                            )
                        )
                    sock.sendall(b"".join(packets))
                    sent = due
                    t_last = time.monotonic()
                    # Packet ids repeat every 65535: never have more than the window unacked.
                    self._read_acks(sock, until=sent - load.PUBLISH_WINDOW)
                pause = TICK - (time.monotonic() - now)
                if pause > 0:
                    time.sleep(pause)
            self._read_acks(sock, until=sent)
            sock.sendall(b"\xe0\x00")  # DISCONNECT
        span = t_last - t0
        lag_ms = percentiles([lag * 1000 for lag in lags], (0.5, 0.99, 1.0))
        return {
            "sent": sent,
            "acked": self.acked,
            "rate_target": rate,
            "rate_achieved": round((sent - 1) / span, 1) if sent > 1 and span > 0 else None,
            "seconds": round(span, 3),
            "t_start": wall0,
            "lag_ms": {k: _round(v, 2) for k, v in lag_ms.items()},
            "writes": len(lags),
        }


def run_publisher(args: argparse.Namespace) -> dict[str, Any]:
    report = PacedPublisher(args.port, args.client_id).run(args.rate, args.count)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 2)
    return report


# ----------------------------------------------------------------------------- subscriber


def run_subscriber(args: argparse.Namespace) -> dict[str, Any]:
    # (receipt wall time, topic, payload): parsed at the end, not while events arrive
    records: list[tuple[float, str, bytes]] = []
    subscribed = [False]
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, clean_session=True,
        protocol=mqtt.MQTTv311,
    )  # fmt: skip
    client.on_message = lambda _c, _u, msg: records.append((time.time(), msg.topic, msg.payload))
    client.on_subscribe = lambda *_: subscribed.__setitem__(0, True)
    client.connect("127.0.0.1", args.port)
    client.subscribe(args.topic, qos=0)
    while not subscribed[0]:
        client.loop(0.1)
    t_ready = time.time()
    print(f"ready {t_ready}", flush=True)
    while not _Stop.requested:
        client.loop(0.05)
    # Asked to stop: the last events may still be on their way.
    last = (len(records), time.monotonic())
    while len(records) < args.expect and time.monotonic() - last[1] < args.idle:
        client.loop(0.05)
        if len(records) != last[0]:
            last = (len(records), time.monotonic())
    client.disconnect()
    return analyse(records, t_ready)


def analyse(records: list[tuple[float, str, bytes]], t_ready: float) -> dict[str, Any]:
    """Latency per unique message (receipt - ts), skipping those older than the subscription
    (a warm-up's readings carry old timestamps). Works for processed events and for the
    readings themselves (``latency-floor``): the key is the topic and ``ts``.

    A processed event also carries ``received_at``, the daemon's wall-clock receipt of the
    reading, which splits the latency in two: publish -> daemon receipt (broker hop and the
    daemon's socket backlog) and daemon receipt -> event received (the pipeline, the commit,
    the event's way out).
    """
    seen: set[tuple[str, str]] = set()
    latencies: list[float] = []
    to_daemon: list[float] = []
    from_daemon: list[float] = []
    per_second: dict[int, list[float]] = {}
    duplicates = stale = unreadable = 0
    for received, topic, payload in records:
        try:
            event = json.loads(payload)
            key = (topic, event["ts"])
            ts = datetime.fromisoformat(event["ts"]).timestamp()
            at_daemon = event.get("received_at")
            daemon_ts = datetime.fromisoformat(at_daemon).timestamp() if at_daemon else None
        except (ValueError, KeyError, TypeError):
            unreadable += 1
            continue
        if ts < t_ready:
            stale += 1
            continue
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        latency_ms = (received - ts) * 1000
        latencies.append(latency_ms)
        per_second.setdefault(int(ts), []).append(latency_ms)
        if daemon_ts is not None:
            to_daemon.append((daemon_ts - ts) * 1000)
            from_daemon.append((received - daemon_ts) * 1000)
    origin = min(per_second) if per_second else 0
    timeline = []
    for second in sorted(per_second):
        values = per_second[second]
        p = percentiles(values, (0.5, 0.99, 1.0))
        timeline.append(
            {"t": second - origin, "n": len(values)} | {k: _round(v, 1) for k, v in p.items()}
        )
    report = {
        "received": len(records),
        "unique": len(latencies),
        "duplicates": duplicates,
        "stale": stale,
        "unreadable": unreadable,
        "t_ready": t_ready,
        "latency_ms": _summary(latencies),
        "per_second": timeline,
    }
    if to_daemon:
        report["publish_to_daemon_ms"] = _summary(to_daemon)
        report["daemon_to_event_ms"] = _summary(from_daemon)
    return report


def _summary(values: list[float]) -> dict[str, float | None]:
    stats = percentiles(values, (0.5, 0.9, 0.99, 0.999, 1.0))
    mean = sum(values) / len(values) if values else None
    return {k: _round(v, 2) for k, v in stats.items()} | {"mean": _round(mean, 2)}


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# --------------------------------------------------------------- the parent's side of it


class LiveProcess:
    """A ``live.py`` subprocess seen from the benchmark: start, stop, read its report."""

    def __init__(self, workdir: Path, name: str, argv: list[str], count: int | None = None) -> None:
        self.name = name
        self.count = count  # messages it will publish (None: until stopped)
        self.argv = [sys.executable, "-m", "bench.live", *argv]
        self.err_path = workdir / f"{name}.stderr"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        with self.err_path.open("a") as err:
            self.process = subprocess.Popen(
                self.argv, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True
            )

    @property
    def stdout(self) -> IO[str]:
        assert self.process is not None
        assert self.process.stdout is not None
        return self.process.stdout

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Wait for the ``ready <time>`` line; return that time."""
        if not select.select([self.stdout], [], [], timeout)[0]:
            raise RuntimeError(f"{self.name} not ready within {timeout:.0f} s{self._stderr()}")
        line = self.stdout.readline()
        if not line.startswith("ready "):
            raise RuntimeError(f"{self.name} said {line!r}{self._stderr()}")
        return float(line.split()[1])

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check(self) -> None:
        """Raise if the process ended with an error (a callback for polling loops)."""
        if self.process is not None and self.process.poll() not in (None, 0):
            raise RuntimeError(f"{self.name} exited {self.process.returncode}{self._stderr()}")

    def stop(self) -> None:
        if self.running():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)

    def report(self, timeout: float = 120.0) -> dict[str, Any]:
        """Wait for the process to end; its last stdout line is its JSON report."""
        assert self.process is not None
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            raise RuntimeError(f"{self.name} did not finish within {timeout:.0f} s") from None
        lines = out.strip().splitlines()
        if self.process.returncode != 0 or not lines:
            raise RuntimeError(
                f"{self.name} exited {self.process.returncode} without a report{self._stderr()}"
            )
        report: dict[str, Any] = json.loads(lines[-1])
        return report

    def kill(self) -> None:
        if self.running():
            assert self.process is not None
            self.process.kill()
            self.process.communicate()

    def _stderr(self) -> str:
        text = self.err_path.read_text(errors="replace") if self.err_path.exists() else ""
        return f":\n{text[-2000:]}" if text else ""


def publisher(workdir: Path, port: int, rate: float, count: int | None) -> LiveProcess:
    argv = ["publish", "--port", str(port), "--rate", str(rate)]
    if count is not None:
        argv += ["--count", str(count)]
    return LiveProcess(workdir, "publisher", argv, count)


def subscriber(
    workdir: Path, port: int, expect: int, topic: str = "ingestd/processed/#"
) -> LiveProcess:
    argv = ["subscribe", "--port", str(port), "--expect", str(expect), "--topic", topic]
    return LiveProcess(workdir, "subscriber", argv)


# ----------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish")
    pub.add_argument("--port", type=int, required=True)
    pub.add_argument("--rate", type=float, required=True, help="messages per second")
    pub.add_argument("--count", type=int, help="default: until SIGTERM")
    pub.add_argument("--client-id", default="bench-live-publisher")
    subs = sub.add_parser("subscribe")
    subs.add_argument("--port", type=int, required=True)
    subs.add_argument("--topic", default="ingestd/processed/#")
    subs.add_argument("--expect", type=int, default=0, help="stop early once this many came")
    subs.add_argument("--idle", type=float, default=2.0, help="after SIGTERM: quiet seconds")
    subs.add_argument("--client-id", default="bench-live-subscriber")
    args = parser.parse_args(argv)
    _Stop.install()
    report = run_publisher(args) if args.command == "publish" else run_subscriber(args)
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
