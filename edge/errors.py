"""The root of every error ingestd raises on purpose (as aiomqtt has ``MqttError``)."""

from __future__ import annotations

__all__ = ["IngestdError"]


class IngestdError(Exception):
    """Base of ingestd's own exceptions; anything else reaching the supervisor is a bug."""
