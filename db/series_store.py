"""What the anomaly detectors learned, kept in the state directory across restarts.

A SQLite file (``anomaly.db``, WAL) with one row per ``(device_id, sensor_id)``: the
series' snapshot as JSON bytes. Written in batches (the series that changed since the
last save) on a thread of its own; a file that cannot be read is moved aside and the
detectors learn again, as they would on a new host.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from db.local_files import move_aside, open_checked
from db.thread import DedicatedThread
from edge.errors import IngestdError

__all__ = ["SeriesStore", "SeriesStoreError"]

log = logging.getLogger("ingestd.anomaly")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    device_id TEXT NOT NULL,
    sensor_id TEXT NOT NULL,
    state BLOB NOT NULL,
    PRIMARY KEY (device_id, sensor_id)
)
"""

_DELETE = "DELETE FROM series WHERE device_id = ? AND sensor_id = ?"

SeriesKey = tuple[str, str]


class SeriesStoreError(IngestdError):
    """The state file cannot be written (a full disk, permissions)."""


class SeriesStore:
    """Series snapshots on local disk, saved and loaded off the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = DedicatedThread("ingestd-anomaly")
        self._conn: sqlite3.Connection | None = None

    async def load(self, limit: int) -> dict[SeriesKey, bytes]:
        """Up to ``limit`` saved series (the most recently saved first)."""
        return await self._thread.call(self._load, limit)

    async def save(self, changed: dict[SeriesKey, bytes], forgotten: Iterable[SeriesKey]) -> None:
        """Replace the rows of ``changed`` and delete ``forgotten``, in one transaction."""
        await self._thread.call(self._save, changed, list(forgotten))

    async def close(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._thread.call(close)
        self._thread.close()

    def _open(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._conn = _connect(self.path)
            except sqlite3.DatabaseError as exc:
                self._move_aside(exc)
                self._conn = _connect(self.path)
        return self._conn

    def _move_aside(self, exc: Exception) -> None:
        target = move_aside(self.path)
        log.error(
            "anomaly state unreadable, moved aside; detectors relearn",
            extra={"file": str(target), "error": str(exc)},
        )

    def _load(self, limit: int) -> dict[SeriesKey, bytes]:
        try:
            rows = self._open().execute(
                "SELECT device_id, sensor_id, state FROM series ORDER BY rowid DESC LIMIT ?",
                (limit,),
            )
            return {(device, sensor): bytes(state) for device, sensor, state in rows}
        except sqlite3.Error as exc:
            raise SeriesStoreError(f"cannot read {self.path}: {exc}") from exc

    def _save(self, changed: dict[SeriesKey, bytes], forgotten: list[SeriesKey]) -> None:
        try:
            conn = self._open()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "DELETE FROM series WHERE device_id = ? AND sensor_id = ?", forgotten
                )
                # Delete then insert: the newest rows get the highest rowids (load order).
                conn.executemany(
                    "DELETE FROM series WHERE device_id = ? AND sensor_id = ?", list(changed)
                )
                conn.executemany(
                    "INSERT INTO series (device_id, sensor_id, state) VALUES (?, ?, ?)",
                    [(device, sensor, state) for (device, sensor), state in changed.items()],
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise SeriesStoreError(f"cannot write {self.path}: {exc}") from exc


def _connect(path: Path) -> sqlite3.Connection:
    # NORMAL: learned state, not data; a save lost in a power cut is relearned.
    return open_checked(path, _SCHEMA, "NORMAL")
