"""The command line as a user meets it: check-config, demo, and systemd's notify protocol."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.daemon import INGESTD, Daemon
from tests.harness.servers import find_mosquitto, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def ingestd(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    return subprocess.run(
        [str(INGESTD), *args], cwd=cwd, env={**clean, **(env or {})}, capture_output=True,
        text=True, timeout=timeout, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("toml", "complaint"),
    [
        ("[mqtt]\nurl = 'http://broker'\n", "mqtt.url"),
        ("[mqtt]\nnope = 1\n", "mqtt.nope: unknown key"),
        ("[nope]\nx = 1\n", "nope: unknown key"),
        ("[mqtt.tls]\nca = 'x'\n", "mqtt.tls.ca: unknown key"),
        ("[mqtt]\nmax_inflight = 0\n", "mqtt.max_inflight"),
        ("[database]\nurl = 'mysql://x'\n", "database.url"),
        ("[[ingest.sources]]\ntopic = 'a/+'\ntemplate = 'a/{device}'\n", "ingest.sources"),
        ("[mqtt\nurl = 1\n", "ingestd.toml"),
        ("[mqtt]\npassword_file = '/nonexistent/secret'\n", "cannot read secret file"),
    ],
)
def test_check_config_explains_broken_files(tmp_path: Path, toml: str, complaint: str) -> None:
    path = tmp_path / "ingestd.toml"
    path.write_text(toml)
    result = ingestd("check-config", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert complaint in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_check_config_prints_the_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("hunter2\n")
    path = tmp_path / "ingestd.toml"
    path.write_text(
        "[mqtt]\nurl = 'mqtts://broker.example:8883'\nusername = 'ingestd'\n"
        f"password_file = '{tmp_path / 'secret'}'\n"
        "[database]\nurl = 'postgresql://ingestd:dbpass@db.example/ingestd'\n"
    )
    result = ingestd(
        "check-config", "-c", str(path), cwd=tmp_path, env={"INGESTD_MQTT__SHARED_GROUP": "edge"}
    )
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["mqtt"]["url"] == "mqtts://broker.example:8883"
    assert effective["mqtt"]["shared_group"] == "edge"
    assert effective["mqtt"]["password"] == "**********"
    assert "hunter2" not in result.stdout
    assert "dbpass" not in result.stdout


def test_check_config_rejects_unknown_environment_variables(tmp_path: Path) -> None:
    result = ingestd("check-config", cwd=tmp_path, env={"INGESTD_MQTT_URL": "mqtt://x:1"})
    assert result.returncode == 1
    assert "INGESTD_MQTT_URL" in result.stderr


def test_demo_runs_end_to_end_and_exits_zero(tmp_path: Path) -> None:
    result = ingestd(
        "demo", "--duration", "3", "--rate", "200", "--mosquitto", find_mosquitto(), cwd=tmp_path,
        env={"INGESTD_METRICS__LISTEN": f"127.0.0.1:{free_port()}"}, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    final = result.stdout.strip().splitlines()[-1]
    assert "simulator published" in final
    assert "rejections with reasons" in final
    assert (tmp_path / "var" / "ingestd.db").exists()


def test_demo_plays_a_sparkplug_edge_node(tmp_path: Path) -> None:
    result = ingestd(
        "demo", "--format", "sparkplug", "--duration", "3", "--rate", "200", "--devices", "3",
        "--mosquitto", find_mosquitto(), cwd=tmp_path,
        env={"INGESTD_METRICS__LISTEN": f"127.0.0.1:{free_port()}"}, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    *_, host, final = result.stdout.strip().splitlines()
    assert "simulator published" in final
    assert "Sparkplug messages" in final
    # The edge node's NDEATH at its clean stop took it and its devices offline.
    assert "edge nodes online 0, offline 1" in host, host
    assert "devices online 0, offline 3" in host, host
    stored = int(final.split("ingestd stored ")[1].split()[0])
    with sqlite3.connect(tmp_path / "var" / "ingestd.db") as db:
        rows = dict(db.execute("SELECT device_id, count(*) FROM sensor_readings GROUP BY 1"))
        make = db.execute(
            "SELECT value, value_text FROM sensor_readings"
            " WHERE device_id = 'plant/edge1' AND sensor_id = 'Properties/Hardware Make'"
        ).fetchall()
    assert set(rows) == {"plant/edge1", "plant/edge1/dev-001", "plant/edge1/dev-002",
                         "plant/edge1/dev-003"}  # fmt: skip
    assert sum(rows.values()) == stored > 0
    assert make == [(None, "ingestd simulator")]  # a String metric: value_text, value NULL
    assert (tmp_path / "var" / "sparkplug.db").exists()  # the birth cache


def test_demo_falls_back_to_an_in_process_amqtt_broker(tmp_path: Path) -> None:
    result = ingestd(
        "demo", "--duration", "3", "--rate", "200", "--broker", "amqtt", cwd=tmp_path,
        env={"INGESTD_METRICS__LISTEN": f"127.0.0.1:{free_port()}"}, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "using an in-process amqtt broker (MQTT 3.1.1)" in result.stdout
    final = result.stdout.strip().splitlines()[-1]
    published = int(final.split("simulator published ")[1].split()[0])
    stored = int(final.split("ingestd stored ")[1].split()[0])
    rejections = int(final.split(" readings and ")[1].split()[0])
    assert published == 600
    assert stored + rejections == published


def test_systemd_notify_ready_watchdog_stopping(
    tmp_path: Path, daemon_factory: Callable[..., Daemon]
) -> None:
    address = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(address))
    listener.settimeout(20)
    daemon = daemon_factory(NOTIFY_SOCKET=str(address), WATCHDOG_USEC="400000")
    daemon.start(wait_ready=False)

    def next_message() -> str:
        return listener.recv(4096).decode()

    seen = [next_message()]
    assert seen[0].startswith("READY=1")
    assert next_message() == "WATCHDOG=1"
    assert next_message() == "WATCHDOG=1"  # periodic
    daemon.signal(signal.SIGTERM)
    while "STOPPING=1" not in seen:
        seen.append(next_message())
    assert daemon.wait(15) == 0
    listener.close()
