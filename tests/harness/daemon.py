"""The daemon as a real subprocess, and plain paho clients playing the plant floor."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from tests.harness.servers import free_port, wait_until

INGESTD = Path(sys.executable).with_name("ingestd")


class Daemon:
    """``ingestd run`` in a subprocess with an environment built for one test."""

    def __init__(self, workdir: Path, env: dict[str, str], args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.metrics_port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")},
            "INGESTD_METRICS__LISTEN": f"127.0.0.1:{self.metrics_port}",
            "INGESTD_LOG__FORMAT": "json",
            **env,
        }
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "daemon.log"
        self.starts = 0

    def start(self, wait_ready: bool = True) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(INGESTD), "run", *self.args],
            cwd=self.workdir,
            env=self.env,
            stdout=log,
            stderr=log,
        )
        log.close()
        if wait_ready:
            wait_until(
                self.ready, 30, message=lambda: f"daemon not ready:\n{self.log_text()[-3000:]}"
            )

    def ready(self) -> bool:
        self._check_alive()
        return self.http("/readyz")[0] == 200

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(
                f"daemon exited with {self.process.returncode}:\n{self.log_text()[-3000:]}"
            )

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}{path}", timeout=2
            ) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {'name{labels}': value}."""
        status, text = self.http("/metrics")
        assert status == 200, f"/metrics answered {status}"
        return _samples(text)

    def scrape(self) -> dict[str, float] | None:
        """``metrics()``, or None while nothing listens yet (the process must be alive)."""
        self._check_alive()
        status, text = self.http("/metrics")
        if status == 0:
            return None
        assert status == 200, f"/metrics answered {status}"
        return _samples(text)

    def metric(self, key: str) -> float:
        return self.metrics().get(key, 0.0)

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.terminate()
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _samples(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def paho_client(url_port: int, client_id: str = "", clean: bool = True) -> mqtt.Client:
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
        protocol=mqtt.MQTTv311,
    )  # fmt: skip
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", url_port)
    client.loop_start()
    return client


class Collector:
    """Subscribes to a filter and keeps every message, for asserting on outbound events."""

    def __init__(self, port: int, topic_filter: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic_filter, qos=1)
        self.client.loop_start()
        assert self._subscribed.wait(10), "collector not subscribed"

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(message)

    def topics(self) -> list[str]:
        with self._lock:
            return [m.topic for m in self.messages]

    def count(self) -> int:
        with self._lock:
            return len(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def publish_all(port: int, messages: list[tuple[str, bytes]], qos: int = 1) -> None:
    """Publish and wait until the broker acknowledged every message."""
    client = paho_client(port)
    try:
        infos = [client.publish(topic, payload, qos) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        client.loop_stop()
        client.disconnect()


@contextlib.contextmanager
def streaming(
    port: int, messages: list[tuple[str, bytes]], rate: float
) -> Iterator[threading.Event]:
    """Publish ``messages`` at about ``rate`` per second in a thread; the event is set when done."""
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            client = paho_client(port)
            interval = 1.0 / rate
            pending: list[mqtt.MQTTMessageInfo] = []
            for index, (topic, payload) in enumerate(messages):
                pending.append(client.publish(topic, payload, 1))
                if index % 50 == 49:
                    for info in pending:
                        info.wait_for_publish(30)
                    pending.clear()
                    done.wait(interval * 50)  # pacing the stream, not waiting for state
            for info in pending:
                info.wait_for_publish(30)
            client.loop_stop()
            client.disconnect()
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=run, name="publisher", daemon=True)
    thread.start()
    try:
        yield done
    finally:
        thread.join(60)
        if errors:
            raise errors[0]
