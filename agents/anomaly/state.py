"""Typed reading of a detector snapshot: plain JSON data checked field by field, so a
corrupt or foreign snapshot fails with a message that names the field, not deep inside math."""

from __future__ import annotations

import math
from collections.abc import Mapping

from edge.errors import IngestdError

__all__ = ["SnapshotError", "SnapshotReader"]


class SnapshotError(IngestdError, ValueError):
    """A snapshot that cannot be restored; the message names the field."""


def _number(raw: object, what: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise SnapshotError(f"snapshot field {what} must be a finite number, got {raw!r:.40}")
    return float(raw)


def _count(raw: object, what: str) -> int:
    if type(raw) is not int or raw < 0:
        raise SnapshotError(f"snapshot field {what} must be an integer >= 0, got {raw!r:.40}")
    return raw


def _items(raw: object, what: str, length: int | None, at_most: int | None = None) -> list[object]:
    if not isinstance(raw, list | tuple):
        raise SnapshotError(f"snapshot field {what} must be a list, got {type(raw).__name__}")
    if length is not None and len(raw) != length:
        raise SnapshotError(f"snapshot field {what} must have {length} items, has {len(raw)}")
    if at_most is not None and len(raw) > at_most:
        raise SnapshotError(f"snapshot field {what} has {len(raw)} items, at most {at_most}")
    return list(raw)


class SnapshotReader:
    """Fields of one snapshot, each checked for its type (and length) as it is read."""

    def __init__(self, state: Mapping[str, object], version: int) -> None:
        if not isinstance(state, Mapping):
            raise SnapshotError(f"a snapshot is a mapping, got {type(state).__name__}")
        self._state = state
        if state.get("version") != version:
            raise SnapshotError(f"unsupported snapshot version {state.get('version')!r:.40}")

    def _get(self, key: str) -> object:
        try:
            return self._state[key]
        except KeyError:
            raise SnapshotError(f"snapshot field {key} is missing") from None

    def mapping(self, key: str) -> Mapping[str, object]:
        raw = self._get(key)
        if not isinstance(raw, Mapping):
            raise SnapshotError(f"snapshot field {key} must be a mapping")
        return raw

    def number(self, key: str) -> float:
        return _number(self._get(key), key)

    def optional_number(self, key: str) -> float | None:
        raw = self._get(key)
        return None if raw is None else _number(raw, key)

    def count(self, key: str) -> int:
        return _count(self._get(key), key)

    def optional_count(self, key: str) -> int | None:
        raw = self._get(key)
        return None if raw is None else _count(raw, key)

    def numbers(self, key: str, length: int | None, at_most: int | None = None) -> list[float]:
        items = _items(self._get(key), key, length, at_most)
        return [_number(item, key) for item in items]

    def counts(self, key: str, length: int) -> list[int]:
        return [_count(item, key) for item in _items(self._get(key), key, length)]

    def number_rows(self, key: str, sizes: tuple[int, ...]) -> list[list[float]]:
        rows = _items(self._get(key), key, len(sizes))
        return [
            [_number(x, key) for x in _items(row, key, size)]
            for row, size in zip(rows, sizes, strict=True)
        ]

    def count_rows(self, key: str, sizes: tuple[int, ...]) -> list[list[int]]:
        rows = _items(self._get(key), key, len(sizes))
        return [
            [_count(x, key) for x in _items(row, key, size)]
            for row, size in zip(rows, sizes, strict=True)
        ]

    def views(self, key: str, names: str) -> dict[str, tuple[int, float, float]]:
        """``{view: [count, scale, select]}`` for views named by one letter of ``names``."""
        views: dict[str, tuple[int, float, float]] = {}
        for name, raw in self.mapping(key).items():
            if name not in names:
                raise SnapshotError(f"snapshot field {key} has an unknown view {name!r:.10}")
            count, scale, select = _items(raw, f"{key}.{name}", 3)
            what = f"{key}.{name}"
            views[name] = (_count(count, what), _number(scale, what), _number(select, what))
        return views

    def choice(self, key: str, allowed: Mapping[str, object]) -> str | None:
        """None, or one of the keys of ``allowed``."""
        raw = self._get(key)
        if raw is not None and (not isinstance(raw, str) or raw not in allowed):
            raise SnapshotError(f"snapshot field {key} names no known view: {raw!r:.20}")
        return raw

    def records(self, key: str, at_most: int) -> list[tuple[int, float]]:
        """``[[index, score], ...]`` of the record filter."""
        pairs = [_items(raw, key, 2) for raw in _items(self._get(key), key, None, at_most)]
        return [(_count(i, key), _number(s, key)) for i, s in pairs]
