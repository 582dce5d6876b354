"""The shipped deployment files work as documented.

mosquitto/mosquitto.conf is started for real (mosquitto 2.0) and shown to carry an
ack-after-commit window and persistent queues; the systemd units pass `systemd-analyze
verify` and `security`; docker-compose.yml and the Dockerfile are checked for the wiring
the docs promise, and their INGESTD_* variables are fed through the real config loader.
No Docker engine is needed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from daemon.config import (
    Config,
    DaemonConfig,
    IngestConfig,
    MetricsConfig,
    MqttConfig,
    load_config,
)
from tests.harness.mosquitto_conf import duration_seconds
from tests.harness.mosquitto_conf import settings as mosquitto_settings
from tests.harness.servers import find_mosquitto, free_port, unique_name, wait_until

# A full YAML parser when the environment has one (PyYAML is not a dependency); see _load_yaml.
yaml: Any = importlib.import_module("yaml") if importlib.util.find_spec("yaml") else None

ROOT = Path(__file__).resolve().parents[1]
MOSQUITTO_CONF = ROOT / "mosquitto" / "mosquitto.conf"
UNIT = ROOT / "systemd" / "ingestd.service"
TEMPLATE = ROOT / "systemd" / "ingestd@.service"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = ROOT / "pyproject.toml"

VENV = "/opt/ingestd/venv"
MAX_EXPOSURE = 2.0  # systemd-analyze security: 0 is fully locked down, 10 is wide open


# ======================================================================= mosquitto.conf


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _broker_dir(path: Path) -> None:
    """A directory the broker can write after it drops from root to the mosquitto user."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        return  # not root: mosquitto keeps running as us
    for parent in path.resolve().parents:  # pytest's tmp dirs are 0700 root: add o+x only
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
    shutil.chown(path, user="mosquitto", group=pwd.getpwnam("mosquitto").pw_gid)
    path.chmod(0o700)


class ShippedBroker:
    """mosquitto on the shipped config, with only two lines moved off the system's paths:
    the listener (to a free port on 127.0.0.1) and persistence_location (to a private dir)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.state_dir = workdir / "state"
        self.conf_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        text = MOSQUITTO_CONF.read_text()
        text, listeners = re.subn(
            r"^listener 1883$", f"listener {self.port} 127.0.0.1", text, flags=re.MULTILINE
        )
        text, locations = re.subn(
            r"^persistence_location /var/lib/mosquitto/$",
            f"persistence_location {self.state_dir}/",
            text,
            flags=re.MULTILINE,
        )
        assert (listeners, locations) == (1, 1), "mosquitto.conf changed shape: update this test"
        self.conf_path.write_text(text)
        _broker_dir(self.state_dir)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [find_mosquitto(), "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        proc = self._proc
        wait_until(
            lambda: proc.poll() is not None or _accepts(self.port),
            10,
            message=lambda: f"mosquitto did not start:\n{self.log()}",
        )
        assert proc.poll() is None, f"mosquitto exited ({proc.returncode}):\n{self.log()}"

    def stop(self) -> None:
        """SIGTERM: a clean stop, on which mosquitto writes its snapshot."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGTERM)
            assert self._proc.wait(10) == 0, self.log()
            self._proc = None

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


@pytest.fixture
def shipped_broker(tmp_path: Path) -> Iterator[ShippedBroker]:
    broker = ShippedBroker(tmp_path)
    try:
        broker.start()
        yield broker
    finally:
        broker.kill()


class Subscriber:
    """A paho client on its own network thread that records payloads and, when told, acks."""

    def __init__(
        self, port: int, client_id: str, *, topic: str | None, clean_session: bool
    ) -> None:
        self.payloads: list[bytes] = []
        self.unacked: list[int] = []
        self.session_present: bool | None = None
        self.subscribed = threading.Event()
        self.disconnected = threading.Event()
        self._lock = threading.Lock()
        self._acking = True
        self._topic = topic
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            manual_ack=True,
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda *_: self.disconnected.set()
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, *_: Any) -> None:
        self.session_present = flags.session_present
        if self._topic is not None:
            client.subscribe(self._topic, qos=1)

    def _on_message(self, client: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.payloads.append(bytes(message.payload))
            if self._acking:
                client.ack(message.mid, message.qos)
            else:
                self.unacked.append(message.mid)

    def hold_acks(self) -> None:
        with self._lock:
            self._acking = False

    def release_acks(self) -> None:
        with self._lock:
            self._acking = True
            held, self.unacked = self.unacked, []
        for mid in held:
            self.client.ack(mid, 1)

    def close(self) -> None:
        """Disconnect cleanly (the DISCONNECT is sent before the network thread stops)."""
        self.client.disconnect()
        self.disconnected.wait(5)
        self.client.loop_stop()


def _publish(port: int, topic: str, payloads: list[bytes]) -> None:
    """Publish at QoS 1 and return once the broker has acknowledged every message."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique_name("pub"))
    disconnected = threading.Event()
    client.on_disconnect = lambda *_: disconnected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for payload in payloads]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        client.disconnect()
        disconnected.wait(5)
        client.loop_stop()


def test_mosquitto_starts_cleanly_on_the_shipped_config(shipped_broker: ShippedBroker) -> None:
    log = shipped_broker.log()
    assert "mosquitto version 2." in log
    assert f"listen socket on port {shipped_broker.port}" in log
    problems = [line for line in log.splitlines() if re.search(r"error|warning", line, re.I)]
    assert not problems, "mosquitto complained about the shipped config:\n" + "\n".join(problems)


def test_mosquitto_config_is_sized_for_ack_after_commit() -> None:
    s = mosquitto_settings(MOSQUITTO_CONF.read_text())
    window = MqttConfig().max_inflight
    assert s["listener"] == ["1883"]
    assert s["persistence"] == ["true"]
    assert s["persistence_location"] == ["/var/lib/mosquitto/"]
    assert s["autosave_on_changes"] == ["false"]
    assert 0 < int(s["autosave_interval"][0]) <= 30  # stock 1800 s risks 30 min on a crash
    assert int(s["max_inflight_messages"][0]) == window  # stock 20 caps the pipeline
    # The broker's byte window agrees with the daemon's in-flight byte budget.
    assert int(s["max_inflight_bytes"][0]) == MqttConfig().max_inflight_bytes
    assert int(s["max_queued_messages"][0]) >= 100 * window
    assert int(s["max_queued_bytes"][0]) > 0  # 0 would mean unbounded broker memory
    expiry = duration_seconds(s["persistent_client_expiration"][0])
    assert expiry >= MqttConfig().session_expiry_seconds
    # Oversized readings must reach ingestd to become payload_too_large dead letters.
    assert int(s["max_packet_size"][0]) > IngestConfig().max_payload_bytes
    assert "message_size_limit" not in s  # acks, then silently drops: no dead letter
    assert s["log_dest"] == ["stderr"]  # stdout is block-buffered off a terminal
    assert {"error", "warning", "notice", "information"} <= set(s["log_type"])


def test_every_mosquitto_setting_has_a_why_comment() -> None:
    """Each setting, or the block of settings it belongs to, sits right under a comment."""
    previous = "blank"
    for number, raw in enumerate(MOSQUITTO_CONF.read_text().splitlines(), start=1):
        line = raw.strip()
        kind = "blank" if not line else "comment" if line.startswith("#") else "setting"
        if kind == "setting":
            assert previous != "blank", f"mosquitto.conf:{number}: {line!r} has no comment"
        previous = kind


def test_broker_lets_a_full_ingestd_window_be_in_flight(shipped_broker: ShippedBroker) -> None:
    """Unacked, ingestd gets exactly its window (a stock broker: 20); the rest is queued
    and follows once it acks."""
    window = MqttConfig().max_inflight
    topic = f"{unique_name('t')}/dev/temp"
    expected = [b"%d" % i for i in range(window + 200)]
    sub = Subscriber(shipped_broker.port, unique_name("ingestd"), topic=topic, clean_session=True)
    try:
        assert sub.subscribed.wait(10)
        sub.hold_acks()
        _publish(shipped_broker.port, topic, expected)
        wait_until(
            lambda: len(sub.payloads) >= window,
            15,
            message=lambda: f"only {len(sub.payloads)} of {window} sent before any PUBACK",
        )
        assert len(sub.payloads) == window  # and not more: the broker keeps to the window
        sub.release_acks()
        wait_until(lambda: len(sub.payloads) >= len(expected), 15)
        assert sub.payloads == expected
    finally:
        sub.close()


def test_queued_messages_survive_a_broker_restart(tmp_path: Path) -> None:
    """What arrives while ingestd is away waits in its session, across a broker restart."""
    broker = ShippedBroker(tmp_path)
    client_id, topic = unique_name("ingestd"), f"{unique_name('t')}/dev/temp"
    expected = [b"reading %d" % i for i in range(50)]
    try:
        broker.start()
        first = Subscriber(broker.port, client_id, topic=topic, clean_session=False)
        assert first.subscribed.wait(10)
        first.close()
        _publish(broker.port, topic, expected)
        broker.stop()
        assert (broker.state_dir / "mosquitto.db").stat().st_size > 0
        broker.start()
        again = Subscriber(broker.port, client_id, topic=None, clean_session=False)
        try:
            wait_until(lambda: len(again.payloads) >= len(expected), 15)
            assert again.session_present is True
            assert again.payloads == expected
        finally:
            again.close()
    finally:
        broker.kill()


# ======================================================================= systemd units


def _unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order, repeated keys kept (configparser would keep only
    the last SystemCallFilter=, Environment=, LoadCredential= ...)."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"{path.name}: keep one setting per line: {raw!r}"
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not key=value: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def _section(path: Path, name: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for section, key, value in _unit_entries(path):
        if section == name:
            values.setdefault(key, []).append(value)
    return values


def _one(values: dict[str, list[str]], key: str) -> str:
    assert len(values.get(key, [])) == 1, f"{key}= should be set exactly once"
    return values[key][0]


def _timespan_seconds(value: str) -> float:
    """systemd time spans: '20', '20s', '1min 30s', '500ms'."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+)\s*([a-z]*)", value)
    assert parts, f"not a time span: {value!r}"
    return sum(int(number) * units[unit] for number, unit in parts)


def _environment(values: dict[str, list[str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in values.get("Environment", []):
        for assignment in shlex.split(line):
            key, _, value = assignment.partition("=")
            env[key] = value
    return env


UNITS = pytest.mark.parametrize("unit", [UNIT, TEMPLATE], ids=lambda p: p.name)


@UNITS
def test_unit_runs_ingestd_as_a_notify_service_with_watchdog(unit: Path) -> None:
    svc = _section(unit, "Service")
    assert _one(svc, "Type") == "notify"
    assert _one(svc, "NotifyAccess") == "main"
    assert shlex.split(_one(svc, "ExecStart")) == [f"{VENV}/bin/ingestd", "run"]
    # `systemctl reload` sends SIGHUP to the daemon itself (tests/e2e/test_reload.py).
    assert shlex.split(_one(svc, "ExecReload")) == ["/bin/kill", "-HUP", "$MAINPID"]
    assert _timespan_seconds(_one(svc, "WatchdogSec")) == 30
    assert _one(svc, "Restart") == "on-failure"
    assert _timespan_seconds(_one(svc, "RestartSec")) == 2
    # The drain (daemon.shutdown_timeout_seconds) must finish, then ack and close, before
    # systemd's SIGKILL.
    drain = DaemonConfig().shutdown_timeout_seconds
    assert _timespan_seconds(_one(svc, "TimeoutStopSec")) >= drain + 5
    assert _one(svc, "ConfigurationDirectory") == "ingestd"
    assert _one(svc, "StateDirectory") in {"ingestd", "ingestd-%i"}
    assert _environment(svc)["PYTHONUNBUFFERED"] == "1"
    assert _section(unit, "Install")["WantedBy"] == ["multi-user.target"]


@UNITS
def test_unit_hands_passwords_over_as_credentials(unit: Path) -> None:
    svc = _section(unit, "Service")
    loaded = dict(item.split(":", 1) for item in svc["LoadCredential"])
    assert loaded == {
        "mqtt-password": "/etc/ingestd/credentials/mqtt-password",
        "db-password": "/etc/ingestd/credentials/db-password",
    }
    # A SetCredential= of the same id makes a missing file non-fatal (systemd.exec(5)).
    fallbacks = {item.split(":", 1)[0] for item in svc["SetCredential"]}
    assert fallbacks == set(loaded)


@UNITS
def test_unit_is_sandboxed(unit: Path) -> None:
    svc = _section(unit, "Service")
    required = {
        "DynamicUser": "yes",
        "PrivateUsers": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "NoNewPrivileges": "yes",
        "UMask": "0077",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectHostname": "yes",
        "ProtectClock": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectProc": "invisible",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallArchitectures": "native",
    }
    assert {key: svc.get(key, ["<unset>"])[-1] for key in required} == required
    assert svc["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]


def test_template_differs_from_the_single_unit_only_where_instances_must() -> None:
    """Hardening and lifecycle stay identical in both files; only the per-instance
    identity (state dir, client id, group, metrics port) differs."""

    def comparable(path: Path) -> list[tuple[str, str, str]]:
        per_instance = {"StateDirectory", "EnvironmentFile", "Conflicts", "Description"}
        return sorted(
            entry
            for entry in _unit_entries(path)
            if entry[1] not in per_instance
            and not (entry[1] == "Environment" and entry[2].startswith("INGESTD_"))
        )

    assert comparable(TEMPLATE) == comparable(UNIT)
    svc = _section(TEMPLATE, "Service")
    assert _one(svc, "StateDirectory") == "ingestd-%i"
    assert _one(svc, "EnvironmentFile") == "-/etc/ingestd/instance-%i.env"
    assert _section(TEMPLATE, "Unit")["Conflicts"] == ["ingestd.service"]
    assert "%i" in _one(_section(TEMPLATE, "Unit"), "Description")


def _clean_ingestd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("INGESTD_") or key in {"STATE_DIRECTORY", "CREDENTIALS_DIRECTORY"}:
            monkeypatch.delenv(key)


def _load_with_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str]) -> Config:
    _clean_ingestd_env(monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    empty = tmp_path / "empty.toml"  # never the host's /etc/ingestd/ingestd.toml
    empty.write_text("")
    return load_config(empty)


def test_template_instance_environment_is_a_valid_ingestd_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = {
        key: value.replace("%H", "edge-7").replace("%i", "11")
        for key, value in _environment(_section(TEMPLATE, "Service")).items()
        if key.startswith("INGESTD_")
    }
    config = _load_with_env(monkeypatch, tmp_path, env)
    assert config.mqtt.client_id == "ingestd-edge-7-11"
    assert config.mqtt.shared_group == "ingestd"
    assert config.subscriptions
    assert all(topic.startswith("$share/ingestd/") for topic in config.subscriptions)
    assert (config.metrics.host, config.metrics.port) == ("127.0.0.1", 9111)
    assert config.metrics.port != MetricsConfig().port  # clear of ingestd.service's port


def _analyzable_copy(unit: Path, directory: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists on this machine (verify
    rejects a missing binary); a template is verified as instance 11."""
    true = shutil.which("true")
    assert true is not None
    text = unit.read_text()
    assert f"ExecStart={VENV}/bin/ingestd " in text
    (directory / unit.name).write_text(text.replace(f"{VENV}/bin/ingestd", true))
    return directory / unit.name.replace("@.", "@11.")


def _systemd_analyze() -> str:
    binary = shutil.which("systemd-analyze")
    if binary is None:  # pragma: no cover - present wherever systemd is installed
        pytest.skip("systemd-analyze is not installed (the unit file checks above still ran)")
    return binary


@UNITS
def test_unit_passes_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [_systemd_analyze(), "verify", str(_analyzable_copy(unit, tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on unknown keys and bad values too: any output is a finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@UNITS
def test_unit_exposure_level_is_low(unit: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            _systemd_analyze(),
            "security",
            "--offline=yes",
            f"--threshold={int(MAX_EXPOSURE * 10)}",
            str(_analyzable_copy(unit, tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE
    assert result.returncode == 0, result.stderr


# ================================================================ docker-compose.yml, Dockerfile


def _load_yaml(text: str) -> Any:
    """PyYAML when importable; otherwise the small subset of YAML that docker-compose.yml
    keeps to (block mappings, sequences of scalars, JSON-style flow sequences, quoted and
    plain scalars; no anchors, no multi-line strings). The subset parser raises on
    anything else, so a richer compose file fails loudly here instead of passing unread."""
    if yaml is not None:
        return yaml.safe_load(text)
    lines: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        body = raw.lstrip(" ")
        if not body or body.startswith("#"):
            continue
        assert not body.startswith("\t"), f"docker-compose.yml:{number}: tab indentation"
        lines.append((len(raw) - len(body), _strip_yaml_comment(body)))
    value, end = _yaml_block(lines, 0)
    assert end == len(lines), f"unsupported YAML near {lines[end][1]!r}"
    return value


def _strip_yaml_comment(line: str) -> str:
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] == " "):
            return line[:i].rstrip()
    return line


def _yaml_block(lines: list[tuple[int, str]], i: int) -> tuple[Any, int]:
    indent = lines[i][0]
    if lines[i][1].startswith("- "):
        items = []
        while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
            items.append(_yaml_scalar(lines[i][1][2:].strip()))
            i += 1
        return items, i
    mapping: dict[str, Any] = {}
    while i < len(lines) and lines[i][0] == indent:
        key, sep, rest = lines[i][1].partition(":")
        assert sep, f"unsupported YAML: {lines[i][1]!r}"
        assert not rest or rest[0] == " ", f"unsupported YAML: {lines[i][1]!r}"
        i += 1
        if rest.strip():
            mapping[key] = _yaml_scalar(rest.strip())
        elif i < len(lines) and lines[i][0] > indent:
            mapping[key], i = _yaml_block(lines, i)
        else:
            mapping[key] = None
    return mapping, i


def _yaml_scalar(text: str) -> Any:
    if text.startswith(("[", '"')):
        return json.loads(text)
    if text.startswith("'"):
        assert text.endswith("'"), f"unsupported YAML scalar: {text!r}"
        return text[1:-1].replace("''", "'")
    assert not text.startswith(("&", "*", "{", "|", ">", "!")), f"unsupported YAML: {text!r}"
    lowered = text.lower()
    if lowered in {"true", "yes", "on", "false", "no", "off"}:  # YAML 1.1, as PyYAML reads
        return lowered in {"true", "yes", "on"}
    if lowered in {"null", "~"}:
        return None
    return int(text) if re.fullmatch(r"-?\d+", text) else text


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = _load_yaml(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _find_compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_file_passes_docker_compose_config(tmp_path: Path) -> None:
    cli = _find_compose_cli()
    if cli is None:  # pragma: no cover - depends on the machine
        pytest.skip("no docker compose CLI here (the structural compose checks still ran)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    result = subprocess.run(
        [*cli, "--project-directory", str(ROOT), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert (result.returncode, result.stderr.strip()) == (0, "")


def test_compose_has_every_service_in_dependency_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {
        "mosquitto", "timescaledb", "migrate", "ingestd", "prometheus", "grafana",
    }  # fmt: skip
    assert services["migrate"]["depends_on"] == {"timescaledb": {"condition": "service_healthy"}}
    assert services["ingestd"]["depends_on"] == {
        "migrate": {"condition": "service_completed_successfully"},
        "mosquitto": {"condition": "service_started"},
    }
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["command"] == ["migrate"]
    assert services["ingestd"]["command"] == ["run"]
    for name in ("migrate", "ingestd"):
        assert services[name]["build"] == "."
        assert services[name]["image"] == services["ingestd"]["image"]
    db = services["timescaledb"]
    assert re.fullmatch(r"timescale/timescaledb:latest-pg1[5-9]", db["image"])
    assert db["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert "127.0.0.1" in db["healthcheck"]["test"]  # TCP: not the init-time socket server
    assert db["environment"]["TIMESCALEDB_TELEMETRY"] == "off"  # a string, not YAML false
    assert "/var/lib/postgresql/data" in [v.split(":")[1] for v in db["volumes"]]


def test_compose_passwords_come_from_the_secret_file(compose: dict[str, Any]) -> None:
    assert compose["secrets"] == {"db_password": {"file": "./deploy/secrets/db-password.txt"}}
    services = compose["services"]
    assert services["timescaledb"]["environment"]["POSTGRES_PASSWORD_FILE"] == (
        "/run/secrets/db_password"
    )
    for name in ("timescaledb", "migrate", "ingestd"):
        assert services[name]["secrets"] == ["db_password"]
        assert "POSTGRES_PASSWORD" not in services[name].get("environment", {})
    for name in ("migrate", "ingestd"):
        env = services[name]["environment"]
        assert env["INGESTD_DATABASE__PASSWORD_FILE"] == "/run/secrets/db_password"
        assert "@" in env["INGESTD_DATABASE__URL"]
        assert ":" not in env["INGESTD_DATABASE__URL"].split("//")[1].split("@")[0]


def test_compose_mosquitto_persists_where_the_shipped_config_says(
    compose: dict[str, Any],
) -> None:
    broker = compose["services"]["mosquitto"]
    assert broker["image"] == "eclipse-mosquitto:2"
    conf_in_image = "/mosquitto/config/mosquitto.conf"
    assert f"./mosquitto/mosquitto.conf:{conf_in_image}:ro" in broker["volumes"]
    location = mosquitto_settings(MOSQUITTO_CONF.read_text())["persistence_location"][0]
    location = location.rstrip("/")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in broker["volumes"]}
    assert mounts.get(location) in compose["volumes"], "no named volume at the snapshot dir"
    # The image only chowns /mosquitto; the broker drops to `mosquitto` before saving.
    script = broker["command"][-1]
    assert f"chown mosquitto:mosquitto {location}" in script
    assert script.endswith(f"exec /usr/sbin/mosquitto -c {conf_in_image}")


def _dockerfile_instructions() -> list[tuple[str, str]]:
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in _dockerfile_instructions():
        if keyword == "ENV":
            for assignment in shlex.split(args):
                key, _, value = assignment.partition("=")
                env[key] = value
    return env


def test_compose_ingestd_environment_is_a_valid_ingestd_config(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The image's ENV, overridden by the compose environment, through the real loader."""
    service = compose["services"]["ingestd"]
    secret = tmp_path / "db_password"
    secret.write_text("s3cret\n")
    env = {k: v for k, v in _dockerfile_env().items() if k.startswith("INGESTD_")}
    env.update(service["environment"])
    assert env["INGESTD_DATABASE__PASSWORD_FILE"] == "/run/secrets/db_password"
    env["INGESTD_DATABASE__PASSWORD_FILE"] = str(secret)
    config = _load_with_env(monkeypatch, tmp_path, env)
    assert (config.mqtt.host, config.mqtt.port) == ("mosquitto", 1883)
    assert config.mqtt.client_id == "ingestd-compose"  # not the container's hostname
    assert config.database_url == "postgresql://ingestd:s3cret@timescaledb:5432/ingestd"
    assert (config.metrics.host, config.metrics.port) == ("0.0.0.0", 9108)
    assert f"127.0.0.1:{config.metrics.port}:{config.metrics.port}" in service["ports"]
    assert "/readyz" in service["healthcheck"]["test"][-1]
    assert str(config.metrics.port) in service["healthcheck"]["test"][-1]
    # The spool lives in the state dir, which must be a volume.
    state_mounts = [v for v in service["volumes"] if v.split(":")[1] == str(config.state_dir)]
    assert state_mounts, f"no volume at the state dir {config.state_dir}"
    assert state_mounts[0].split(":")[0] in compose["volumes"]
    drain = DaemonConfig().shutdown_timeout_seconds
    assert _timespan_seconds(service["stop_grace_period"]) >= drain + 5


def test_dockerfile_installs_the_distribution_into_a_non_root_image() -> None:
    instructions = _dockerfile_instructions()
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert froms
    assert all(args.split()[0] == "python:3.11-slim" for args in froms)
    pyproject = tomllib.loads(PYPROJECT.read_text())
    packages = [
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    copied = {
        src
        for keyword, args in instructions
        if keyword == "COPY" and not args.startswith("--from")
        for src in args.split()[:-1]
    }
    missing = {*packages, "pyproject.toml", pyproject["project"]["readme"]} - copied
    assert not missing, f"the image build would miss {missing}"
    assert any(k == "RUN" and f"{VENV}/bin/pip install" in a for k, a in instructions)
    final_stage = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    users = [args for keyword, args in final_stage if keyword == "USER"]
    assert users
    assert users[-1] not in {"root", "0"}
    assert ("ENTRYPOINT", '["ingestd"]') in final_stage
    assert ("CMD", '["run"]') in final_stage
    env = _dockerfile_env()
    assert env["PATH"].startswith(f"{VENV}/bin:")
    assert ("VOLUME", f'["{env["INGESTD_DAEMON__STATE_DIR"]}"]') in final_stage
    assert ("EXPOSE", env["INGESTD_METRICS__LISTEN"].rpartition(":")[2]) in final_stage
