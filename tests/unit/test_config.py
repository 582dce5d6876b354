"""daemon.config: contract defaults, TOML + INGESTD_* env, unknown keys, secrets, masking."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import get_args

import pytest
from pydantic import ValidationError

from agents.formats import DECODERS
from daemon import config as config_module
from daemon.config import (
    MASK,
    Config,
    ConfigError,
    Format,
    SourceConfig,
    load_config,
    mask_url,
    masked,
)
from edge.errors import IngestdError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No INGESTD_* / systemd variables, no /etc/ingestd/ingestd.toml, cwd in a tmp dir."""
    for name in list(os.environ):
        if name.upper().startswith("INGESTD_"):
            monkeypatch.delenv(name)
    for name in ("STATE_DIRECTORY", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_FILE", tmp_path / "etc" / "ingestd.toml")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def toml(tmp_path: Path, text: str, name: str = "ingestd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(*args: object, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


# ------------------------------------------------------------------------------ defaults


def test_contract_defaults(clean_env: Path) -> None:
    config = load_config()
    assert config.mqtt.url == "mqtt://127.0.0.1:1883"
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.use_tls) == ("127.0.0.1", 1883, False)
    assert config.mqtt.client_id == f"ingestd-{socket.gethostname()}"
    assert config.mqtt.shared_group is None
    assert config.mqtt.username is None
    assert config.mqtt.password is None
    assert config.metrics.listen == "127.0.0.1:9108"
    assert (config.metrics.host, config.metrics.port) == ("127.0.0.1", 9108)
    assert config.database.url is None
    assert config.state_dir == Path("var")
    assert config.database_url == f"sqlite:///{clean_env / 'var' / 'ingestd.db'}"
    assert config.subscriptions == ["sensors/+/+"]
    (source,) = config.ingest.sources
    assert (source.topic, source.format, source.template) == (
        "sensors/+/+", "json", "sensors/{device_id}/{sensor_id}",
    )  # fmt: skip
    assert config.ingest.max_payload_bytes == 64 * 1024
    assert config.publish.prefix == "ingestd"
    assert (config.publish.processed_qos, config.publish.failed_qos) == (0, 1)


def test_memory_budget_defaults() -> None:
    config = load_config()
    assert config.mqtt.max_inflight == 4000
    assert config.mqtt.max_inflight_bytes == 16 * 1024 * 1024
    assert config.ingest.max_inflight_readings == 50_000
    assert config.publish.max_queued_bytes == 8 * 1024 * 1024
    assert config.database.batch_size == 1000


def test_memory_budgets_from_file_and_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = toml(
        tmp_path,
        "[mqtt]\nmax_inflight_bytes = 2048\n[ingest]\nmax_inflight_readings = 7\n"
        "[publish]\nmax_queued_bytes = 4096\n",
    )
    from_file = load_config(path)
    assert from_file.mqtt.max_inflight_bytes == 2048
    assert from_file.ingest.max_inflight_readings == 7
    assert from_file.publish.max_queued_bytes == 4096
    monkeypatch.setenv("INGESTD_MQTT__MAX_INFLIGHT_BYTES", "1048576")
    monkeypatch.setenv("INGESTD_INGEST__MAX_INFLIGHT_READINGS", "500")
    monkeypatch.setenv("INGESTD_PUBLISH__MAX_QUEUED_BYTES", "65536")
    config = load_config(path)
    assert config.mqtt.max_inflight_bytes == 1 << 20
    assert config.ingest.max_inflight_readings == 500
    assert config.publish.max_queued_bytes == 1 << 16


def test_state_directory_from_systemd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/state:{tmp_path}/other")
    config = load_config()
    assert config.state_dir == tmp_path / "state"  # the first of several
    assert config.database_url == f"sqlite:///{tmp_path}/state/ingestd.db"


def test_explicit_state_dir_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/ingestd")
    monkeypatch.setenv("INGESTD_DAEMON__STATE_DIR", str(tmp_path / "mine"))
    assert load_config().database_url == f"sqlite:///{tmp_path}/mine/ingestd.db"


def test_mqtts_defaults_to_port_8883() -> None:
    config = load_config(mqtt={"url": "mqtts://broker.example"})
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.use_tls) == (
        "broker.example",
        8883,
        True,
    )


def test_default_config_file_is_used_when_present(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    toml(etc, '[mqtt]\nurl = "mqtt://from-etc:1884"\n')
    assert load_config().mqtt.url == "mqtt://from-etc:1884"


# ------------------------------------------------------------------------------ file + env


def test_toml_file_overridden_by_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = toml(
        tmp_path,
        """
[mqtt]
url = "mqtt://file-broker:1884"
username = "plant"
max_inflight = 200

[database]
url = "sqlite:///file.db"
batch_size = 10

[metrics]
listen = "0.0.0.0:9200"

[[ingest.sources]]
topic = "plant/+/+/+"
template = "plant/{site}/{device_id}/{sensor_id}"

[[ingest.sources]]
topic = "raw/+/+"
format = "value"
template = "raw/{device_id}/{sensor_id}"
""",
    )
    from_file = load_config(path)
    assert from_file.mqtt.url == "mqtt://file-broker:1884"
    assert from_file.database_url == "sqlite:///file.db"
    assert from_file.subscriptions == ["plant/+/+/+", "raw/+/+"]
    assert from_file.ingest.sources[1].format == "value"

    monkeypatch.setenv("INGESTD_MQTT__URL", "mqtt://env-broker:1885")
    monkeypatch.setenv("INGESTD_MQTT__SHARED_GROUP", "ingestd")
    monkeypatch.setenv("INGESTD_DATABASE__URL", "postgresql://ingest@db.example:5432/plant")
    config = load_config(path)
    assert config.mqtt.url == "mqtt://env-broker:1885"
    assert (config.mqtt.host, config.mqtt.port) == ("env-broker", 1885)
    # The rest of the file's sections survive a per-key environment override.
    assert config.mqtt.username == "plant"
    assert config.mqtt.max_inflight == 200
    assert config.database.batch_size == 10
    assert config.database_url == "postgresql://ingest@db.example:5432/plant"
    assert config.metrics.port == 9200
    assert config.subscriptions == ["$share/ingestd/plant/+/+/+", "$share/ingestd/raw/+/+"]


def test_shared_group_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGESTD_MQTT__SHARED_GROUP", "line7")
    assert load_config().subscriptions == ["$share/line7/sensors/+/+"]


def test_nested_tls_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("ca")
    (tmp_path / "c.pem").write_text("cert")
    monkeypatch.setenv("INGESTD_MQTT__URL", "mqtts://broker:8883")
    monkeypatch.setenv("INGESTD_MQTT__TLS__CA_FILE", str(tmp_path / "ca.pem"))
    monkeypatch.setenv("INGESTD_MQTT__TLS__CERT_FILE", str(tmp_path / "c.pem"))
    config = load_config()
    assert config.mqtt.tls.ca_file == tmp_path / "ca.pem"
    assert config.mqtt.tls.cert_file == tmp_path / "c.pem"
    assert config.mqtt.tls.key_file is None


def test_sources_as_json_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    sources = [{"topic": "a/+/+", "format": "value", "template": "a/{device_id}/{sensor_id}"}]
    monkeypatch.setenv("INGESTD_INGEST__SOURCES", json.dumps(sources))
    assert load_config().ingest.sources[0].format == "value"


def test_empty_database_url_means_the_default(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    monkeypatch.setenv("INGESTD_DATABASE__URL", "")
    assert load_config().database_url == f"sqlite:///{clean_env / 'var' / 'ingestd.db'}"


def test_overrides_beat_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGESTD_MQTT__URL", "mqtt://env:1")
    assert load_config(mqtt={"url": "mqtt://override:2"}).mqtt.url == "mqtt://override:2"


# ------------------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize(
    ("text", "key"),
    [("nope = 1\n", "nope"), ("[nope]\nx = 1\n", "nope"),
     ('[mqtt]\nurl = "mqtt://h:1"\nurll = "typo"\n', "mqtt.urll"),
     ("[database]\nbatchsize = 5\n", "database.batchsize"),
     ('[mqtt.tls]\nca = "/x"\n', "mqtt.tls.ca"),
     ('[[ingest.sources]]\ntopic = "a/+/+"\nformat = "json"\nfmt = "x"\n', "ingest.sources.0.fmt")],
)  # fmt: skip
def test_unknown_keys_in_the_file_are_errors(tmp_path: Path, text: str, key: str) -> None:
    message = config_error(toml(tmp_path, text))
    assert f"{key}: unknown key" in message
    assert str(tmp_path / "ingestd.toml") in message


@pytest.mark.parametrize(
    ("name", "key"),
    [("INGESTD_MQTT__NOPE", "mqtt.nope"), ("INGESTD_MQTT__TLS__NOPE", "mqtt.tls.nope"),
     ("INGESTD_DATABASE__URLL", "database.urll")],
)  # fmt: skip
def test_unknown_env_keys_inside_sections_are_errors(
    monkeypatch: pytest.MonkeyPatch, name: str, key: str
) -> None:
    monkeypatch.setenv(name, "1")
    assert f"{key}: unknown key" in config_error()


@pytest.mark.parametrize("name", ["INGESTD_NOPE", "INGESTD_MQTT_URL"])
def test_unknown_top_level_env_var_is_an_error(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "1")
    with pytest.raises(ConfigError):
        load_config()


# ------------------------------------------------------------------------------ invalid values


@pytest.mark.parametrize(
    ("name", "value", "key"),
    [("INGESTD_MQTT__URL", "http://broker:1883", "mqtt.url"),
     ("INGESTD_MQTT__URL", "mqtt://broker:99999", "mqtt.url"),
     ("INGESTD_MQTT__URL", "mqtt://", "mqtt.url"),
     ("INGESTD_MQTT__MAX_INFLIGHT", "0", "mqtt.max_inflight"),
     ("INGESTD_MQTT__MAX_INFLIGHT", "many", "mqtt.max_inflight"),
     ("INGESTD_MQTT__PROTOCOL", "4", "mqtt.protocol"),
     ("INGESTD_MQTT__SUBSCRIBE_QOS", "2", "mqtt.subscribe_qos"),
     ("INGESTD_MQTT__SHARED_GROUP", "a/b", "mqtt.shared_group"),
     ("INGESTD_MQTT__SHARED_GROUP", "a+", "mqtt.shared_group"),
     ("INGESTD_METRICS__LISTEN", "9108", "metrics.listen"),
     ("INGESTD_METRICS__LISTEN", "host:http", "metrics.listen"),
     ("INGESTD_METRICS__LISTEN", "host:70000", "metrics.listen"),
     ("INGESTD_DATABASE__URL", "mysql://db/x", "database.url"),
     ("INGESTD_DATABASE__URL", "sqlite://relative.db", "database.url"),
     ("INGESTD_DATABASE__BATCH_SIZE", "0", "database.batch_size"),
     ("INGESTD_MQTT__MAX_INFLIGHT_BYTES", "1023", "mqtt.max_inflight_bytes"),
     ("INGESTD_INGEST__MAX_INFLIGHT_READINGS", "0", "ingest.max_inflight_readings"),
     ("INGESTD_PUBLISH__MAX_QUEUED_BYTES", "lots", "publish.max_queued_bytes"),
     ("INGESTD_INGEST__MAX_PAYLOAD_BYTES", "8", "ingest.max_payload_bytes"),
     ("INGESTD_INGEST__SOURCES", "[]", "ingest.sources"),
     ("INGESTD_INGEST__SOURCES", '[{"topic": "a/+", "template": "a/{nope}"}]', "ingest.sources"),
     ("INGESTD_INGEST__SOURCES", '[{"topic": "a/+/+", "template": "a/{device_id}"}]',
      "ingest.sources"),
     ("INGESTD_INGEST__SOURCES", '[{"format": "xml"}]', "ingest.sources.0.format"),
     ("INGESTD_LOG__LEVEL", "LOUD", "log.level"),
     ("INGESTD_DAEMON__SHUTDOWN_TIMEOUT_SECONDS", "-1", "daemon.shutdown_timeout_seconds")],
)  # fmt: skip
def test_invalid_values_name_the_key(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, key: str
) -> None:
    monkeypatch.setenv(name, value)
    message = config_error()
    assert message.startswith("invalid configuration")
    assert f"  {key}" in message


def test_config_error_is_an_ingestd_error() -> None:
    with pytest.raises(IngestdError):
        load_config(mqtt={"url": "http://nope"})


def test_every_source_format_has_a_decoder() -> None:
    assert set(get_args(Format)) == set(DECODERS)


def test_source_parsed_template_reads_the_topic() -> None:
    source = SourceConfig(topic="plant/+/+/#", template="plant/{site}/{device_id}/#")
    assert source.parsed_template.match("plant/berlin/d1/x/y") == {
        "site": "berlin",
        "device_id": "d1",
    }
    assert SourceConfig().parsed_template.match("sensors/d1/s1") == {
        "device_id": "d1", "sensor_id": "s1",
    }  # fmt: skip


def test_invalid_value_in_file_names_key_and_file(tmp_path: Path) -> None:
    path = toml(tmp_path, '[mqtt]\nkeepalive_seconds = "often"\n')
    message = config_error(path)
    assert "mqtt.keepalive_seconds" in message
    assert str(path) in message


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = toml(tmp_path, "[mqtt\nurl = ")
    assert str(path) in config_error(path)


def test_missing_config_file(tmp_path: Path) -> None:
    assert "does not exist" in config_error(tmp_path / "missing.toml")


# ------------------------------------------------------------------------------ secrets


def test_mqtt_password_file_absolute(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt.pw"
    secret.write_text("s3cret\n", encoding="utf-8")
    config = load_config(mqtt={"username": "ingest", "password_file": str(secret)})
    assert config.mqtt.password is not None
    assert config.mqtt.password.get_secret_value() == "s3cret"  # trailing newline stripped


def test_password_file_relative_to_credentials_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-systemd", encoding="utf-8")
    (creds / "db-password").write_text("p@ss:w/rd%", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("INGESTD_MQTT__PASSWORD_FILE", "mqtt-password")
    monkeypatch.setenv(
        "INGESTD_DATABASE__URL", "postgresql://ingest@db.example:5433/plant?sslmode=require"
    )
    monkeypatch.setenv("INGESTD_DATABASE__PASSWORD_FILE", "db-password")
    config = load_config()
    assert config.mqtt.password is not None
    assert config.mqtt.password.get_secret_value() == "from-systemd"
    # The password is percent-encoded into the URL; host, port, path and query survive.
    assert config.database_url == (
        "postgresql://ingest:p%40ss%3Aw%2Frd%25@db.example:5433/plant?sslmode=require"
    )


def test_missing_password_file_is_a_config_error(tmp_path: Path) -> None:
    message = config_error(mqtt={"password_file": str(tmp_path / "nope")})
    assert "mqtt" in message
    assert "cannot read secret file" in message
    assert str(tmp_path / "nope") in message


def test_password_and_password_file_together(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("x", encoding="utf-8")
    assert "not both" in config_error(mqtt={"password": "y", "password_file": str(secret)})


def test_database_password_file_needs_postgres(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("x", encoding="utf-8")
    assert "needs a postgresql" in config_error(database={"password_file": str(secret)})


def test_database_password_file_with_ipv6_host(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("pw", encoding="utf-8")
    config = load_config(
        database={"url": "postgresql://u@[::1]:5432/db", "password_file": str(secret)}
    )
    assert config.database_url == "postgresql://u:pw@[::1]:5432/db"


# ------------------------------------------------------------------------------ masking


def test_masked_hides_every_secret(tmp_path: Path) -> None:
    secret = tmp_path / "db.pw"
    secret.write_text("db-secret", encoding="utf-8")
    config = load_config(
        mqtt={"username": "ingest", "password": "mqtt-secret"},
        database={"url": "postgresql://ingest@db:5432/plant", "password_file": str(secret)},
    )
    data = masked(config)
    text = json.dumps(data)
    assert "mqtt-secret" not in text
    assert "db-secret" not in text
    assert data["mqtt"]["password"] == MASK
    assert data["mqtt"]["username"] == "ingest"
    assert data["database"]["url"] == f"postgresql://ingest:{MASK}@db:5432/plant"
    assert data["daemon"]["state_dir"] == "var"


def test_masked_database_url_with_inline_password_and_default_sqlite(clean_env: Path) -> None:
    config = load_config(database={"url": "postgresql://u:hunter2@db/plant"})
    assert masked(config)["database"]["url"] == f"postgresql://u:{MASK}@db/plant"
    plain = masked(load_config())
    assert plain["database"]["url"] == f"sqlite:///{clean_env / 'var' / 'ingestd.db'}"
    assert plain["mqtt"]["password"] is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [("postgresql://u:p@h/db", f"postgresql://u:{MASK}@h/db"),
     ("postgresql://p:p@h:5432/db", f"postgresql://p:{MASK}@h:5432/db"),
     ("postgresql://u@h/db", "postgresql://u@h/db"),
     ("sqlite:////var/lib/ingestd/ingestd.db", "sqlite:////var/lib/ingestd/ingestd.db")],
)  # fmt: skip
def test_mask_url(url: str, expected: str) -> None:
    assert mask_url(url) == expected


def test_config_is_frozen() -> None:
    config = load_config()
    with pytest.raises(ValidationError, match="frozen"):
        config.mqtt.url = "mqtt://x:1"  # type: ignore[misc]
    assert isinstance(config, Config)


def test_credentials_in_the_mqtt_url_are_used_and_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("INGESTD_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("INGESTD_MQTT__URL", "mqtt://ingestd:s3cret@broker.example:1883")
    config = load_config(None)
    assert config.mqtt.username == "ingestd"
    assert config.mqtt.password is not None
    assert config.mqtt.password.get_secret_value() == "s3cret"
    shown = masked(config)
    assert "s3cret" not in str(shown)
    assert shown["mqtt"]["url"] == f"mqtt://ingestd:{MASK}@broker.example:1883"


def test_tls_files_must_be_readable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INGESTD_MQTT__TLS__CA_FILE", str(tmp_path / "missing.pem"))
    with pytest.raises(
        ConfigError, match=r"mqtt.tls.ca_file: .*missing.pem is not a readable file"
    ):
        load_config()
