"""``ingestd demo``: a private mosquitto, the edge simulator and the daemon on the defaults.

A first look for a new user: everything runs on this machine for about twenty seconds
with a live one-line summary, then a final summary, and nothing is left running. Without
a mosquitto binary it falls back to an in-process amqtt broker (MQTT 3.1.1), and says so.

``--format sparkplug``: the simulator is a Sparkplug B edge node (``spBv1.0/plant/.../edge1``
with ``--devices`` devices) and the daemon gets one ``sparkplug`` source on ``spBv1.0/#``,
so ingestd runs as a Sparkplug host (its second connection, STATE, birth cache).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

from daemon.config import Config, load_config
from daemon.sessions import Publish, SparkplugSession

if TYPE_CHECKING:
    from daemon.supervisor import Supervisor

MOSQUITTO_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
# The daemon's source for --format sparkplug: every group (the simulator's is "plant").
SPARKPLUG_SOURCE = {"topic": "spBv1.0/#", "format": "sparkplug", "template": "spBv1.0/#"}
_SUBSCRIBE_TIMEOUT = 10.0  # seconds to wait for the host's subscriptions before publishing


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of simulated traffic")
    parser.add_argument("--rate", type=float, default=500.0, help="messages per second")
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--bad-ratio", type=float, default=0.02, help="share of malformed messages")
    parser.add_argument(
        "--format",
        choices=("json", "sparkplug"),
        default="json",
        help="json: devices publish JSON readings on sensors/...; sparkplug: a Sparkplug B edge"
        " node publishes births and data on spBv1.0/..., ingestd is its host application",
    )
    parser.add_argument("--mosquitto", help="path of the mosquitto binary (default: found on PATH)")
    parser.add_argument(
        "--broker",
        choices=("auto", "mosquitto", "amqtt"),
        default="auto",
        help="auto: mosquitto when installed, else an in-process amqtt broker",
    )


def run(args: argparse.Namespace) -> int:
    binary = args.mosquitto or next(filter(None, map(shutil.which, MOSQUITTO_CANDIDATES)), None)
    if args.broker == "amqtt" or (args.broker == "auto" and binary is None):
        if not _amqtt_installed():
            print("ingestd demo: no mosquitto binary found and amqtt is not installed; install "
                  "mosquitto (apt-get install mosquitto) or amqtt (pip install 'ingestd[demo]')",
                  file=sys.stderr)  # fmt: skip
            return 1
        why = "no mosquitto binary found" if binary is None else "--broker amqtt"
        print(f"demo: {why}: using an in-process amqtt broker (MQTT 3.1.1)")
        return _demo(args, _free_port(), in_process_broker=True)
    if binary is None:
        print("ingestd demo: no mosquitto binary found; install it (apt-get install mosquitto) "
              "or pass --mosquitto PATH", file=sys.stderr)  # fmt: skip
        return 1
    with (
        tempfile.TemporaryDirectory(prefix="ingestd-demo-") as workdir,
        _broker(binary, Path(workdir)) as port,
    ):
        return _demo(args, port)


def _amqtt_installed() -> bool:
    try:
        import amqtt.broker  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


@contextlib.asynccontextmanager
async def _amqtt_broker(port: int) -> AsyncIterator[None]:
    """amqtt in this process: a fallback for a first look, not a production broker."""
    from amqtt.broker import Broker  # noqa: PLC0415

    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    await broker.start()
    print(f"demo: amqtt broker listening on 127.0.0.1:{port}")
    try:
        yield
    finally:
        await broker.shutdown()


def _free_port(preferred: int = 0) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _broker(binary: str, workdir: Path) -> Iterator[int]:
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        # ack-after-commit needs more than mosquitto's default of 20 unacknowledged messages
        "max_inflight_messages 4000\nmax_queued_messages 100000\nlog_dest none\n"
    )
    process = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=0.2),
            ):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                error = process.stderr.read().decode() if process.stderr else ""
                raise SystemExit(f"ingestd demo: mosquitto did not start: {error.strip()}")
            time.sleep(0.05)  # polling a port with a deadline
        print(f"demo: mosquitto {binary} listening on 127.0.0.1:{port}")
        yield port
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()


def _demo(args: argparse.Namespace, port: int, *, in_process_broker: bool = False) -> int:
    from daemon.logs import setup_logging  # noqa: PLC0415
    from daemon.loop import run_async  # noqa: PLC0415
    from daemon.wiring import prepare_schema  # noqa: PLC0415

    os.environ.setdefault("INGESTD_LOG__LEVEL", "WARNING")
    sparkplug = {"ingest": {"sources": [SPARKPLUG_SOURCE]}} if args.format == "sparkplug" else {}
    config = load_config(
        None,
        mqtt={"url": f"mqtt://127.0.0.1:{port}", "client_id": f"ingestd-demo-{os.getpid()}"},
        metrics={"listen": f"127.0.0.1:{_free_port(9108)}"},
        **sparkplug,
    )
    setup_logging(config.log.level, config.log.format)
    problem = prepare_schema(config)
    if problem:
        print(f"ingestd demo: {problem}", file=sys.stderr)
        return 1
    print(
        f"demo: storing in {config.database_url}; metrics at http://{config.metrics.listen}/metrics"
    )
    outcome: dict[str, int] = {}

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            if in_process_broker:
                await stack.enter_async_context(_amqtt_broker(port))
            outcome.update(await _traffic(config, args, port))

    run_async(main)
    return 0 if outcome.get("received") == outcome.get("published") else 1


class _HostSession(SparkplugSession):
    """The Sparkplug host's session, counting the messages it keeps off the pipeline.

    Those are ingestd's own STATE coming back (it subscribes to it): received, not
    published by the simulator. The first one also says the subscriptions are in place.
    """

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.own = 0
        self.subscribed = asyncio.Event()

    def intercept(self, topic: str, payload: bytes, publish: Publish) -> bool:
        if not super().intercept(topic, payload, publish):
            return False
        self.own += 1
        self.subscribed.set()
        return True


async def _traffic(config: Config, args: argparse.Namespace, port: int) -> dict[str, int]:
    """Run the daemon and the simulator side by side; what was published and received."""
    from daemon.supervisor import Supervisor  # noqa: PLC0415
    from edge.simulator import SimulatorOptions, simulate  # noqa: PLC0415

    supervisor = Supervisor(config)
    host = _watch_host(supervisor)
    daemon = asyncio.create_task(supervisor.run(install_signal_handlers=False), name="daemon")
    await supervisor.daemon.intake.main.connected.wait()
    if host is not None:  # an edge node's NBIRTH (QoS 0) sent before that would be lost
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(host.subscribed.wait(), _SUBSCRIBE_TIMEOUT)
    options = SimulatorOptions(
        url=f"mqtt://127.0.0.1:{port}", devices=args.devices, rate=args.rate,
        duration=args.duration, bad_ratio=args.bad_ratio, seed=42, format=args.format,
    )  # fmt: skip
    simulator = asyncio.create_task(simulate(options), name="simulator")
    started = time.monotonic()
    while not simulator.done():
        await asyncio.wait({simulator}, timeout=1.0)
        end = "\r" if sys.stdout.isatty() else "\n"
        _summary(supervisor, host, time.monotonic() - started, end=end)
    report = simulator.result()
    deadline = time.monotonic() + 15
    # Counters have no event to wait on: poll them with a deadline.
    while _from_edge(supervisor, host) < report.published:
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.1)
    await asyncio.wait_for(
        supervisor.daemon.intake.wait_drained(), max(0.1, deadline - time.monotonic())
    )
    supervisor.request_stop()
    await daemon
    print()
    _summary(supervisor, host, time.monotonic() - started, end="\n")
    stored = f"ingestd stored {supervisor.metrics.pipeline.stored} readings and"
    rejected = f"{_rejected(supervisor)} rejections with reasons"
    if host is None:
        print(
            f"demo: simulator published {report.published} ({report.bad} malformed on purpose);"
            f" {stored} {rejected}"
        )
    else:
        print(_sparkplug_summary(supervisor, host))
        print(
            f"demo: simulator published {report.published} Sparkplug messages (NBIRTH,"
            f" {options.devices} DBIRTH, DDATA, and NDEATH at its clean stop;"
            f" {report.bad} malformed on purpose); {stored} {rejected}"
        )
    return {"published": report.published, "received": _from_edge(supervisor, host)}


def _watch_host(supervisor: Supervisor) -> _HostSession | None:
    """Count what the Sparkplug host connection keeps to itself (None: no such connection)."""
    source = supervisor.daemon.intake.sparkplug
    if source is None:
        return None
    host = _HostSession(source.session.config)
    source.session = host  # before it first connects: its will is taken from it then
    return host


def _from_edge(supervisor: Supervisor, host: _HostSession | None) -> int:
    """Messages received from the simulator: all of them, but for ingestd's own STATE and
    its rebirth requests (NCMD) coming back on ``spBv1.0/#``."""
    received = supervisor.metrics.intake.received
    if host is None:
        return received
    return received - host.own - _count(supervisor.metrics.pipeline.sparkplug_rebirth_requests)


def _sparkplug_summary(supervisor: Supervisor, host: _HostSession) -> str:
    pipeline = supervisor.metrics.pipeline
    return (
        f"demo: Sparkplug host {host.state_topic}: edge nodes"
        f" online {_gauge(pipeline.sparkplug_nodes, 'online')},"
        f" offline {_gauge(pipeline.sparkplug_nodes, 'offline')} (after its NDEATH); devices"
        f" online {_gauge(pipeline.sparkplug_devices, 'online')},"
        f" offline {_gauge(pipeline.sparkplug_devices, 'offline')}; rebirths requested"
        f" {_count(pipeline.sparkplug_rebirth_requests)},"
        f" seq errors {_count(pipeline.sparkplug_seq_errors)}"
    )


def _count(counter: Counter) -> int:
    return int(sum(sample.value for family in counter.collect() for sample in family.samples
                   if sample.name.endswith("_total")))  # fmt: skip


def _gauge(gauge: Gauge, state: str) -> int:
    return int(sum(sample.value for family in gauge.collect() for sample in family.samples
                   if sample.labels.get("state") == state))  # fmt: skip


def _rejected(supervisor: Supervisor) -> int:
    return _count(supervisor.metrics.pipeline.rejected)


def _summary(supervisor: Supervisor, host: _HostSession | None, elapsed: float, end: str) -> None:
    received = _from_edge(supervisor, host)
    rate = received / elapsed if elapsed > 0 else 0.0
    print(
        f"received {received:>7}  stored {supervisor.metrics.pipeline.stored:>7}  "
        f"rejected {_rejected(supervisor):>5}  "
        f"in flight {supervisor.daemon.intake.pending:>4}  "
        f"{rate:8.0f} msg/s",
        end=end,
        flush=True,
    )
