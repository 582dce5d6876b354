"""The one typed configuration: TOML file overridden by ``INGESTD_<SECTION>__<KEY>`` env vars.

Resolved once at start (``load_config``); anything invalid raises ``ConfigError`` with a
message meant for the operator. Unknown keys are errors at every level, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from daemon.config_anomaly import AnomalyConfig
from daemon.config_sections import (
    DaemonConfig,
    DatabaseConfig,
    Format,
    IngestConfig,
    LogConfig,
    MetricsConfig,
    MqttConfig,
    PublishConfig,
    SourceConfig,
    SparkplugConfig,
    SpoolConfig,
    TlsConfig,
)
from edge.errors import IngestdError

__all__ = [
    "AnomalyConfig",
    "Config",
    "ConfigError",
    "DaemonConfig",
    "DatabaseConfig",
    "Format",
    "IngestConfig",
    "LogConfig",
    "MetricsConfig",
    "MqttConfig",
    "PublishConfig",
    "SourceConfig",
    "SparkplugConfig",
    "SpoolConfig",
    "TlsConfig",
    "load_config",
    "mask_url",
    "masked",
]

DEFAULT_CONFIG_FILE = Path("/etc/ingestd/ingestd.toml")
MASK = "**********"


class ConfigError(IngestdError):
    """The configuration cannot be used; the message says why, for the operator."""


class Config(BaseSettings):
    """Everything ingestd can be told, with defaults that need no configuring."""

    model_config = SettingsConfigDict(
        env_prefix="INGESTD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    mqtt: MqttConfig = MqttConfig()
    ingest: IngestConfig = IngestConfig()
    database: DatabaseConfig = DatabaseConfig()
    spool: SpoolConfig = SpoolConfig()
    publish: PublishConfig = PublishConfig()
    metrics: MetricsConfig = MetricsConfig()
    sparkplug: SparkplugConfig = SparkplugConfig()
    anomaly: AnomalyConfig = AnomalyConfig()
    log: LogConfig = LogConfig()
    daemon: DaemonConfig = DaemonConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = settings_cls.model_config.get("toml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @property
    def state_dir(self) -> Path:
        if self.daemon.state_dir is not None:
            return self.daemon.state_dir
        systemd_state = os.environ.get("STATE_DIRECTORY")
        if systemd_state:
            return Path(systemd_state.split(":")[0])
        return Path("var")

    @property
    def database_url(self) -> str:
        """The configured database, or the embedded SQLite file in the state directory."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.state_dir / 'ingestd.db').absolute()}"

    @property
    def spool_path(self) -> Path:
        return self.spool.path or self.state_dir / "spool.db"

    @model_validator(mode="after")
    def _sparkplug_in_order(self) -> Config:
        if self.mqtt.shared_group and self.sparkplug_sources:
            raise ValueError(
                "a sparkplug source cannot be subscribed through mqtt.shared_group: a shared"
                " subscription splits each edge node's messages across instances, and the host"
                " needs them in order (seq, aliases, deaths). To scale Sparkplug out, give each"
                ' instance its own groups instead, e.g. topic = "spBv1.0/line1/#" on one and'
                ' "spBv1.0/line2/#" on another, each with its own sparkplug.host_id'
            )
        return self

    @property
    def sparkplug_sources(self) -> list[SourceConfig]:
        """The sources the Sparkplug host connection subscribes to."""
        return [source for source in self.ingest.sources if source.format == "sparkplug"]

    @property
    def subscriptions(self) -> list[str]:
        """What the persistent-session connection subscribes to (all but Sparkplug)."""
        prefix = f"$share/{self.mqtt.shared_group}/" if self.mqtt.shared_group else ""
        return [
            prefix + source.topic for source in self.ingest.sources if source.format != "sparkplug"
        ]


def load_config(path: Path | None = None, **overrides: Any) -> Config:
    """Resolve the configuration once: defaults < TOML file < environment < overrides."""
    if path is None and DEFAULT_CONFIG_FILE.exists():
        path = DEFAULT_CONFIG_FILE
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    _check_environment()
    settings_cls: type[Config] = Config
    if path is not None:
        settings_cls = type(
            "FileConfig", (Config,), {"model_config": {**Config.model_config, "toml_file": path}}
        )
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, path)) from None
    except (ValueError, OSError) as exc:  # malformed TOML surfaces as ValueError
        raise ConfigError(f"{path}: {exc}") from None


def _check_environment() -> None:
    # pydantic-settings ignores INGESTD_* variables that name no section (INGESTD_NOPE,
    # or INGESTD_MQTT_URL with one underscore): a typo must not silently use a default.
    sections = set(Config.model_fields)
    for name in os.environ:
        if name.upper().startswith("INGESTD_"):
            section = name[len("INGESTD_") :].split("__", 1)[0].lower()
            if section not in sections:
                raise ConfigError(
                    f"unknown environment variable {name}: expected INGESTD_<SECTION>__<KEY> "
                    f"with a section among {', '.join(sorted(sections))}"
                )


def _explain(exc: ValidationError, path: Path | None) -> str:
    where = f"in {path} or INGESTD_* environment" if path else "in INGESTD_* environment"
    lines = [f"invalid configuration ({where}):"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def masked(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data, every secret replaced by a mask."""
    data = config.model_dump(mode="json")
    for section in data.values():
        if isinstance(section, dict) and section.get("password"):
            section["password"] = MASK
    data["database"]["url"] = mask_url(config.database_url)
    data["mqtt"]["url"] = mask_url(config.mqtt.url)
    data["daemon"]["state_dir"] = str(config.state_dir)
    return data


def mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", f":{MASK}@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
