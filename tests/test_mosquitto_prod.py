"""mosquitto/mosquitto.prod.conf and mosquitto/acl work as shipped (mosquitto 2.0).

scripts/dev-certs.sh makes a CA, certificates and passwords in a temp dir; mosquitto runs the
shipped config with only its ports and paths rewritten (see ``_prod_config``). The tests show
that nobody gets in without a password, that a device writes only its own topics and reads
nothing, and that the real ``ingestd run`` connects over TLS as ``ingestd`` (shared
subscription included) and stores exactly what the devices published.
"""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from daemon.config import MqttConfig
from tests.harness.daemon import Daemon
from tests.harness.mosquitto_conf import duration_seconds
from tests.harness.mosquitto_conf import settings as mosquitto_settings
from tests.harness.servers import Mosquitto, free_port, unique_name, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (shutil.which("openssl") and shutil.which("mosquitto_passwd")),
        reason="scripts/dev-certs.sh needs openssl and mosquitto_passwd (apt-get install "
        "openssl mosquitto)",
    ),
]

ROOT = Path(__file__).resolve().parents[1]
PROD_CONF = ROOT / "mosquitto" / "mosquitto.prod.conf"
DEV_CONF = ROOT / "mosquitto" / "mosquitto.conf"
ACL = ROOT / "mosquitto" / "acl"
DEV_CERTS = ROOT / "scripts" / "dev-certs.sh"

NOT_AUTHORIZED = 0x87
FLOW_CONTROL = (
    "persistence",
    "autosave_interval",
    "autosave_on_changes",
    "persistent_client_expiration",
    "max_inflight_messages",
    "max_inflight_bytes",
    "max_queued_messages",
    "max_queued_bytes",
    "max_packet_size",
    "max_keepalive",
)


# ------------------------------------------------------------------------------ fixtures


class Certs:
    """What scripts/dev-certs.sh created: CA, server certificate, passwd, password files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ca = path / "ca.crt"
        self.passwd = path / "passwd"

    def password_file(self, account: str) -> Path:
        return self.path / f"{account}.password"

    def password(self, account: str) -> str:
        return self.password_file(account).read_text().strip()


def _run_dev_certs(target: Path) -> str:
    result = subprocess.run(
        [str(DEV_CERTS), str(target)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"dev-certs.sh failed:\n{result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """The script's output, made once for the module (RSA keys take a moment)."""
    certs = Certs(tmp_path_factory.mktemp("prod") / "certs")
    _run_dev_certs(certs.path)
    return certs


def _prod_config(certs: Certs, acl: Path, plain_port: int) -> Callable[[Mosquitto], str]:
    """The shipped text with its ports and Debian paths moved to the test's, nothing else."""

    def render(broker: Mosquitto) -> str:
        text = PROD_CONF.read_text()
        rewrites = [
            (r"^listener 8883$", f"listener {broker.port} 127.0.0.1", 1),
            (r"^listener 1883 127\.0\.0\.1$", f"listener {plain_port} 127.0.0.1", 1),
            (r"^(cafile|certfile|keyfile) /etc/mosquitto/certs/", rf"\1 {certs.path}/", 3),
            (r"^password_file /etc/mosquitto/passwd$", f"password_file {certs.passwd}", 1),
            (r"^acl_file /etc/mosquitto/acl$", f"acl_file {acl}", 1),
            (r"^persistence_location /var/lib/mosquitto/$",
             f"persistence_location {broker.state_dir}/", 1),
        ]  # fmt: skip
        for pattern, replacement, expected in rewrites:
            text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
            assert count == expected, f"mosquitto.prod.conf changed shape at {pattern!r}"
        return text

    return render


class ProdBroker:
    """mosquitto on the shipped production config: a TLS port and a loopback plain port."""

    def __init__(self, broker: Mosquitto, plain_port: int, certs: Certs) -> None:
        self.broker = broker
        self.tls_port = broker.port
        self.plain_port = plain_port
        self.certs = certs


@pytest.fixture(scope="module")
def prod(generated: Certs) -> Iterator[ProdBroker]:
    workdir = generated.path.parent / "broker"
    workdir.mkdir()
    acl = workdir / "acl"  # a copy the broker's user can read wherever the checkout lives
    shutil.copyfile(ACL, acl)
    acl.chmod(0o644)
    plain_port = free_port()
    with Mosquitto(workdir, config=_prod_config(generated, acl, plain_port)) as broker:
        wait_until(lambda: f"listen socket on port {plain_port}" in broker.log_text(), 5)
        yield ProdBroker(broker, plain_port, generated)


class Client:
    """A paho client (MQTT v5 unless told) that records CONNACK, SUBACK and PUBACK reason
    codes and every message it receives."""

    def __init__(
        self,
        prod: ProdBroker,
        username: str | None,
        password: str | None = None,
        *,
        tls: bool = True,
        protocol: MQTTProtocolVersion = mqtt.MQTTv5,
    ) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=unique_name(f"{username}-"), protocol=protocol
        )
        if tls:
            self.client.tls_set(ca_certs=str(prod.certs.ca))
        if username is not None:
            if password is None:
                password = prod.certs.password(username)
            self.client.username_pw_set(username, password)
        self.port = prod.tls_port if tls else prod.plain_port
        self.connack: ReasonCode | None = None
        self.messages: list[tuple[str, bytes]] = []
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.pubacks: dict[int, ReasonCode] = {}
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self.connack = reason
        self._connected.set()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: list[ReasonCode], _p: Any) -> None:
        with self._lock:
            self.subacks[mid] = codes

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        with self._lock:
            self.pubacks[mid] = reason

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def connect(self) -> ReasonCode:
        """Connect and return the CONNACK's reason code (the connection is closed when it
        was refused, so paho does not retry)."""
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(10), "no CONNACK"
        assert self.connack is not None
        if self.connack.is_failure:
            self.close()
        return self.connack

    def subscribe(self, *filters: str) -> list[ReasonCode]:
        _, mid = self.client.subscribe([(f, 1) for f in filters])
        assert mid is not None
        wait_until(lambda: mid in self.subacks, 10, message="no SUBACK")
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK's reason code (always success on 3.1.1)."""
        mid = self.client.publish(topic, payload, qos=1, retain=retain).mid
        wait_until(lambda: mid in self.pubacks, 10, message=f"no PUBACK: {topic}")
        return self.pubacks[mid]

    def received(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def connect(prod: ProdBroker, username: str | None, *args: Any, **kwargs: Any) -> Client:
        client = Client(prod, username, *args, **kwargs)
        made.append(client)
        reason = client.connect()
        assert not reason.is_failure, f"{username} refused: {reason}"
        return client

    yield connect
    for client in made:
        client.close()


def _reading(value: float, second: int = 0) -> bytes:
    """A JSON reading; (device, sensor, ts) is the unique key, so vary ``second`` per sensor."""
    ts = f"2026-11-27T07:30:{second:02d}Z"
    return json.dumps({"value": value, "ts": ts, "unit": "degC"}).encode()


# ------------------------------------------------------------------ the files themselves


@pytest.mark.timeout(10)
def test_prod_config_keeps_the_ack_after_commit_sizing() -> None:
    prod, dev = mosquitto_settings(PROD_CONF.read_text()), mosquitto_settings(DEV_CONF.read_text())
    window = MqttConfig().max_inflight
    assert {k: prod.get(k) for k in FLOW_CONTROL} == {k: dev.get(k) for k in FLOW_CONTROL}
    assert prod["max_inflight_messages"] == [str(window)]  # ingestd's window, not the stock 20
    assert int(prod["max_queued_messages"][0]) >= 100 * window
    assert int(prod["max_queued_bytes"][0]) > 0  # bounded broker memory
    assert prod["persistence"] == ["true"]
    assert 0 < int(prod["autosave_interval"][0]) <= 30
    expiry = duration_seconds(prod["persistent_client_expiration"][0])
    assert expiry >= MqttConfig().session_expiry_seconds
    assert prod["persistence_location"] == ["/var/lib/mosquitto/"]
    assert "message_size_limit" not in prod  # acks, then drops: no dead letter


@pytest.mark.timeout(10)
def test_prod_config_requires_tls_passwords_and_the_acl() -> None:
    s = mosquitto_settings(PROD_CONF.read_text())
    assert s["allow_anonymous"] == ["false"]
    assert s["password_file"] == ["/etc/mosquitto/passwd"]
    assert s["acl_file"] == ["/etc/mosquitto/acl"]
    assert s["listener"] == ["8883", "1883 127.0.0.1"]  # plain MQTT on loopback only
    assert s["cafile"] == ["/etc/mosquitto/certs/ca.crt"]
    assert s["certfile"] == ["/etc/mosquitto/certs/server.crt"]
    assert s["keyfile"] == ["/etc/mosquitto/certs/server.key"]
    assert s.get("per_listener_settings", ["false"]) == ["false"]  # auth covers both listeners
    assert s["log_dest"] == ["stderr"]


@pytest.mark.timeout(10)
def test_every_prod_setting_and_acl_line_has_a_why_comment() -> None:
    for path in (PROD_CONF, ACL):
        previous = "blank"
        for number, raw in enumerate(path.read_text().splitlines(), start=1):
            line = raw.strip()
            kind = "blank" if not line else "comment" if line.startswith("#") else "setting"
            if kind == "setting":
                assert previous != "blank", f"{path.name}:{number}: {line!r} has no comment"
            previous = kind


@pytest.mark.timeout(10)
def test_acl_confines_every_pattern_to_the_devices_own_topics() -> None:
    """`pattern` lines apply to every account: each must stay inside the user's own %u."""
    lines = [ln.split() for ln in ACL.read_text().splitlines() if ln and not ln.startswith("#")]
    patterns = [ln for ln in lines if ln[0] == "pattern"]
    assert ["pattern", "write", "sensors/%u/#"] in patterns
    for line in patterns:
        topic = line[-1]
        assert "%u" in topic, line
        assert "#" not in topic.split("%u")[0], line  # no wildcard ahead of the device id
    assert lines[-6:] == [
        ["user", "ingestd"],
        ["topic", "read", "sensors/#"],
        ["topic", "read", "spBv1.0/#"],
        ["topic", "write", "ingestd/#"],
        ["topic", "write", "spBv1.0/STATE/ingestd"],  # sparkplug.host_id's default
        ["topic", "write", "spBv1.0/+/NCMD/+"],  # rebirth requests
    ]


@pytest.mark.timeout(60)
def test_dev_certs_script_is_idempotent_and_says_how_to_use_it(tmp_path: Path) -> None:
    first = _run_dev_certs(tmp_path / "certs")
    assert "created" in first
    assert "INGESTD_MQTT__PASSWORD_FILE" in first
    files = {p.name: p.read_bytes() for p in (tmp_path / "certs").iterdir()}
    assert {"ca.crt", "server.crt", "server.key", "passwd", "ingestd.password"} <= set(files)
    san = subprocess.run(
        ["openssl", "x509", "-in", str(tmp_path / "certs" / "server.crt"), "-noout", "-ext",
         "subjectAltName"], capture_output=True, text=True, check=True, timeout=10,
    ).stdout  # fmt: skip
    assert "DNS:localhost" in san
    assert "IP Address:127.0.0.1" in san
    accounts = [line.split(":")[0] for line in files["passwd"].decode().splitlines()]
    assert accounts == ["ingestd", "dev-001", "dev-002", "dev-003"]
    assert (tmp_path / "certs" / "server.key").stat().st_mode & 0o007 == 0  # not world-readable

    again = _run_dev_certs(tmp_path / "certs")
    assert "everything already present" in again
    assert {p.name: p.read_bytes() for p in (tmp_path / "certs").iterdir()} == files


# ------------------------------------------------------------------------- the broker


@pytest.mark.timeout(30)
def test_broker_starts_cleanly_on_the_prod_config(prod: ProdBroker) -> None:
    # Up to "running": the harness's readiness probe (a bare TCP connect to the TLS port)
    # later logs a failed TLS handshake, which is not about the config.
    log, running, _ = prod.broker.log_text().partition(" running")
    assert running, prod.broker.log_text()
    assert "mosquitto version 2." in log
    assert f"listen socket on port {prod.tls_port}" in log
    assert f"listen socket on port {prod.plain_port}" in log
    problems = [line for line in log.splitlines() if re.search(r"error|warning", line, re.I)]
    assert not problems, "mosquitto complained about the prod config:\n" + "\n".join(problems)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "loopback-plain"])
@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311], ids=["v5", "v311"])
def test_anonymous_clients_are_refused(
    prod: ProdBroker,
    clients: Callable[..., Client],
    tls: bool,
    protocol: MQTTProtocolVersion,
) -> None:
    reason = Client(prod, None, tls=tls, protocol=protocol).connect()
    assert reason == "Not authorized", reason
    # The same listener lets a device with its password in.
    clients(prod, "dev-001", tls=tls, protocol=protocol)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("username", "password"),
    [("dev-001", "not-the-password"), ("dev-404", "whatever"), ("ingestd", None)],
    ids=["wrong-password", "unknown-user", "someone-elses-password"],
)
def test_wrong_credentials_are_refused(
    prod: ProdBroker, username: str, password: str | None
) -> None:
    password = password or prod.certs.password("dev-001")
    reason = Client(prod, username, password).connect()
    assert reason.is_failure, reason
    assert reason in ("Not authorized", "Bad user name or password"), reason


@pytest.mark.timeout(30)
def test_a_device_cannot_publish_as_another_device(
    prod: ProdBroker, clients: Callable[..., Client]
) -> None:
    sensor = unique_name("s")
    ingestd = clients(prod, "ingestd")
    ingestd.subscribe("sensors/#", "spBv1.0/#")
    dev1 = clients(prod, "dev-001")
    forbidden = [
        f"sensors/dev-002/{sensor}",
        f"spBv1.0/plant/DDATA/dev-002/{sensor}",
        "spBv1.0/plant/NCMD/dev-001",  # commands come from a host, not from the node
        "ingestd/status",
    ]
    allowed = [
        f"sensors/dev-001/{sensor}",
        "spBv1.0/plant/NDATA/dev-001",
        f"spBv1.0/plant/DDATA/dev-001/{sensor}",
    ]
    # Forbidden first: one publisher's messages reach a subscriber in order, so once the
    # allowed ones are in, a forbidden one that got through would be in too.
    assert [dev1.publish(t, _reading(1)) for t in forbidden] == [NOT_AUTHORIZED] * 4
    assert [dev1.publish(t, _reading(2)) for t in allowed] == ["Success"] * 3
    # MQTT 3.1.1 has no reason codes: the device gets a plain PUBACK, the message is dropped.
    old = clients(prod, "dev-001", protocol=mqtt.MQTTv311)
    old.publish(f"sensors/dev-002/{sensor}", _reading(3))
    old.publish(f"sensors/dev-001/{sensor}", _reading(4))
    expected = [*allowed, f"sensors/dev-001/{sensor}"]
    wait_until(lambda: len(ingestd.received()) >= len(expected), 10)
    assert [topic for topic, _ in ingestd.received()] == expected


@pytest.mark.timeout(30)
def test_a_device_reads_neither_other_devices_nor_ingestd(
    prod: ProdBroker, clients: Callable[..., Client]
) -> None:
    sensor = unique_name("s")
    ingestd = clients(prod, "ingestd")
    # ingestd's own account may write its events, retained status included.
    # (v5 PUBACK 0x10 "No matching subscribers" is a success: nobody may read these yet.)
    for topic, retain in (
        (f"ingestd/processed/dev-001/{sensor}", False),
        (f"ingestd/t/{sensor}", True),
    ):
        reason = ingestd.publish(topic, b"online", retain=retain)
        assert not reason.is_failure, f"{topic}: {reason}"
    ingestd.subscribe("$share/ingestd/sensors/+/+")
    spy = clients(prod, "dev-002")
    # mosquitto 2.0.11 grants these SUBACKs and filters each message on delivery instead.
    spy.subscribe("sensors/#", "sensors/dev-001/#", "$share/spies/sensors/#", "ingestd/#", "#")
    dev1 = clients(prod, "dev-001")
    assert dev1.publish(f"sensors/dev-001/{sensor}", _reading(5)) == "Success"
    wait_until(ingestd.received, 10, message="ingestd got nothing")
    assert ingestd.received() == [(f"sensors/dev-001/{sensor}", _reading(5))]
    # The broker fanned that message out before ingestd got it; a PUBACK to the spy queued
    # after it proves nothing was on its way to the spy either (one ordered connection).
    assert not spy.publish(f"sensors/dev-002/{sensor}", _reading(6)).is_failure
    assert spy.received() == []


@pytest.mark.timeout(30)
def test_ingestd_writes_its_sparkplug_state_and_rebirth_requests_only(
    prod: ProdBroker, clients: Callable[..., Client]
) -> None:
    ingestd = clients(prod, "ingestd")
    node = clients(prod, "dev-001")  # an edge node: its account is its edge node id
    node.subscribe("spBv1.0/+/NCMD/dev-001", "spBv1.0/+/DCMD/dev-001/+")
    forbidden = [
        "spBv1.0/STATE/other-host",  # another host's STATE
        "spBv1.0/plant/DCMD/dev-001/press",  # device commands: not ingestd's
        "spBv1.0/plant/NDATA/dev-001",  # speaking for an edge node
        "spBv1.0/plant/NCMD/dev-001/extra",  # NCMD has no device level
    ]
    assert [ingestd.publish(t, b"x") for t in forbidden] == [NOT_AUTHORIZED] * 4
    for topic, retain in (
        ("spBv1.0/STATE/ingestd", True),  # its STATE, retained as the spec wants
        ("spBv1.0/plant/NCMD/dev-001", False),
    ):
        reason = ingestd.publish(topic, b"x", retain=retain)
        assert not reason.is_failure, f"{topic}: {reason}"
    wait_until(node.received, 10, message="the edge node got no command")
    assert node.received() == [("spBv1.0/plant/NCMD/dev-001", b"x")]
    ingestd.publish("spBv1.0/STATE/ingestd", b"", retain=True)  # clear the retained STATE


# -------------------------------------------------------------------- ingestd itself


@pytest.mark.timeout(60)
def test_ingestd_connects_over_tls_and_stores_what_devices_send(
    prod: ProdBroker, clients: Callable[..., Client], tmp_path: Path
) -> None:
    db = tmp_path / "ingestd.db"
    daemon = Daemon(
        tmp_path / "daemon",
        {
            "INGESTD_MQTT__URL": f"mqtts://127.0.0.1:{prod.tls_port}",
            "INGESTD_MQTT__TLS__CA_FILE": str(prod.certs.ca),
            "INGESTD_MQTT__USERNAME": "ingestd",
            "INGESTD_MQTT__PASSWORD_FILE": str(prod.certs.password_file("ingestd")),
            "INGESTD_MQTT__SHARED_GROUP": "ingestd",
            "INGESTD_MQTT__CLIENT_ID": unique_name("ingestd-prod-"),
            "INGESTD_DATABASE__URL": f"sqlite:///{db}",
            "INGESTD_DAEMON__SHUTDOWN_TIMEOUT_SECONDS": "8",
        },
    )
    try:
        daemon.start()  # waits for /readyz: connected and subscribed over TLS
        sensor = unique_name("s")
        dev1, dev2 = clients(prod, "dev-001"), clients(prod, "dev-002")
        assert dev1.publish(f"sensors/dev-002/{sensor}", _reading(666.0)) == NOT_AUTHORIZED
        expected = set()
        for i in range(5):
            for device, client in (("dev-001", dev1), ("dev-002", dev2)):
                value = float(i * 10 + int(device[-1]))
                assert client.publish(f"sensors/{device}/{sensor}", _reading(value, i)) == "Success"
                expected.add((device, sensor, value))

        def settled() -> bool:
            m = daemon.metrics()
            return (
                m.get("ingestd_readings_stored_total", 0) >= len(expected)
                and m.get("ingestd_inflight_messages", 1) == 0
            )

        wait_until(settled, 20, message=lambda: f"not stored:\n{daemon.log_text()[-3000:]}")
        with sqlite3.connect(db) as conn:
            rows = set(conn.execute("SELECT device_id, sensor_id, value FROM sensor_readings"))
            rejected = conn.execute("SELECT count(*) FROM rejected_messages").fetchone()[0]
        assert rows == expected
        assert rejected == 0
        assert daemon.metric("ingestd_messages_received_total") == len(expected)
        assert daemon.metric('ingestd_mqtt_connects_total{connection="main"}') == 1
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
    finally:
        daemon.stop()


@pytest.mark.timeout(10)
@pytest.mark.skipif(os.geteuid() != 0, reason="only root's broker drops to the mosquitto user")
def test_script_lets_the_broker_user_read_the_key_and_password_file(generated: Certs) -> None:
    """mosquitto 2.0 started as root drops to `mosquitto` before it loads the server key and
    the password file: the script gives that group read access, and nobody else."""
    for name in ("server.key", "passwd"):
        st = (generated.path / name).stat()
        assert grp.getgrgid(st.st_gid).gr_name == "mosquitto", name
        assert stat.S_IMODE(st.st_mode) == 0o640, f"{name}: {stat.S_IMODE(st.st_mode):o}"
