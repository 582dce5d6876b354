"""Reading mosquitto config files in tests: settings by name, and its duration syntax."""

from __future__ import annotations

import re


def settings(text: str) -> dict[str, list[str]]:
    """Every setting's values, in file order (a key may repeat, e.g. ``listener``)."""
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            found.setdefault(key, []).append(value.strip())
    return found


def duration_seconds(value: str) -> int:
    """mosquitto's persistent_client_expiration syntax: an integer and one of h d w m y."""
    units = {"h": 3600, "d": 86400, "w": 7 * 86400, "m": 30 * 86400, "y": 365 * 86400}
    match = re.fullmatch(r"(\d+)([hdwmy])", value)
    assert match, f"not a mosquitto duration: {value!r}"
    return int(match.group(1)) * units[match.group(2)]
