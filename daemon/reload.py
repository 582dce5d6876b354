"""What a SIGHUP reload may change while running, and what needs a restart.

``ingestd run`` re-reads its config file (and the INGESTD_* environment) on SIGHUP
(``systemctl reload ingestd``). An invalid file changes nothing: the running config
stays and the log says why.
"""

from __future__ import annotations

from typing import Any

from daemon.config import Config

# Applied at once: log level and format, the registry, validation limits and sources,
# outbound events.
LIVE = ("log", "ingest", "publish")
# Applied by reconnecting to the broker: the MQTT connection itself, and the subscriptions
# the sources make.
RECONNECT = ("mqtt",)
# Held by open files, sockets and pools: kept until the next restart.
RESTART = ("database", "spool", "metrics", "daemon")


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
