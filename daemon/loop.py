"""The event loop ingestd runs on: uvloop when installed (measured faster for the MQTT hot
path), asyncio's own otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["run_async"]


def run_async(factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run the coroutine ``factory()`` makes to completion on a new loop."""
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError:
        asyncio.run(factory())
    else:
        uvloop.run(factory())
