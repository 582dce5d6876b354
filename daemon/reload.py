"""SIGHUP: what a reload may change while running, what needs a restart, and applying it.

``ingestd run`` re-reads its config file (and the INGESTD_* environment) on SIGHUP
(``systemctl reload ingestd``). An invalid file changes nothing: the running config
stays and the log says why.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from agents.registry import DeviceRegistry, RegistryError
from daemon.config import Config, ConfigError, load_config
from daemon.logs import setup_logging
from daemon.wiring import Daemon, build_routes, event_settings, file_registry

__all__ = ["LIVE", "RECONNECT", "RESTART", "changes", "needs_reconnect", "reload"]

log = logging.getLogger("ingestd")

# Applied at once: log level and format, the registry, validation limits and sources,
# outbound events.
LIVE = ("log", "ingest", "publish")
# Applied by reconnecting to the broker: the MQTT connection itself, and the subscriptions
# the sources make.
RECONNECT = ("mqtt",)
# Held by open files, sockets and pools: kept until the next restart.
RESTART = ("database", "spool", "metrics", "daemon", "sparkplug", "anomaly")


def changes(old: Config, new: Config) -> dict[str, list[str]]:
    """Changed keys per section, e.g. {"mqtt": ["url"], "log": ["level"]}."""
    out: dict[str, list[str]] = {}
    for section in type(old).model_fields:
        before: Any = getattr(old, section)
        after: Any = getattr(new, section)
        if before == after:
            continue
        keys = [
            key for key in type(before).model_fields if getattr(before, key) != getattr(after, key)
        ]
        out[section] = keys
    return out


def needs_reconnect(changed: dict[str, list[str]]) -> bool:
    """Broker settings, or sources (their topic filters are the subscriptions)."""
    return (
        "mqtt" in changed
        or "sources" in changed.get("ingest", [])
        or (
            "prefix" in changed.get("publish", [])  # the status topic and the will
        )
    )


async def reload(daemon: Daemon, config_file: Path | None, device_table: DeviceRegistry) -> None:
    """Re-read the config: apply what can change live, reconnect where needed, and say
    what waits for a restart. An invalid config changes nothing."""
    try:
        new = load_config(config_file)
        registry = file_registry(new)
    except (ConfigError, RegistryError) as exc:
        log.error("reload refused, running config kept", extra={"error": str(exc)})  # noqa: TRY400
        return
    if bool(new.sparkplug_sources) != bool(daemon.config.sparkplug_sources):
        # The Sparkplug host is a connection of its own: opened or closed at start only.
        log.error(
            "reload refused: adding or removing every sparkplug source needs a restart",
            extra={"error": "sparkplug sources changed"},
        )
        return
    changed = changes(daemon.config, new)
    old = daemon.config
    setup_logging(new.log.level, new.log.format)
    limit = new.ingest.max_payload_bytes
    intake = daemon.intake
    routes = build_routes(
        new, intake.host_outbound, daemon.metrics.pipeline, daemon.validation.router
    )
    daemon.validation.reconfigure(routes, limit)
    daemon.persistence.max_payload_bytes = limit
    daemon.intake.budget.resize(
        daemon.config.mqtt.max_inflight_bytes, new.ingest.max_inflight_readings, limit
    )  # the byte budget is the broker connection's: it changes with a reconnect
    daemon.publisher.reconfigure(event_settings(new))
    # The registry file is read again even when its path did not change (its content
    # may have), and the devices table is merged over it as at start-up.
    registry.merge(device_table)
    daemon.registry = daemon.enrichment.registry = registry
    if daemon.anomaly is not None:  # names the limits in out_of_range alerts
        daemon.anomaly.registry = registry
    daemon.metrics.pipeline.registry_devices.set(len(registry))
    pending = {s: keys for s, keys in changed.items() if s in RESTART}
    log.info(
        "config reloaded",
        extra={
            "changed": {s: k for s, k in changed.items() if s not in RESTART},
            "needs_restart": pending or None,
        },
    )
    # Keep reporting what actually runs for the sections that wait for a restart.
    daemon.config = new.model_copy(update={s: getattr(old, s) for s in pending})
    if needs_reconnect(changed):
        await daemon.intake.reconfigure(daemon.config)
