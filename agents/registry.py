"""The device registry enrichment reads: a TOML or CSV file plus rows of the ``devices`` table.

A row is keyed by (device_id, sensor_id); ``sensor_id = "*"`` holds the device's defaults,
which a sensor's own row overrides field by field.
"""

from __future__ import annotations

import csv
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from agents.cache import BoundedCache
from edge.errors import IngestdError

ANY_SENSOR = "*"


class RegistryError(IngestdError):
    """The registry file cannot be read; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What the registry knows about one sensor of one device."""

    site: str | None = None
    area: str | None = None
    line: str | None = None
    asset: str | None = None
    sensor_type: str | None = None
    unit: str | None = None
    min_value: float | None = None
    max_value: float | None = None

    def merged_over(self, base: DeviceInfo) -> DeviceInfo:
        """This row's fields where set, ``base``'s elsewhere."""
        changes = {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }
        return replace(base, **changes)


_FIELDS = {f.name for f in fields(DeviceInfo)}
_NUMERIC = {"min_value", "max_value"}


class DeviceRegistry:
    """Lookup of (device_id, sensor_id) → DeviceInfo, with device-level defaults."""

    def __init__(self, rows: Iterable[Mapping[str, Any]] = ()) -> None:
        self._rows: dict[tuple[str, str], DeviceInfo] = {}
        self._resolved: BoundedCache[tuple[str, str], DeviceInfo | None] = BoundedCache(100_000)
        self.add(rows)

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Add rows (later rows override earlier ones for the same key)."""
        for row in rows:
            if not row.get("device_id"):
                raise RegistryError(f"registry row without a device_id: {dict(row)!r}"[:200])
            device_id = str(row["device_id"])
            sensor_id = str(row.get("sensor_id") or ANY_SENSOR)
            self._rows[(device_id, sensor_id)] = _info(row, f"{device_id}/{sensor_id}")
        self._resolved.clear()

    def merge(self, other: DeviceRegistry) -> None:
        """Take every row of ``other``, overriding rows with the same key."""
        self._rows.update(other._rows)
        self._resolved.clear()

    def __len__(self) -> int:
        return len({device for device, _ in self._rows})

    def lookup(self, device_id: str, sensor_id: str) -> DeviceInfo | None:
        key = (device_id, sensor_id)
        try:
            return self._resolved[key]
        except KeyError:
            pass
        device = self._rows.get((device_id, ANY_SENSOR))
        sensor = self._rows.get(key)
        info = sensor.merged_over(device) if sensor and device else sensor or device
        return self._resolved.put(key, info)


def _info(row: Mapping[Any, Any], where: str) -> DeviceInfo:
    if None in row:  # csv.DictReader's key for cells beyond the header
        raise RegistryError(f"{where}: a row has more cells than the header has columns")
    unknown = {str(key) for key in row} - _FIELDS - {"device_id", "sensor_id", "updated_at"}
    if unknown:
        raise RegistryError(f"{where}: unknown registry fields {sorted(unknown)}")
    values: dict[str, Any] = {}
    for name in _FIELDS:
        raw = row.get(name)
        if raw is None or raw == "":
            continue
        if name in _NUMERIC:
            try:
                number = float(raw)
            except (TypeError, ValueError):
                raise RegistryError(f"{where}: {name} must be a number, got {raw!r}") from None
            if not math.isfinite(number):
                raise RegistryError(f"{where}: {name} must be finite")
            values[name] = number
        else:
            values[name] = str(raw)
    return DeviceInfo(**values)


def load_registry_file(path: Path) -> list[dict[str, Any]]:
    """Registry rows from TOML (``[[devices]]``, optional ``[devices.sensors.X]``) or CSV."""
    try:
        if path.suffix.lower() == ".csv":
            # utf-8-sig: spreadsheet exports start with a byte-order mark.
            with path.open(newline="", encoding="utf-8-sig") as handle:
                return [dict(row) for row in csv.DictReader(handle)]
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, csv.Error) as exc:
        raise RegistryError(f"registry {path}: {exc}") from None
    devices = document.get("devices", [])
    if not isinstance(devices, list):
        raise RegistryError(f"registry {path}: 'devices' must be an array of tables ([[devices]])")
    rows: list[dict[str, Any]] = []
    for device in devices:
        if not isinstance(device, dict) or "device_id" not in device:
            raise RegistryError(f"registry {path}: every [[devices]] entry needs a device_id")
        sensors = device.pop("sensors", {})
        if not isinstance(sensors, dict) or not all(isinstance(s, dict) for s in sensors.values()):
            raise RegistryError(
                f"registry {path}: {device['device_id']}: sensors must be tables "
                "([devices.sensors.NAME])"
            )
        rows.append({**device, "sensor_id": ANY_SENSOR})
        for sensor_id, sensor in sensors.items():
            rows.append({**sensor, "device_id": device["device_id"], "sensor_id": sensor_id})
    for row in rows:  # accept the short names min/max in files
        for short, full in (("min", "min_value"), ("max", "max_value")):
            if short in row:
                row[full] = row.pop(short)
    return rows
