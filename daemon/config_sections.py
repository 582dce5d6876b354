"""The sections of the configuration: one pydantic model per ``[section]`` of the TOML file.

Unknown keys are errors in every section (``extra="forbid"``); values are checked where
they are declared, so ``load_config`` (in ``daemon.config``) reports every mistake at once.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from edge.topics import TopicTemplate

__all__ = [
    "DaemonConfig",
    "DatabaseConfig",
    "Format",
    "IngestConfig",
    "LogConfig",
    "MetricsConfig",
    "MqttConfig",
    "PublishConfig",
    "Section",
    "SourceConfig",
    "SparkplugConfig",
    "SpoolConfig",
    "TlsConfig",
]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _read_secret(path: Path) -> str:
    """Read a secret file; relative paths resolve in systemd's ``$CREDENTIALS_DIRECTORY``."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not path.is_absolute() and creds:
        path = Path(creds) / path
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from exc


class TlsConfig(Section):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = Field(default=False, description="skip hostname checks (testing only)")

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not os.access(value, os.R_OK):
            raise ValueError(f"{value} is not a readable file")
        return value


class MqttConfig(Section):
    url: str = "mqtt://127.0.0.1:1883"
    client_id: str = Field(default_factory=lambda: f"ingestd-{socket.gethostname()}")
    # v3.1.1 with clean_session=False gives the same persistent session as v5 on mosquitto,
    # and paho's v5 receive path builds a properties object per message (measured: the
    # largest single per-message cost), so 3.1.1 is the default.
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    shared_group: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    tls: TlsConfig = TlsConfig()
    keepalive_seconds: int = Field(default=30, ge=5, le=3600)
    # The unacknowledged in-flight window the daemon enforces itself (and advertises as
    # Receive Maximum on v5). Size mosquitto's max_inflight_messages to match. Throughput
    # is at most window / (receipt-to-commit time), so a WAN database needs a large one.
    max_inflight: int = Field(default=4000, ge=1, le=65535)
    # ... and the payload bytes those messages may carry together (reads pause when full;
    # room is kept for one more payload of ingest.max_payload_bytes). Match mosquitto's
    # max_inflight_bytes to it.
    max_inflight_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    session_expiry_seconds: int = Field(default=7 * 24 * 3600, ge=0)
    subscribe_qos: Literal[0, 1] = 1
    # SUBACK queues behind a persistent session's backlog, so this must be generous.
    subscribe_timeout_seconds: float = Field(default=300.0, gt=0)
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    reconnect_min_seconds: float = Field(default=0.5, gt=0)
    reconnect_max_seconds: float = Field(default=30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"mqtt", "mqtts"} or not parts.hostname:
            raise ValueError("must look like mqtt://host:port or mqtts://host:port")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from exc
        return value

    @field_validator("shared_group")
    @classmethod
    def _check_group(cls, value: str | None) -> str | None:
        if value and re.search(r"[/+#]", value):
            raise ValueError("must be a name without '/', '+' or '#'")
        return value or None  # empty means no shared subscription

    @model_validator(mode="after")
    def _resolve_password(self) -> MqttConfig:
        parts = urlsplit(self.url)
        if parts.username and self.username is None:  # mqtt://user:password@host
            object.__setattr__(self, "username", parts.username)
            if parts.password and self.password is None and self.password_file is None:
                object.__setattr__(self, "password", SecretStr(parts.password))
        if self.password_file is not None:
            if self.password is not None:
                raise ValueError("set password or password_file, not both")
            object.__setattr__(self, "password", SecretStr(_read_secret(self.password_file)))
        return self

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def use_tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"


Format = Literal["json", "value", "sparkplug"]


class SourceConfig(Section):
    """One inbound subscription: an MQTT filter, its payload format and its topic template."""

    topic: str = "sensors/+/+"
    format: Format = "json"
    template: str = "sensors/{device_id}/{sensor_id}"

    @model_validator(mode="after")
    def _check_template(self) -> SourceConfig:
        TopicTemplate.parse(self.template, self.topic)  # raises ValueError with the reason
        return self

    @property
    def parsed_template(self) -> TopicTemplate:
        return TopicTemplate.parse(self.template, self.topic)


class IngestConfig(Section):
    max_payload_bytes: int = Field(default=64 * 1024, ge=16, le=256 * 1024 * 1024)
    # Decoded readings in flight, from validation until their events are out: arrays and
    # Sparkplug payloads carry hundreds each, so the message window alone bounds nothing.
    max_inflight_readings: int = Field(default=50_000, ge=1)
    sources: tuple[SourceConfig, ...] = (SourceConfig(),)
    # Device registry used for enrichment (TOML or CSV); rows in the `devices` table add to it.
    registry_file: Path | None = None

    @field_validator("sources")
    @classmethod
    def _non_empty(cls, value: tuple[SourceConfig, ...]) -> tuple[SourceConfig, ...]:
        if not value:
            raise ValueError("at least one source is needed")
        return value


class DatabaseConfig(Section):
    url: str | None = Field(default=None, description="postgresql://... or sqlite:///path")
    password_file: Path | None = None
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    # Batches written at once, each on its own connection: hides the database's round
    # trips (a WAN link) behind each other. Acks still leave in receive order.
    batches_in_flight: int = Field(default=4, ge=1, le=32)
    command_timeout_seconds: float = Field(default=15.0, gt=0)
    connect_timeout_seconds: float = Field(default=10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        scheme = urlsplit(value).scheme
        if scheme not in {"postgresql", "postgres", "sqlite"}:
            raise ValueError("must start with postgresql:// or sqlite:///")
        if scheme == "sqlite" and not value.startswith("sqlite:///"):
            raise ValueError("a SQLite URL is sqlite:///relative/path or sqlite:////absolute/path")
        return value

    @model_validator(mode="after")
    def _resolve_password(self) -> DatabaseConfig:
        if self.password_file is not None:
            if self.url is None or not self.url.startswith("postgres"):
                raise ValueError("password_file needs a postgresql:// url")
            parts = urlsplit(self.url)
            user = parts.username or ""
            host = parts.hostname or ""
            netloc = f"{quote(user, safe='')}:{quote(_read_secret(self.password_file), safe='')}"
            host = f"[{host}]" if ":" in host else host
            netloc += f"@{host}" + (f":{parts.port}" if parts.port else "")
            object.__setattr__(self, "url", urlunsplit(parts._replace(netloc=netloc)))
        return self


class SpoolConfig(Section):
    """The local store-and-forward spool used while PostgreSQL is unreachable."""

    max_bytes: int = Field(default=1024**3, ge=4096)
    path: Path | None = Field(default=None, description="default: spool.db in the state dir")


class PublishConfig(Section):
    prefix: str = "ingestd"
    processed: bool = True
    processed_qos: Literal[0, 1] = 0
    failed_qos: Literal[0, 1] = 1
    alerts_qos: Literal[0, 1] = 1  # AnomalyDetected and MaintenanceTask events
    # Outbound events wait here while the broker is away; beyond it they are counted as dropped
    # (the stored row or rejection remains the record).
    max_queued: int = Field(default=10_000, ge=1)
    # ... and the bytes of QoS 1 events (failed events carry the payload) awaiting the broker.
    max_queued_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)


class MetricsConfig(Section):
    listen: str = "127.0.0.1:9108"

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        _, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be host:port, e.g. 127.0.0.1:9108 (port 0 picks a free one)")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]") or "0.0.0.0"

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class SparkplugConfig(Section):
    """ingestd as a Sparkplug B 3.0 Host Application (sources with format = "sparkplug")."""

    host_id: str = "ingestd"  # its STATE topic: spBv1.0/STATE/{host_id}
    rebirth_cooldown_seconds: float = Field(default=5.0, ge=0)

    @field_validator("host_id")
    @classmethod
    def _check_host_id(cls, value: str) -> str:
        if not value or re.search(r"[/+#]", value):
            raise ValueError("must be a non-empty name without '/', '+' or '#'")
        return value


class LogConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "text"] = "auto"


class DaemonConfig(Section):
    state_dir: Path | None = None
    # Must stay below systemd's TimeoutStopSec.
    shutdown_timeout_seconds: float = Field(default=8.0, gt=0, le=600)
    inbox_size: int = Field(default=4096, ge=16)
    # An agent with work that has not progressed for this long fails the watchdog.
    stall_timeout_seconds: float = Field(default=60.0, gt=0)
